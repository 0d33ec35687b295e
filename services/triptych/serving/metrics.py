"""Prometheus metrics of one process, on a port of its own (settings.metrics_port; docs/deploy.md, Metrics).

Off by default, and then free: nothing imports this module and the ErrorInterceptor has no observer. On, two kinds:
- per call, in the interceptor (serving/observe.py): calls by method, model and status code, calls in flight, and a
  latency histogram per name of the call's `server-timing` trailer (`total`, `queue`, `encode`, `encode-hop`, ...);
- read at scrape time, at no cost to calls: what RuntimeService reports (loaded components, counters) and each
  role's readings (`Service.readings`: queue depth, busy seconds and steps per model, encoder batch sizes).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pool
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from triptych.client.timing import parse_server_timing
from triptych.serving import shm
from triptych.serving.security import is_loopback
from triptych.serving.settings import ConfigurationError, Settings

log = logging.getLogger("triptych")

# Seconds, from a cached Encode (well under a millisecond) to a large CPU Denoise (minutes).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 150, 300, 600)
# Requests sharing one encoder forward pass (encoder_max_batch_rows is 16 by default).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Distinct model ids a process labels its calls with; later ones count as "other" (a bounded series count).
MAX_MODEL_LABELS = 64
# Calls that failed on the request itself: their model id may be anything a caller typed, so it is not a label.
_CALLER_ERRORS = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED)

# RuntimeService counters (Service.counters, serving/shm.py) by name: (metric name, help). Monotonic unless listed
# in _GAUGES; a name not listed here is still exported, as `triptych_<name>`.
_COUNTERS = {
    "shared_memory_reads": ("triptych_shared_memory_reads", "tensors read from a caller's shared-memory range"),
    "shared_memory_writes": ("triptych_shared_memory_writes", "tensors written into a caller's shared-memory range"),
    "shared_memory_refused": (
        "triptych_shared_memory_fallbacks",
        "downstream calls sent again in bytes because a backend could not use shared memory (gateway)",
    ),
    "encode_cache_hits": ("triptych_encoder_cache_hits", "Encodes answered from the encoder's result cache"),
    "encode_cache_misses": ("triptych_encoder_cache_misses", "Encodes that ran the text encoders"),
    "encode_cache_evictions": ("triptych_encoder_cache_evictions", "results evicted from the encoder's cache"),
    "encode_forward_passes": ("triptych_encoder_forward_passes", "text-encoder forward passes (batches)"),
    "encode_batched_requests": ("triptych_encoder_batched_requests", "Encodes served by those forward passes"),
    "encode_batched_chunks": ("triptych_encoder_batched_chunks", "77-token rows run by those forward passes"),
    "encode_shared_forward_passes": (
        "triptych_encoder_shared_forward_passes",
        "forward passes that served more than one Encode",
    ),
    "denoise_steps": ("triptych_denoise_steps_all_models", "denoising network calls, all models"),
    "denoise_cancelled": ("triptych_denoise_cancelled", "Denoises whose caller left before the result"),
    "denoise_rejected": ("triptych_denoise_rejected", "Denoises refused because the model's queue was full"),
    "lora_disk_reads": ("triptych_lora_disk_reads", "LoRA files read from the store"),
    "lora_evictions": ("triptych_lora_evictions", "LoRA adapters evicted from memory"),
    "compiled_graphs": ("triptych_compiled_graphs", "graphs torch.compile has built in this process"),
    "cuda_max_allocated_bytes": ("triptych_cuda_max_allocated_bytes", "peak GPU memory allocated by torch"),
}
_GAUGES = {"compiled_graphs", "cuda_max_allocated_bytes"}

# Service.readings names: (kind, metric name, label, help). A per-model gauge also has a sum over models, named in
# _TOTALS, present from the start (0 while idle), which is what an autoscaler reads per pod.
_READINGS = {
    "denoiser_queue_depth": (
        "gauge",
        "triptych_denoiser_queue_depth",
        "model",
        "Denoises admitted per model, running and waiting (at most denoiser_queue_per_model)",
    ),
    "denoiser_busy_seconds": (
        "counter",
        "triptych_denoiser_busy_seconds",
        "model",
        "seconds the model's compute thread spent on jobs; rate() is the busy fraction",
    ),
    "denoiser_steps": (
        "counter",
        "triptych_denoiser_steps",
        "model",
        "denoising network calls per model; rate() is steps per second",
    ),
    "decoder_queue_depth": (
        "gauge",
        "triptych_decoder_queue_depth",
        "model",
        "Decodes admitted per VAE, running and waiting (at most decoder_queue_per_model)",
    ),
    "gateway_admitted": (
        "gauge",
        "triptych_gateway_admitted",
        "model",
        "Generates admitted per model, running (at most gateway_queue_per_model)",
    ),
    "encoder_batch_requests": (
        "histogram",
        "triptych_encoder_batch_requests",
        "",
        "Encodes served per text-encoder forward pass (dynamic batching)",
    ),
}


_TOTALS = {
    "denoiser_queue_depth": ("triptych_denoiser_jobs", "Denoises admitted, running and waiting, all models"),
    "decoder_queue_depth": ("triptych_decoder_jobs", "Decodes admitted, running and waiting, all VAEs"),
    "gateway_admitted": ("triptych_gateway_generates", "Generates admitted, all models"),
}


class ModelLabels:
    """The `model` label of a call: its model id, for the first MAX_MODEL_LABELS distinct ids; "other" beyond, and
    "-" for calls refused for the request itself (an unknown or malformed id must not make a series)."""

    def __init__(self, most: int = MAX_MODEL_LABELS):
        self._most = most
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def label(self, model: str, code: grpc.StatusCode) -> str:
        if code in _CALLER_ERRORS:
            return "-"
        with self._lock:
            if model in self._seen:
                return model
            if len(self._seen) < self._most:
                self._seen.add(model)
                return model
        return "other"


def split_method(method: str) -> tuple[str, str]:
    """`/triptych.v1.ImageService/Generate` -> ("triptych.v1.ImageService", "Generate")."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


