"""The one server bootstrap: interceptor (errors -> status), health, reflection, runtime info, limits, signals."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from triptych.runtime.components import LoadedComponent
from triptych.serving import message_limits, shm, timing
from triptych.serving.drain import Drain
from triptych.serving.errors import InvalidArgument, ResourceExhausted, TriptychError, status_for
from triptych.serving.health_port import start_health_port
from triptych.serving.observe import Observability
from triptych.serving.probes import ProbeStreams
from triptych.serving.security import describe, server_credentials, server_interceptors
from triptych.serving.settings import ConfigurationError, Settings
from triptych.serving.threads import choose_threads, usable_cpus
from triptych.serving.write_bound import WriteBound
from triptych.v1 import runtime_service_pb2, runtime_service_pb2_grpc

log = logging.getLogger("triptych")
VERSION = "0.1.0"


# Health and reflection answer during a drain (health says NOT_SERVING) and never hold it up.
_UNTRACKED = ("/grpc.health.", "/grpc.reflection.")


# Threads and call slots kept beyond max_workers and the probe streams for what neither counts (health checks,
# unary reflection), so a process that is busy with max_workers calls still answers its probes.
PROBE_RESERVE = 8

# The health name that says only that the process runs (liveness), whatever it depends on; "" and a role's service
# names say it is ready to serve (readiness), which for the gateway means its backends serve too.
LIVENESS = "liveness"

# After a drain, the time calls that raced in get to be refused (serve_forever).
STOP_GRACE_SECONDS = 1.0


def server_keepalive_options(min_ping_interval_ms: int = 10_000) -> list[tuple[str, int]]:
    """Accept the keepalive pings our channels send (transport.CHANNEL_OPTIONS: every 20 s, with or without calls),
    and ping callers ourselves so that the calls of one that vanished end within 40 s.

    A server counts a ping that comes sooner than `min_ping_interval_ms` after the last one (since it last sent
    data) as a strike, and two strikes end the connection with GOAWAY "too_many_pings"; its default interval is 5
    minutes. The key is gRPC's GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, whose string is
    "grpc.http2.min_ping_interval_without_data_ms": the "min_recv_..." spelling used here before is no option gRPC
    knows, so every stream that went a minute without sending (a Generate without progress events on a slow
    model, a full-size model loading) was cut there with UNAVAILABLE "Too many pings" (test_keepalive.py)."""
    return [
        ("grpc.http2.min_ping_interval_without_data_ms", min_ping_interval_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]


SERVER_KEEPALIVE_OPTIONS = server_keepalive_options()


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions raised by servicers to statuses, in one place (unknown exceptions become INTERNAL),
    admits each call through the server's Drain, and ends each successful call with its `server-timing` trailer
    (serving/timing.py)."""

    def __init__(
        self,
        drain: Drain | None = None,
        probe_streams: ProbeStreams | None = None,
        request_limits: dict[str, int] | None = None,
        write_bound: WriteBound | None = None,
        observer: Observability | None = None,
    ):
        self.drain = drain or Drain()
        self.observer = observer  # metrics and traces of each call (serving/observe.py); None when both are off
        self.write_bound = write_bound or WriteBound(0)
        self.probe_streams = probe_streams
        self.request_limits = request_limits or {}

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        tracked = not method.startswith(_UNTRACKED)
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            inner = getattr(handler, kind)
            if inner is not None:
                wrap = self._streaming if kind.endswith("_stream") else self._single
                handler = handler._replace(**{kind: wrap(inner, method, tracked)})
                if not handler.request_streaming and handler.request_deserializer is not None:
                    limit = message_limits.request_limit(self.request_limits, method)
                    handler = handler._replace(request_deserializer=_lenient(handler.request_deserializer, limit))
                return handler
        return handler

    def _enter(self, request, context, method: str, tracked: bool, streaming: bool = False) -> None:
        """What every call passes before its handler runs: the drain's admission (or, for a health-watch or
        reflection stream, the probe streams' bound), and a request that parsed."""
        if tracked:
            self.drain.admit(context)
        elif streaming and self.probe_streams is not None:
            self.probe_streams.admit(context)
        if isinstance(request, _TooLarge):
            raise ResourceExhausted(
                f"the request to {method} is {request.size} bytes; that method accepts at most {request.limit}"
            )
        if isinstance(request, _Unparsable):
            raise InvalidArgument.one("request", f"not a serialized request message of {method} ({request.why})")

    def _single(self, inner, method: str, tracked: bool):
        def handle(request, context):
            started = time.perf_counter()
            watch = self.observer.begin(method, request, context) if tracked and self.observer else None
            code = grpc.StatusCode.CANCELLED
            if tracked:
                self.drain.handler_started()
            try:
                self._enter(request, context, method, tracked)
                if watch is None:
                    response = inner(request, context)
                else:
                    with watch.attached():
                        response = inner(request, context)
                if tracked:
                    timing.append(context, {"total": time.perf_counter() - started})
                code = grpc.StatusCode.OK
                return response
            except Exception as exc:  # noqa: BLE001 - this is the one mapping point
                status = status_for(method, exc)
                code = status.code
                context.abort_with_status(status)
            finally:
                if watch is not None:
                    watch.end(code)
                if tracked:
                    self.drain.handler_finished()

        return handle

    def _streaming(self, inner, method: str, tracked: bool):
        def handle(request, context):
            started = time.perf_counter()
            watch = self.observer.begin(method, request, context) if tracked and self.observer else None
            code = grpc.StatusCode.CANCELLED  # unless it ends below: the stream was closed, its caller gone
            if tracked:
                self.drain.handler_started()
            try:
                self._enter(request, context, method, tracked, streaming=True)
                if watch is not None:
                    yield from self._bounded(watch.iterate(lambda: inner(request, context)), context, method)
                elif tracked:
                    yield from self._bounded(iter(inner(request, context)), context, method)
                else:
                    yield from inner(request, context)
                if tracked:
                    timing.append(context, {"total": time.perf_counter() - started})
                code = grpc.StatusCode.OK
            except Exception as exc:  # noqa: BLE001 - this is the one mapping point
                status = status_for(method, exc)
                code = status.code
                context.abort_with_status(status)
            finally:
                if watch is not None:
                    watch.end(code)
                if tracked:
                    self.drain.handler_finished()

        return handle

    def _bounded(self, responses, context, method: str):
        """Yields a tracked stream's messages, each one under the write bound (serving/write_bound.py)."""
        try:
            for response in responses:
                self.write_bound.writing(context, method)
                yield response
                self.write_bound.written(context)
        finally:
            self.write_bound.written(context)
            close = getattr(responses, "close", None)  # a generator: its own cleanup (queue slots) runs now
            if close is not None:
                close()


