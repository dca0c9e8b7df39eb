#!/usr/bin/env bash
# Session B on nvidia-h200-x2 (2026-12-01): issue 12's two-GPU tests again (run_entry, the group-agreed
# one-shot setup), then the layouts not measured yet: gpt-oss-20b at ep=2 with the recipe's expert parallel
# in the same run, data parallel for both models, gpt-oss-20b at tp=2 batch 64/256. Most important first:
# what the session's device time cuts is at the end. From a copy of the repository; results in $R.
#
#   bash docs/bench/2026-12-01-h200x2/b.sh /tmp/res
set -u
R=${1:-/tmp/res}
mkdir -p "$R"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast, ever
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
PY=python3
TR="$PY -m torch.distributed.run --standalone --nproc_per_node=2"
FAST="attention=triton experts=mxfp4 generation.compile=true"
LEN="bench.input_len=1024 bench.output_len=128 bench.repetitions=2 bench.plots=false bench.table=$R/table.csv"
B="-m runtime.bench $FAST $LEN"
M120="model=gpt-oss-120b model.path=/dev/shm/ck120"
M20="model=gpt-oss-20b model.path=/dev/shm/ck20"
stamp() { echo "[$(date +%T)] $*" | tee -a "$R/progress.txt"; }
run() {  # run NAME CMD...: output in $R/NAME.log
    local name=$1; shift
    stamp "start $name: $*"
    timeout 900 "$@" > "$R/$name.log" 2>&1
    stamp "end $name rc=$?"
}
( $PY -m runtime.synth model=gpt-oss-20b synth.format=mxfp4 synth.out=/dev/shm/ck20 > "$R/synth20.log" 2>&1
  $PY -m runtime.synth model=gpt-oss-120b synth.format=mxfp4 synth.out=/dev/shm/ck120 > "$R/synth120.log" 2>&1
  touch "$R/synth.done" ) &
run tests-multi $PY -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu_multi.py -k "not collectives and not 20b"
while [ ! -f "$R/synth.done" ]; do sleep 2; done
run b20-ep2 $TR $B $M20 parallel.ep_size=2 "bench.batch_sizes=[1,8,64]" bench.baseline=true bench.out_dir=$R/b20-ep2
run b120-dp2 $TR $B $M120 parallel.dp_size=2 "bench.batch_sizes=[1,8,64]" bench.out_dir=$R/b120-dp2
run b20-dp2 $TR $B $M20 parallel.dp_size=2 "bench.batch_sizes=[1,8,64]" bench.out_dir=$R/b20-dp2
run b20-tp2 $TR $B $M20 parallel.tp_size=2 "bench.batch_sizes=[64,256]" bench.out_dir=$R/b20-tp2
stamp "all done"
