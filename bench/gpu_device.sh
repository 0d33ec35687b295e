#!/usr/bin/env bash
# There (a lent GPU machine, repo root, carrying .whl and clients/python/triptych/v1): install the carried
# wheels beside the image's torch, then run the GPU benchmarks and send back RESULTS.md and the log in $OUT.
#   device run: bash bench/gpu_device.sh            (carry: [".whl", "clients/python/triptych/v1"])
# One call must fit the device's 600 s limit, so each step runs with what is left of LIMIT seconds (or is
# skipped), and RESULTS.md is copied to $OUT after every step: a late failure or cut keeps what came before.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LIMIT=${LIMIT:-570}
if [ -z "${SKIP_WHEELS:-}" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/services:$PWD/clients/python:$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/triptych-gpu-out}
mkdir -p "$OUT"
LOG=$OUT/gpu.log

# step NAME SECONDS_NEEDED [--reserve SECONDS] COMMAND...: runs COMMAND under `timeout` with the time left
# (less what later steps reserve), logs it, and copies RESULTS.md to $OUT whatever its outcome.
step() {
  local name=$1 need=$2 reserve=0
  shift 2
  if [ "$1" = "--reserve" ]; then reserve=$2; shift 2; fi
  local left=$((LIMIT - SECONDS - reserve))
  if [ "$left" -lt "$need" ]; then
    echo "== $name: skipped, ${left} s left" | tee -a "$LOG"
    return 0
  fi
  echo "== $name (${left} s allowed)" | tee -a "$LOG"
  timeout "$left" "$@" 2>&1 | tee -a "$LOG"
  echo "== $name: exit ${PIPESTATUS[0]} after ${SECONDS} s in all" | tee -a "$LOG"
  cp bench/RESULTS.md "$OUT/RESULTS.md"
}

step "versions" 5 "$PYTHON" -c '
import torch, diffusers, transformers, peft, grpc, google.protobuf, pydantic
import triptych.denoiser.servicer, triptych.encoder.servicer
print("torch", torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())
for m in (diffusers, transformers, peft, grpc, google.protobuf, pydantic):
    print(m.__name__, m.__version__)'
# inductor and Triton need a C compiler; without one the compiled path runs eager (its row shows 0 graphs).
command -v cc gcc || echo "no C compiler on this machine: the compiled rows will be eager" | tee -a "$LOG"
# The issue's main figures first; 90 s stay for the LoRA switch (eager, float16, as the services run).
step "bench.gpu" 120 --reserve 90 "$PYTHON" -m bench.gpu --record "$@"
step "lora_switch eager" 45 "$PYTHON" -m bench.lora_switch --device "${LORA_DEVICE:-cuda}" --dtype float16
# Encoder batching where it pays: full-size SDXL text encoders in float16 (no --record, which would rewrite
# the CPU encoder table; lines for bench/RESULTS.md by hand, as the LoRA ones).
step "encoder batching" 90 env TRIPTYCH_DEVICE=cuda TRIPTYCH_DTYPE=float16 \
  "$PYTHON" -m bench.encoder_throughput --quick --full-size sdxl
# Compiled, merged LoRAs: a switch costs no recompile (the peft-layer variant recompiles per set, about a minute
# each on this UNet: measured on the CPU only).
step "lora_switch compiled merged" 90 "$PYTHON" -m bench.lora_switch --device "${LORA_DEVICE:-cuda}" \
  --dtype float16 --compile --modes merged --switches 3
echo "done in ${SECONDS} s" | tee -a "$LOG"
