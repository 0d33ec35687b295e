"""TLS, mTLS and bearer tokens with real processes: `triptych serve` passes its security settings to all four
processes, the gateway calls the backends with them, the CLI and the Python client present them, and every
way of calling without them fails. Certificates come from a throwaway CA made with `cryptography`."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from tests.e2e.processes import isolated_env, serve_role, serving
from triptych.client import ImageClient, channel_credentials, open_channel
from triptych.v1 import (
    encoder_service_pb2,
    encoder_service_pb2_grpc,
    image_service_pb2,
    image_service_pb2_grpc,
    runtime_service_pb2,
    runtime_service_pb2_grpc,
)

GATEWAY_TOKEN, CALLER_TOKEN = "gateway-token-5c1f", "caller-token-9e2a"
SERVING = health_pb2.HealthCheckResponse.SERVING
SMALL = dict(model="tiny/sd15", positive_prompt="a red fox", width=64, height=64, steps=2, seed=3)


# --- a throwaway PKI ---------------------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject, issuer, public_key, signing_key, extensions) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


def _write(directory: Path, stem: str, key, cert) -> tuple[Path, Path]:
    key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _issue(directory: Path, stem: str, ca_key, ca_cert, usage, san=None) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    extensions = [(x509.BasicConstraints(ca=False, path_length=None), True), (x509.ExtendedKeyUsage([usage]), False)]
    if san is not None:
        extensions.append((x509.SubjectAlternativeName(san), False))
    cert = _certificate(_name(stem), ca_cert.subject, key.public_key(), ca_key, extensions)
    return _write(directory, stem, key, cert)


def _ca(directory: Path, stem: str):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(
        _name(stem), _name(stem), key.public_key(), key, [(x509.BasicConstraints(ca=True, path_length=0), True)]
    )
    return key, cert, _write(directory, stem, key, cert)[0]


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_client_cert: Path  # signed by a CA the servers do not trust
    rogue_client_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert, ca_path = _ca(directory, "triptych-test-ca")
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _issue(directory, "server", ca_key, ca_cert, ExtendedKeyUsageOID.SERVER_AUTH, san)
    client = _issue(directory, "client", ca_key, ca_cert, ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue_key, rogue_cert, _ = _ca(directory, "rogue-ca")
    rogue = _issue(directory, "rogue-client", rogue_key, rogue_cert, ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(ca_path, *server, *client, *rogue)


def _run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "triptych.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


# --- `triptych serve` with mTLS and tokens everywhere --------------------------------------------------------


@pytest.fixture(scope="module")
def secure(pki, model_root, tmp_path_factory):
    """`triptych serve` (four processes) with mTLS and bearer tokens, configured only through the environment."""
    directory = tmp_path_factory.mktemp("tokens")
    (directory / "accepted").write_text(f"# one token per line\n{GATEWAY_TOKEN}\n{CALLER_TOKEN}\n")
    (directory / "gateway").write_text(GATEWAY_TOKEN + "\n")
    env = dict(
        TRIPTYCH_TLS_CERT_FILE=str(pki.server_cert),
        TRIPTYCH_TLS_KEY_FILE=str(pki.server_key),
        TRIPTYCH_TLS_CLIENT_CA_FILE=str(pki.ca),
        TRIPTYCH_TLS_CA_FILE=str(pki.ca),
        TRIPTYCH_TLS_CLIENT_CERT_FILE=str(pki.client_cert),
        TRIPTYCH_TLS_CLIENT_KEY_FILE=str(pki.client_key),
        TRIPTYCH_AUTH_TOKEN_FILE=str(directory / "accepted"),
        TRIPTYCH_CLIENT_AUTH_TOKEN_FILE=str(directory / "gateway"),
    )
    with serving(None, model_root, env, isolated=True) as served:
        yield served.addresses


def _mtls(pki: Pki) -> grpc.ChannelCredentials:
    return channel_credentials(pki.ca, pki.client_cert, pki.client_key)


def _health(address: str, **channel_args) -> int:
    """The process's liveness over the given transport (a gateway started alone is live, not ready: it has no
    backends to serve with)."""
    with open_channel(address, **channel_args) as channel:
        request = health_pb2.HealthCheckRequest(service="liveness")
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


def test_cli_generates_over_mtls_with_a_token(secure, pki, tmp_path):
    (tmp_path / "token").write_text(CALLER_TOKEN)
    out = tmp_path / "fox.png"
    done = _run_cli(
        "generate", "a red fox", "--model", "tiny/sd15", "--steps", "2", "--seed", "7", "-o", str(out),
        "--address", secure["gateway"],
        "--tls-ca-file", str(pki.ca), "--tls-client-cert-file", str(pki.client_cert),
        "--tls-client-key-file", str(pki.client_key), "--auth-token-file", str(tmp_path / "token"),
        env=isolated_env(TRIPTYCH_CLIENT_AUTH_TOKEN="not-a-token"),  # the flag's file wins over the environment
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size == (128, 128)
    # The same flags from the environment (the settings the gateway uses for its own outgoing calls).
    env = isolated_env(
        TRIPTYCH_TLS_CA_FILE=str(pki.ca),
        TRIPTYCH_TLS_CLIENT_CERT_FILE=str(pki.client_cert),
        TRIPTYCH_TLS_CLIENT_KEY_FILE=str(pki.client_key),
        TRIPTYCH_CLIENT_AUTH_TOKEN=CALLER_TOKEN,
    )
    done = _run_cli("generate", "a fox", "--steps", "2", "-o", str(out), "--address", secure["gateway"], env=env)
    assert done.returncode == 0, done.stderr


def test_python_client_with_certificate_and_token(secure, pki):
    with ImageClient(secure["gateway"], credentials=_mtls(pki), auth_token=CALLER_TOKEN) as client:
        images = client.generate(image_service_pb2.GenerateRequest(**SMALL), timeout=60)
    assert len(images) == 1 and images[0].image.data.startswith(b"\x89PNG")


@pytest.mark.parametrize("role", ["gateway", "encoder", "denoiser", "decoder"])
def test_a_caller_without_a_trusted_client_certificate_fails_the_handshake(secure, pki, role):
    assert _health(secure[role], credentials=_mtls(pki)) == SERVING
    untrusted = [channel_credentials(pki.ca)]  # no client certificate at all
    if role == "gateway":  # one from another CA (each refusal costs ~1.5 s of retries: once is enough)
        untrusted.append(channel_credentials(pki.ca, pki.rogue_client_cert, pki.rogue_client_key))
    for credentials in untrusted:
        with pytest.raises(grpc.RpcError) as raised:
            _health(secure[role], credentials=credentials)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("role", ["gateway", "encoder"])
def test_a_plaintext_call_to_a_tls_server_fails(secure, role):
    with pytest.raises(grpc.RpcError) as raised:
        _health(secure[role])
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("token", [None, "wrong-token", GATEWAY_TOKEN + "x"])
def test_every_rpc_needs_a_valid_token(secure, pki, token):
    calls = [
        (secure["gateway"], lambda ch: list(image_service_pb2_grpc.ImageServiceStub(ch).Generate(
            image_service_pb2.GenerateRequest(**SMALL), timeout=30))),
        (secure["encoder"], lambda ch: encoder_service_pb2_grpc.TextEncoderServiceStub(ch).Encode(
            encoder_service_pb2.EncodeRequest(model="tiny/sd15", positive_prompt="a fox"), timeout=30)),
        (secure["denoiser"], lambda ch: runtime_service_pb2_grpc.RuntimeServiceStub(ch).GetRuntimeInfo(
            runtime_service_pb2.GetRuntimeInfoRequest(), timeout=30)),
    ]  # fmt: skip
    for address, call in calls:
        with (
            open_channel(address, credentials=_mtls(pki), auth_token=token) as channel,
            pytest.raises(grpc.RpcError) as raised,
        ):
            call(channel)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED, (address, raised.value.details())
        assert "Bearer" in raised.value.details()


def test_the_backends_accept_the_gateway_token_directly(secure, pki):
    with open_channel(secure["encoder"], credentials=_mtls(pki), auth_token=GATEWAY_TOKEN) as channel:
        reply = encoder_service_pb2_grpc.TextEncoderServiceStub(channel).Encode(
            encoder_service_pb2.EncodeRequest(model="tiny/sd15", positive_prompt="a fox"), timeout=30
        )
    assert list(reply.positive.prompt_embeds.shape) == [1, 77, 32]


def test_health_and_reflection_stay_open_without_a_token(secure, pki):
    for address in secure.values():
        assert _health(address, credentials=_mtls(pki)) == SERVING
    with open_channel(secure["gateway"], credentials=_mtls(pki)) as channel:
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        services = {s.name for reply in replies for s in reply.list_services_response.service}
    assert "triptych.v1.ImageService" in services


# --- one process at a time: TLS without mTLS, and the plaintext rule -------------------------------------------


def test_tls_without_client_certificates(pki, model_root):
    env = {"TRIPTYCH_TLS_CERT_FILE": str(pki.server_cert), "TRIPTYCH_TLS_KEY_FILE": str(pki.server_key)}
    with serve_role("gateway", model_root, env=env) as (_, address):
        assert _health(address, credentials=channel_credentials(pki.ca)) == SERVING
        with open_channel(address, credentials=channel_credentials(pki.ca)) as channel:
            info = runtime_service_pb2_grpc.RuntimeServiceStub(channel).GetRuntimeInfo(
                runtime_service_pb2.GetRuntimeInfoRequest(), timeout=10
            )
        assert info.role == "gateway"
        with pytest.raises(grpc.RpcError) as raised:
            _health(address)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        # A certificate for another name is refused by the client; the right expected name fixes it.
        with pytest.raises(grpc.RpcError):
            _health(address, credentials=channel_credentials(pki.ca), server_name="elsewhere.example")
        assert _health(address, credentials=channel_credentials(pki.ca), server_name="localhost") == SERVING


def test_plaintext_is_refused_off_loopback_unless_explicitly_allowed(model_root):
    refused = _run_cli("serve", "gateway", "--host", "0.0.0.0", "--port", "0", env=isolated_env())
    assert refused.returncode == 2
    assert "refusing to serve plaintext on 0.0.0.0" in refused.stderr and "TRIPTYCH_ALLOW_INSECURE" in refused.stderr
    remote = _run_cli("serve", "gateway", "--port", "0", "--encoder-address", "10.9.8.7:50061", env=isolated_env())
    assert remote.returncode == 2 and "refusing to call 10.9.8.7 in plaintext" in remote.stderr
    allowed = serve_role("gateway", model_root, env={"TRIPTYCH_ALLOW_INSECURE": "1"}, args=("--host", "0.0.0.0"))
    with allowed as (_, address):
        assert _health("127.0.0.1:" + address.rsplit(":", 1)[1]) == SERVING


def test_serve_says_which_setting_the_gateway_is_missing(pki, model_root):
    server_only = isolated_env(TRIPTYCH_TLS_CERT_FILE=str(pki.server_cert), TRIPTYCH_TLS_KEY_FILE=str(pki.server_key))
    done = _run_cli("serve", "--port", "0", "--model-root", str(model_root), env=server_only)
    assert done.returncode == 2 and "TRIPTYCH_TLS_CA_FILE" in done.stderr
    tokens_only = isolated_env(TRIPTYCH_AUTH_TOKENS="a,b")
    done = _run_cli("serve", "--port", "0", "--model-root", str(model_root), env=tokens_only)
    assert done.returncode == 2 and "TRIPTYCH_CLIENT_AUTH_TOKEN" in done.stderr
    half_pair = isolated_env(TRIPTYCH_TLS_CERT_FILE=str(pki.server_cert))
    done = _run_cli("serve", "encoder", "--port", "0", env=half_pair)  # refused before torch is even imported
    assert done.returncode == 2 and "TRIPTYCH_TLS_KEY_FILE" in done.stderr
