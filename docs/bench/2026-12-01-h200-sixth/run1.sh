#!/usr/bin/env bash
# Sixth session, one H200 (issues 15 and 14): the GPU checks of what landed last session, then issue 15's
# unmeasured targets. In order, each line's log in $R:
#   1. GPU tests: the MXFP4 kernels at real shapes, every weights-first tile and tl.dot_scaled forced one by one
#      against the reference, the batcher's graphs over block and window tables. If the swapped tiles pass, the
#      copy this script runs gets SWAP_AB = (False, True) (the autotuner may pick them) for everything after;
#   2. the MXFP4 blocks in both operand orders and through tl.dot_scaled, and the 120b's 128 experts (microbench);
#   3. max load on the 20b: concurrency 256, 1,024 in / 1,024 out (target 14,000 output tok/s);
#   4. the offline target (continuous vs static rounds at batch 256, 512 prompts of 105-1,995 in / 52-997 out);
#   5. gpt-oss-120b: synthesize, then the serving sweep at 1, 8, 64 (256 out).
# Start it in the background (setsid) and poll $R/progress.txt from the next call within 30 s.
#
#   bash docs/bench/2026-12-01-h200-sixth/run1.sh /tmp/res
set -u
R=${1:-/tmp/res}
mkdir -p "$R"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
PY=python3
FAST="attention=triton experts=mxfp4 generation.compile=true"
OUT="bench.plots=false bench.table=$R/table.csv"
stamp() { echo "[$(date +%T)] $*" | tee -a "$R/progress.txt"; }
run() { local name=$1; shift; stamp "start $name"; timeout 900 "$@" > "$R/$name.log" 2>&1; stamp "end $name rc=$?"; }
$PY -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)' > "$R/versions.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$R/versions.txt"
[ -d /dev/shm/ck20 ] || run synth20 $PY -m runtime.synth model=gpt-oss-20b synth.format=mxfp4 synth.out=/dev/shm/ck20
run tests $PY -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu.py -k "mxfp4_moe or continuous"
if [ "$(grep -c '^PASSED.*test_mxfp4_moe_swapped_and_scaled_tiles' "$R/tests.log")" = 3 ]; then
  sed -i 's/^SWAP_AB: tuple\[bool, ...\] = (False,)$/SWAP_AB: tuple[bool, ...] = (False, True)/' runtime/kernels/moe_mxfp4.py
  stamp "swapped tiles passed: SWAP_AB = $(grep -o '^SWAP_AB.*' runtime/kernels/moe_mxfp4.py)"
fi
run moe-swap $PY -m runtime.kernels.microbench --format mxfp4 --tokens 256 1024 4096 --swap --configs
run moe-scaled $PY -m runtime.kernels.microbench --format mxfp4 --tokens 256 1024 4096 --dot-scaled --configs
run moe-120b $PY -m runtime.kernels.microbench --format mxfp4 --experts 128 --tokens 1 8 64 256 1024 --swap --configs
run serve20-256 $PY -m runtime.bench bench.mode=serve model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST \
    'bench.concurrency=[256]' bench.num_prompts=512 bench.input_len=1024 bench.output_len=1024 $OUT bench.out_dir=$R/serve20-256
run offline20 $PY -m runtime.bench bench.mode=offline model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST \
    bench.num_prompts=512 bench.input_len=1050 bench.output_len=525 bench.range_ratio=0.9 'bench.batch_sizes=[256]' \
    $OUT bench.out_dir=$R/offline20
[ -d /dev/shm/ck120 ] || run synth120 $PY -m runtime.synth model=gpt-oss-120b synth.format=mxfp4 synth.out=/dev/shm/ck120
run serve120 $PY -m runtime.bench bench.mode=serve model=gpt-oss-120b model.path=/dev/shm/ck120 $FAST \
    'bench.concurrency=[1,8,64]' bench.input_len=1024 bench.output_len=256 $OUT bench.out_dir=$R/serve120
stamp "all done"
