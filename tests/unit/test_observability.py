"""The parts of metrics and traces that need no process: connection age options, the work meter, model labels, the
trace id in log lines."""

from __future__ import annotations

import logging
import time

import grpc

from triptych.runtime.work_meter import WorkMeter
from triptych.serving.metrics import MAX_MODEL_LABELS, ModelLabels, split_method
from triptych.serving.server import connection_age_options
from triptych.serving.settings import Settings


def test_connection_age_is_off_unless_set_and_its_grace_unbounded_unless_set():
    assert connection_age_options(Settings()) == []
    assert connection_age_options(Settings(max_connection_age_seconds=300)) == [("grpc.max_connection_age_ms", 300_000)]
    assert connection_age_options(Settings(max_connection_age_seconds=300, max_connection_age_grace_seconds=40)) == [
        ("grpc.max_connection_age_ms", 300_000),
        ("grpc.max_connection_age_grace_ms", 40_000),
    ]


def test_work_meter_counts_running_work_up_to_now():
    meter = WorkMeter()
    with meter.busy("a"):
        time.sleep(0.05)
        running = meter.busy_seconds()["a"]
        meter.step("a")
    assert 0.04 < running < meter.busy_seconds()["a"]
    assert meter.steps == {"a": 1}
    assert "b" not in meter.busy_seconds()


def test_model_labels_are_bounded_and_skip_what_a_caller_typed():
    labels = ModelLabels()
    assert labels.label("tiny/sd15", grpc.StatusCode.OK) == "tiny/sd15"
    assert labels.label("no/such-model", grpc.StatusCode.NOT_FOUND) == "-"
    assert labels.label("bad", grpc.StatusCode.INVALID_ARGUMENT) == "-"
    for index in range(MAX_MODEL_LABELS):
        labels.label(f"model-{index}", grpc.StatusCode.OK)
    assert labels.label("one-too-many", grpc.StatusCode.OK) == "other"
    assert labels.label("tiny/sd15", grpc.StatusCode.RESOURCE_EXHAUSTED) == "tiny/sd15"
    assert split_method("/triptych.v1.ImageService/Generate") == ("triptych.v1.ImageService", "Generate")


def test_log_lines_carry_the_trace_id_of_the_call(capsys):
    from triptych.serving.tracing import TraceIdFilter, Tracing

    tracing = Tracing("encoder", Settings(tracing=True, OTEL_TRACES_EXPORTER="console"))
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("trace_id=%(trace_id)s %(message)s"))
    handler.addFilter(TraceIdFilter())
    log = logging.getLogger("test-observability")
    log.addHandler(handler)
    try:
        traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        span = tracing.begin("/triptych.v1.TextEncoderService/Encode", "tiny/sd15", [("traceparent", traceparent)])
        with span.attached():
            log.warning("inside")
        span.end(grpc.StatusCode.OK, None)
        log.warning("outside")
    finally:
        log.removeHandler(handler)
        tracing.shutdown()
    err = capsys.readouterr().err
    assert "trace_id=0af7651916cd43dd8448eb211c80319c inside" in err
    assert "trace_id=- outside" in err
