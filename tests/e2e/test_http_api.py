"""The HTTP API (`triptych serve http`) as a real process in front of the real services, called with httpx:
Runware's body and answer shapes, its error shape, OpenAI's images API, and images equal to the gRPC ones."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.e2e.processes import serving
from tests.e2e.self_signed import self_signed
from triptych.client import request_from_task

# Runware's documented imageInference request (an authentication task, then the inference task), with the tiny
# model's id and size for Runware's model and 512², and 4 steps to keep the test short.
RUNWARE_DOC_BODY = [
    {"taskType": "authentication", "apiKey": "<API_KEY>"},
    {
        "taskType": "imageInference",
        "taskUUID": "a770f077-f413-47de-9dac-be0b26a35da6",
        "positivePrompt": "a cat",
        "width": 128,
        "height": 128,
        "model": "tiny/sd15",
        "numberResults": 1,
        "steps": 4,
    },
]
SMALL = {"taskType": "imageInference", "positivePrompt": "a red fox", "model": "tiny/sd15", "width": 64, "height": 64}


@pytest.fixture(scope="module")
def http_api(services, model_root):
    """`triptych serve http --port 0` against the session's gateway; yields an httpx client on its base URL."""
    with (
        serving("http", model_root, args=("--gateway-address", services.gateway)) as served,
        httpx.Client(base_url=f"http://{served.address}", timeout=120) as http,
    ):
        yield http


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def grpc_image(client, task: dict, seed: int, index: int = 0) -> bytes:
    images = client.generate(request_from_task({**task, "seed": seed}))
    return images[index].image.data


