#!/usr/bin/env bash
# One H200 (2026-12-01, second session): issue 14's new decode GEMV for the MXFP4 experts (fp16x2 FMAs in
# inline PTX, inputs in pair order). The kernel A/B against the previous commit's (ab2.py beside this script, real
# shapes, CUDA-graph replays), the GPU tests of the MXFP4 path, then the "after" numbers: 120b batch 1 with
# the per-kernel profile, 120b batch 8/64, 20b batch 1/8/64 with the recipe. Results in $R.
#
#   bash docs/bench/2026-12-01-h200/c.sh /tmp/res
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
$PY -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)' > "$R/versions.txt"
( [ -d /dev/shm/ck120 ] || $PY -m runtime.synth model=gpt-oss-120b synth.format=mxfp4 synth.out=/dev/shm/ck120 > "$R/synth120.log" 2>&1
  touch "$R/synth120.done"
  [ -d /dev/shm/ck20 ] || $PY -m runtime.synth model=gpt-oss-20b synth.format=mxfp4 synth.out=/dev/shm/ck20 > "$R/synth20.log" 2>&1
  touch "$R/synth20.done" ) &
OLD=docs/bench/2026-12-01-h200/old_moe_mxfp4.py  # the kernel before the PTX GEMV, for the A/B
[ -s $OLD ] || git show fa4d775:runtime/kernels/moe_mxfp4.py > $OLD || echo "no git here: put fa4d775's moe_mxfp4.py at $OLD"
run ab $PY docs/bench/2026-12-01-h200/ab2.py
run tests $PY -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu.py -k "mxfp4"
stamp "phase1 done"
while [ ! -f "$R/synth120.done" ]; do sleep 2; done
run b120-b1-profile $PY -m runtime.bench model=gpt-oss-120b model.path=/dev/shm/ck120 $FAST $LEN 'bench.batch_sizes=[1]' bench.profile=true bench.out_dir=$R/b120-b1-profile
run b120 $PY -m runtime.bench model=gpt-oss-120b model.path=/dev/shm/ck120 $FAST $LEN 'bench.batch_sizes=[8,64]' bench.out_dir=$R/b120
while [ ! -f "$R/synth20.done" ]; do sleep 2; done
run b20 $PY -m runtime.bench model=gpt-oss-20b model.path=/dev/shm/ck20 $FAST $LEN 'bench.batch_sizes=[1,8,64]' bench.baseline=true bench.out_dir=$R/b20
stamp "all done"
