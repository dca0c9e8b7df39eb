#!/usr/bin/env bash
# For the next one-H200 session (issue 15, after the paged KV cache, the planner and graph-captured prefills
# landed: none of it has run on a GPU yet). In order of value, each line's log in $R:
#   1. the GPU tests of the paged kernel, the continuous batcher (decode and prefill graphs) and the server
#      (~5 min);
#   1b. step_profile.py: the batcher's decode step (synced per step, as the server) against the engine's static
#      decode, the padded prefill graphs, and a kernel table (where the single stream's 0.75 ms/token went), ~3 min;
#   2. the serving sweep on the 20b at concurrency 1, 8, 64 (1,024 in / 1,024 out): single stream vs bench
#      batch 1 (target within 15%), 64 streams vs batch 64 (within 20%), ~8 min;
#   3. the prefix cache's TTFT (4,000 shared tokens + 100 against 4,100 unshared; target >= 5x sooner), ~3 min;
#   4. the offline target at batch 256 (continuous vs static rounds, 512 prompts), ~8 min;
#   5. concurrency 256 (max-load throughput).
# Start it in the background (setsid) and poll $R/progress.txt from the next call within 30 s; do not pkill a
# pattern that appears in the polling command itself.
#
#   bash docs/bench/2026-12-01-h200-serve/next.sh /tmp/res
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
run tests $PY -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu.py -k "paged or continuous or serve"
run step-profile $PY docs/bench/2026-12-01-h200-paged/step_profile.py /dev/shm/ck20
run serve20 $PY -m runtime.bench bench.mode=serve model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST \
    'bench.concurrency=[1,8,64]' bench.input_len=1024 bench.output_len=1024 $OUT bench.out_dir=$R/serve20
run prefix-shared $PY -m runtime.bench bench.mode=serve model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST \
    'bench.concurrency=[1]' bench.num_prompts=8 bench.prefix_len=4000 bench.input_len=100 bench.output_len=16 \
    $OUT bench.out_dir=$R/prefix-shared
run prefix-none $PY -m runtime.bench bench.mode=serve model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST \
    'bench.concurrency=[1]' bench.num_prompts=8 bench.prefix_len=0 bench.input_len=4100 bench.output_len=16 \
    $OUT bench.out_dir=$R/prefix-none
run offline20 $PY -m runtime.bench bench.mode=offline model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST \
    bench.num_prompts=512 bench.input_len=1050 bench.output_len=525 bench.range_ratio=0.9 'bench.batch_sizes=[256]' \
    $OUT bench.out_dir=$R/offline20
run serve20-256 $PY -m runtime.bench bench.mode=serve model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST \
    'bench.concurrency=[256]' bench.input_len=1024 bench.output_len=1024 $OUT bench.out_dir=$R/serve20-256
stamp "all done"
