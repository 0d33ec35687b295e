"""OpenTelemetry traces (settings.tracing; docs/deploy.md, Traces): a SERVER span per call on every process, a CLIENT
span per downstream call of the gateway, one trace id across them through W3C `traceparent` in gRPC metadata, and
the trace id in every log line written while a call runs.

Imported only when tracing is on (serving/observe.py). The exporter and what it is configured by are OpenTelemetry's
own: OTEL_TRACES_EXPORTER (otlp, console), OTEL_EXPORTER_OTLP_ENDPOINT and the rest of OTEL_EXPORTER_OTLP_*,
OTEL_TRACES_SAMPLER, OTEL_BSP_*, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from triptych.client.timing import parse_server_timing
from triptych.serving.settings import ConfigurationError, Settings

EXPORTERS = ("otlp", "console")
# Server statuses that mean the service failed (OpenTelemetry's gRPC conventions); the others are the caller's.
_SERVER_ERRORS = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
}
# Never spanned on the client side: the gateway's readiness checks its backends every second.
_UNTRACED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


def _exporter(name: str) -> SpanExporter:
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # endpoint, TLS, headers, timeout from OTEL_EXPORTER_OTLP_*
    return ConsoleSpanExporter()


class Tracing:
    """The process's tracer provider and exporter."""

    def __init__(self, role: str, settings: Settings):
        name = settings.otel_traces_exporter.strip().lower()
        if name not in EXPORTERS:
            raise ConfigurationError(
                f"OTEL_TRACES_EXPORTER={settings.otel_traces_exporter!r}: Triptych exports traces with one of "
                f"{', '.join(EXPORTERS)}"
            )
        resource = Resource.create(
            {"service.name": settings.otel_service_name or f"triptych-{role}", "triptych.role": role}
        )
        self.provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER (default parent-based on)
        self.provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
        self.tracer = self.provider.get_tracer("triptych")

    def begin(self, method: str, model: str, invocation_metadata) -> ServerSpan:
        return ServerSpan(self.tracer, method, model, invocation_metadata)

    def client_interceptor(self) -> ClientInterceptor:
        return ClientInterceptor(self.tracer)

    def shutdown(self) -> None:
        """Exports what is still buffered (a process leaving after its drain)."""
        self.provider.shutdown()


def _rpc_attributes(method: str) -> dict[str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


class ServerSpan:
    """One call's SERVER span, the child of the caller's `traceparent` when it sent one."""

    def __init__(self, tracer: trace.Tracer, method: str, model: str, invocation_metadata):
        parent = propagate.extract({key: value for key, value in invocation_metadata or () if isinstance(value, str)})
        attributes = _rpc_attributes(method)
        if model:
            attributes["triptych.model"] = model
        self.span = tracer.start_span(method.lstrip("/"), context=parent, kind=SpanKind.SERVER, attributes=attributes)
        self._context = trace.set_span_in_context(self.span, parent)

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """The span is current (for the gateway's downstream calls and for log lines) while the block runs."""
        token = otel_context.attach(self._context)
        try:
            yield
        finally:
            otel_context.detach(token)

    def end(self, code: grpc.StatusCode, trailing_metadata) -> None:
        self.span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code == grpc.StatusCode.OK:
            # The call's server-timing trailer, as attributes: where its time went (queue, encode, encode-hop, ...).
            for stage, seconds in parse_server_timing(trailing_metadata).items():
                self.span.set_attribute(f"triptych.timing.{stage}_ms", round(seconds * 1e3, 3))
        elif code in _SERVER_ERRORS:
            self.span.set_status(Status(StatusCode.ERROR, code.name))
        self.span.end()


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: list):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = details.wait_for_ready
        self.compression = details.compression


class ClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """A CLIENT span per call made while a span is current (the gateway's downstream calls), its context sent as
    `traceparent`; calls made outside any call (readiness checks) pass untouched."""

    def __init__(self, tracer: trace.Tracer):
        self._tracer = tracer

    def _call(self, continuation, details: grpc.ClientCallDetails, request):
        method = details.method if isinstance(details.method, str) else details.method.decode()
        if method.startswith(_UNTRACED_PREFIXES) or not trace.get_current_span().get_span_context().is_valid:
            return continuation(details, request)
        span = self._tracer.start_span(method.lstrip("/"), kind=SpanKind.CLIENT, attributes=_rpc_attributes(method))
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        metadata = [*(details.metadata or ()), *carrier.items()]
        try:
            call = continuation(_CallDetails(details, metadata), request)
        except Exception:
            span.set_status(Status(StatusCode.ERROR, "the call did not start"))
            span.end()
            raise

        def done(finished) -> None:
            code = finished.code() if hasattr(finished, "code") else None
            if code is not None:
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code != grpc.StatusCode.OK:
                    span.set_status(Status(StatusCode.ERROR, code.name))
            span.end()

        call.add_done_callback(done)
        return call

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return self._call(continuation, client_call_details, request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return self._call(continuation, client_call_details, request)


class TraceIdFilter(logging.Filter):
    """Sets `trace_id` on every record: the current span's trace id, "-" outside any call."""

    def filter(self, record: logging.LogRecord) -> bool:
        span_context = trace.get_current_span().get_span_context()
        record.trace_id = trace.format_trace_id(span_context.trace_id) if span_context.is_valid else "-"
        return True
