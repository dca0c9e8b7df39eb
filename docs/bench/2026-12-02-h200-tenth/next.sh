#!/usr/bin/env bash
# For the next one-H200 session (issues 14 and 15), in order of value, sized for 30 device minutes (the machine's
# start takes ~1.5 of them); each step's log in $R:
#   A1. (~6 min, the GPU to itself; the 20b's synthesis beside it; --only mxfp4: no bf16 copy timed) the MXFP4 GEMVs as they are, with each tile
#      loaded as runs of a row (moe_mxfp4.GEMV_ROW_RUNS: on Triton 3.6 a warp's lanes then read consecutive groups of
#      a row, not 16 bytes from each of 32 rows), with the split nibble placement in their PTX and in the blocks' bf16
#      one (SPLIT_NIBBLES: 11 integer operations a word instead of 20 in the GEMVs, 7 instead of 10 per two bytes in
#      the blocks), and both (the decode gate_up loop: 232 / 219 / 199 / 187 sm_90 instructions); 120b at 1 / 8 / 64
#      tokens, 20b at 1 / 8 / 64 / 256 (the last two: register-operand blocks); each result's error against the
#      reference is printed: turn on what wins and is right;
#   A1b. (~1 min) decode attention's in-kernel merge reading 4 splits an iteration against one
#      (flash.MERGE_SPLITS_AT_ONCE; one at a time, the flash kernel's time a 120b step rose from 250 to 296 us);
#   A2. (~2 min) the 120b's experts at 32 / 64 / 128 tokens a step: the pairs GEMV (on for 128 experts up to 4 pairs
#      an expert) against the register-operand blocks that run where it is off (--gemv-pairs-per-expert 0; the pairs
#      GEMV beat the plain blocks by 0-13%, the register-operand blocks beat those by 16-30%);
#   A. (~8 min, three pytest processes beside the 120b's synthesis) the GPU tests that the tenth session's defaults
#      touch: the register-operand MXFP4 blocks (on now; the test skips forced tiles over the shared-memory limit),
#      the compiled decode steps and the dequantized copy with them, the paged flash kernel and the batcher's graphs
#      with 128 keys a split and the merge in the kernel;
#   C. (~5 min) the 120b's batch 1 / 8 / 64 with the new defaults (the prefill's blocks now register-operand: TTFT
#      97.8 ms at batch 1 before; step 3.31 ms);
#   B. (~10 min) the 20b's serving sweep with async scheduling and the copy above 256 tokens (the register-operand
#      blocks beat the copy up to 256 tokens a step): 1 / 64 / 512 streams against the eighth session's 366 / 4,130 /
#      10,293 tok/s, with the server's stats lines and its warm-up by part;
#   C2. (~4 min) the 120b's batch 1 / 8 with inductor's combo kernels (torch._inductor.config.combo_kernels:
#      independent pointwise kernels in one launch, e.g. the three RoPE / KV-write kernels a layer, 158 us of the
#      batch-1 step; each launch leaves a gap: 3.08 ms of kernels in a 3.31 ms step), profiled: if faster with the
#      same tokens, make it a setting;
#   D. the offline target at batch 128 (continuous + async vs static rounds), if time is left.
# Start it in the background (setsid) and poll $R/progress.txt from the next call within 30 s. Never pkill a
# pattern that the polling command itself contains; `timeout` puts each step in its own process group.
#
#   bash docs/bench/2026-12-02-h200-tenth/next.sh /tmp/res
R=${1:-/tmp/res}
. "$(dirname "$0")/../lib.sh"  # R made, NVLink multicast off, versions, stamp / run
FAST="attention=triton generation.compile=true"
OUT="bench.plots=false bench.table=$R/table.csv"
[ -d /dev/shm/ck20 ] || run synth20 300 $PY -m runtime.synth model=gpt-oss-20b synth.format=mxfp4 synth.out=/dev/shm/ck20 &
for v in "no-gemv-row-runs no-split-nibbles" "gemv-row-runs no-split-nibbles" \
         "no-gemv-row-runs split-nibbles" "gemv-row-runs split-nibbles"; do
  name=$(echo $v | tr ' ' '+'); flags="--${v// / --} --only mxfp4"  # (each a fresh process: a fresh autotune)
  run moe120-$name 150 $PY -m runtime.kernels.microbench --format mxfp4 --experts 128 --tokens 1 8 64 $flags
  case $name in *+no-split-nibbles) tokens="1 8";; *) tokens="1 8 64 256";; esac  # (64, 256: the blocks' PTX)
  run moe20-$name 150 $PY -m runtime.kernels.microbench --format mxfp4 --tokens $tokens $flags
  grep -hE "^ +[0-9]+ +mxfp4" "$R/moe120-$name.log" "$R/moe20-$name.log" | sed "s/^/$name /" >> "$R/progress.txt"