class CallMetrics:
    """What the interceptor records of each call (per-call metrics)."""

    def __init__(self, registry: CollectorRegistry):
        self.calls = Counter(
            "triptych_calls",
            "calls served, by gRPC method, model and status code (health checks and reflection not counted)",
            ["service", "method", "model", "code"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "triptych_calls_in_flight", "calls being served now", ["service", "method"], registry=registry
        )
        self.stages = Histogram(
            "triptych_stage_seconds",
            "seconds per name of a successful call's server-timing trailer (total, queue, encode, encode-hop, ...)",
            ["service", "method", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.models = ModelLabels()

    def prepare(self, service_names: list[str]) -> None:
        """Every method of the role starts with 0 calls in flight, so an autoscaler reads 0, not nothing."""
        pool = descriptor_pool.Default()
        for service_name in service_names:
            try:
                methods = pool.FindServiceByName(service_name).methods
            except KeyError:
                continue
            for method in methods:
                self.in_flight.labels(service_name, method.name).set(0)

    def begin(self, method: str) -> tuple[str, str]:
        names = split_method(method)
        self.in_flight.labels(*names).inc()
        return names

    def end(self, names: tuple[str, str], model: str, code: grpc.StatusCode, trailing_metadata) -> None:
        self.in_flight.labels(*names).dec()
        self.calls.labels(*names, self.models.label(model, code), code.name).inc()
        if code == grpc.StatusCode.OK:
            for stage, seconds in parse_server_timing(trailing_metadata).items():
                self.stages.labels(*names, stage).observe(seconds)


class ServiceCollector:
    """Reads the role's state at scrape time: loaded components, RuntimeService counters, the role's readings."""

    def __init__(self, service, version: str):
        self._service = service
        self._version = version

    def collect(self) -> Iterable:
        info = GaugeMetricFamily("triptych_info", "this process: its role and version", labels=["role", "version"])
        info.add_metric([self._service.role, self._version], 1)
        yield info
        components = GaugeMetricFamily(
            "triptych_loaded_components",
            "components held in memory (1 each)",
            labels=["model", "component", "class_name"],
        )
        sizes = GaugeMetricFamily(
            "triptych_loaded_parameter_bytes",
            "bytes of parameters and buffers of each component held in memory",
            labels=["model", "component"],
        )
        for loaded in self._service.loaded():
            components.add_metric([loaded.model, loaded.component, loaded.class_name], 1)
            sizes.add_metric([loaded.model, loaded.component], loaded.parameter_bytes)
        yield components
        yield sizes
        yield from _counter_families({**shm.counters, **self._service.counters()})
        yield from _reading_families(self._service.readings())


def _counter_families(counters: dict[str, int]) -> Iterable:
    for name, value in sorted(counters.items()):
        metric, text = _COUNTERS.get(name, (f"triptych_{name}", f"RuntimeService counter {name}"))
        family = GaugeMetricFamily if name in _GAUGES else CounterMetricFamily
        yield family(metric, text, value=value)


def _reading_families(readings: dict[str, dict[str, float]]) -> Iterable:
    for name, values in sorted(readings.items()):
        kind, metric, label, text = _READINGS.get(name, ("gauge", f"triptych_{name}", "key", f"reading {name}"))
        if kind == "histogram":
            yield _histogram(metric, text, values)
            continue
        family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(metric, text, labels=[label])
        for key, value in sorted(values.items()):
            family.add_metric([key], value)
        yield family
        if name in _TOTALS:
            yield GaugeMetricFamily(*_TOTALS[name], value=sum(values.values()))


def _histogram(metric: str, text: str, counts: dict[str, float]) -> HistogramMetricFamily:
    """A histogram from {observed value: how many times}: cumulative buckets at BATCH_BUCKETS."""
    observed = sorted((float(value), count) for value, count in counts.items())
    buckets = [
        (floatToGoString(bound), sum(count for value, count in observed if value <= bound)) for bound in BATCH_BUCKETS
    ]
    total = sum(count for _, count in observed)
    family = HistogramMetricFamily(metric, text)
    family.add_metric([], [*buckets, ("+Inf", total)], sum_value=sum(value * count for value, count in observed))
    return family


class Metrics:
    """A process's metrics: the per-call part for the interceptor, the rest read at scrape time."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # CPU seconds, resident memory, open files
        PlatformCollector(registry=self.registry)
        self.calls = CallMetrics(self.registry)
        self._server = None

    def serve(self, service, settings: Settings, version: str) -> str:
        """Registers the role's state and starts the HTTP(S) endpoint; returns its URL."""
        self.registry.register(ServiceCollector(service, version))
        self.calls.prepare(service.service_names)
        host = settings.metrics_host or settings.host
        sec = settings.security
        if sec.tls_cert_file is None and not is_loopback(host) and not sec.allow_insecure:
            raise ConfigurationError(
                f"refusing to serve metrics in plaintext on {host}: set TLS (TRIPTYCH_TLS_CERT_FILE, _KEY_FILE: the "
                "metrics port then speaks HTTPS), TRIPTYCH_METRICS_HOST=127.0.0.1, or TRIPTYCH_ALLOW_INSECURE=1"
            )
        tls = {}
        if sec.tls_cert_file is not None:
            tls = {"certfile": str(sec.tls_cert_file), "keyfile": str(sec.tls_key_file)}
        try:
            self._server, _ = start_http_server(settings.metrics_port, host.strip("[]"), self.registry, **tls)
        except OSError as exc:
            raise ConfigurationError(
                f"TRIPTYCH_METRICS_PORT: cannot serve metrics on {host}:{settings.metrics_port}: {exc.strerror}"
            ) from exc
        scheme = "https" if tls else "http"
        shown = f"[{host.strip('[]')}]" if ":" in host.strip("[]") else host
        return f"{scheme}://{shown}:{self._server.server_port}/metrics"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
