"""The compose topology, for real (deploy/ci/check runs it with .venv's Python):

1. the image serves: deploy/compose.yaml up (gateway, two encoders, two denoisers, decoder, models read-only);
2. pixels: a Generate through the gateway container equals, pixel for pixel, the same request to `triptych serve`
   run here on the same tiny models;
3. replicas: callers keep generating while one denoiser replica is stopped (`podman stop`: SIGTERM, drain): no
   call fails, and each encoder and denoiser replica served calls (its own /metrics says how many).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from triptych.client import ImageClient, describe_error
from triptych.client.connection import wait_until_serving
from triptych.v1 import image_service_pb2

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "triptych-ci"
GATEWAY_PORT = 55051
REQUEST = dict(model="tiny/sd15", positive_prompt="a red fox in the snow", width=64, height=64, steps=6, seed=42)


def run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, text=True, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}: {(done.stderr or '')[-3000:]}")
    return done


def pixels(png: bytes) -> tuple[tuple[int, int], bytes]:
    image = Image.open(io.BytesIO(png))
    return image.size, image.convert("RGB").tobytes()


def generate(address: str, **fields) -> bytes:
    with ImageClient(address) as client:
        return client.generate(image_service_pb2.GenerateRequest(**{**REQUEST, **fields}), timeout=120)[0].image.data


@contextlib.contextmanager
def triptych_serve(models: Path, port: int):
    """`triptych serve` here, on loopback, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIPTYCH_")}
    command = [sys.executable, "-m", "triptych.cli", "serve", "--port", str(port), "--model-root", str(models)]
    env.update(HF_HUB_OFFLINE="1", TRIPTYCH_TORCH_THREADS="1")  # as each container runs (compose: one thread each)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if line.startswith("all services SERVING"):
                break
        else:
            raise RuntimeError(f"triptych serve exited with {process.wait()}")
        threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(60)


class Compose:
    def __init__(self, compose: str, image: str, models: Path):
        self.command = [compose, "-p", PROJECT, "-f", str(ROOT / "deploy" / "compose.yaml")]
        self.env = {
            **os.environ,
            "TRIPTYCH_IMAGE": image,
            "TRIPTYCH_MODELS": str(models),
            "TRIPTYCH_GATEWAY_PORT": str(GATEWAY_PORT),
            "TRIPTYCH_TORCH_THREADS": "1",  # two cores for six processes
        }

    def __call__(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return run(*self.command, *args, env=self.env, **kwargs)

    def clean(self) -> None:
        """Down, and any container or network of this project that is still there."""
        subprocess.run([*self.command, "down", "-t", "5"], env=self.env, capture_output=True)
        label = f"label=com.docker.compose.project={PROJECT}"
        left = subprocess.run(["podman", "ps", "-aq", "--filter", label], capture_output=True, text=True).stdout.split()
        if left:
            subprocess.run(["podman", "rm", "-f", "-t", "5", *left], capture_output=True)
        subprocess.run(["podman", "network", "rm", "-f", f"{PROJECT}_triptych"], capture_output=True)

    def container(self, service: str) -> str:
        """The container of a compose service (its name is the compose tool's business)."""
        names = run(
            "podman", "ps", "-a", "--format", "{{.Names}}",
            "--filter", f"label=com.docker.compose.project={PROJECT}",
            "--filter", f"label=com.docker.compose.service={service}",
            capture_output=True,
        ).stdout.split()  # fmt: skip
        assert len(names) == 1, (service, names)
        return names[0]


def scrape(container: str) -> dict:
    """A replica's /metrics, read inside its container (the metrics ports are not published)."""
    script = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9100/metrics').read().decode())"
    text = run("podman", "exec", container, "python3", "-c", script, capture_output=True).stdout
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def calls_served(container: str, grpc_service: str, method: str) -> float:
    samples = scrape(container)
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == "triptych_calls_total"
        and dict(labels).get("method") == method
        and dict(labels).get("service") == grpc_service
        and dict(labels).get("code") == "OK"
    )


