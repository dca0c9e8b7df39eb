#!/usr/bin/env bash
# For the next one-H200 session (issues 14 and 15), in order of value; each step's log in $R:
#   1. the register-operand MXFP4 blocks, repaired on the CPU after failing on the H200 in the eighth session
#      (each byte its own scale): their GPU test (and async scheduling's, and the projections' GEMV's, built in the
#      ninth session), then their time against the default blocks and our bf16 kernel (if faster than both from 256
#      tokens: REG_A_BLOCKS=True, and the 20b serves without the bf16 copy), the GEMV against cuBLAS at the
#      projections' shapes, and decode attention's split merge in the kernel against torch's (if its test passed
#      and it is faster: flash.MERGE_IN_KERNEL = True) (~9 min);
#   2. the 20b's serving sweep as in the eighth session (4-bit experts, the bf16 copy above 128 tokens; 366 / 4,130
#      / 10,293 tok/s at 1 / 64 / 512 streams) with generation.async_scheduling=true, the server's new stats lines
#      (serve.stats_seconds: GPU wait vs host ms a step, the stream writer's share) and its warm-up by part (~10 min);
#   3. issue 14's rows on the 120b (synthesize, then runtime.bench at batch 1 / 8 / 64, the pairs GEMV on), then
#      batch 1 / 8 again with generation.gemv_max_tokens=16 if its GPU tests passed (~10 min);
#   4. why 512 streams served 10,293 tok/s with the bf16 copy (eighth session) where experts=triton had served
#      12,370 (seventh): the 512-row decode step alone, both ways, one runtime.bench each (one compile of one step
#      size each, not the server's 5-minute warm-up), with a kernel profile; 256-token prompts (the static
#      decoder prefills in column chunks of generation.max_prefill_tokens since the ninth session, but these rows
#      stay comparable with the earlier ones) (~8 min);
#   5. if time is left: the offline target at batch 128 (continuous, async, vs static rounds; its warm-ups alone
#      took more than 9 minutes at batch 256 in the eighth session: give it 20). 256 would now fit (static rounds
#      prefill in column chunks of 8,192 tokens, no longer ~60 GB of MoE temporaries in one forward) but costs
#      more warm-up than this script has left.
# Start it in the background (setsid) and poll $R/progress.txt from the next call within 30 s. Never pkill a
# pattern that the polling command itself contains; `timeout` puts each step in its own process group.
#
#   bash docs/bench/2026-12-01-h200-eighth/next.sh /tmp/res
set -u
R=${1:-/tmp/res}
mkdir -p "$R"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
PY=python3
FAST="attention=triton generation.compile=true"
OUT="bench.plots=false bench.table=$R/table.csv"
stamp() { echo "[$(date +%T)] $*" | tee -a "$R/progress.txt"; }
run() { local name=$1 limit=$2; shift 2; stamp "start $name"; timeout "$limit" "$@" > "$R/$name.log" 2>&1; stamp "end $name rc=$?"; }
$PY -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)' > "$R/versions.txt"
run tests 600 $PY -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu.py -k "reg_a_blocks or async_scheduling or gemv or flash_merge"
grep -E '^(PASSED|FAILED|ERROR)|passed|failed' "$R/tests.log" | tail -8 >> "$R/progress.txt"
if grep -q "^PASSED.*test_mxfp4_moe_reg_a_blocks\[32-2048\]" "$R/tests.log"; then
  run moe20-rega 300 $PY -m runtime.kernels.microbench --format mxfp4 --tokens 64 256 512 2048 --reg-a
  run moe120-rega 300 $PY -m runtime.kernels.microbench --format mxfp4 --experts 128 --tokens 32 256 1024 --reg-a
  cat "$R"/moe*-rega.log | grep -E "mxfp4|bf16" >> "$R/progress.txt"
fi
run gemv 180 $PY -m runtime.kernels.microbench --gemv --tokens 1 2 8 16
grep -E "^ +[0-9]+ " "$R/gemv.log" >> "$R/progress.txt"
run flash 180 $PY -m runtime.kernels.microbench --flash --tokens 1 8 16 --split-keys 64 128 256
grep -E "^ +[0-9]+ " "$R/flash.log" >> "$R/progress.txt"
[ -d /dev/shm/ck20 ] || run synth20 300 $PY -m runtime.synth model=gpt-oss-20b synth.format=mxfp4 synth.out=/dev/shm/ck20
run serve20-async 900 $PY -m runtime.bench bench.mode=serve model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST \
    experts=mxfp4 experts.dequantized_above_tokens=128 generation.async_scheduling=true \
    'bench.concurrency=[1,64,512]' bench.input_len=1024 bench.output_len=1024 $OUT bench.out_dir=$R/serve20-async
grep "serve concurrency" "$R/serve20-async.log" >> "$R/progress.txt"
grep -E "warm-up|last [0-9.]+ s:" "$R/serve20-async/server/server.log" | tail -4 | cut -c1-400 >> "$R/progress.txt"
[ -d /dev/shm/ck120 ] || run synth120 600 $PY -m runtime.synth model=gpt-oss-120b synth.format=mxfp4 synth.out=/dev/shm/ck120
run bench120 600 $PY -m runtime.bench model=gpt-oss-120b model.path=/dev/shm/ck120 $FAST experts=mxfp4 \
    bench.input_len=1024 bench.output_len=128 bench.repetitions=2 'bench.batch_sizes=[1,8,64]' \
    $OUT bench.out_dir=$R/bench120
grep -E "batch +[0-9]+:" "$R/bench120.log" | tail -3 >> "$R/progress.txt"
if grep -q "^PASSED.*test_gemv_projections_give_cublas_tokens" "$R/tests.log"; then
  run bench120-gemv 600 $PY -m runtime.bench model=gpt-oss-120b model.path=/dev/shm/ck120 $FAST experts=mxfp4 \
      generation.gemv_max_tokens=16 bench.input_len=1024 bench.output_len=128 bench.repetitions=2 \
      'bench.batch_sizes=[1,8]' bench.profile=true $OUT bench.out_dir=$R/bench120-gemv
  grep -E "batch +[0-9]+:" "$R/bench120-gemv.log" | tail -2 >> "$R/progress.txt"
fi
rm -rf /dev/shm/ck120  # room for the 20b's copies
for experts in "experts=triton" "experts=mxfp4 experts.dequantized_above_tokens=128"; do
  name=b512-$(echo "$experts" | tr -c 'a-z0-9' '-' | sed 's/-*$//')
  run "$name" 420 $PY -m runtime.bench model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST $experts \
      bench.input_len=256 bench.output_len=64 bench.repetitions=1 'bench.batch_sizes=[512]' bench.profile=true \
      $OUT bench.out_dir=$R/$name
  grep -E "batch +512:" "$R/$name.log" | tail -1 >> "$R/progress.txt"
done
run offline20 1200 $PY -m runtime.bench bench.mode=offline model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST \
    experts=mxfp4 experts.dequantized_above_tokens=128 generation.async_scheduling=true \
    bench.num_prompts=512 bench.input_len=1050 bench.output_len=525 \
    bench.range_ratio=0.9 'bench.batch_sizes=[128]' $OUT bench.out_dir=$R/offline20
grep -E "offline batch" "$R/offline20.log" >> "$R/progress.txt"
stamp "all done"