class _Unparsable:
    """What a request that is not a valid protobuf message parses to, so that the handler can refuse it."""

    def __init__(self, why: str):
        self.why = why


class _TooLarge:
    """What a request bigger than its method's limit (serving/message_limits.py) parses to: it is not parsed."""

    def __init__(self, size: int, limit: int):
        self.size, self.limit = size, limit


def _lenient(deserialize, limit: int):
    """grpcio answers a request its deserializer cannot parse with INTERNAL; ours says INVALID_ARGUMENT. A request
    over its method's limit is not parsed at all."""

    def parse(data: bytes):
        if len(data) > limit:
            return _TooLarge(len(data), limit)
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or anything a parser raises
            return _Unparsable(f"{type(exc).__name__}: {exc}")

    return parse


def _cuda_counters(torch) -> dict[str, int]:
    """Peak GPU memory of this process (PyTorch's allocator), once CUDA is in use."""
    if torch is None or not torch.cuda.is_initialized():
        return {}
    return {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated()}


class RuntimeServicer(runtime_service_pb2_grpc.RuntimeServiceServicer):
    """Answers GetRuntimeInfo for any role."""

    def __init__(
        self, role: str, loaded: Callable[[], Iterable[LoadedComponent]], counters: Callable[[], dict[str, int]]
    ):
        self._role = role
        self._loaded = loaded
        self._counters = counters

    def GetRuntimeInfo(self, request, context):
        torch = sys.modules.get("torch")
        return runtime_service_pb2.GetRuntimeInfoResponse(
            role=self._role,
            version=VERSION,
            loaded_components=[
                runtime_service_pb2.LoadedComponent(
                    model=c.model, component=c.component, class_name=c.class_name, parameter_bytes=c.parameter_bytes
                )
                for c in self._loaded()
            ],
            torch_threads=torch.get_num_threads() if torch is not None else 0,
            pid=os.getpid(),
            counters={**shm.counters, **_cuda_counters(torch), **self._counters()},
        )


