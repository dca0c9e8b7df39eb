#!/usr/bin/env bash
# For the next session on nvidia-h200-x2 (issue 12), in order of value; what the 30 device minutes cut is at the end.
#   1. the two-GPU tests again (since the ninth session the plans, stop votes and records travel on a gloo group
#      beside NCCL: every job must still exit on its own), with async scheduling at tp=2 (~8 min);
#   2. issue 12's batch-1 target in one run each, same checkpoint: gpt-oss-120b on one GPU and at tp=2, batch 1 /
#      8 / 64 (target: tp=2 >= 1.6x one GPU at batch 1, >= 1.85x at 64), then tp=2 batch 1 / 8 profiled (~12 min);
#   3. the 20b's server at tp=2, 64 and 256 streams, without and with async scheduling (~8 min);
#   4. what 2026-12-01 left: the 20b at dp=2 and at tp=2 batch 64 / 256, the 120b at dp=2 batch 64,
#      parallel.all_reduce=nccl beside one_shot, parallel.plan=transformers at ep=2.
# Start it in the background (setsid) and poll $R/progress.txt within 30 s of each call's end.
#
#   bash docs/bench/next-x2/run.sh /tmp/res
R=${1:-/tmp/res}
. "$(dirname "$0")/../lib.sh"  # R made, NVLink multicast off, versions, stamp / run
TR="$PY -m torch.distributed.run --standalone --nproc_per_node=2"
FAST="attention=triton experts=mxfp4 generation.compile=true"
LEN="bench.input_len=1024 bench.output_len=128 bench.repetitions=2 bench.plots=false bench.table=$R/table.csv"
B="-m runtime.bench $FAST $LEN"
M120="model=gpt-oss-120b model.path=/dev/shm/ck120"
M20="model=gpt-oss-20b model.path=/dev/shm/ck20"
( [ -d /dev/shm/ck120 ] || $PY -m runtime.synth model=gpt-oss-120b synth.format=mxfp4 synth.out=/dev/shm/ck120 > "$R/synth120.log" 2>&1
  [ -d /dev/shm/ck20 ] || $PY -m runtime.synth model=gpt-oss-20b synth.format=mxfp4 synth.out=/dev/shm/ck20 > "$R/synth20.log" 2>&1
  touch "$R/synth.done" ) &
run tests-multi 900 $PY -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu_multi.py -k "not collectives and not 20b"
grep -E '^(PASSED|FAILED|ERROR)|passed|failed' "$R/tests-multi.log" | tail -14 >> "$R/progress.txt"
while [ ! -f "$R/synth.done" ]; do sleep 2; done
run b120-1gpu 900 $PY $B $M120 "bench.batch_sizes=[1,8,64]" bench.out_dir="$R/b120-1gpu"
run b120-tp2 900 $TR $B $M120 parallel.tp_size=2 "bench.batch_sizes=[1,8,64]" bench.out_dir="$R/b120-tp2"
grep -hE "batch +[0-9]+:" "$R/b120-1gpu.log" "$R/b120-tp2.log" >> "$R/progress.txt"
run b120-tp2-profile 900 $TR $B $M120 parallel.tp_size=2 "bench.batch_sizes=[1,8]" bench.profile=true \
    bench.out_dir="$R/b120-tp2-profile"
grep -hE "batch +[0-9]+:" "$R/b120-tp2-profile.log" >> "$R/progress.txt"
SERVE="-m runtime.bench bench.mode=serve $FAST $M20 parallel.tp_size=2 experts.dequantized_above_tokens=128"
SERVE="$SERVE bench.input_len=1024 bench.output_len=512 bench.plots=false bench.table=$R/table.csv"
run serve20-tp2 900 $PY $SERVE "bench.concurrency=[64,256]" bench.out_dir="$R/serve20-tp2"
run serve20-tp2-async 900 $PY $SERVE generation.async_scheduling=true "bench.concurrency=[64,256]" \
    bench.out_dir="$R/serve20-tp2-async"
grep -h "serve concurrency" "$R"/serve20-tp2*.log >> "$R/progress.txt"
run b20-dp2 900 $TR $B $M20 parallel.dp_size=2 "bench.batch_sizes=[1,8,64]" bench.out_dir="$R/b20-dp2"
run b20-tp2 900 $TR $B $M20 parallel.tp_size=2 "bench.batch_sizes=[64,256]" bench.out_dir="$R/b20-tp2"
run b120-dp2 900 $TR $B $M120 parallel.dp_size=2 "bench.batch_sizes=[64]" bench.out_dir="$R/b120-dp2"
run b120-tp2-nccl 900 $TR $B $M120 parallel.tp_size=2 parallel.all_reduce=nccl "bench.batch_sizes=[1,8]" \
    bench.out_dir="$R/b120-tp2-nccl"
run b20-ep2-transformers 900 $TR -m runtime.bench $M20 parallel.ep_size=2 parallel.plan=transformers $LEN \
    "bench.batch_sizes=[1,8]" bench.out_dir="$R/b20-ep2-transformers"
stamp "all done"
