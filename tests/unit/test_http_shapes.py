"""The HTTP API's translations, without processes: Runware bodies and error paths, OpenAI bodies."""

from __future__ import annotations

import grpc
import pytest

from triptych.http.openai import OpenAIError, openai_param, parse_images_body
from triptych.http.runware import RunwareErrors, errors_from_rpc, parse_body, runware_parameter


@pytest.mark.parametrize(
    ("proto_path", "runware"),
    [
        ("width", "width"),
        ("cfg_scale", "CFGScale"),
        ("task_uuid", "taskUUID"),
        ("lora[0].weight", "lora[0].weight"),
        ("control_net[1].end_step_percentage", "controlNet[1].endStepPercentage"),
        ("refiner.start_step", "refiner.startStep"),
        ("max_sequence_length", "maxSequenceLength"),
    ],
)
def test_proto_field_paths_become_runware_keys(proto_path, runware):
    assert runware_parameter(proto_path) == runware


def test_a_body_of_tasks_keeps_their_order_and_the_api_key():
    body = parse_body(
        [
            {"taskType": "authentication", "apiKey": "k"},
            {"taskType": "imageInference", "taskUUID": "a", "positivePrompt": "x", "outputType": ["dataURI", "URL"]},
            {"taskType": "imageInference", "positivePrompt": "y", "includeCost": True, "checkNSFW": False},
        ]
    )
    assert body.api_key == "k"
    assert [t.request.positive_prompt for t in body.tasks] == ["x", "y"]
    assert body.tasks[0].task_uuid == "a" and body.tasks[0].output_types == ("dataURI", "URL")
    assert body.tasks[1].task_uuid and body.tasks[1].include_cost and body.tasks[1].output_types == ("URL",)
    assert body.tasks[1].request.task_uuid == body.tasks[1].task_uuid  # a made-up taskUUID is echoed too


def test_every_bad_key_of_every_task_is_named_before_anything_runs():
    with pytest.raises(RunwareErrors) as raised:
        parse_body(
            [
                {"taskType": "imageInference", "taskUUID": "a", "steps": -1, "checkNSFW": True},
                {"taskType": "imageInference", "taskUUID": "b", "deliveryMethod": "async", "lora": [{"weight": "x"}]},
                {"taskType": "videoInference"},
                "not a task",
            ]
        )
    found = [(e["code"], e.get("parameter"), e.get("taskUUID")) for e in raised.value.errors]
    assert found == [
        ("invalidCheckNSFW", "checkNSFW", "a"),
        ("invalidSteps", "steps", "a"),
        ("invalidDeliveryMethod", "deliveryMethod", "b"),
        ("invalidLora", "lora[0].weight", "b"),
        ("unsupportedTaskType", "taskType", None),
        ("invalidRequestBody", None, None),
    ]
    assert raised.value.status == 400


class _Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


def test_gateway_errors_in_runware_shape():
    invalid = errors_from_rpc(
        _Failed(grpc.StatusCode.INVALID_ARGUMENT, "..."), "t", [("control_net[0].end_step", "must be a step")]
    )
    assert invalid.status == 400
    assert invalid.errors == [
        {
            "code": "invalidControlNet",
            "message": "controlNet[0].endStep: must be a step",
            "parameter": "controlNet[0].endStep",
            "taskUUID": "t",
        }
    ]
    missing = errors_from_rpc(_Failed(grpc.StatusCode.NOT_FOUND, "lora[0].model: model 'x' is not in"), "t", [])
    assert (missing.errors[0]["code"], missing.errors[0]["parameter"]) == ("modelNotFound", "lora[0].model")
    busy = errors_from_rpc(_Failed(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"), "t", [])
    assert (busy.status, busy.errors[0]["code"], busy.errors[0].get("parameter")) == (429, "serverBusy", None)


def test_openai_body_becomes_a_request():
    parsed = parse_images_body(
        {"prompt": "a fox", "n": 2, "size": "640x384", "response_format": "url", "user": "u", "seed": 4}, "tiny/sd15"
    )
    request = parsed.request
    assert (request.model, request.number_results, request.width, request.height) == ("tiny/sd15", 2, 640, 384)
    assert request.seed == 4 and parsed.response_format == "url"
    assert not parse_images_body({"prompt": "a", "model": "m", "size": "auto"}, None).request.HasField("width")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "prompt"),
        ({"prompt": "a"}, "model"),
        ({"prompt": "a", "model": "m", "size": "big"}, "size"),
        ({"prompt": "a", "model": "m", "style": "vivid"}, "style"),
        ({"prompt": "a", "model": "m", "n": "2"}, "n"),
        ({"prompt": "a", "model": "m", "response_format": "png"}, "response_format"),
    ],
)
def test_openai_errors_name_the_openai_key(body, param):
    with pytest.raises(OpenAIError) as raised:
        parse_images_body(body, None)
    assert raised.value.param == param and raised.value.body()["error"]["type"] == "invalid_request_error"


def test_server_side_parameters_map_back_to_openai_keys():
    assert [openai_param(p) for p in ("width", "numberResults", "positivePrompt", "CFGScale", None)] == [
        "size",
        "n",
        "prompt",
        "cfg_scale",
        None,
    ]


def test_a_body_has_at_most_max_tasks():
    task = {"taskType": "imageInference", "positivePrompt": "x"}
    assert len(parse_body([task] * 3, max_tasks=3).tasks) == 3
    with pytest.raises(RunwareErrors) as raised:
        parse_body([task] * 4, max_tasks=3)
    assert raised.value.errors[0]["code"] == "tooManyTasks"
