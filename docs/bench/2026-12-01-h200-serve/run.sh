#!/usr/bin/env bash
# Run on 2026-12-01 (fourth session; see docs/benchmarks.md) with the offline run cut to 512 prompts and the
# HTTP check moved last. Written after the stream writer and the
# bucketed decode step landed, neither yet run on a GPU). In order of value, each line's log in $R:
#   1. the GPU tests of the continuous batcher / server paths (the bucketed step's graphs and compiles);
#   2. the serving sweep on the 20b (1,024 in / 1,024 out; single stream vs bench batch 1, 64 streams vs
#      batch 64: issue 15's targets), ~10 min;
#   3. the prefix cache's TTFT (4,000 shared tokens + 100 against 4,100 unshared, one stream);
#   4. the HTTP layer at 512 streams on this host's cores;
#   5. the offline target at batch 256 (continuous vs static rounds, 1,000 prompts), ~10-15 min.
# Start it in the background (setsid) and poll $R/progress.txt from the next call within 30 s.
#
#   bash docs/bench/2026-12-01-h200-e2e/next.sh /tmp/res
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
run tests $PY -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu.py -k "continuous or serve or compiled"
run serve20 $PY -m runtime.bench bench.mode=serve model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST \
    'bench.concurrency=[1,8,64,256]' bench.input_len=1024 bench.output_len=1024 $OUT bench.out_dir=$R/serve20
run prefix-shared $PY -m runtime.bench bench.mode=serve model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST \
    'bench.concurrency=[1]' bench.num_prompts=8 bench.prefix_len=4000 bench.input_len=100 bench.output_len=16 \
    $OUT bench.out_dir=$R/prefix-shared
run prefix-none $PY -m runtime.bench bench.mode=serve model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST \
    'bench.concurrency=[1]' bench.num_prompts=8 bench.prefix_len=0 bench.input_len=4100 bench.output_len=16 \
    $OUT bench.out_dir=$R/prefix-none
run offline20 $PY -m runtime.bench bench.mode=offline model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST \
    bench.num_prompts=512 bench.input_len=1050 bench.output_len=525 bench.range_ratio=0.9 'bench.batch_sizes=[256]' \
    $OUT bench.out_dir=$R/offline20
run http512 $PY docs/bench/2026-12-01-cpu-http/http512.py 64 256 512 --tokens 128
stamp "all done"