class Service:
    """What a role plugs into the bootstrap: its gRPC service names and a function that registers them."""

    def __init__(
        self,
        role: str,
        service_names: list[str],
        register: Callable[[grpc.Server], None],
        loaded: Callable[[], Iterable[LoadedComponent]] = list,
        counters: Callable[[], dict[str, int]] = dict,
        warm_up: Callable[[str], bool] | None = None,
        readiness: Callable[[health.HealthServicer], None] | None = None,
        readings: Callable[[], dict[str, dict[str, float]]] = dict,
    ):
        self.role = role
        self.service_names = service_names
        self.register = register
        self.loaded = loaded
        self.counters = counters
        self.warm_up = warm_up  # model id -> whether this role has a part of it to load (and loaded it)
        # A role that depends on others sets its own health ("" and its services) from theirs, now and later
        # (the gateway: gateway/readiness.py); the others are SERVING once started.
        self.readiness = readiness
        # Per-model state read when metrics are scraped, by reading name (serving/metrics.py): queue depth, busy
        # seconds, steps, batch sizes. Never called when metrics are off.
        self.readings = readings


def preload(service: Service, models: list[str]) -> None:
    """Loads and runs each model once (settings.preload_models), before the server binds: the first request
    then pays no loading, and under TRIPTYCH_COMPILE no compiling at the model's default size. A model that
    does not exist stops the process (ConfigurationError); one this role has no part of is skipped."""
    if service.warm_up is None:
        return
    for model in models:
        started = time.perf_counter()
        try:
            used = service.warm_up(model)
        except TriptychError as exc:
            raise ConfigurationError(f"TRIPTYCH_PRELOAD_MODELS: {model}: {exc}") from exc
        if used:
            log.info("preloaded %s in %.1f s", model, time.perf_counter() - started)
        else:
            log.info("preload: %s has nothing for the %s", model, service.role)


