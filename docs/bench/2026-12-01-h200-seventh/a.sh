#!/usr/bin/env bash
# Seventh session, first call (one H200): does commit 4e56c4d's repair of the compiled MXFP4 path hold on the GPU,
# and is the pairs GEMV right and faster? Then one MoE layer of the 20b at max-load sizes, MXFP4 against our
# bf16 kernel on the same weights dequantized (is a bf16 copy of the 20b's experts worth its 38 GB at 256-512 rows?).
#   bash docs/bench/2026-12-01-h200-seventh/a.sh /tmp/res
set -u
R=${1:-/tmp/res}
mkdir -p "$R"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
PY=python3
MB="$PY -m runtime.kernels.microbench --format mxfp4"
stamp() { echo "[$(date +%T)] $*" | tee -a "$R/progress.txt"; }
run() { local name=$1; shift; stamp "start $name"; timeout 900 "$@" > "$R/$name.log" 2>&1; stamp "end $name rc=$?"; }
$PY -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)' > "$R/versions.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$R/versions.txt"
run tests $PY -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu.py \
    -k "compiled_decode_step_equals_plain or mxfp4_moe_pairs_gemv or mxfp4_moe_real_shapes or continuous"
grep -E '^(PASSED|FAILED|ERROR)|passed|failed' "$R/tests.log" | tail -40 >> "$R/progress.txt"
if [ "$(grep -c '^PASSED.*test_mxfp4_moe_pairs_gemv' "$R/tests.log")" = 6 ]; then
  run moe120-off $MB --experts 128 --tokens 32 64 128 256
  run moe120-pairs $MB --experts 128 --tokens 32 64 128 256 --gemv-pairs-per-expert 4
  run moe120-gemv256 $MB --experts 128 --tokens 64 --decode-max-pairs 256
  run moe20-pairs $MB --tokens 32 64 --gemv-pairs-per-expert 4
fi
run moe20-max $MB --tokens 256 512 2048
stamp "all done"
