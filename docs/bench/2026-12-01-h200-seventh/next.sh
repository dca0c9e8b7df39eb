#!/usr/bin/env bash
# For the next one-H200 session (issues 15 and 14), in order of value; each step's log in $R:
#   1. GPU tests of what this session built on the CPU: experts.dequantized_above_tokens (the copy's tokens equal
#      the 4-bit path's, compiled), the compiled decode step (the pairs GEMV is now on for 128 experts), the
#      register-operand blocks (moe_mxfp4.REG_A_BLOCKS), then their time against the default blocks and our bf16
#      kernel (if faster than both from 256 tokens, turn them on and serve without the bf16 copy) (~6 min);
#   2. the 20b's serving sweep on one configuration, 4-bit experts for small steps and the dequantized copy for
#      big ones: concurrency 1, 64, 512, 1,024 in / 1,024 out (this session: 12,370 output tok/s at 512 with
#      experts=triton; target 14,000; c1 and c64 against runtime.bench's batch-1 and batch-64 decode) (~9 min);
#   3. the offline target (continuous vs static rounds at batch 256, 512 prompts of 105-1,995 in / 52-997 out) (~4 min);
#   4. gpt-oss-120b: synthesize; runtime.bench at batch 1 / 8 / 64 with the pairs GEMV on (issue 14's rows) (~5 min).
# The server's warm-up is ~280 s at 512 rows (one torch.compile per step size): budget for it.
# Start it in the background (setsid) and poll $R/progress.txt from the next call within 30 s. Never pkill a
# pattern that the polling command itself contains; `timeout` puts each step in its own process group.
#
#   bash docs/bench/2026-12-01-h200-seventh/next.sh /tmp/res
set -u
R=${1:-/tmp/res}
mkdir -p "$R"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
PY=python3
HYBRID="attention=triton experts=mxfp4 experts.dequantized_above_tokens=128 generation.compile=true"
OUT="bench.plots=false bench.table=$R/table.csv"
stamp() { echo "[$(date +%T)] $*" | tee -a "$R/progress.txt"; }
run() { local name=$1; shift; stamp "start $name"; timeout 900 "$@" > "$R/$name.log" 2>&1; stamp "end $name rc=$?"; }
$PY -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)' > "$R/versions.txt"
[ -d /dev/shm/ck20 ] || run synth20 $PY -m runtime.synth model=gpt-oss-20b synth.format=mxfp4 synth.out=/dev/shm/ck20
run tests $PY -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu.py \
    -k "dequantized_copy or compiled_decode_step_equals_plain or reg_a_blocks"
grep -E '^(PASSED|FAILED|ERROR)|passed|failed' "$R/tests.log" | tail -14 >> "$R/progress.txt"
if grep -q "^PASSED.*test_mxfp4_moe_reg_a_blocks\[32-2048\]" "$R/tests.log"; then  # the register-operand blocks
  run moe20-rega $PY -m runtime.kernels.microbench --format mxfp4 --tokens 64 256 512 2048 --reg-a
  run moe120-rega $PY -m runtime.kernels.microbench --format mxfp4 --experts 128 --tokens 256 1024 --reg-a
  cat "$R"/moe*-rega.log | grep -E "mxfp4|bf16" >> "$R/progress.txt"
fi
run serve20 $PY -m runtime.bench bench.mode=serve model=gpt-oss-20b model.path=/dev/shm/ck20 $HYBRID \
    'bench.concurrency=[1,64,512]' bench.input_len=1024 bench.output_len=1024 $OUT bench.out_dir=$R/serve20
grep "serve concurrency" "$R/serve20.log" >> "$R/progress.txt"
run offline20 $PY -m runtime.bench bench.mode=offline model=gpt-oss-20b model.path=/dev/shm/ck20 $HYBRID \
    bench.num_prompts=512 bench.input_len=1050 bench.output_len=525 bench.range_ratio=0.9 'bench.batch_sizes=[256]' \
    $OUT bench.out_dir=$R/offline20
[ -d /dev/shm/ck120 ] || run synth120 $PY -m runtime.synth model=gpt-oss-120b synth.format=mxfp4 synth.out=/dev/shm/ck120
run bench120 $PY -m runtime.bench model=gpt-oss-120b model.path=/dev/shm/ck120 attention=triton experts=mxfp4 \
    generation.compile=true bench.input_len=1024 bench.output_len=128 bench.repetitions=2 'bench.batch_sizes=[1,8,64]' \
    $OUT bench.out_dir=$R/bench120
stamp "all done"
