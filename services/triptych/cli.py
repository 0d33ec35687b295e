"""`triptych`: serve the services, generate images, manage the model store."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROLES = ("encoder", "denoiser", "decoder", "gateway")


def _settings(args):
    from triptych.serving.settings import Settings

    overrides = {}
    names = ("model_root", "host", "torch_threads", "metrics_port", "health_port")
    for name in (*names, "encoder_address", "denoiser_address", "decoder_address"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return Settings(**overrides)


def build_role(role: str, settings):
    """The Service `triptych serve ROLE` runs (the contract tests start the same one in-process). Each role's code
    is imported here, per role, so the gateway never imports torch and each process loads only its own code."""
    if role == "encoder":
        from triptych.encoder.servicer import build
    elif role == "denoiser":
        from triptych.denoiser.servicer import build
    elif role == "decoder":
        from triptych.decoder.servicer import build
    else:
        from triptych.gateway.servicer import build
    return build(settings)


def cmd_serve(args) -> int:
    if args.role == "http":  # the Runware/OpenAI HTTP API, calling a gateway (docs/decisions.md, HTTP API)
        from triptych.http.server import serve_http
        from triptych.http.settings import HTTPSettings
        from triptych.serving.settings import Security

        names = {"host": args.host, "http_port": args.port, "gateway_address": args.gateway_address}
        return serve_http(HTTPSettings(**{k: v for k, v in names.items() if v is not None}), Security())
    if args.role != "all":
        from triptych.serving.observe import Observability
        from triptych.serving.security import server_credentials
        from triptych.serving.server import serve_forever
        from triptych.serving.settings import DEFAULT_PORTS

        settings = _settings(args)
        server_credentials(settings)  # a security misconfiguration stops here, before any model code loads
        port = args.port if args.port is not None else DEFAULT_PORTS[args.role]
        # Metrics and traces (off by default) before the role: the gateway's channels carry traceparent from the start.
        observability = Observability(args.role, settings)
        serve_forever(build_role(args.role, settings), settings, port, observability)
        return 0
    return _serve_all(args)


def read_serving_lines(lines) -> tuple[dict[str, str], dict[str, int]]:
    """Reads `triptych serve`'s stdout up to "all services SERVING": ({role: address}, {role: pid}).
    The one parser of the lines _serve_all prints, for supervisors, tests and benchmarks."""
    addresses, pids = {}, {}
    for line in lines:
        words = line.split()
        if len(words) >= 4 and words[0] == "triptych" and words[2] == "SERVING" and "(pid" in line:
            addresses[words[1]] = words[3]
            pids[words[1]] = int(words[-1].rstrip(")"))
        if line.startswith("all services SERVING"):
            break
    return addresses, pids


class _Stopping(Exception):
    """A stop signal that came while the services were still starting."""


def _spawn(role: str, port: int, args, extra: list[str], processes: list) -> str:
    """Starts one role as its own OS process (added to `processes` at once, so a stop during its start reaches
    it) and returns the address it reported."""
    command = [sys.executable, "-m", "triptych.cli", "serve", role, "--port", str(port), *extra]
    if args.model_root is not None:
        command += ["--model-root", str(args.model_root)]
    if args.host is not None:
        command += ["--host", args.host]
    if args.torch_threads is not None:
        command += ["--torch-threads", str(args.torch_threads)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1)
    processes.append(process)
    for line in process.stdout:
        if line.startswith(f"triptych {role} SERVING "):
            address = line.split()[-1]
            # A wildcard bind is reached on loopback: the gateway's links stay local (and match a certificate
            # issued for 127.0.0.1), whatever interface the services also listen on.
            host, _, bound_port = address.rpartition(":")
            address = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}.get(host, host) + ":" + bound_port
            break
        sys.stdout.write(line)
    else:
        raise RuntimeError(f"{role} exited with code {process.wait()} before serving")
    # Keep draining its stdout so the child never blocks on a full pipe.
    threading.Thread(target=lambda: [sys.stdout.write(x) for x in process.stdout], daemon=True).start()
    return address


def _side_ports(role: str, settings) -> list[str]:
    """`serve all`: a metrics or health port P (not 0, any free port) is P for the encoder, P+1 for the denoiser,
    P+2 for the decoder and P+3 for the gateway, since the four processes share one host."""
    flags = []
    for name in ("metrics_port", "health_port"):
        port = getattr(settings, name)
        if port:
            flags += [f"--{name.replace('_', '-')}", str(port + ROLES.index(role))]
    return flags


def _serve_all(args) -> int:
    from triptych.client.connection import wait_until_serving
    from triptych.serving.security import check_serves_and_calls, outgoing_channel_args, server_credentials

    # The children read the same TRIPTYCH_* environment (TLS, tokens); check here, once, that it can work.
    settings = _settings(args)
    server_credentials(settings)
    check_serves_and_calls(settings.security)
    processes: list[subprocess.Popen] = []
    stop, started = threading.Event(), threading.Event()

    def on_signal(*_) -> None:
        stop.set()
        if not started.is_set():  # a start can take minutes (preload, compile): stop it now, not after
            raise _Stopping

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        addresses = {}
        for role in ("encoder", "denoiser", "decoder"):
            addresses[role] = _spawn(role, 0, args, _side_ports(role, settings), processes)
        gateway_port = args.port if args.port is not None else 50051
        links = [f"--{role}-address={addresses[role]}" for role in ("encoder", "denoiser", "decoder")]
        links += _side_ports("gateway", settings)
        addresses["gateway"] = _spawn("gateway", gateway_port, args, links, processes)
        for role in ROLES:
            wait_until_serving(addresses[role], timeout=60, **outgoing_channel_args(settings.security, addresses[role]))
            print(f"triptych {role} SERVING {addresses[role]} (pid {processes[ROLES.index(role)].pid})", flush=True)
        started.set()
        print("all services SERVING; Ctrl-C stops them", flush=True)
        while not stop.wait(0.5):
            dead = [(ROLES[i], p.returncode) for i, p in enumerate(processes) if p.poll() is not None]
            if dead:
                print(f"stopping: {dead[0][0]} exited with code {dead[0][1]}", file=sys.stderr, flush=True)
                return 1
        return 0
    except _Stopping:
        print("stopped while starting", file=sys.stderr, flush=True)
        return 0
    finally:
        started.set()  # a second signal must not cut the cleanup short
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()


_REQUEST_FLAGS = ("negative_prompt", "seed", "steps", "width", "height", "cfg_scale", "scheduler", "clip_skip")
_REQUEST_FLAGS += ("number_results", "vae")
_DEFAULT_MODEL = "tiny/sd15"
_DEMO_MODEL = "demo/base"  # the demo family (#20): draws what the prompt says; installed by `models install-demo`
_SUFFIXES = {"image/png": (".png",), "image/jpeg": (".jpg", ".jpeg"), "image/webp": (".webp",)}


def _output_path(base: Path, task_index: int, tasks: int, image_index: int, mime_type: str = "image/png") -> Path:
    """-o's path, "-<task>-<image>" added when there are several, with the suffix of the format the image is in
    (`out.png` for a JPEG task becomes `out.jpg`)."""
    parts = ([str(task_index)] if tasks > 1 else []) + ([str(image_index)] if image_index else [])
    suffixes = _SUFFIXES.get(mime_type, (base.suffix,))
    suffix = base.suffix if base.suffix.lower() in suffixes else suffixes[0]
    return base.with_name(f"{base.stem}{'-' if parts else ''}{'-'.join(parts)}{suffix}")


def default_model(model_root: Path) -> str:
    """The model `generate` asks for without --model: demo/base when the local store (the one `triptych serve`
    serves on this host) holds it, else tiny/sd15."""
    return _DEMO_MODEL if (Path(model_root) / _DEMO_MODEL / "model_index.json").is_file() else _DEFAULT_MODEL


def cmd_generate(args) -> int:
    import grpc

    settings = _settings(args)
    if args.address is None:
        args.address = settings.gateway_address

    from triptych.client import ImageClient, TaskError, describe_error, requests_from_json, server_timing
    from triptych.v1 import image_service_pb2

    flags = [f"--{name.replace('_', '-')}" for name in _REQUEST_FLAGS if getattr(args, name) is not None]
    flags += ["--model"] if args.model is not None else []
    if args.request and (args.prompt or flags):
        given = ", ".join(["a prompt"] * bool(args.prompt) + flags)
        print(f"--request takes the whole request from its file; drop {given} or put it in the file", file=sys.stderr)
        return 2
    try:
        if args.request:
            path = Path(args.request)
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                print(f"cannot read request file {path}: {why}", file=sys.stderr)
                return 2
            requests = requests_from_json(text, base_dir=path.parent)
            if not requests:
                print(f"{path} holds no task", file=sys.stderr)
                return 2
        else:
            if not args.prompt:
                print("give a prompt or --request FILE", file=sys.stderr)
                return 2
            model = args.model or default_model(settings.model_root)
            request = image_service_pb2.GenerateRequest(positive_prompt=args.prompt, model=model)
            for name in ("seed", "steps", "width", "height", "cfg_scale", "clip_skip", "number_results"):
                if getattr(args, name) is not None:
                    try:
                        setattr(request, name, getattr(args, name))
                    except ValueError:  # e.g. a negative seed for a uint64 field
                        raise TaskError([(f"--{name.replace('_', '-')}", "out of range")]) from None
            request.negative_prompt = args.negative_prompt or ""
            request.scheduler = args.scheduler or ""
            request.vae = args.vae or ""
            requests = [request]
    except TaskError as exc:
        print(f"INVALID_ARGUMENT: bad {'request file' if args.request else 'flags'}", file=sys.stderr)
        for key, why in exc.violations:
            print(f"  field {key}: {why}", file=sys.stderr)
        return 2
    base = Path(args.output)
    try:  # the same message limit as the services (TRIPTYCH_MAX_MESSAGE_BYTES)
        client = ImageClient(args.address, max_message_bytes=settings.max_message_bytes, **_client_security(args))
    except ValueError as exc:  # e.g. a replica list of host names
        print(f"--address: {exc}", file=sys.stderr)
        return 2
    with client:
        for task_index, request in enumerate(requests):
            progress_shown = False
            try:
                call = client.stream(request, timeout=args.timeout)
                for event in call:
                    if event.HasField("progress") and not args.quiet:
                        p = event.progress
                        print(f"\r[{p.image_index}] {p.stage} {p.step}/{p.total_steps}", end="", file=sys.stderr)
                        progress_shown = True
                    elif event.HasField("image"):
                        image = event.image
                        out = _output_path(base, task_index, len(requests), image.index, image.image.mime_type)
                        out.parent.mkdir(parents=True, exist_ok=True)
                        out.write_bytes(image.image.data)
                        if progress_shown:  # end the progress line (stderr) before the result line (stdout)
                            print(file=sys.stderr, flush=True)
                            progress_shown = False
                        print(
                            f"{out}  seed={image.seed}  {image.image.width}x{image.image.height}  "
                            f"{image.scheduler_class}",
                            flush=True,
                        )
                        if not args.quiet and image.index == 0:
                            for note in image.notes:
                                print(f"note: {note}", file=sys.stderr)
                if not args.quiet and (line := _timing_line(server_timing(call))):
                    print(line, file=sys.stderr)
            except grpc.RpcError as exc:
                which = f"task [{task_index}]: " if len(requests) > 1 else ""
                print(f"\n{which}{describe_error(exc)}", file=sys.stderr)
                return 1
    return 0


def _timing_line(timing: dict[str, float]) -> str:
    """`took 389 ms: encode 2.0, denoise 350.7 (queued 0.1), decode 26.6; hops 3.3, gateway 1.4` from a
    Generate's trailer."""
    if "total" not in timing:
        return ""  # a gateway that sends no timing

    def stage(name: str) -> str:
        queued = timing.get(f"{name}-queue")
        return f"{name} {timing[name] * 1e3:.1f}" + ("" if queued is None else f" (queued {queued * 1e3:.1f})")

    listed = ", ".join(stage(name) for name in timing if "-" not in name and name not in ("gateway", "total"))
    hops = sum(seconds for name, seconds in timing.items() if name.endswith("-hop"))
    own = timing.get("gateway", 0.0)
    return f"took {timing['total'] * 1e3:.0f} ms: {listed}; hops {hops * 1e3:.1f}, gateway {own * 1e3:.1f}"


