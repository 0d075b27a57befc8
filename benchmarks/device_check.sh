#!/usr/bin/env bash
# The GPU checks of one lent-device session, in one call (about 7 minutes on an H100):
#   1. the reference tests on CUDA (engine vs transformers, quant methods, Triton kernels)
#   2. one linear layer in every precision (benchmarks/gemm_formats.py)
#   3. offline throughput vs transformers in fp32 and bf16 (benchmarks/offline_throughput.py)
#   4. every quantization method's decode/prefill speed (benchmarks/quantization.py)
#   5. a profile of decode steps at batch 1 and 64 (benchmarks/profile_decode.py)
#   6. --compile on CUDA (inductor's Triton kernels): its tests, then eager vs compiled decode
#      side by side (benchmarks/decode_ab.py); never run on a GPU yet (written after the H100 run)
# on a random-weight model of SmolLM2-135M's shape made there from a carried config + tokenizer
# (.devcarry/smollm2-shape; the real GGUF is too large to send). Logs and JSON go to $OUT.
#
#   bash benchmarks/device_check.sh        (PY=python3 OUT=device-out by default)
#   STEPS="tests gemm" bash benchmarks/device_check.sh     (only those steps)
set -u
STEPS=${STEPS:-tests gemm offline quant profile compile}
OUT=${OUT:-device-out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/.devcarry/site${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/run.log"

step() {  # step NAME LIMIT_S CMD...: run with a time limit, log it, never stop the script
  local name=$1 limit=$2 t=$SECONDS rc
  shift 2
  [[ " $STEPS " == *" ${name%%-*} "* ]] || return 0
  echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t))s" | tee -a "$LOG"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton',
triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
} >>"$LOG" 2>&1
tail -n 4 "$LOG"

MODEL=/tmp/smollm2-shape-random
STEPS="$STEPS make" step make-model 60 $PY benchmarks/make_random_model.py "$MODEL" --like .devcarry/smollm2-shape

XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
step tests 170 $PY -m pytest -q -p no:cacheprovider $XDIST -rfE \
  tests/unit/test_triton_dequant.py tests/unit/test_quant_methods.py \
  tests/models/test_engine_vs_hf.py tests/models/test_engine_features.py \
  tests/models/test_kv_quant.py tests/models/test_quant_models.py \
  tests/unit/test_kv_storage.py
grep -E "passed|failed|error" "$LOG" | tail -n 3

step gemm 150 $PY benchmarks/gemm_formats.py --shapes 4096x4096,14336x4096 --m 1,16,256,4096 \
  --json-out "$OUT/gemm.json"
step offline-fp32 60 $PY benchmarks/offline_throughput.py --model "$MODEL" --repeats 2 \
  --dtype float32 --json-out "$OUT/offline-fp32.json"
step offline-bf16 60 $PY benchmarks/offline_throughput.py --model "$MODEL" --repeats 2 \
  --dtype bfloat16 --json-out "$OUT/offline-bf16.json"
step quant 90 $PY benchmarks/quantization.py --model "$MODEL" --no-quality --dtype bfloat16 \
  --methods fp8,w8a8,int8,int4,fp6_e2m3,mxfp4,nvfp4 --json-out "$OUT/quant.json"
step profile-b1 60 $PY benchmarks/profile_decode.py --model "$MODEL" --batch 1 --steps 32
step profile-b64 60 $PY benchmarks/profile_decode.py --model "$MODEL" --batch 64 --steps 32
step compile-tests 150 $PY -m pytest -q -p no:cacheprovider -rfE tests/models/test_compile.py
step compile-ab 150 $PY benchmarks/decode_ab.py --model "$MODEL" --rounds 3 --batch 32 \
  bfloat16 bfloat16+compile w8a8/bfloat16 w8a8/bfloat16+compile fp8/bfloat16 fp8/bfloat16+compile
grep -E "^=== |^\| |^device|CUDA kernels per step" "$LOG" | tail -n 90
