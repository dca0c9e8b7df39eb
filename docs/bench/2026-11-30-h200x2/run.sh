#!/usr/bin/env bash
# Issue 12's two-GPU session on an nvidia-h200-x2 machine, as it ran: the exit hang on the previous main
# (diagnosis), the two-GPU tests, then runtime.bench for gpt-oss-120b and gpt-oss-20b (synthetic MXFP4) on
# one GPU and at tp=2 / ep=2 / dp=2, the recipe beside them where it fits. Started in the background from
# a copy of the repository (/tmp/repo, the previous main in /tmp/orig); everything lands in $R.
#
#   bash docs/bench/2026-11-30-h200x2/run.sh /tmp/res
set -u
R=${1:-/tmp/res}
mkdir -p "$R"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast, ever
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
PY=python3
TR="$PY -m torch.distributed.run --standalone"
FAST="attention=triton experts=mxfp4 generation.compile=true"
LEN="bench.input_len=1024 bench.output_len=128 bench.repetitions=2 bench.plots=false bench.table=$R/table.csv"

stamp() { echo "[$(date +%T)] $*" | tee -a "$R/progress.txt"; }

# run NAME DONE_PATTERN CMD...: the command's output in $R/NAME.log; once DONE_PATTERN has appeared, the
# job gets 90 s to exit, after which every Python process of it prints its stacks (SIGABRT with
# PYTHONFAULTHANDLER) and is killed; 1200 s at most in all.
run() {
    local name=$1 done_pat=$2; shift 2
    stamp "start $name: $*"
    setsid "$@" > "$R/$name.log" 2>&1 &
    local pid=$! t0=$SECONDS seen=""
    while kill -0 $pid 2>/dev/null; do
        sleep 2
        if [ -z "$seen" ] && grep -q -- "$done_pat" "$R/$name.log"; then seen=$SECONDS; fi
        if { [ -n "$seen" ] && [ $((SECONDS - seen)) -gt 90 ]; } || [ $((SECONDS - t0)) -gt 1200 ]; then
            stamp "HANG $name: alive $((SECONDS - ${seen:-$t0})) s after '${done_pat}' (or 1200 s): stacks, then kill"
            pkill -ABRT -g $pid; sleep 5; pkill -KILL -g $pid
            break
        fi
    done
    wait $pid; local rc=$?
    stamp "end $name rc=$rc after $((SECONDS - t0)) s"
}

nvidia-smi topo -m > "$R/topo.txt" 2>&1
$PY -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)' > "$R/versions.txt"
( $PY -m runtime.synth model=gpt-oss-120b synth.format=mxfp4 synth.out=/dev/shm/ck120 > "$R/synth120.log" 2>&1
  $PY -m runtime.synth model=gpt-oss-20b synth.format=mxfp4 synth.out=/dev/shm/ck20 > "$R/synth20.log" 2>&1
  touch "$R/synth.done" ) &

# 1. the hang, on the previous main: with CUDA graphs (they capture the NCCL all-reduces) and without
cd /tmp/orig
TINY="model.device=cuda parallel.tp_size=2 attention=triton experts=mxfp4 generation.max_new_tokens=16"
run orig-graphs "done:" $TR --nproc_per_node=2 -m runtime.generate $TINY output.path=/tmp/o1.jsonl
run orig-nographs "done:" $TR --nproc_per_node=2 -m runtime.generate $TINY generation.cuda_graph=false output.path=/tmp/o2.jsonl
cd /tmp/repo

# 2. the two-GPU tests
run tests-multi "passed\|failed" $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_multi.py -rA

while [ ! -f "$R/synth.done" ]; do sleep 2; done
stamp "synthetic checkpoints written"

# 3. benchmarks: one GPU each, at once (120b on GPU 0, 20b with the recipe on GPU 1), then the 2-GPU layouts
B="-m runtime.bench $FAST $LEN"
CUDA_VISIBLE_DEVICES=0 run b120-1gpu "results in" $PY $B model=gpt-oss-120b model.path=/dev/shm/ck120 \
    "bench.batch_sizes=[1,8,64]" bench.out_dir=$R/b120-1gpu &
CUDA_VISIBLE_DEVICES=1 run b20-1gpu "results in" $PY $B model=gpt-oss-20b model.path=/dev/shm/ck20 \
    "bench.batch_sizes=[1,8,64]" bench.baseline=true bench.out_dir=$R/b20-1gpu &
wait
run b120-tp2 "results in" $TR --nproc_per_node=2 $B model=gpt-oss-120b model.path=/dev/shm/ck120 \
    parallel.tp_size=2 "bench.batch_sizes=[1,8,64,256]" bench.out_dir=$R/b120-tp2
run b120-ep2 "results in" $TR --nproc_per_node=2 $B model=gpt-oss-120b model.path=/dev/shm/ck120 \
    parallel.ep_size=2 "bench.batch_sizes=[1,8,64]" bench.out_dir=$R/b120-ep2
run b20-tp2 "results in" $TR --nproc_per_node=2 $B model=gpt-oss-20b model.path=/dev/shm/ck20 \
    parallel.tp_size=2 "bench.batch_sizes=[1,8,64,256]" bench.out_dir=$R/b20-tp2
run b20-ep2 "results in" $TR --nproc_per_node=2 $B model=gpt-oss-20b model.path=/dev/shm/ck20 \
    parallel.ep_size=2 "bench.batch_sizes=[1,8,64]" bench.baseline=true bench.out_dir=$R/b20-ep2
run b120-dp2 "results in" $TR --nproc_per_node=2 $B model=gpt-oss-120b model.path=/dev/shm/ck120 \
    parallel.dp_size=2 "bench.batch_sizes=[1,8,64]" bench.out_dir=$R/b120-dp2
run b20-dp2 "results in" $TR --nproc_per_node=2 $B model=gpt-oss-20b model.path=/dev/shm/ck20 \
    parallel.dp_size=2 "bench.batch_sizes=[1,8,64]" bench.out_dir=$R/b20-dp2
run b120-tp2-nccl "results in" $TR --nproc_per_node=2 $B model=gpt-oss-120b model.path=/dev/shm/ck120 \
    parallel.tp_size=2 parallel.all_reduce=nccl "bench.batch_sizes=[1,8]" bench.out_dir=$R/b120-tp2-nccl
stamp "all done"
