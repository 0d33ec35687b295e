import base64
import json

import pytest

from triptych.client import TaskError, request_from_task, requests_from_json, task_from_request
from triptych.v1 import common_pb2, decoder_service_pb2

FULL = {
    "taskType": "imageInference",
    "taskUUID": "u1",
    "positivePrompt": "a fox",
    "negativePrompt": "blur",
    "model": "tiny/sdxl",
    "width": 128,
    "height": 64,
    "steps": 30,
    "CFGScale": 6.5,
    "scheduler": "Euler a",
    "seed": 2**64 - 1,
    "clipSkip": 1,
    "vae": "tiny/vae-alt",
    "numberResults": 2,
    "outputFormat": "webp",
    "lora": [{"model": "tiny/lora-sd15-kohya", "weight": 0.7}],
    "embeddings": [{"model": "tiny/ti-sdxl"}],
    "controlNet": [
        {
            "model": "tiny/controlnet-sdxl",
            "guideImage": "data:image/png;base64," + base64.b64encode(b"png").decode(),
            "startStepPercentage": 10,
            "endStep": 12,
            "controlMode": "ControlNet",
        }
    ],
    "refiner": {"model": "tiny/sdxl-refiner", "startStepPercentage": 80},
}


def test_full_task_round_trips():
    request = request_from_task(FULL)
    assert request.cfg_scale == 6.5 and request.seed == 2**64 - 1 and request.clip_skip == 1
    assert request.output_format == decoder_service_pb2.OUTPUT_FORMAT_WEBP
    assert request.control_net[0].guide_image == b"png"
    assert request.control_net[0].control_mode == common_pb2.CONTROL_MODE_CONTROLNET
    assert request.control_net[0].WhichOneof("end") == "end_step"
    assert request.refiner.start_step_percentage == 80
    assert request_from_task(json.loads(json.dumps(task_from_request(request)))) == request


@pytest.mark.parametrize(
    "change,key",
    [
        ({"sampler": "x"}, "sampler"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"width": "512"}, "width"),
        ({"steps": 2.5}, "steps"),
        ({"CFGScale": "high"}, "CFGScale"),
        ({"CFGScale": 10**400}, "CFGScale"),  # JSON allows it; float() cannot hold it
        ({"lora": [{"model": "x", "weight": -(10**400)}]}, "lora[0].weight"),
        ({"taskType": "imageUpscale"}, "taskType"),
        ({"outputFormat": "GIF"}, "outputFormat"),
        ({"lora": [{"model": "x", "strength": 1}]}, "lora[0].strength"),
        ({"controlNet": [{"model": "c", "guideImage": "https://example.com/a.png"}]}, "controlNet[0].guideImage"),
        ({"controlNet": [{"model": "c", "guideImage": "!!!"}]}, "controlNet[0].guideImage"),
        ({"controlNet": [{"model": "c", "guideImage": "aGk=", "controlMode": "loud"}]}, "controlNet[0].controlMode"),
        ({"refiner": {"model": "r", "startStep": 3, "startStepPercentage": 50}}, "refiner.startStep"),
    ],
)
def test_bad_keys_are_named(change, key):
    with pytest.raises(TaskError) as raised:
        request_from_task({**FULL, **change})
    assert key in [k for k, _ in raised.value.violations]


def test_array_of_tasks_and_errors_carry_their_index(tmp_path):
    assert len(requests_from_json(json.dumps([FULL, FULL]))) == 2
    with pytest.raises(TaskError) as raised:
        requests_from_json(json.dumps([FULL, {**FULL, "bogus": 1}]))
    assert raised.value.violations[0][0] == "[1].bogus"


def test_guide_image_from_a_local_path(tmp_path):
    (tmp_path / "guide.png").write_bytes(b"bytes")
    task = {**FULL, "controlNet": [{"model": "c", "guideImage": "guide.png"}]}
    assert requests_from_json(json.dumps(task), base_dir=tmp_path)[0].control_net[0].guide_image == b"bytes"


def test_a_null_refiner_is_no_refiner():
    assert not request_from_task({**FULL, "refiner": None}).HasField("refiner")