done
run flash 180 $PY -m runtime.kernels.microbench --flash --tokens 1 8 16 --merge-splits-at-once 1 4 8
grep -E "^ +[0-9]+ |SPLIT" "$R/flash.log" >> "$R/progress.txt"
for pairs in 4 0; do
  run moe120-pairs$pairs 180 $PY -m runtime.kernels.microbench --format mxfp4 --experts 128 --tokens 32 64 128 \
      --gemv-pairs-per-expert $pairs
  grep -E "^ +[0-9]+ +mxfp4" "$R/moe120-pairs$pairs.log" | sed "s/^/pairs $pairs /" >> "$R/progress.txt"
done
wait
T="$PY -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu.py"
run tests-rega 600 $T -k "reg_a_blocks or mxfp4_moe_real_shapes" &
run tests-compiled 600 $T -k "compiled_decode_step_equals_plain or dequantized_copy" &
run tests-flash 600 $T -k "paged or flash_merge or continuous" &
[ -d /dev/shm/ck120 ] || run synth120 600 $PY -m runtime.synth model=gpt-oss-120b synth.format=mxfp4 synth.out=/dev/shm/ck120 &
wait
grep -hE '^(FAILED|ERROR)|passed|failed' "$R"/tests-*.log >> "$R/progress.txt"
B120="model=gpt-oss-120b model.path=/dev/shm/ck120 $FAST experts=mxfp4 bench.input_len=1024 bench.output_len=128"
run bench120 600 $PY -m runtime.bench $B120 bench.repetitions=2 'bench.batch_sizes=[1,8,64]' $OUT \
    bench.out_dir=$R/bench120
grep -E "batch +[0-9]+:" "$R/bench120.log" | tail -3 >> "$R/progress.txt"
run serve20 900 $PY -m runtime.bench bench.mode=serve model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST \
    experts=mxfp4 experts.dequantized_above_tokens=256 generation.async_scheduling=true \
    'bench.concurrency=[1,64,512]' bench.input_len=1024 bench.output_len=1024 $OUT bench.out_dir=$R/serve20
grep "serve concurrency" "$R/serve20.log" >> "$R/progress.txt"
grep -E "warm-up|last [0-9.]+ s:" "$R/serve20/server/server.log" | tail -4 | cut -c1-400 >> "$R/progress.txt"
run bench120-combo 600 $PY -c "import runpy, sys; import torch._inductor.config as c; c.combo_kernels = True; \
sys.argv = ['runtime.bench'] + sys.argv[1:]; runpy.run_module('runtime.bench', run_name='__main__')" \
    $B120 bench.repetitions=2 'bench.batch_sizes=[1,8]' bench.profile=true $OUT bench.out_dir=$R/bench120-combo
grep -E "batch +[0-9]+:" "$R/bench120-combo.log" | tail -2 >> "$R/progress.txt"
rm -rf /dev/shm/ck120
run offline20 1200 $PY -m runtime.bench bench.mode=offline model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST \
    experts=mxfp4 experts.dequantized_above_tokens=256 generation.async_scheduling=true \
    bench.num_prompts=512 bench.input_len=1050 bench.output_len=525 \
    bench.range_ratio=0.9 'bench.batch_sizes=[128]' $OUT bench.out_dir=$R/offline20
grep -E "offline batch" "$R/offline20.log" >> "$R/progress.txt"
stamp "all done"
