"""What a process watches of its calls: Prometheus metrics (serving/metrics.py) and OpenTelemetry spans
(serving/tracing.py), both off by default. Off, neither module is imported, the ErrorInterceptor has no observer
and outgoing channels have no interceptor: a call pays one `is None` test.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import grpc

from triptych.serving.settings import ConfigurationError, Settings

log = logging.getLogger("triptych")

# Interceptors every outgoing channel of this process gets (tracing: traceparent on the gateway's downstream calls).
_client_interceptors: list = []


def client_interceptors() -> list:
    """What serving/security.outgoing_channel wraps each channel in; empty while tracing is off."""
    return list(_client_interceptors)


def _missing(setting: str, extra: str, exc: ImportError) -> ConfigurationError:
    return ConfigurationError(f"{setting} needs the `{extra}` extra: pip install 'triptych[{extra}]' ({exc})")


class Observability:
    """Metrics and traces of one process, as its settings ask. Build it before the role (the gateway's channels
    take the tracing interceptor as they open); `serve` once the role is built; `close` on the way out."""

    def __init__(self, role: str, settings: Settings):
        self.role = role
        self.metrics = None
        self.tracing = None
        if settings.metrics_port is not None:
            try:
                from triptych.serving.metrics import Metrics
            except ImportError as exc:
                raise _missing("TRIPTYCH_METRICS_PORT", "metrics", exc) from exc
            self.metrics = Metrics()
        if settings.tracing:
            try:
                from triptych.serving.tracing import Tracing
            except ImportError as exc:
                raise _missing("TRIPTYCH_TRACING", "tracing", exc) from exc
            self.tracing = Tracing(role, settings)
            _client_interceptors[:] = [self.tracing.client_interceptor()]

    @property
    def observer(self) -> Observability | None:
        """What the ErrorInterceptor calls for each call, or None when nothing is watched."""
        return self if self.metrics is not None or self.tracing is not None else None

    def log_format(self) -> str:
        if self.tracing is None:
            return f"%(asctime)s {self.role} %(levelname)s %(message)s"
        return f"%(asctime)s {self.role} %(levelname)s trace_id=%(trace_id)s %(message)s"

    def install_log_fields(self) -> None:
        """With tracing, every log line carries the trace id of the call it was written in (`-` outside one)."""
        if self.tracing is None:
            return
        from triptych.serving.tracing import TraceIdFilter

        for handler in logging.getLogger().handlers:
            handler.addFilter(TraceIdFilter())

    def serve(self, service, settings: Settings, grpc_port: int, version: str) -> None:
        """Starts the metrics endpoint (prints `triptych ROLE METRICS URL` for supervisors and tests)."""
        if self.metrics is None:
            return
        if settings.metrics_port and settings.metrics_port in (grpc_port, settings.health_port):
            raise ConfigurationError(
                f"TRIPTYCH_METRICS_PORT={settings.metrics_port} is also this process's gRPC or health port"
            )
        url = self.metrics.serve(service, settings, version)
        log.info("metrics at %s", url)
        print(f"triptych {self.role} METRICS {url}", flush=True)

    def begin(self, method: str, request, context: grpc.ServicerContext) -> Watch:
        return Watch(self, method, request, context)

    def close(self) -> None:
        """Flushes buffered spans (a process leaving after its drain) and stops the metrics endpoint."""
        if self.tracing is not None:
            self.tracing.shutdown()
        if self.metrics is not None:
            self.metrics.close()


class Watch:
    """One call as metrics and traces see it: begun when its handler starts, ended with its status code."""

    __slots__ = ("_context", "_model", "_names", "_observability", "_span")

    def __init__(self, observability: Observability, method: str, request, context: grpc.ServicerContext):
        self._observability = observability
        self._context = context
        model = getattr(request, "model", "")
        self._model = model if isinstance(model, str) else ""
        metrics, tracing = observability.metrics, observability.tracing
        self._names = metrics.calls.begin(method) if metrics is not None else None
        self._span = tracing.begin(method, self._model, context.invocation_metadata()) if tracing else None

    def attached(self):
        """The call's span is current while the block runs (nothing when tracing is off)."""
        return self._span.attached() if self._span is not None else contextlib.nullcontext()

    def iterate(self, make: Callable[[], Iterator]) -> Iterator:
        """A streaming handler's responses, its span current while each one is made (never across a yield: the
        stream may be closed from another thread)."""
        if self._span is None:
            yield from make()
            return
        with self._span.attached():
            responses = iter(make())
        try:
            while True:
                with self._span.attached():
                    try:
                        response = next(responses)
                    except StopIteration:
                        return
                yield response
        finally:
            close = getattr(responses, "close", None)
            if close is not None:
                with self._span.attached():
                    close()

    def end(self, code: grpc.StatusCode) -> None:
        trailing = self._context.trailing_metadata() if code == grpc.StatusCode.OK else None
        if self._names is not None:
            self._observability.metrics.calls.end(self._names, self._model, code, trailing)
        if self._span is not None:
            self._span.end(code, trailing)