def test_runware_documented_body_gets_a_runware_answer_equal_to_grpc(http_api, client):
    reply = http_api.post("/v1", json=RUNWARE_DOC_BODY)
    assert reply.status_code == 200, reply.text
    (entry,) = reply.json()["data"]
    assert set(entry) == {"taskType", "taskUUID", "imageUUID", "seed", "imageURL"}  # Runware's default: URL
    assert entry["taskType"] == "imageInference"
    assert entry["taskUUID"] == "a770f077-f413-47de-9dac-be0b26a35da6"
    image = http_api.get(entry["imageURL"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    expected = grpc_image(client, RUNWARE_DOC_BODY[1], entry["seed"])
    assert np.array_equal(pixels(image.content), pixels(expected))
    assert image.content == expected


def test_output_types_cost_and_tasks_in_order(http_api, client):
    body = [
        {**SMALL, "taskUUID": "first", "seed": 5, "numberResults": 2, "outputType": "base64Data", "steps": 2},
        {**SMALL, "taskUUID": "second", "seed": 9, "outputType": ["dataURI", "URL"], "includeCost": True, "steps": 2},
    ]
    reply = http_api.post("/v1", json=body)
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    assert [(d["taskUUID"], d["seed"]) for d in data] == [("first", 5), ("first", 6), ("second", 9)]
    assert len({d["imageUUID"] for d in data}) == 3
    for i, entry in enumerate(data[:2]):
        expected = grpc_image(client, {k: v for k, v in body[0].items() if k != "outputType"}, 5, i)
        assert base64.b64decode(entry["imageBase64Data"]) == expected
    header, _, payload = data[2]["imageDataURI"].partition(",")
    assert header == "data:image/png;base64" and data[2]["cost"] == 0
    assert base64.b64decode(payload) == http_api.get(data[2]["imageURL"]).content


def test_runware_errors_name_runware_keys(http_api):
    reply = http_api.post("/v1", json=[{**SMALL, "taskUUID": "t", "widht": 64, "steps": "4", "outputType": "PNG"}])
    assert reply.status_code == 400
    errors = reply.json()["errors"]
    assert {(e["code"], e["parameter"]) for e in errors} == {
        ("invalidOutputType", "outputType"),
        ("unsupportedParameter", "widht"),
        ("invalidSteps", "steps"),
    }
    assert all(e["taskUUID"] == "t" and e["message"] for e in errors)
    # Checked by the gateway: its snake_case field paths come back as Runware keys.
    guide = base64.b64encode(b"not an image").decode()
    task = {
        **SMALL,
        "taskUUID": "u",
        "CFGScale": 99,
        "controlNet": [{"model": "tiny/controlnet-sd15", "guideImage": guide}],
    }
    errors = http_api.post("/v1", json=[task]).json()["errors"]
    assert ("invalidCFGScale", "CFGScale") in {(e["code"], e["parameter"]) for e in errors}
    missing = http_api.post("/v1", json=[{**SMALL, "model": "tiny/no-such-model"}])
    assert missing.status_code == 400
    (error,) = missing.json()["errors"]
    assert (error["code"], error["parameter"]) == ("modelNotFound", "model")
    assert "taskUUID" in error  # generated when the task had none
    for body, code in (
        (b"[{", "invalidRequestBody"),
        (b"[]", "invalidRequestBody"),
        (b'[{"taskType": "imageUpscale"}]', "unsupportedTaskType"),
    ):
        reply = http_api.post("/v1", content=body, headers={"content-type": "application/json"})
        assert reply.status_code == 400 and reply.json()["errors"][0]["code"] == code


def test_openai_images_generations(http_api, client):
    body = {"prompt": "a red fox", "model": "tiny/sd15", "size": "64x64", "n": 2, "seed": 3, "steps": 2}
    reply = http_api.post("/v1/images/generations", json=body)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert isinstance(answer["created"], int) and len(answer["data"]) == 2
    task = {**SMALL, "numberResults": 2, "steps": 2}
    for i, item in enumerate(answer["data"]):
        assert base64.b64decode(item["b64_json"]) == grpc_image(client, task, 3, i)
    by_url = http_api.post("/v1/images/generations", json={**body, "n": 1, "response_format": "url"}).json()
    assert http_api.get(by_url["data"][0]["url"]).content == grpc_image(client, {**task, "numberResults": 1}, 3)
    for bad, param in (({"size": "500x64"}, "size"), ({"quality": "hd"}, "quality"), ({"n": 0}, "n")):
        reply = http_api.post("/v1/images/generations", json={**body, **bad})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
        assert error["param"] == param


def test_health(http_api):
    assert http_api.get("/health").json() == {"status": "SERVING"}


def test_the_callers_key_is_the_gateways_bearer_token(services, model_root):
    """Against a gateway that requires a token: Runware's `authentication` task or an Authorization header."""
    links = tuple(f"--{role}-address={services.addresses[role]}" for role in ("encoder", "denoiser", "decoder"))
    task = {**SMALL, "steps": 1, "seed": 1, "outputType": "base64Data"}
    with (
        serving("gateway", model_root, {"TRIPTYCH_AUTH_TOKENS": "http-key-7f3a"}, args=links) as gateway,
        serving("http", model_root, args=("--gateway-address", gateway.address)) as served,
        httpx.Client(base_url=f"http://{served.address}", timeout=120) as http,
    ):
        refused = http.post("/v1", json=[task])
        assert refused.status_code == 401
        assert refused.json()["errors"][0]["code"] == "invalidApiKey"
        wrong = http.post("/v1", json=[{"taskType": "authentication", "apiKey": "nope"}, task])
        assert wrong.status_code == 401
        body = [{"taskType": "authentication", "apiKey": "http-key-7f3a"}, task]
        assert http.post("/v1", json=body).status_code == 200
        header = {"authorization": "Bearer http-key-7f3a"}
        assert http.post("/v1", json=[task], headers=header).status_code == 200
        openai = {"prompt": "a red fox", "model": "tiny/sd15", "size": "64x64", "steps": 1}
        assert http.post("/v1/images/generations", json=openai).status_code == 401
        assert http.post("/v1/images/generations", json=openai, headers=header).status_code == 200


def test_https(services, model_root, tmp_path):
    cert, key = self_signed(tmp_path)
    env = {"TRIPTYCH_TLS_CERT_FILE": str(cert), "TRIPTYCH_TLS_KEY_FILE": str(key)}
    args = ("--gateway-address", services.gateway)
    with serving("http", model_root, env, args=args) as served:
        with httpx.Client(base_url=f"https://{served.address}", verify=str(cert), timeout=60) as https:
            assert https.get("/health").json() == {"status": "SERVING"}
        with pytest.raises(httpx.HTTPError), httpx.Client(base_url=f"http://{served.address}", timeout=10) as http:
            http.get("/health")
