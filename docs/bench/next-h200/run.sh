#!/usr/bin/env bash
# For the next session on one H200 (issues 15 and 14), in order of value, sized for 30 device minutes (the machine's
# start takes ~1.5 of them); each step's log in $R:
#   0. (~6 min, beside the syntheses) the GPU tests of what the twelfth session made the default without a test at
#      that value: the router in one launch at 4 experts a program (router.EXPERTS_PER_PROGRAM), and the compiled
#      decode step with inductor's combo kernels (generation.combo_kernels, on by default since); and of what it
#      built after its run for the eager prefill: RMSNorm and RoPE in one launch each, the MoE block layout in three,
#      the router's top-k kernel at every size (norm_and_rope, block_layout_kernels, and the fast path's tokens,
#      whose prefills now run them). The TTFTs of steps 1-4 are their first timing (20b 37.1 ms and 120b 74.2 ms at
#      1,024 tokens before);
#   0b. (~4 min) the 120b's experts at 1 / 8 / 1,024 / 8,192 tokens with every autotuned tile's time, both built in
#      the twelfth session after its run: the GEMVs with the next tile prefetched into registers (PREFETCH; at one
#      token ~5 programs an SM had too few bytes in flight: down at 47% of the copy rate, 0.036 ms a layer) against
#      the plain loop, and the register-operand blocks' unpipelined tiles (ONE_STAGE: Triton 3.6's ptxas serializes
#      the pipelined ones' wgmmas, info C7515) against the pipelined ones (gate_up 990 / 4,370 us and down 522 /
#      2,150 us a layer in that session's 120b prefill profiles);
#   1. (~10 min) issue 15's serving sweep on the 20b at concurrency 1 / 8 / 64 / 256, 1,024 in / 1,024 out, with
#      async scheduling and the copy above 256 tokens (the eighth session, copy above 128, no async: 366 / 4,130 at 1
#      / 64 streams; the targets: within 15% / 20% of runtime.bench's batch-1 / batch-64 decode rates, 514 and 7,710
#      tok/s in the twelfth session), with the server's stats lines (GPU wait vs host ms a step) and its warm-up;
#   2. (~4 min) issue 15's prefix-cache target: at concurrency 1, a 4,000-token shared prefix + 100 own tokens
#      against 4,100 own tokens (TTFT >= 5x sooner with the cache);
#   3. (~8 min) issue 15's offline target: continuous against static rounds at batch 128, inputs 105-1,995 and
#      outputs 52-997 (>= 3x static's output tok/s; 384 prompts, not the issue's 2,000, to fit);
#   4. (~5 min) issue 14's 120b rows at batch 1 / 8 / 64 with the twelfth session's defaults (router in one launch
#      up to 16 tokens, combo kernels; that session measured batch 1 / 8 at 342 / 1,224 tok/s with one of them
#      each);
#   5. the 120b's serving sweep at 1 / 8 / 64, if time is left.
# Start it in the background (setsid) and poll $R/progress.txt from the next call within 30 s. Never pkill a
# pattern that the polling command itself contains; `timeout` puts each step in its own process group.
#
#   bash docs/bench/next-h200/run.sh /tmp/res
R=${1:-/tmp/res}
. "$(dirname "$0")/../lib.sh"  # R made, NVLink multicast off, versions, stamp / run
FAST="attention=triton experts=mxfp4 generation.compile=true"
OUT="bench.plots=false bench.table=$R/table.csv"
S20="model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST experts.dequantized_above_tokens=256 generation.async_scheduling=true"
[ -d /dev/shm/ck20 ] || run synth20 600 $PY -m runtime.synth model=gpt-oss-20b synth.format=mxfp4 synth.out=/dev/shm/ck20 &
[ -d /dev/shm/ck120 ] || run synth120 600 $PY -m runtime.synth model=gpt-oss-120b synth.format=mxfp4 synth.out=/dev/shm/ck120 &
# which ptxas binaries the image has (Triton 3.6 assembles Hopper code with CUDA 12.8's; docs/benchmarks.md, twelfth
# session's CPU section: register-operand wgmmas and ptxas before 13.3)
find /usr/local /opt /usr/lib /usr/bin /root -name 'ptxas*' -type f 2>/dev/null | head -8 | while read -r p; do echo "$p $("$p" --version | tail -1)"; done \
    > "$R/ptxas.txt" 2>&1
G="$PY -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu.py"  # (three processes at once, beside the syntheses)
run tests-compiled 900 $G -k "compiled_decode_step_equals_plain and triton" &
run tests-kernels 900 $G -k "router_in_one_launch or norm_and_rope or block_layout_kernels or mxfp4_gemv_tiles \
or reg_a_blocks" &
run tests-tokens 900 $G -k "fast_path_tokens_equal_reference_path or mxfp4_moe_real_shapes"
wait
grep -hE '^(FAILED|ERROR)|passed|failed' "$R"/tests-*.log >> "$R/progress.txt"
wait
run moe120-tiles 300 $PY -m runtime.kernels.microbench --format mxfp4 --experts 128 --tokens 1 8 1024 8192 \
    --only mxfp4 --configs --kernels --one-stage
grep -E "^ +[0-9]+ +mxfp4| ms  |us$" "$R/moe120-tiles.log" | head -90 >> "$R/progress.txt"
run serve20 900 $PY -m runtime.bench bench.mode=serve $S20 'bench.concurrency=[1,8,64,256]' \
    bench.input_len=1024 bench.output_len=1024 $OUT bench.out_dir=$R/serve20
grep "serve concurrency" "$R/serve20.log" >> "$R/progress.txt"
grep -E "warm-up|last [0-9.]+ s:" "$R/serve20/server/server.log" | tail -4 | cut -c1-400 >> "$R/progress.txt"
for p in 4000 0; do
  run prefix$p 300 $PY -m runtime.bench bench.mode=serve $S20 'bench.concurrency=[1]' bench.num_prompts=8 \
      bench.prefix_len=$p bench.input_len=$((4100 - p)) bench.output_len=16 $OUT bench.out_dir=$R/prefix$p
  grep "serve concurrency" "$R/prefix$p.log" | sed "s/^/prefix $p: /" >> "$R/progress.txt"
done
run offline20 900 $PY -m runtime.bench bench.mode=offline $S20 bench.num_prompts=384 bench.input_len=1050 \
    bench.output_len=525 bench.range_ratio=0.9 'bench.batch_sizes=[128]' $OUT bench.out_dir=$R/offline20
grep -E "offline batch" "$R/offline20.log" >> "$R/progress.txt"
run bench120 600 $PY -m runtime.bench model=gpt-oss-120b model.path=/dev/shm/ck120 $FAST bench.input_len=1024 \
    bench.output_len=128 bench.repetitions=2 'bench.batch_sizes=[1,8,64]' $OUT bench.out_dir=$R/bench120
grep -E "batch +[0-9]+:" "$R/bench120.log" | tail -3 >> "$R/progress.txt"
run serve120 900 $PY -m runtime.bench bench.mode=serve model=gpt-oss-120b model.path=/dev/shm/ck120 $FAST \
    generation.async_scheduling=true 'bench.concurrency=[1,8,64]' bench.input_len=1024 bench.output_len=1024 $OUT \
    bench.out_dir=$R/serve120
grep "serve concurrency" "$R/serve120.log" >> "$R/progress.txt"
stamp "all done"
