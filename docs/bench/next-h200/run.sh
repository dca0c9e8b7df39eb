#!/usr/bin/env bash
# For the next session on one H200 (issues 14 and 15), in order of value, sized for 30 device minutes (the machine's
# start takes ~1.5 of them); each step's log in $R:
#   0. (~5 min, beside the syntheses) the router's GEMV + top-k in one launch (router.GEMV_MAX_TOKENS, 0 until
#      this passes and wins): its GPU test (100 graph replays against F.linear, an arrival counter per token; with
#      it the plain and the register-operand MXFP4 blocks' every tile, their SWAP / SCALED variants removed in the
#      eleventh session), the
#      compiled decode step with it on (the tiny model, every layer sharing one counter table through inductor), then
#      `microbench --router` at 1-16 tokens with 1 / 2 / 4 experts a program (router.EXPERTS_PER_PROGRAM; cuBLAS's
#      split-K GEMV + its reduce + the top-k kernel before: ~7.8 us a layer at batch 1 in the tenth session's profile);
#   1. (~4 min) the 120b's batch 1 / 8 profiled with the eleventh session's GEMVs (row runs, split nibbles): one layer
#      of experts at 1 token took 0.036 ms instead of 0.043 in the microbench, yet the batch-1 TPOT stayed at 3.30 ms
#      (batch 8: 7.94 -> 6.87): where did batch 1's gain go? Compare the kernels with res/bench120-merge/profile-b1.txt
#      of the tenth session (gate_up 679 + down 381 us a step);
#   1b. (~4 min) the same with the router in one launch up to 8 tokens (router.GEMV_MAX_TOKENS=8), profiled: the
#      router's three kernels a layer should become one; if faster with the same tokens, turn it on;
#   2. (~3 min) the 120b's experts at 1 and 8 tokens with each kernel's GPU time (microbench --kernels: the replay's
#      own launch cost left out, as in a step), then at 32 / 64 / 128 tokens a step: the pairs GEMV (4 pairs an expert at most, on
#      now) against the register-operand blocks (--gemv-pairs-per-expert 0), both with the new GEMV: before it the
#      blocks won at 64 and 128 tokens (0.869 / 1.481 vs 1.095 / 1.771 ms), the pairs GEMV with it took 0.825 at 64;
#      set GEMV_PAIRS_PER_EXPERT by the result;
#   3. (~3 min) the 20b's batch 1 / 8 / 64 with today's defaults (issue 14's 20b rows; batch 8 last measured in the
#      third session);
#   4. (~10 min) the 20b's serving sweep with async scheduling and the copy above 256 tokens: 1 / 64 / 512 streams
#      against the eighth session's 366 / 4,130 / 10,293 tok/s, with the server's stats lines and its warm-up by part;
#   5. (~4 min) the 120b's batch 1 / 8 with inductor's combo kernels (torch._inductor.config.combo_kernels), profiled:
#      if faster with the same tokens, make it a setting;
#   6. the offline target at batch 128 (continuous + async vs static rounds), if time is left.
# Start it in the background (setsid) and poll $R/progress.txt from the next call within 30 s. Never pkill a
# pattern that the polling command itself contains; `timeout` puts each step in its own process group.
#
#   bash docs/bench/next-h200/run.sh /tmp/res
R=${1:-/tmp/res}
. "$(dirname "$0")/../lib.sh"  # R made, NVLink multicast off, versions, stamp / run
FAST="attention=triton experts=mxfp4 generation.compile=true"
OUT="bench.plots=false bench.table=$R/table.csv"
LEN="bench.input_len=1024 bench.output_len=128 bench.repetitions=2"
B120="model=gpt-oss-120b model.path=/dev/shm/ck120 $FAST $LEN"
B20="model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST $LEN"
[ -d /dev/shm/ck20 ] || $PY -m runtime.synth model=gpt-oss-20b synth.format=mxfp4 synth.out=/dev/shm/ck20 \
    > "$R/synth20.log" 2>&1 &  # (both syntheses beside the tests; `wait` below)
