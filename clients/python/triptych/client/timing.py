"""Reading the `server-timing` trailer every successful Triptych call ends with (W3C Server-Timing syntax).

`total` is the handler's own time; a denoiser's also has `queue` (the wait for its model behind other jobs); a
gateway's Generate also names its stages (`encode`, `denoise`, `refine`, `decode`), the denoising stages' queue
(`denoise-queue`, ...), each stage's hop (`encode-hop`, ...: transport, (de)serialisation and gRPC's queueing)
and `gateway` (its time outside the downstream calls). The service docs (docs/decisions.md, Timing) say
exactly what each covers.

    call = client.stream(request)
    images = [event.image for event in call if event.HasField("image")]
    server_timing(call)  # {"encode": 0.0016, "encode-hop": 0.0004, ..., "total": 0.29} in seconds
"""

from __future__ import annotations

import re

SERVER_TIMING = "server-timing"
_METRIC = re.compile(r"\s*([A-Za-z0-9_.-]+)\s*(?:;\s*dur\s*=\s*([0-9.eE+-]+))?")


def parse_server_timing(metadata) -> dict[str, float]:
    """Seconds by metric name from trailing metadata (empty when it holds no `server-timing` entry)."""
    out: dict[str, float] = {}
    for key, value in metadata or ():
        if key != SERVER_TIMING:
            continue
        for item in value.split(","):
            match = _METRIC.match(item)
            if match and match.group(2) is not None:
                out[match.group(1)] = float(match.group(2)) / 1e3
    return out


def server_timing(call) -> dict[str, float]:
    """The timing trailer of a finished call: a streaming call once iterated to its end, or the call object of
    `stub.Method.with_call(...)`. Blocks until the call has ended."""
    return parse_server_timing(call.trailing_metadata())
