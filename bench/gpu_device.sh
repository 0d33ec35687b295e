#!/usr/bin/env bash
# There (a lent GPU machine, repo root, carrying .whl and clients/python/triptych/v1): install the carried
# wheels beside the image's torch, then run the GPU benchmark and send back RESULTS.md and the log in $OUT.
#   device run: bash bench/gpu_device.sh            (carry: [".whl", "clients/python/triptych/v1"])
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -z "${SKIP_WHEELS:-}" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/services:$PWD/clients/python:$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/triptych-gpu-out}
mkdir -p "$OUT"
"$PYTHON" -c 'import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'
# inductor and Triton need a C compiler; without one the compiled path runs eager (its row shows 0 graphs).
command -v cc gcc || echo "no C compiler on this machine: the compiled rows will be eager"
set -o pipefail
"$PYTHON" -m bench.gpu --record "$@" 2>&1 | tee "$OUT/gpu.log"
cp bench/RESULTS.md "$OUT/RESULTS.md"
# LoRA set switch latency on the GPU, full-size SD1.5: lines for bench/RESULTS.md by hand. Eager (peft layers and
# merged), then compiled: merged (no recompile) and peft layers (a recompile per new set; two switches suffice).
LORA="$PYTHON -m bench.lora_switch --device ${LORA_DEVICE:-cuda}"
$LORA 2>&1 | tee -a "$OUT/gpu.log" || true
timeout 150 $LORA --compile --modes merged --switches 5 2>&1 | tee -a "$OUT/gpu.log" || true
timeout 150 $LORA --compile --modes adapters --switches 1 2>&1 | tee -a "$OUT/gpu.log" || true
# Encoder batching on the GPU, full-size SDXL text encoders in float16 (lines for bench/RESULTS.md by hand; no
# --record, which would overwrite the CPU encoder table).
TRIPTYCH_DEVICE=cuda TRIPTYCH_DTYPE=float16 timeout 200 "$PYTHON" -m bench.encoder_throughput --quick --full-size sdxl \
  2>&1 | tee -a "$OUT/gpu.log" || true