[ -d /dev/shm/ck120 ] || run synth120 600 $PY -m runtime.synth model=gpt-oss-120b synth.format=mxfp4 synth.out=/dev/shm/ck120 &
run tests-router 300 $PY -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu.py -k "router_in_one_launch or plain_tiles or reg_a_blocks"
run tests-router-compiled 600 $PY -c "import sys, pytest, runtime.kernels.router as r; r.GEMV_MAX_TOKENS = 8; \
sys.exit(pytest.main(['-m', 'gpu', '-q', '-p', 'no:cacheprovider', '-rA', 'tests/test_gpu.py', \
'-k', 'compiled_decode_step_equals_plain and triton-mxfp4']))"
grep -hE '^(FAILED|ERROR)|passed|failed' "$R"/tests-router*.log >> "$R/progress.txt"
run router 120 $PY -m runtime.kernels.microbench --router --tokens 1 2 4 8 16
grep -E "^ +[0-9]+ +[0-9]+ " "$R/router.log" >> "$R/progress.txt"
wait
run bench120-profile 600 $PY -m runtime.bench $B120 'bench.batch_sizes=[1,8]' bench.profile=true $OUT \
    bench.out_dir=$R/bench120-profile
grep -E "batch +[0-9]+:" "$R/bench120-profile.log" | tail -2 >> "$R/progress.txt"
run bench120-router 600 $PY -c "import runpy, sys; import runtime.kernels.router as r; r.GEMV_MAX_TOKENS = 8; \
sys.argv = ['runtime.bench'] + sys.argv[1:]; runpy.run_module('runtime.bench', run_name='__main__')" \
    $B120 'bench.batch_sizes=[1,8]' bench.profile=true $OUT bench.out_dir=$R/bench120-router
grep -E "batch +[0-9]+:" "$R/bench120-router.log" | tail -2 >> "$R/progress.txt"
run moe120-kernels 120 $PY -m runtime.kernels.microbench --format mxfp4 --experts 128 --tokens 1 8 --only mxfp4 --kernels
grep -E "^ +[0-9]+ +mxfp4|  us$" "$R/moe120-kernels.log" >> "$R/progress.txt"
for pairs in 4 0; do
  run moe120-pairs$pairs 180 $PY -m runtime.kernels.microbench --format mxfp4 --experts 128 --tokens 32 64 128 \
      --gemv-pairs-per-expert $pairs --only mxfp4
  grep -E "^ +[0-9]+ +mxfp4" "$R/moe120-pairs$pairs.log" | sed "s/^/pairs $pairs /" >> "$R/progress.txt"
done
run bench20 600 $PY -m runtime.bench $B20 'bench.batch_sizes=[1,8,64]' $OUT bench.out_dir=$R/bench20
grep -E "batch +[0-9]+:" "$R/bench20.log" | tail -3 >> "$R/progress.txt"
run serve20 900 $PY -m runtime.bench bench.mode=serve model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST \
    experts.dequantized_above_tokens=256 generation.async_scheduling=true \
    'bench.concurrency=[1,64,512]' bench.input_len=1024 bench.output_len=1024 $OUT bench.out_dir=$R/serve20
grep "serve concurrency" "$R/serve20.log" >> "$R/progress.txt"
grep -E "warm-up|last [0-9.]+ s:" "$R/serve20/server/server.log" | tail -4 | cut -c1-400 >> "$R/progress.txt"
run bench120-combo 600 $PY -c "import runpy, sys; import torch._inductor.config as c; c.combo_kernels = True; \
sys.argv = ['runtime.bench'] + sys.argv[1:]; runpy.run_module('runtime.bench', run_name='__main__')" \
    $B120 'bench.batch_sizes=[1,8]' bench.profile=true $OUT bench.out_dir=$R/bench120-combo
grep -E "batch +[0-9]+:" "$R/bench120-combo.log" | tail -2 >> "$R/progress.txt"
rm -rf /dev/shm/ck120
run offline20 1200 $PY -m runtime.bench bench.mode=offline model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST \
    experts=mxfp4 experts.dequantized_above_tokens=256 generation.async_scheduling=true \
    bench.num_prompts=512 bench.input_len=1050 bench.output_len=525 \
    bench.range_ratio=0.9 'bench.batch_sizes=[128]' $OUT bench.out_dir=$R/offline20
grep -E "offline batch" "$R/offline20.log" >> "$R/progress.txt"
stamp "all done"
