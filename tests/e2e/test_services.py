"""The four processes as a user runs them: separation of weights, determinism, seeds, errors, CLI, formats."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import grpc
import pytest
from PIL import Image

from tests.e2e.stubs import DEADLINE_S, tiny_decode
from triptych.client import field_violations, open_channel
from triptych.v1 import (
    decoder_service_pb2,
    image_service_pb2,
    runtime_service_pb2,
    runtime_service_pb2_grpc,
)

SMALL = dict(model="tiny/sd15", positive_prompt="a red fox", width=64, height=64, steps=4)


def runtime_info(address: str) -> runtime_service_pb2.GetRuntimeInfoResponse:
    with open_channel(address) as channel:
        return runtime_service_pb2_grpc.RuntimeServiceStub(channel).GetRuntimeInfo(
            runtime_service_pb2.GetRuntimeInfoRequest()
        )


def test_each_process_holds_only_its_own_components(client, services):
    for model in ("tiny/sd15", "tiny/sdxl"):
        client.generate(image_service_pb2.GenerateRequest(**{**SMALL, "model": model}, seed=1))
    allowed = {
        "encoder": {"tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2", "text_encoder_3"},
        "denoiser": {"unet", "transformer", "controlnet"},
        "decoder": {"vae"},
        "gateway": set(),
    }
    pids = set()
    for role, components in allowed.items():
        info = runtime_info(services.addresses[role])
        assert info.role == role
        held = {c.component for c in info.loaded_components}
        assert held <= components, f"{role} holds {held - components}"
        pids.add(info.pid)
        if role != "gateway":
            assert {c.model for c in info.loaded_components} >= {"tiny/sd15", "tiny/sdxl"}
            assert all(c.parameter_bytes > 0 for c in info.loaded_components if "tokenizer" not in c.component)
    assert len(pids) == 4, "each service is its own OS process"
    assert runtime_info(services.gateway).torch_threads == 0, "the gateway never imports torch"


def test_same_request_gives_same_bytes(client):
    request = image_service_pb2.GenerateRequest(**SMALL, seed=77, scheduler="Euler a")
    first, second = client.generate(request)[0], client.generate(request)[0]
    assert first.image.data == second.image.data


def test_unset_seed_is_random_echoed_and_reproduces(client):
    first = client.generate(image_service_pb2.GenerateRequest(**SMALL))[0]
    second = client.generate(image_service_pb2.GenerateRequest(**SMALL))[0]
    assert first.seed != second.seed
    again = client.generate(image_service_pb2.GenerateRequest(**SMALL, seed=first.seed))[0]
    assert again.image.data == first.image.data


def test_png_carries_parameters_and_a_request_that_reproduces_it(client):
    image = client.generate(image_service_pb2.GenerateRequest(**SMALL, seed=5, clip_skip=1, negative_prompt="dull"))[0]
    png = Image.open(io.BytesIO(image.image.data))
    assert png.text["parameters"] == image.parameters
    assert "Seed: 5" in image.parameters and "Clip skip: 2" in image.parameters  # A1111's clip skip is ours + 1
    assert "Negative prompt: dull" in image.parameters
    task = json.loads(png.text["triptych-request"])
    assert task["seed"] == 5 and task["positivePrompt"] == "a red fox"
    from triptych.client import request_from_task

    assert client.generate(request_from_task(task))[0].image.data == image.image.data


@pytest.mark.parametrize(
    "output_format,mime,pil_format",
    [
        (decoder_service_pb2.OUTPUT_FORMAT_JPEG, "image/jpeg", "JPEG"),
        (decoder_service_pb2.OUTPUT_FORMAT_WEBP, "image/webp", "WEBP"),
        (decoder_service_pb2.OUTPUT_FORMAT_PNG, "image/png", "PNG"),
    ],
)
def test_output_formats(client, output_format, mime, pil_format):
    image = client.generate(image_service_pb2.GenerateRequest(**SMALL, seed=1, output_format=output_format))[0]
    assert image.image.mime_type == mime
    decoded = Image.open(io.BytesIO(image.image.data))
    assert decoded.format == pil_format and decoded.size == (64, 64)


def test_png_text_chunks_come_in_key_order_whatever_order_the_map_arrived_in(services):
    """A protobuf map has no order: two gateways (or one gateway's restarts) serialise png_text differently, and
    upb iterates what it parsed in an order that follows the arrival. The decoder writes the chunks sorted, so a
    request gives the same bytes from any gateway. The entries are sent raw, in both orders."""
    keys = [f"key-{i}" for i in range(12)]
    base = tiny_decode().SerializeToString()

    def decode(order: list[str]) -> bytes:
        entries = [decoder_service_pb2.DecodeRequest(png_text={k: k.upper()}).SerializeToString() for k in order]
        with open_channel(services.addresses["decoder"]) as channel:
            call = channel.unary_unary(
                "/triptych.v1.DecoderService/Decode",
                request_serializer=None,
                response_deserializer=decoder_service_pb2.DecodeResponse.FromString,
            )
            return call(base + b"".join(entries), timeout=DEADLINE_S).images[0].data

    forward, backward = decode(keys), decode(keys[::-1])
    assert forward == backward
    assert list(Image.open(io.BytesIO(forward)).text) == sorted(keys)


BAD = [
    ({"width": 500}, grpc.StatusCode.INVALID_ARGUMENT, "width"),
    ({"height": 4096}, grpc.StatusCode.INVALID_ARGUMENT, "height"),
    ({"steps": 0}, grpc.StatusCode.INVALID_ARGUMENT, "steps"),
    ({"steps": 151}, grpc.StatusCode.INVALID_ARGUMENT, "steps"),
    ({"cfg_scale": 51}, grpc.StatusCode.INVALID_ARGUMENT, "cfg_scale"),
    ({"cfg_scale": float("nan")}, grpc.StatusCode.INVALID_ARGUMENT, "cfg_scale"),
    ({"scheduler": "Eulerish"}, grpc.StatusCode.INVALID_ARGUMENT, "scheduler"),
    ({"scheduler": "DDIM Karras"}, grpc.StatusCode.INVALID_ARGUMENT, "scheduler"),
    ({"number_results": 0}, grpc.StatusCode.INVALID_ARGUMENT, "number_results"),
    ({"clip_skip": 9}, grpc.StatusCode.INVALID_ARGUMENT, "clip_skip"),
    ({"model": "tiny/nope"}, grpc.StatusCode.NOT_FOUND, "model"),
    ({"model": "../etc"}, grpc.StatusCode.INVALID_ARGUMENT, "model"),
    ({"model": ""}, grpc.StatusCode.INVALID_ARGUMENT, "model"),
    ({"model": "tiny/vae-alt"}, grpc.StatusCode.INVALID_ARGUMENT, "model"),
    ({"vae": "tiny/missing-vae"}, grpc.StatusCode.NOT_FOUND, "vae"),
]


@pytest.mark.parametrize("change,code,field", BAD, ids=[f"{next(iter(c))}={next(iter(c.values()))}" for c, _, _ in BAD])
def test_bad_input_is_rejected_by_field_and_the_next_request_works(client, change, code, field):
    with pytest.raises(grpc.RpcError) as raised:
        client.generate(image_service_pb2.GenerateRequest(**{**SMALL, "seed": 1, **change}))
    assert raised.value.code() == code, raised.value.details()
    assert field in raised.value.details()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert field in [f for f, _ in field_violations(raised.value)]
    assert len(client.generate(image_service_pb2.GenerateRequest(**SMALL, seed=1))) == 1


def test_every_bad_field_is_reported_at_once(client):
    with pytest.raises(grpc.RpcError) as raised:
        client.generate(image_service_pb2.GenerateRequest(**{**SMALL, "width": 500, "steps": 0, "scheduler": "x"}))
    assert {f for f, _ in field_violations(raised.value)} == {"width", "steps", "scheduler"}


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "triptych.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_cli_generate_from_prompt_and_from_request_file(services, tmp_path):
    out = tmp_path / "fox.png"
    done = run_cli(
        "generate",
        "a red fox",
        "--model",
        "tiny/sd15",
        "--seed",
        "7",
        "--steps",
        "4",
        "-o",
        str(out),
        "--address",
        services.gateway,
    )
    assert done.returncode == 0, done.stderr
    assert "seed=7" in done.stdout and Image.open(out).size == (128, 128)
    # Where the time went, from the gateway's server-timing trailer, e.g. "took 389 ms: encode 2.0, ...".
    line = r"took \d+ ms: encode [\d.]+, denoise [\d.]+ \(queued [\d.]+\), decode [\d.]+; hops [\d.]+, gateway [\d.]+"
    assert re.search(line, done.stderr), done.stderr
    task = {
        "taskType": "imageInference",
        "taskUUID": "abc",
        "positivePrompt": "a red fox",
        "model": "tiny/sd15",
        "width": 64,
        "height": 64,
        "steps": 4,
        "CFGScale": 7,
        "seed": 7,
        "scheduler": "Euler a",
        "numberResults": 2,
        "outputFormat": "PNG",
    }
    (tmp_path / "task.json").write_text(json.dumps(task))
    done = run_cli(
        "generate",
        "--request",
        str(tmp_path / "task.json"),
        "-o",
        str(tmp_path / "t.png"),
        "--address",
        services.gateway,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "t.png").exists() and (tmp_path / "t-1.png").exists()
    assert "seed=8" in done.stdout


def test_cli_reports_status_and_field_and_exits_non_zero(services, tmp_path):
    done = run_cli("generate", "a fox", "--width", "500", "--address", services.gateway)
    assert done.returncode != 0
    assert "INVALID_ARGUMENT" in done.stderr and "field width" in done.stderr
    done = run_cli("generate", "a fox", "--model", "tiny/none", "--address", services.gateway)
    assert done.returncode != 0 and "NOT_FOUND" in done.stderr and "tiny/none" in done.stderr
    (tmp_path / "task.json").write_text(json.dumps({"positivePrompt": "x", "model": "tiny/sd15", "sampler": "x"}))
    done = run_cli("generate", "--request", str(tmp_path / "task.json"), "--address", services.gateway)
    assert done.returncode != 0 and "INVALID_ARGUMENT" in done.stderr and "field sampler" in done.stderr


def test_cli_refuses_flags_it_would_ignore_and_names_the_format_it_wrote(services, tmp_path):
    (tmp_path / "task.json").write_text(
        json.dumps({"positivePrompt": "x", "model": "tiny/sd15", "width": 64, "height": 64, "steps": 2,
                    "outputFormat": "JPG"})
    )  # fmt: skip
    request = ("--request", str(tmp_path / "task.json"), "--address", services.gateway)
    done = run_cli("generate", "a cat", *request, "--seed", "5")
    assert done.returncode == 2 and "drop a prompt, --seed" in done.stderr, done.stderr
    done = run_cli("generate", "a fox", "--seed", "-1", "--address", services.gateway)
    assert done.returncode == 2 and "field --seed: out of range" in done.stderr and "Traceback" not in done.stderr
    done = run_cli("generate", "a fox", "--address", "a.example:443,b.example:443", "--allow-insecure")
    assert done.returncode == 2 and "--address: replica list" in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "empty.json").write_text("[]")
    done = run_cli("generate", "--request", str(tmp_path / "empty.json"), "--address", services.gateway)
    assert done.returncode == 2 and "holds no task" in done.stderr
    # A JPEG task asked to write out.png writes out.jpg (and says so), never JPEG bytes under a .png name.
    done = run_cli("generate", *request, "-o", str(tmp_path / "out.png"))
    assert done.returncode == 0, done.stderr
    written = tmp_path / "out.jpg"
    assert done.stdout.startswith(f"{written}  seed=") and written.read_bytes()[:3] == b"\xff\xd8\xff"
    assert not (tmp_path / "out.png").exists()


def test_cli_names_an_unreadable_request_file_without_a_traceback(services, tmp_path):
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    for path, why in ((tmp_path / "missing.json", "No such file"), (tmp_path / "binary.json", "not UTF-8")):
        done = run_cli("generate", "--request", str(path), "--address", services.gateway)
        assert done.returncode == 2 and why in done.stderr and str(path) in done.stderr
        assert "Traceback" not in done.stderr