def connection_age_options(settings: Settings) -> list[tuple[str, int]]:
    """GOAWAY to connections older than max_connection_age_seconds, so that long-lived client channels re-resolve
    and spread over the replicas there are now (a Kubernetes headless Service); unset keeps gRPC's default (never).
    The grace (unset: unbounded) lets the calls on the old connection finish, however long a Denoise takes."""
    if not settings.max_connection_age_seconds:
        return []
    options = [("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000))]
    if settings.max_connection_age_grace_seconds:
        options.append(("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_seconds * 1000)))
    return options


def start(
    service: Service,
    settings: Settings,
    port: int,
    drain: Drain | None = None,
    observability: Observability | None = None,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Builds and starts a server for `service` on host:port (0 = any free port); returns the bound port.

    TLS/mTLS and bearer tokens come from settings.security; plaintext is refused off loopback unless allowed
    (ConfigurationError, before anything binds).
    """
    credentials = server_credentials(settings)
    shm.configure(settings.shared_memory)
    drain = drain or Drain(settings.max_workers)
    # Calls that do work: at most max_workers (Drain, with our message). Every call has its thread: grpc refuses
    # beyond the threads, since its own executor queue has no bound and no deadline. The reserve answers health
    # checks while max_workers calls run, and refuses calls beyond them.
    # Health-watch and reflection streams hold a thread each: they have threads of their own, bounded (probes.py).
    probe_streams = ProbeStreams(settings.max_probe_streams, settings.max_probe_streams_per_peer)
    threads = settings.max_workers + settings.max_probe_streams + PROBE_RESERVE
    # gRPC reads a request whole before any handler runs: receive no more than the methods served here need.
    request_limits = message_limits.request_limits(settings.limits, settings.max_message_bytes)
    receive_limit = message_limits.receive_limit(request_limits, service.service_names)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=service.role),
        # ErrorInterceptor first (outermost): it maps what the token check raises, like any typed error.
        interceptors=[
            ErrorInterceptor(
                drain,
                probe_streams,
                request_limits,
                WriteBound(settings.stream_write_timeout_seconds),
                observability.observer if observability is not None else None,
            ),
            *server_interceptors(settings),
        ],
        options=[
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", receive_limit),
            *SERVER_KEEPALIVE_OPTIONS,
            *connection_age_options(settings),
        ],
        maximum_concurrent_rpcs=threads,
    )
    service.register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    runtime_service_pb2_grpc.add_RuntimeServiceServicer_to_server(
        RuntimeServicer(service.role, service.loaded, service.counters), server
    )
    names = [*service.service_names, "triptych.v1.RuntimeService", health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    # A unix socket ("unix:/path") is bound as is; TCP hosts get the port.
    address = settings.host if settings.host.startswith("unix:") else f"{settings.host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind {settings.host}:{port}")
    server.start()
    health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    if service.readiness is not None:
        service.readiness(health_servicer)
    else:
        for name in ["", *service.service_names]:
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory for reuse instead of returning it to the OS at once.

    Tensors of the same sizes are allocated and freed at every step. glibc's defaults hand large blocks back with
    munmap/trim, so each step page-faults them in again, and off the main thread (where our compute threads run)
    more so: the tiny SDXL VAE decode took 26-35 ms in the decoder process against 15 ms in a plain script, and
    18 ms with this (bench/RESULTS.md). The price: a process's RSS stays at its peak working set, as with any
    caching allocator (PyTorch's CUDA one included). Returns whether it applied (glibc only).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # The largest mmap threshold glibc accepts (HEAP_MAX_SIZE / 2 on 64-bit); bigger blocks still use mmap.
    return bool(libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024) and libc.mallopt(m_trim_threshold, 1 << 30))


def serve_forever(service: Service, settings: Settings, port: int, observability: Observability | None = None) -> None:
    """Runs until SIGTERM/SIGINT: then health goes NOT_SERVING, new calls get UNAVAILABLE and the calls in flight
    get up to the grace period to finish before the server stops. `observability`: metrics and traces (observe.py)."""
    observability = observability or Observability(service.role, settings)
    logging.basicConfig(level=logging.INFO, format=observability.log_format())
    observability.install_log_fields()
    if settings.keep_freed_memory and not keep_freed_memory():
        log.info("keep_freed_memory: not glibc, left as it is")
    if "torch" in sys.modules:  # the gateway never imports torch
        threads, warning = choose_threads(settings.torch_threads, settings.replicas_per_host, usable_cpus())
        if warning:
            log.warning("%s", warning)
        sys.modules["torch"].set_num_threads(threads)
    preload(service, settings.preload_models)
    drain = Drain(settings.max_workers)
    observability.serve(service, settings, port, VERSION)  # the metrics port, before SERVING is printed
    server, bound, health_servicer = start(service, settings, port, drain, observability)
    health_only = start_health_port(health_servicer, settings)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("listening on %s:%d (%s)", settings.host, bound, describe(settings))
    # One machine-readable line that supervisors (`triptych serve`, tests) wait for.
    print(f"triptych {service.role} SERVING {settings.host}:{bound}", flush=True)
    stop.wait()
    health_servicer.enter_graceful_shutdown()
    drained = drain.wait(settings.shutdown_grace_seconds)
    if not drained:
        log.warning("calls still running after %.0f s of grace are cancelled", settings.shutdown_grace_seconds)
    # A call gRPC took but no handler has admitted yet (queued for a thread) is not counted by the drain: a second
    # lets it be refused UNAVAILABLE (retried elsewhere) rather than cancelled by the stop (CANCELLED, never retried).
    server.stop(STOP_GRACE_SECONDS if drained else 0).wait()
    if not drain.wait_handlers(STOP_GRACE_SECONDS):
        # A handler in work that does not stop at once (one image's VAE decode, one step) would hold the exit, which
        # joins every gRPC thread: the grace is the bound, so the process leaves without it.
        log.warning("stopped, leaving %d handlers still computing", drain.handlers)
        _close(health_only, observability)
        logging.shutdown()
        os._exit(0)
    _close(health_only, observability)
    log.info("stopped")


def _close(health_only: grpc.Server | None, observability: Observability) -> None:
    """After the drain: the health-only port stops, buffered spans are exported."""
    if health_only is not None:
        health_only.stop(0)
    observability.close()
