"""Torch-free Python client for Triptych: generated stubs live in `triptych.v1`, helpers here."""

from triptych.client.connection import (
    DEFAULT_GATEWAY,
    ImageClient,
    describe_error,
    field_violations,
    open_channel,
    wait_until_serving,
)
from triptych.client.task import TaskError, request_from_task, requests_from_json, task_from_request
from triptych.client.timing import parse_server_timing, server_timing
from triptych.client.transport import channel_credentials

__all__ = [
    "DEFAULT_GATEWAY",
    "ImageClient",
    "TaskError",
    "channel_credentials",
    "describe_error",
    "field_violations",
    "open_channel",
    "parse_server_timing",
    "request_from_task",
    "requests_from_json",
    "server_timing",
    "task_from_request",
    "wait_until_serving",
]
