"""Metrics and traces of the real processes (docs/deploy.md): each process's /metrics moves after a Generate; one
trace id follows a Generate through gateway, encoder, denoiser and decoder, exported over OTLP to a collector held
by this test; the health-only port answers kubelet-style plaintext probes beside a TLS port; bad settings stop a
process with a line naming the variable."""

from __future__ import annotations

import random
import secrets
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.request
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.processes import isolated_env, serving
from tests.e2e.self_signed import self_signed
from triptych.cli import ROLES
from triptych.client import ImageClient
from triptych.v1 import image_service_pb2, image_service_pb2_grpc

SMALL = dict(model="tiny/sd15", width=64, height=64, steps=3)


def free_port_run(count: int) -> int:
    """The first of `count` consecutive loopback ports that are free now."""
    for _ in range(100):
        base = random.randint(20000, 60000 - count)
        sockets = []
        try:
            for offset in range(count):
                probe = socket.socket()
                sockets.append(probe)
                probe.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for probe in sockets:
                probe.close()
    raise RuntimeError("no run of free ports")


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, by (sample name, labels)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_each_process_counts_a_generate(observed):
    served, urls = observed.served, observed.metrics
    before = {role: scrape(url) for role, url in urls.items()}
    request = image_service_pb2.GenerateRequest(**SMALL, positive_prompt=f"a fox {secrets.token_hex(4)}", seed=3)
    with ImageClient(served.gateway) as client:
        assert len(client.generate(request)) == 1
    after = {role: scrape(url) for role, url in urls.items()}

    def moved(role: str, name: str, **labels) -> float:
        return value(after[role], name, **labels) - value(before[role], name, **labels)

    calls = [
        ("encoder", "triptych.v1.TextEncoderService", "Encode"),
        ("denoiser", "triptych.v1.DenoiserService", "Denoise"),
        ("decoder", "triptych.v1.DecoderService", "Decode"),
        ("gateway", "triptych.v1.ImageService", "Generate"),
    ]
    for role, service, method in calls:
        assert value(after[role], "triptych_info", role=role, version="0.1.0") == 1
        ok = dict(service=service, method=method, model="tiny/sd15", code="OK")
        assert moved(role, "triptych_calls_total", **ok) == 1, role
        assert moved(role, "triptych_stage_seconds_count", service=service, method=method, stage="total") == 1
        assert value(after[role], "triptych_calls_in_flight", service=service, method=method) == 0
    # The gateway's histogram has the trailer's names: each stage, its hop, the denoiser's queue, its own time.
    for stage in ("encode", "encode-hop", "denoise", "denoise-queue", "denoise-hop", "decode", "decode-hop", "gateway"):
        generate = dict(service="triptych.v1.ImageService", method="Generate", stage=stage)
        assert moved("gateway", "triptych_stage_seconds_count", **generate) == 1, stage
    denoise = dict(service="triptych.v1.DenoiserService", method="Denoise", stage="queue")
    assert moved("denoiser", "triptych_stage_seconds_count", **denoise) == 1
    # Per model: steps (PNDM makes 4 model calls for 3 steps), busy seconds, an idle queue.
    assert moved("denoiser", "triptych_denoiser_steps_total", model="tiny/sd15") == 4
    assert moved("denoiser", "triptych_denoiser_busy_seconds_total", model="tiny/sd15") > 0
    assert value(after["denoiser"], "triptych_denoiser_jobs") == 0
    assert value(after["decoder"], "triptych_decoder_jobs") == 0
    assert value(after["gateway"], "triptych_gateway_generates") == 0
    # A new prompt: one forward pass of one request, a cache miss.
    assert moved("encoder", "triptych_encoder_batch_requests_count") == 1
    assert moved("encoder", "triptych_encoder_batch_requests_bucket", le="1.0") == 1
    assert moved("encoder", "triptych_encoder_cache_misses_total") == 1
    # What each backend holds, and the tensors it passed through shared memory (all four on one host).
    for role, component in (("encoder", "text_encoder"), ("denoiser", "unet"), ("decoder", "vae")):
        assert value(after[role], "triptych_loaded_parameter_bytes", model="tiny/sd15", component=component) > 0
    assert moved("denoiser", "triptych_shared_memory_reads_total") >= 1
    assert value(after["gateway"], "triptych_shared_memory_fallbacks_total") == 0
    assert value(after["denoiser"], "process_resident_memory_bytes") > 0


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver: keeps what the processes export, as (service.name, span)."""

    def __init__(self):
        self.spans = []
        self._lock = threading.Lock()

    def Export(self, request, context):
        with self._lock:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    self.spans += [(attributes.get("service.name"), span) for span in scope_spans.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: bytes) -> list:
        with self._lock:
            return [(service, span) for service, span in self.spans if span.trace_id == trace_id]


@pytest.fixture(scope="module")
def observed(model_root):
    """`triptych serve` with metrics (ports P..P+3) and traces (OTLP to a collector held here) on, once for the
    tests below: (served, {role: metrics URL}, collector)."""
    collector = Collector()
    receiver = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    base = free_port_run(len(ROLES))
    env = {
        "TRIPTYCH_METRICS_PORT": str(base),
        "TRIPTYCH_TRACING": "1",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    try:
        with serving(None, model_root, env=env, isolated=True) as served:
            urls = {role: f"http://127.0.0.1:{base + index}/metrics" for index, role in enumerate(ROLES)}
            yield types.SimpleNamespace(served=served, metrics=urls, collector=collector)
    finally:
        receiver.stop(0)


def test_one_trace_across_the_four_processes(observed):
    collector = observed.collector
    trace_id, caller_span = secrets.token_bytes(16), secrets.token_bytes(8)
    traceparent = f"00-{trace_id.hex()}-{caller_span.hex()}-01"  # the caller's own trace, as W3C sends it
    with grpc.insecure_channel(observed.served.gateway) as channel:
        stub = image_service_pb2_grpc.ImageServiceStub(channel)
        request = image_service_pb2.GenerateRequest(**SMALL, positive_prompt="a traced fox", seed=5)
        events = list(stub.Generate(request, metadata=[("traceparent", traceparent)], timeout=120))
    assert any(event.HasField("image") for event in events)
    deadline = time.monotonic() + 30
    while len({service for service, _ in collector.of_trace(trace_id)}) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    spans = collector.of_trace(trace_id)
    by_name = {(service, span.name, span.kind): span for service, span in spans}
    assert len(spans) >= 4
    assert {service for service, _ in spans} == {f"triptych-{role}" for role in ROLES}
    server, client = 2, 3  # OTLP's SpanKind values
    generate = by_name[("triptych-gateway", "triptych.v1.ImageService/Generate", server)]
    assert generate.parent_span_id == caller_span
    for role, method in (
        ("encoder", "triptych.v1.TextEncoderService/Encode"),
        ("denoiser", "triptych.v1.DenoiserService/Denoise"),
        ("decoder", "triptych.v1.DecoderService/Decode"),
    ):
        call = by_name[("triptych-gateway", method, client)]
        served_span = by_name[(f"triptych-{role}", method, server)]
        assert call.parent_span_id == generate.span_id  # the gateway's downstream call, inside its Generate
        assert served_span.parent_span_id == call.span_id  # the backend's span, the child of that call
        attributes = {a.key: a.value for a in served_span.attributes}
        assert attributes["triptych.model"].string_value == "tiny/sd15"
        assert attributes["rpc.grpc.status_code"].int_value == 0
        assert attributes["triptych.timing.total_ms"].double_value > 0


def test_off_by_default_nothing_is_imported(model_root):
    """Without the settings, a gateway serves with neither prometheus_client nor OpenTelemetry imported."""
    script = (
        "import sys\n"
        "from triptych.cli import build_role\n"
        "from triptych.serving.observe import Observability\n"
        "from triptych.serving.server import start\n"
        "from triptych.serving.settings import Settings\n"
        "settings = Settings()\n"
        "observability = Observability('gateway', settings)\n"
        "server, _, _ = start(build_role('gateway', settings), settings, 0, observability=observability)\n"
        "print(observability.observer, sorted({m.split('.')[0] for m in sys.modules\n"
        "    if m.startswith(('prometheus_client', 'opentelemetry'))}))\n"
        "server.stop(0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=isolated_env(), capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["None", "[]"], done.stdout + done.stderr


def _serve_gateway(env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "triptych.cli", "serve", "gateway", "--port", "0"]
    return subprocess.run(command, env=isolated_env(**env), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"TRIPTYCH_METRICS_PORT": "nine"}, "TRIPTYCH_METRICS_PORT: Input should be a valid integer"),
        ({"TRIPTYCH_METRICS_PORT": "70000"}, "TRIPTYCH_METRICS_PORT: Input should be less than or equal to 65535"),
        ({"TRIPTYCH_TRACING": "1", "OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin'"),
        ({"TRIPTYCH_METRICS_PORT": "0", "TRIPTYCH_METRICS_HOST": "0.0.0.0"}, "refusing to serve metrics in plaintext"),
        ({"TRIPTYCH_MAX_CONNECTION_AGE_SECONDS": "-1"}, "TRIPTYCH_MAX_CONNECTION_AGE_SECONDS"),
    ],
)
def test_bad_settings_stop_the_process_naming_the_variable(env, said):
    done = _serve_gateway(env)
    assert done.returncode == 2, done.stderr
    assert said in done.stderr
    assert "Traceback" not in done.stderr


def test_a_metrics_port_in_use_is_named():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = _serve_gateway({"TRIPTYCH_METRICS_PORT": str(taken.getsockname()[1])})
    assert done.returncode == 2, done.stderr
    assert "TRIPTYCH_METRICS_PORT: cannot serve metrics on 127.0.0.1:" in done.stderr


def test_health_port_answers_plaintext_beside_a_tls_port(model_root, tmp_path):
    """Kubelet gRPC probes speak no TLS: the health-only port serves them the same health names."""
    cert, key = self_signed(tmp_path)
    port = free_port_run(1)
    env = {"TRIPTYCH_TLS_CERT_FILE": str(cert), "TRIPTYCH_TLS_KEY_FILE": str(key), "TRIPTYCH_HEALTH_PORT": str(port)}
    with serving("gateway", model_root, env=env, isolated=True) as served:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            live = health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=10)
            assert live.status == health_pb2.HealthCheckResponse.SERVING
            # A gateway alone: live, not ready (no backends), exactly as on its main port.
            ready = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert ready.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as refused:  # nothing but health on that port
                image_service_pb2_grpc.ImageServiceStub(channel).Generate(
                    image_service_pb2.GenerateRequest(**SMALL), timeout=10
                ).next()
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # The main port speaks TLS only.
        with grpc.insecure_channel(served.address) as plaintext, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(plaintext).Check(health_pb2.HealthCheckRequest(), timeout=3)
