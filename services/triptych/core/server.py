"""The one server bootstrap: interceptor (errors -> status), health, reflection, runtime info, limits, signals."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterable
from concurrent import futures

import grpc
from google.rpc import status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from triptych.core import shm
from triptych.core.components import LoadedComponent
from triptych.core.errors import TriptychError
from triptych.core.security import describe, server_credentials, server_interceptors
from triptych.core.settings import Settings
from triptych.v1 import runtime_service_pb2, runtime_service_pb2_grpc

log = logging.getLogger("triptych")
VERSION = "0.1.0"


def _internal(method: str, exc: BaseException) -> grpc.Status:
    log.error("unexpected error in %s: %s", method, "".join(traceback.format_exception(exc)))
    status = status_pb2.Status(code=grpc.StatusCode.INTERNAL.value[0], message=f"internal error: {exc!r}")
    return rpc_status.to_status(status)


def _status_for(method: str, exc: BaseException) -> grpc.Status:
    if isinstance(exc, TriptychError):
        return exc.to_status()
    try:
        import torch  # only for the OOM type; torch is already loaded wherever it can be raised

        if isinstance(exc, torch.OutOfMemoryError):
            status = status_pb2.Status(
                code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message=f"out of memory: {exc}"
            )
            return rpc_status.to_status(status)
    except ImportError:
        pass
    return _internal(method, exc)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions raised by servicers to statuses, in one place. Unknown exceptions become INTERNAL."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        if handler.unary_unary:
            inner = handler.unary_unary

            def unary_unary(request, context):
                try:
                    return inner(request, context)
                except Exception as exc:  # noqa: BLE001 - this is the one mapping point
                    context.abort_with_status(_status_for(method, exc))

            return handler._replace(unary_unary=unary_unary)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            def unary_stream(request, context):
                try:
                    yield from inner_stream(request, context)
                except Exception as exc:  # noqa: BLE001
                    context.abort_with_status(_status_for(method, exc))

            return handler._replace(unary_stream=unary_stream)
        if handler.stream_unary:
            inner_client_stream = handler.stream_unary

            def stream_unary(requests, context):
                try:
                    return inner_client_stream(requests, context)
                except Exception as exc:  # noqa: BLE001
                    context.abort_with_status(_status_for(method, exc))

            return handler._replace(stream_unary=stream_unary)
        if handler.stream_stream:
            inner_bidi = handler.stream_stream

            def stream_stream(requests, context):
                try:
                    yield from inner_bidi(requests, context)
                except Exception as exc:  # noqa: BLE001
                    context.abort_with_status(_status_for(method, exc))

            return handler._replace(stream_stream=stream_stream)
        return handler


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
    ):
        self.role = role
        self.service_names = service_names
        self.register = register
        self.loaded = loaded
        self.counters = counters


def start(service: Service, settings: Settings, port: int) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Builds and starts a server for `service` on host:port (0 = any free port); returns the bound port.

    TLS/mTLS and bearer tokens come from settings.security; plaintext is refused off loopback unless allowed
    (ConfigurationError, before anything binds).
    """
    credentials = server_credentials(settings)
    shm.configure(settings.shared_memory)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix=service.role),
        # ErrorInterceptor first (outermost): it maps what the token check raises, like any typed error.
        interceptors=[ErrorInterceptor(), *server_interceptors(settings)],
        options=settings.grpc_options(),
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


def serve_forever(service: Service, settings: Settings, port: int) -> None:
    """Runs until SIGTERM/SIGINT: then health goes NOT_SERVING, in-flight calls get the grace period."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {service.role} %(levelname)s %(message)s")
    if settings.keep_freed_memory and not keep_freed_memory():
        log.info("keep_freed_memory: not glibc, left as it is")
    if settings.torch_threads > 0 and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(settings.torch_threads)
    server, bound, health_servicer = start(service, settings, port)
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
    server.stop(settings.shutdown_grace_seconds).wait()
    log.info("stopped")
