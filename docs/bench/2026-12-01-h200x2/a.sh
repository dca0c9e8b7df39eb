#!/usr/bin/env bash
# Session A on nvidia-h200-x2 (2026-12-01): issue 12's two GPU tests that had not run (collectives after the
# unaligned-message fix, the synthetic 20b's per-layer logits at tp=2/ep=2), and issue 14's "before": a
# kernel-by-kernel profile of a batch-1 decode on one GPU (120b on GPU 0, 20b on GPU 1 at once) and the
# MXFP4 MoE kernel alone (runtime.kernels.microbench). Run from a copy of the repository; results in $R.
#
#   bash docs/bench/2026-12-01-h200x2/a.sh /tmp/res
set -u
R=${1:-/tmp/res}
mkdir -p "$R"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast, ever
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
PY=python3
FAST="attention=triton experts=mxfp4 generation.compile=true"
LEN="bench.input_len=1024 bench.output_len=128 bench.repetitions=2 bench.plots=false bench.table=$R/table.csv"
stamp() { echo "[$(date +%T)] $*" | tee -a "$R/progress.txt"; }
run() {  # run NAME CMD...: output in $R/NAME.log
    local name=$1; shift
    stamp "start $name: $*"
    timeout 900 "$@" > "$R/$name.log" 2>&1
    stamp "end $name rc=$?"
}
nvidia-smi > "$R/nvidia-smi.txt" 2>&1
$PY -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)' > "$R/versions.txt"
( [ -d /dev/shm/ck20 ] || $PY -m runtime.synth model=gpt-oss-20b synth.format=mxfp4 synth.out=/dev/shm/ck20 > "$R/synth20.log" 2>&1
  touch "$R/synth20.done"
  [ -d /dev/shm/ck120 ] || $PY -m runtime.synth model=gpt-oss-120b synth.format=mxfp4 synth.out=/dev/shm/ck120 > "$R/synth120.log" 2>&1
  touch "$R/synth.done" ) &
run tests-collectives $PY -m pytest -m gpu -q -p no:cacheprovider -s -rA tests/test_gpu_multi.py -k collectives
while [ ! -f "$R/synth20.done" ]; do sleep 2; done
GPTOSS_SYNTH_20B=/dev/shm/ck20 run tests-20b-layers $PY -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu_multi.py -k 20b
while [ ! -f "$R/synth.done" ]; do sleep 2; done
CUDA_VISIBLE_DEVICES=0 run b120-1gpu-profile $PY -m runtime.bench $FAST $LEN model=gpt-oss-120b model.path=/dev/shm/ck120 \
    "bench.batch_sizes=[1]" bench.profile=true bench.out_dir=$R/b120-1gpu-profile &
( CUDA_VISIBLE_DEVICES=1 run b20-1gpu-profile $PY -m runtime.bench $FAST $LEN model=gpt-oss-20b model.path=/dev/shm/ck20 \
    "bench.batch_sizes=[1]" bench.profile=true bench.out_dir=$R/b20-1gpu-profile
  CUDA_VISIBLE_DEVICES=1 run moe-120b $PY -m runtime.kernels.microbench --format mxfp4 --experts 128 --tokens 1 8 64
  CUDA_VISIBLE_DEVICES=1 run moe-20b $PY -m runtime.kernels.microbench --format mxfp4 --experts 32 --tokens 1 8 64 ) &
wait
stamp "all done"