def under_load(address: str, callers: int, stop_after: float, stop) -> tuple[int, list[str]]:
    """`callers` threads generating (each seed its own) until `stop_after` s after `stop()` returned."""
    done, failures, lock = [0], [], threading.Lock()
    finish = threading.Event()

    def caller(index: int) -> None:
        with ImageClient(address) as client:
            seed = index * 1000
            while not finish.is_set():
                seed += 1
                request = image_service_pb2.GenerateRequest(**{**REQUEST, "seed": seed, "steps": 4})
                try:
                    client.generate(request, timeout=120)
                    with lock:
                        done[0] += 1
                except grpc.RpcError as exc:
                    with lock:
                        failures.append(describe_error(exc))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    time.sleep(5)
    stop()
    time.sleep(stop_after)
    finish.set()
    for thread in threads:
        thread.join(180)
    return done[0], failures


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--compose", required=True)
    args = parser.parse_args()
    models = args.work.resolve() / "models"  # compose reads a relative path as a volume name
    if not (models / "tiny" / "sd15").exists():
        run(sys.executable, "-m", "triptych.cli", "models", "build-tiny", "--root", str(models), capture_output=True)
    # The containers run as uid 10001 and read the store: files the builders wrote 0600 (safetensors does) must be
    # readable by others, as in any shared store (docs/deploy.md).
    run("chmod", "-R", "a+rX", str(models))
    compose = Compose(args.compose, args.image, models)
    compose.clean()  # what a previous run left
    started = time.monotonic()
    compose("up", "-d", capture_output=True)
    try:
        gateway = f"127.0.0.1:{GATEWAY_PORT}"
        # No systemd here: health checks and depends_on conditions do not run. Poll readiness: the gateway is ready
        # only once its encoders, denoisers and decoder serve.
        wait_until_serving(gateway, timeout=240)
        print(f"compose up: gateway ready in {time.monotonic() - started:.1f} s")
        for service in ("gateway", "denoiser-1"):  # the image's HEALTHCHECK command, and who runs it
            container = compose.container(service)
            run("podman", "exec", container, "python3", "-m", "triptych.serving.health_port", "8081", "liveness")
            user = run("podman", "exec", container, "id", "-u", capture_output=True).stdout.strip()
            assert user == "10001", f"{service} runs as uid {user}"
        print("HEALTHCHECK (gRPC health on 8081) answers SERVING; processes run as uid 10001")
        # Plaintext on all interfaces without TRIPTYCH_ALLOW_INSECURE or TLS: refused at start, with the reason.
        refused = subprocess.run(
            ["podman", "run", "--rm", args.image, "gateway"], capture_output=True, text=True, timeout=120
        )
        assert refused.returncode == 2 and "refusing to serve plaintext on 0.0.0.0" in refused.stderr, refused.stderr
        print("a container without TLS or TRIPTYCH_ALLOW_INSECURE refuses to start: exit 2, says why")

        from_containers = generate(gateway)
        with triptych_serve(models, 55151) as here:
            from_here = generate(here)
        size, container_pixels = pixels(from_containers)
        assert (size, container_pixels) == pixels(from_here), "the containers' image differs from triptych serve's"
        print(f"pixels: {size[0]}x{size[1]} identical to `triptych serve` on the same tiny model")

        denoise = ("triptych.v1.DenoiserService", "Denoise")
        stopped = {}

        def stop_denoiser() -> None:
            # Both replicas have served (round-robin over dns:///denoiser) before one of them goes.
            samples = scrape(compose.container("denoiser-2"))
            in_flight = dict(service=denoise[0], method=denoise[1])
            stopped["in_flight"] = samples.get(("triptych_calls_in_flight", frozenset(in_flight.items())), 0)
            stopped["served"] = calls_served(compose.container("denoiser-2"), *denoise)
            stopped["survivor"] = calls_served(compose.container("denoiser-1"), *denoise)
            began = time.monotonic()
            run("podman", "stop", "-t", "40", compose.container("denoiser-2"), capture_output=True)
            stopped["seconds"] = time.monotonic() - began

        completed, failures = under_load(gateway, callers=4, stop_after=8, stop=stop_denoiser)
        print(f"load: {completed} Generates by 4 callers, {len(failures)} failed; denoiser-2 stopped (SIGTERM, drain)")
        print(
            f"  in {stopped['seconds']:.1f} s, having served {stopped['served']:.0f} Denoise calls, "
            f"{stopped['in_flight']:.0f} in flight just before the stop"
        )
        assert not failures, failures[:3]
        assert completed >= 8, completed
        assert stopped["served"] > 0, "denoiser-2 served no Denoise before it stopped"
        survivor = calls_served(compose.container("denoiser-1"), *denoise)
        print(f"denoiser-1: {survivor:.0f} Denoise calls served ({survivor - stopped['survivor']:.0f} after the stop)")
        assert survivor > stopped["survivor"], "denoiser-1 took no calls once denoiser-2 stopped"
        for service in ("encoder-1", "encoder-2"):
            count = calls_served(compose.container(service), "triptych.v1.TextEncoderService", "Encode")
            print(f"{service}: {count:.0f} Encode calls served")
            assert count > 0, f"{service} served no Encode"
        container = compose.container("denoiser-2")
        exit_code = run("podman", "inspect", "-f", "{{.State.ExitCode}}", container, capture_output=True).stdout
        log = run("podman", "logs", container, capture_output=True).stderr
        assert exit_code.strip() == "0" and " stopped" in log, log[-2000:]
        print("denoiser-2: drained and exited 0 within its grace")
        return 0
    finally:
        if os.environ.get("TRIPTYCH_CI_KEEP") != "1":
            compose.clean()


if __name__ == "__main__":
    sys.exit(main())
