"""Runware's `promptWeighting` key in task JSON <-> GenerateRequest.prompt_weighting."""

from __future__ import annotations

import pytest

from triptych.client import TaskError, request_from_task, task_from_request
from triptych.v1 import encoder_service_pb2

TASK = {"positivePrompt": "a (red:1.3) fox", "model": "tiny/sd15"}


@pytest.mark.parametrize("value", ["sdEmbeds", "SDEMBEDS", "a1111"])
def test_sd_embeds_is_a1111_syntax_and_round_trips(value):
    request = request_from_task({**TASK, "promptWeighting": value})
    assert request.prompt_weighting == encoder_service_pb2.PROMPT_WEIGHTING_A1111
    assert task_from_request(request)["promptWeighting"] == "sdEmbeds"
    assert request_from_task(task_from_request(request)) == request


def test_absent_means_literal_and_stays_absent():
    request = request_from_task(TASK)
    assert request.prompt_weighting == encoder_service_pb2.PROMPT_WEIGHTING_UNSPECIFIED
    assert "promptWeighting" not in task_from_request(request)


@pytest.mark.parametrize(
    "value,reason",
    [("compel", "'compel' syntax is not supported"), ("fancy", "must be 'sdEmbeds'"), (1, "must be a string")],
)
def test_other_values_are_errors_naming_the_key(value, reason):
    with pytest.raises(TaskError) as raised:
        request_from_task({**TASK, "promptWeighting": value})
    assert [key for key, _ in raised.value.violations] == ["promptWeighting"]
    assert reason in raised.value.violations[0][1]
