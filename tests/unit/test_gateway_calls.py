"""The gateway's downstream calls are cancelled together when the caller goes away, also one started after."""

from __future__ import annotations

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
