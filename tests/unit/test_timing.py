"""The server-timing trailer's syntax and the gateway's stage clock (serving/timing.py, client/timing.py)."""

from __future__ import annotations

import time

from triptych.client.timing import parse_server_timing
from triptych.serving.timing import StageClock, append, format_metrics


class FakeContext:
    """What `append` uses of a grpc.ServicerContext: the trailing metadata set so far."""

    def __init__(self, metadata=()):
        self.metadata = tuple(metadata)

    def trailing_metadata(self):
        return self.metadata

    def set_trailing_metadata(self, metadata):
        self.metadata = tuple(metadata)


def test_metrics_read_back_in_seconds_and_order():
    text = format_metrics({"encode": 0.0015, "encode-hop": 0.0002, "total": 0.25})
    assert text == "encode;dur=1.500, encode-hop;dur=0.200, total;dur=250.000"
    assert parse_server_timing([("server-timing", text)]) == {"encode": 0.0015, "encode-hop": 0.0002, "total": 0.25}


def test_parsing_skips_other_keys_and_metrics_without_a_duration():
    metadata = [("x-other", "total;dur=5"), ("server-timing", 'cache;desc="hit", total;dur=2.5')]
    assert parse_server_timing(metadata) == {"total": 0.0025}
    assert parse_server_timing(None) == {}


def test_append_keeps_other_trailers_and_adds_after_the_metrics_already_set():
    context = FakeContext([("x-request-id", "7"), ("server-timing", "encode;dur=1.000")])
    append(context, {"total": 0.002})
    assert context.metadata == (("x-request-id", "7"), ("server-timing", "encode;dur=1.000, total;dur=2.000"))


def test_stage_clock_sums_calls_per_stage_and_leaves_out_hops_it_cannot_know():
    clock = StageClock()
    clock.record("encode", 0.010, [("server-timing", "total;dur=7.000")])
    clock.record("denoise", 0.100, [("server-timing", "queue;dur=30.000, total;dur=95.000")])
    clock.record("denoise", 0.050, [("server-timing", "queue;dur=1.000, total;dur=46.000")])
    clock.record("decode", 0.020, [])  # a downstream that sends no trailer
    time.sleep(0.001)
    metrics = clock.metrics()
    assert list(metrics) == ["encode", "encode-hop", "denoise", "denoise-queue", "denoise-hop", "decode", "gateway"]
    assert abs(metrics["denoise-queue"] - 0.031) < 1e-9
    assert abs(metrics["encode-hop"] - 0.003) < 1e-9 and abs(metrics["denoise"] - 0.150) < 1e-9
    assert abs(metrics["denoise-hop"] - 0.009) < 1e-9
    assert metrics["gateway"] == 0.0  # the recorded calls took longer than the clock has run: never negative
