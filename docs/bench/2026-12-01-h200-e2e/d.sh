#!/usr/bin/env bash
# One H200 (2026-12-01, third session): the end-to-end "after" of issue 14's PTX decode GEMV (20b batch
# 1/8/64 with the recipe, 120b batch 1 with the per-kernel profile, 120b batch 8/64), then issue 15's
# offline benchmark (continuous against static, same run), a first serving sweep and the HTTP layer at 512
# streams on this host's cores. Results in $R.
#
#   bash docs/bench/2026-12-01-h200-e2e/d.sh /tmp/res
set -u
R=${1:-/tmp/res}
mkdir -p "$R"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
PY=python3
FAST="attention=triton experts=mxfp4 generation.compile=true"
LEN="bench.input_len=1024 bench.output_len=128 bench.repetitions=2 bench.plots=false bench.table=$R/table.csv"
stamp() { echo "[$(date +%T)] $*" | tee -a "$R/progress.txt"; }
run() { local name=$1; shift; stamp "start $name"; timeout 900 "$@" > "$R/$name.log" 2>&1; stamp "end $name rc=$?"; }
nvidia-smi > "$R/nvidia-smi.txt" 2>&1
nproc > "$R/nproc.txt"
$PY -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)' > "$R/versions.txt"
[ -d /dev/shm/ck20 ] || run synth20 $PY -m runtime.synth model=gpt-oss-20b synth.format=mxfp4 synth.out=/dev/shm/ck20
( [ -d /dev/shm/ck120 ] || $PY -m runtime.synth model=gpt-oss-120b synth.format=mxfp4 synth.out=/dev/shm/ck120 > "$R/synth120.log" 2>&1
  touch "$R/synth120.done" ) &
run b20 $PY -m runtime.bench model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST $LEN 'bench.batch_sizes=[1,8,64]' bench.baseline=true bench.out_dir=$R/b20
while [ ! -f "$R/synth120.done" ]; do sleep 2; done
run b120-b1-profile $PY -m runtime.bench model=gpt-oss-120b model.path=/dev/shm/ck120 $FAST $LEN 'bench.batch_sizes=[1]' bench.profile=true bench.out_dir=$R/b120-b1-profile
run b120 $PY -m runtime.bench model=gpt-oss-120b model.path=/dev/shm/ck120 $FAST $LEN 'bench.batch_sizes=[8,64]' bench.out_dir=$R/b120
stamp "phase1 done"
run offline20 $PY -m runtime.bench bench.mode=offline model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST bench.num_prompts=1000 bench.input_len=1050 bench.output_len=525 bench.range_ratio=0.9 'bench.batch_sizes=[64,256]' bench.plots=false bench.table=$R/table.csv bench.out_dir=$R/offline20
stamp "phase2 done"
run http512 $PY docs/bench/2026-12-01-cpu-http/http512.py 64 256 512 --tokens 128
run serve20 $PY -m runtime.bench bench.mode=serve model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST 'bench.concurrency=[1,8,64]' bench.input_len=1024 bench.output_len=256 bench.plots=false bench.table=$R/table.csv bench.out_dir=$R/serve20
stamp "all done"
