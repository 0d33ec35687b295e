"""The gateway's downstream calls are cancelled together when the caller goes away, also one started after."""

from __future__ import annotations

import grpc

from triptych.gateway.calls import Calls


class Context:
    """The two grpc.ServicerContext methods Calls uses."""

    def __init__(self):
        self.callbacks = []

    def add_callback(self, callback) -> bool:
        self.callbacks.append(callback)
        return True

    def time_remaining(self):
        return None


class Call:
    def __init__(self):
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def test_a_call_started_after_the_caller_went_away_is_cancelled_at_once():
    context = Context()
    calls = Calls(context, transport=None)
    running = calls.track(Call())
    for callback in context.callbacks:  # what gRPC does when the Generate call ends early
        callback()
    assert running.cancelled
    late = calls.track(Call())  # e.g. the Decode the handler thread was about to start
    assert late.cancelled


class Failed(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "Cancelled"


def test_a_backend_that_cancels_under_a_live_caller_is_unavailable_so_callers_retry():
    # A denoiser stopped past its drain grace cancels the calls still running: the caller, still there, gets
    # UNAVAILABLE (retried by clients, like a backend gone before the call), never a CANCELLED it did not ask for.
    context = Context()
    calls = Calls(context, transport=None)
    relayed = calls.relayed(Failed(grpc.StatusCode.CANCELLED))
    assert relayed.code == grpc.StatusCode.UNAVAILABLE and "stopped during the call" in relayed.message
    assert calls.relayed(Failed(grpc.StatusCode.INVALID_ARGUMENT)).code == grpc.StatusCode.INVALID_ARGUMENT
    for callback in context.callbacks:  # the caller went away: its own cancel stays CANCELLED
        callback()
    assert calls.relayed(Failed(grpc.StatusCode.CANCELLED)).code == grpc.StatusCode.CANCELLED