def _client_security(args) -> dict:
    """TLS and token for `generate`: flags first, then TRIPTYCH_TLS_CA_FILE etc. (the same settings the
    gateway uses for its own outgoing calls)."""
    from triptych.serving.security import outgoing_channel_args
    from triptych.serving.settings import Security

    names = ("tls_ca_file", "tls_client_cert_file", "tls_client_key_file", "tls_server_name", "client_auth_token_file")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.allow_insecure:
        overrides["allow_insecure"] = True
    if args.client_auth_token_file is not None:
        overrides["client_auth_token"] = None  # the flag's file, not TRIPTYCH_CLIENT_AUTH_TOKEN
    return outgoing_channel_args(Security(**overrides), args.address)


def cmd_models(args) -> int:
    from triptych.model_store import ModelStore

    settings = _settings(args)
    root = Path(args.root or settings.model_root)
    if args.action == "build-tiny":
        from triptych.model_builders.tiny import build_tiny_family

        for model_id in build_tiny_family(root):
            print(f"built {model_id}")
        return 0
    if args.action == "install-demo":
        from triptych.demo.assets import AssetsError, default_source, install

        try:
            installed = install(Path(args.source) if args.source else default_source(), root)
        except AssetsError as exc:
            print(f"triptych: {exc}", file=sys.stderr)
            return 1
        for model_id in installed:
            print(f"installed {model_id}")
        return 0
    if args.action == "build-full-size":
        from triptych.model_builders.full_size import ARCHITECTURES, build_full_size

        if (args.name or "sd15") not in ARCHITECTURES:
            print(
                f"triptych: build-full-size builds one of {', '.join(ARCHITECTURES)}, not {args.name!r}",
                file=sys.stderr,
            )
            return 2
        print(f"built {build_full_size(root, args.name or 'sd15')}")
        return 0
    if args.action == "import":
        from triptych.serving.errors import TriptychError

        if not args.name or not args.id:
            print("triptych: models import FILE --id ID (e.g. --id civitai:4384@128713)", file=sys.stderr)
            return 2
        try:
            info = ModelStore(root, settings.base_models).place(Path(args.name), args.id, replace=args.replace)
        except TriptychError as exc:
            print(f"triptych: {exc}", file=sys.stderr)
            return 1
        print(f"imported {info.model_id}: {info.note or info.kind}" + (f" ({info.family_name})" * bool(info.family)))
        return 0
    if args.action == "inspect":
        from triptych.model_inspect import describe
        from triptych.serving.errors import TriptychError

        if not args.name:
            print(
                "triptych: models inspect needs a model id, e.g. `triptych models inspect tiny/flux`", file=sys.stderr
            )
            return 2
        try:
            print(describe(ModelStore(root, settings.base_models).resolve(args.name, "model")))
        except TriptychError as exc:
            print(f"triptych: {exc}", file=sys.stderr)
            return 1
        return 0
    for info in ModelStore(root, settings.base_models).list():
        where = info.weights.path if info.weights is not None else info.path  # a checkpoint: its file
        print(
            f"{info.model_id:40s} {info.kind:10s} {info.family_name:12s} {where}"
            + (f"  ({info.note})" * bool(info.note))
        )
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="triptych", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start services (all four as separate processes, or one role)")
    serve.add_argument("role", nargs="?", default="all", choices=("all", *ROLES, "http"))
    serve.add_argument("--port", type=int, help="port (0 = any free); `all`: the gateway's, default 50051")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--model-root", type=Path, help="model store (default $TRIPTYCH_MODEL_ROOT or ./models)")
    serve.add_argument("--torch-threads", type=int, help="torch intra-op threads per process")
    serve.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default off; `all`: P..P+3)")
    serve.add_argument("--health-port", type=int, help="plaintext gRPC-health-only port (default off)")
    for role in ("encoder", "denoiser", "decoder"):
        serve.add_argument(f"--{role}-address", help=f"gateway only: where the {role} listens")
    serve.add_argument("--gateway-address", help="http only: the gateway to call (default 127.0.0.1:50051)")
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="generate images through a gateway")
    gen.add_argument("prompt", nargs="?")
    gen.add_argument("--request", help="Runware imageInference task JSON file (object or array)")
    gen.add_argument("--model", help=f"model id (default: {_DEMO_MODEL} when the store has it, else {_DEFAULT_MODEL})")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--cfg-scale", type=float)
    gen.add_argument("--scheduler")
    gen.add_argument("--clip-skip", type=int)
    gen.add_argument("--vae")
    gen.add_argument("--number-results", type=int)
    gen.add_argument("-o", "--output", default="out.png")
    gen.add_argument("--address", help="gateway address (default $TRIPTYCH_GATEWAY_ADDRESS or 127.0.0.1:50051)")
    gen.add_argument("--timeout", type=float, help="deadline in seconds")
    gen.add_argument("--tls-ca-file", help="CA (PEM) to verify the gateway; turns TLS on ($TRIPTYCH_TLS_CA_FILE)")
    gen.add_argument("--tls-client-cert-file", help="client certificate (PEM) for an mTLS gateway")
    gen.add_argument("--tls-client-key-file", help="key (PEM) of the client certificate")
    gen.add_argument("--tls-server-name", help="name the gateway's certificate carries, if not the address's host")
    gen.add_argument("--auth-token-file", dest="client_auth_token_file", help="file holding the bearer token to send")
    gen.add_argument("--allow-insecure", action="store_true", help="allow plaintext to a non-loopback gateway")
    gen.add_argument("-q", "--quiet", action="store_true")
    gen.set_defaults(func=cmd_generate)

    models = sub.add_parser("models", help="list, inspect, import or build models in the store")
    actions = ("list", "inspect", "import", "build-tiny", "install-demo", "build-full-size")
    models.add_argument("action", choices=actions)
    models.add_argument(
        "name",
        nargs="?",
        help="inspect: a model id; import: a .safetensors file; build-full-size: sd15 (default), sd21, sdxl or "
        "sdxl-refiner (real architecture, random weights)",
    )
    models.add_argument("--id", help="import: the id to place the file under, e.g. civitai:4384@128713 or my/model")
    models.add_argument("--replace", action="store_true", help="import: replace a model already under that id")
    models.add_argument(
        "--from", dest="source", help="install-demo: the demo family's folder (default: the checkout's assets/demo)"
    )
    models.add_argument("--root", help="model store (default $TRIPTYCH_MODEL_ROOT or ./models)")
    models.set_defaults(func=cmd_models)
    return top


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from triptych.serving.settings import ConfigurationError

    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigurationError as exc:
        print(f"triptych: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # a setting of the wrong type or out of range: name its variable, not a traceback
        for error in exc.errors():
            name = str(error["loc"][-1]) if error["loc"] else "settings"
            variable = name if name.isupper() else f"TRIPTYCH_{name.upper()}"
            print(f"triptych: {variable}: {error['msg']} (got {error.get('input')!r})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
