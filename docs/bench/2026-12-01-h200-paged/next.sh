#!/usr/bin/env bash
# For the next one-H200 session (issue 15, then 14). What landed after this directory's run and has not run on a
# GPU: the sliding layers' window tables (a second block table; window blocks given back behind the window), the
# MXFP4 blocks' swapped operand order (autotuned), blocks of 128 pairs beyond 4,096 pairs, the warm-up's long
# prefills. In order of value, each line's log in $R:
#   1. GPU tests: the MXFP4 kernels at real shapes, every weights-first tile and tl.dot_scaled forced one by one
#      (test_mxfp4_moe_swapped_and_scaled_tiles: if it passes, set SWAP_AB = (False, True), and DOT_SCALED if
#      faster), the paged kernel, the batcher's graphs over block and window tables, the server (~9 min);
#   1b. the MXFP4 blocks through tl.dot_scaled (moe_mxfp4.DOT_SCALED: if faster, make it the default), at blocks of
#      32 pairs (the plan gives 64 beyond 256 pairs: at 256 rows ~32 pairs an expert)
#      and on the 120b's 128 experts (~2 min);
#   2. the serving sweep on the 20b at concurrency 1, 8, 64 (targets: 0.85 x bench b1 = 373 tok/s, 0.80 x b64 =
#      4,570 tok/s; last run 394.6 and 4,330) (~6 min);
#   3. the offline target (continuous vs static rounds at batch 256, 512 prompts of 105-1,995 in / 52-997 out);
#   4. concurrency 256 (max load; target 14,000 tok/s);
#   5. gpt-oss-120b: synthesize, then the sweep at 1, 8, 64.
# Start it in the background (setsid) and poll $R/progress.txt from the next call within 30 s; do not pkill a
# pattern that appears in the polling command itself.
#
#   bash docs/bench/2026-12-01-h200-paged/next.sh /tmp/res
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
[ -d /dev/shm/ck20 ] || run synth20 $PY -m runtime.synth model=gpt-oss-20b synth.format=mxfp4 synth.out=/dev/shm/ck20
run tests $PY -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu.py -k "mxfp4_moe or paged or continuous or serve"
run moe-scaled $PY -m runtime.kernels.microbench --format mxfp4 --tokens 256 1024 4096 --dot-scaled --configs  # vs 0.599/1.329/4.473 ms (x first)
run moe-swap $PY -m runtime.kernels.microbench --format mxfp4 --tokens 256 1024 4096 --swap --configs
run moe-block32 $PY -m runtime.kernels.microbench --format mxfp4 --tokens 64 256 1024 --block-m 32 --swap --configs  # vs the plan's
run moe-120b $PY -m runtime.kernels.microbench --format mxfp4 --experts 128 --tokens 1 8 64 256 1024 --configs
run serve20 $PY -m runtime.bench bench.mode=serve model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST \
    'bench.concurrency=[1,8,64]' bench.input_len=1024 bench.output_len=1024 $OUT bench.out_dir=$R/serve20
run offline20 $PY -m runtime.bench bench.mode=offline model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST \
    bench.num_prompts=512 bench.input_len=1050 bench.output_len=525 bench.range_ratio=0.9 'bench.batch_sizes=[256]' \
    $OUT bench.out_dir=$R/offline20
run serve20-256 $PY -m runtime.bench bench.mode=serve model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST \
    'bench.concurrency=[256]' bench.input_len=1024 bench.output_len=1024 $OUT bench.out_dir=$R/serve20-256
[ -d /dev/shm/ck120 ] || run synth120 $PY -m runtime.synth model=gpt-oss-120b synth.format=mxfp4 synth.out=/dev/shm/ck120
run serve120 $PY -m runtime.bench bench.mode=serve model=gpt-oss-120b model.path=/dev/shm/ck120 $FAST \
    'bench.concurrency=[1,8,64]' bench.input_len=1024 bench.output_len=1024 $OUT bench.out_dir=$R/serve120
stamp "all done"
