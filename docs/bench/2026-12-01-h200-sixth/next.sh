#!/usr/bin/env bash
# For the next one-H200 session (issues 15 and 14). What has not run on a GPU: commit 4e56c4d's repair of the
# compiled fast path (every run with generation.compile=true experts=mxfp4 failed since 23aae9e), the pairs
# GEMV (moe_mxfp4.GEMV_PAIRS_PER_EXPERT, off), the free rows of a decode step skipping the experts (b08b856),
# the planner's O(1) window look (f68914e). In order of value, each step's log in $R:
#   1. GPU tests: the compiled decode step with the MXFP4 experts (the repair), the pairs GEMV against the
#      reference and the blocks, the MXFP4 kernels at real shapes, the batcher's step sizes as graphs, compiled
#      and not, with the step's free rows routed to no expert (b08b856) (~7 min);
#   2. if the pairs GEMV passed: one MoE layer with it on and off (and the plain GEMV up to 256 pairs) on the
#      120b's and the 20b's experts; where it is faster at 64 tokens on 128 experts, this copy turns it on
#      (GEMV_PAIRS_PER_EXPERT = 4) for what follows (~2 min);
#   3. max load on the 20b: concurrency 256 and 512, 1,024 in / 1,024 out (target 14,000 output tok/s: a decode
#      step of 512 rows costs well under twice one of 256, the MoE blocks being half empty at 256) (~8 min);
#   4. the offline target (continuous vs static rounds at batch 256, 512 prompts of 105-1,995 in / 52-997 out);
#   5. gpt-oss-120b: synthesize; runtime.bench at batch 1 / 8 / 64 (issue 14's rows); the serving sweep at
#      1, 8, 64 (256 out).
# Start it in the background (setsid) and poll $R/progress.txt from the next call within 30 s. Never pkill a
# pattern that the polling command itself contains; `timeout` puts each step in its own process group.
#
#   bash docs/bench/2026-12-01-h200-sixth/next.sh /tmp/res
set -u
R=${1:-/tmp/res}
mkdir -p "$R"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
PY=python3
FAST="attention=triton experts=mxfp4 generation.compile=true"
OUT="bench.plots=false bench.table=$R/table.csv"
MB="$PY -m runtime.kernels.microbench --format mxfp4"
stamp() { echo "[$(date +%T)] $*" | tee -a "$R/progress.txt"; }
run() { local name=$1; shift; stamp "start $name"; timeout 900 "$@" > "$R/$name.log" 2>&1; stamp "end $name rc=$?"; }
ms64() { awk '$1 == 64 && $2 == "mxfp4" {print $3}' "$1"; }
$PY -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)' > "$R/versions.txt"
[ -d /dev/shm/ck20 ] || run synth20 $PY -m runtime.synth model=gpt-oss-20b synth.format=mxfp4 synth.out=/dev/shm/ck20
run tests $PY -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu.py \
    -k "compiled_decode_step_equals_plain or mxfp4_moe_pairs_gemv or mxfp4_moe_real_shapes or continuous"
if [ "$(grep -c '^PASSED.*test_mxfp4_moe_pairs_gemv' "$R/tests.log")" = 6 ]; then
  run moe120-off $MB --experts 128 --tokens 32 64 128 256
  run moe120-pairs $MB --experts 128 --tokens 32 64 128 256 --gemv-pairs-per-expert 4
  run moe120-gemv256 $MB --experts 128 --tokens 64 --decode-max-pairs 256
  run moe20-pairs $MB --tokens 32 64 --gemv-pairs-per-expert 4
  if python3 -c "import sys; sys.exit(not float('$(ms64 "$R/moe120-pairs.log")') < float('$(ms64 "$R/moe120-off.log")'))"; then
    sed -i 's/^GEMV_PAIRS_PER_EXPERT = 0$/GEMV_PAIRS_PER_EXPERT = 4/' runtime/kernels/moe_mxfp4.py
    stamp "pairs GEMV faster at 64 tokens: $(grep -o '^GEMV_PAIRS_PER_EXPERT.*' runtime/kernels/moe_mxfp4.py)"
  fi
fi
run serve20-max $PY -m runtime.bench bench.mode=serve model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST \
    'bench.concurrency=[256,512]' bench.num_prompts=1024 bench.input_len=1024 bench.output_len=1024 $OUT \
    bench.out_dir=$R/serve20-max
run offline20 $PY -m runtime.bench bench.mode=offline model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST \
    bench.num_prompts=512 bench.input_len=1050 bench.output_len=525 bench.range_ratio=0.9 'bench.batch_sizes=[256]' \
    $OUT bench.out_dir=$R/offline20
[ -d /dev/shm/ck120 ] || run synth120 $PY -m runtime.synth model=gpt-oss-120b synth.format=mxfp4 synth.out=/dev/shm/ck120
run bench120 $PY -m runtime.bench model=gpt-oss-120b model.path=/dev/shm/ck120 $FAST bench.input_len=1024 \
    bench.output_len=128 bench.repetitions=2 'bench.batch_sizes=[1,8,64]' $OUT bench.out_dir=$R/bench120
run serve120 $PY -m runtime.bench bench.mode=serve model=gpt-oss-120b model.path=/dev/shm/ck120 $FAST \
    'bench.concurrency=[1,8,64]' bench.input_len=1024 bench.output_len=256 $OUT bench.out_dir=$R/serve120
stamp "all done"
