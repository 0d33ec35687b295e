#!/usr/bin/env bash
# Here (with internet): fetch, into .whl/, the wheels a lent GPU machine lacks, at the versions this .venv has
# (Python 3.12 x86-64 builds: that machine's python3 holds torch, transformers and numpy, but no diffusers,
# pydantic or gRPC extras, and reaches no package registry). Then run bench/gpu_device.sh there, carrying
# .whl and the generated stubs: see bench/RESULTS.md, "GPU".
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PACKAGES=(diffusers grpcio protobuf pydantic pydantic_core pydantic-settings python-dotenv typing-inspection
  typing_extensions annotated-types grpcio-status grpcio-health-checking grpcio-reflection googleapis-common-protos
  peft)
pins=()
for name in "${PACKAGES[@]}"; do
  pins+=("$name==$(.venv/bin/python -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pins[@]}"
du -sh .whl
