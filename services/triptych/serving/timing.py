"""The `server-timing` trailer: where a call's time went, in the W3C Server-Timing syntax.

Every call a Triptych process answers successfully ends with trailing metadata `server-timing`, e.g.
`total;dur=12.345`: milliseconds from the handler's start to its last response (request parsing and the
transport are outside it). The gateway puts its downstream calls in front, per stage (`encode`, `guide`,
`denoise`, `refine`, `decode`: summed over the calls of that stage, as the gateway saw them), each followed by its hop
(`encode-hop`: the part of those calls the downstream handler did not account for, that is the network,
(de)serialisation and gRPC's queueing at both ends), and `gateway` (the time outside any downstream call). The
denoiser also reports `queue` before its `total`: how long the job waited for its model's compute thread (behind
other jobs on the same model); the gateway relays it as `denoise-queue` and `refine-queue`. A downstream that
sends no trailer leaves its stage without a hop. Failed calls carry no trailer: their
trailing metadata is the error's. Callers read it with `triptych.client.server_timing`.
"""

from __future__ import annotations

import time
from collections import defaultdict

from triptych.client.timing import SERVER_TIMING, parse_server_timing


def format_metrics(metrics: dict[str, float]) -> str:
    """`name;dur=ms, ...` from seconds, in the given order."""
    return ", ".join(f"{name};dur={seconds * 1e3:.3f}" for name, seconds in metrics.items())


def append(context, metrics: dict[str, float]) -> None:
    """Adds `metrics` (seconds) to the call's `server-timing` trailer, after what is already there."""
    entries = list(context.trailing_metadata() or ())
    timing = [value for key, value in entries if key == SERVER_TIMING] + [format_metrics(metrics)]
    others = [(key, value) for key, value in entries if key != SERVER_TIMING]
    context.set_trailing_metadata([*others, (SERVER_TIMING, ", ".join(timing))])


class StageClock:
    """The gateway's side: how long each stage's downstream calls took, and what their handlers reported."""

    def __init__(self):
        self.started = time.perf_counter()
        self._observed: dict[str, float] = defaultdict(float)
        self._hops: dict[str, float] = defaultdict(float)
        self._queued: dict[str, float] = defaultdict(float)
        self._unreported: set[str] = set()

    def record(self, stage: str, observed_s: float, trailing_metadata) -> None:
        """One finished downstream call of `stage` that took `observed_s` here."""
        self._observed[stage] += observed_s
        reported = parse_server_timing(trailing_metadata)
        if "queue" in reported:
            self._queued[stage] += reported["queue"]
        if "total" not in reported:
            self._unreported.add(stage)
        else:
            self._hops[stage] += max(0.0, observed_s - reported["total"])

    def metrics(self) -> dict[str, float]:
        """stage, stage-queue (where the downstream reports one), stage-hop, ... then `gateway`: this call's time
        outside its downstream calls so far."""
        out: dict[str, float] = {}
        for stage, observed in self._observed.items():
            out[stage] = observed
            if stage in self._queued:
                out[f"{stage}-queue"] = self._queued[stage]
            if stage not in self._unreported:
                out[f"{stage}-hop"] = self._hops[stage]
        out["gateway"] = max(0.0, time.perf_counter() - self.started - sum(self._observed.values()))
        return out
