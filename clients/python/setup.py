"""Generates the gRPC stubs from ../../protos at build time (they are never committed)."""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "protos"


def generate_stubs() -> None:
    """Runs protoc over protos/triptych/v1 into this directory, so imports read `triptych.v1.*_pb2`."""
    from grpc_tools import protoc  # build requirement, see pyproject.toml

    protos = sorted(str(p) for p in (PROTO_ROOT / "triptych" / "v1").glob("*.proto"))
    if not protos:
        if (HERE / "triptych" / "v1" / "tensor_pb2.py").exists():
            return  # building from an sdist that already carries the stubs
        raise RuntimeError(f"no .proto files under {PROTO_ROOT}")
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={HERE}",
        f"--pyi_out={HERE}",
        f"--grpc_python_out={HERE}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    (HERE / "triptych" / "v1" / "__init__.py").touch()


# Generated before setup() because setuptools checks that the listed packages exist before build_py runs;
# this covers wheels, sdists and editable installs alike.
generate_stubs()
setup()
