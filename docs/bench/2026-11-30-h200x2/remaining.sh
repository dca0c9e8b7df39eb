#!/usr/bin/env bash
# What issue 12's 2026-11-30 two-GPU session did not get to (its device time ran out), for the next
# nvidia-h200-x2 session: the collectives test again (its unaligned-message fix), the rest of the layout
# matrix, the one-shot all-reduce's share, the transformers plan, and a batch-1 profile at tp=2.
# Same conventions as run.sh beside it (a copy of the repository in /tmp/repo, results in $R).
#
#   bash docs/bench/2026-11-30-h200x2/remaining.sh /tmp/res
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
run() {  # run NAME CMD...: output in $R/NAME.log (run.sh has the hang detector; these jobs exit since the fix)
    local name=$1; shift
    stamp "start $name: $*"
    timeout 1200 "$@" > "$R/$name.log" 2>&1
    stamp "end $name rc=$?"
}

[ -d /dev/shm/ck120 ] || $PY -m runtime.synth model=gpt-oss-120b synth.format=mxfp4 synth.out=/dev/shm/ck120
[ -d /dev/shm/ck20 ] || $PY -m runtime.synth model=gpt-oss-20b synth.format=mxfp4 synth.out=/dev/shm/ck20
run tests-collectives $PY -m pytest -m gpu -q -p no:cacheprovider -s tests/test_gpu_multi.py -k collectives
GPTOSS_SYNTH_20B=/dev/shm/ck20 run tests-20b-layers $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_multi.py -k 20b
run b120-tp2-profile $TR $B $M120 parallel.tp_size=2 "bench.batch_sizes=[1]" bench.profile=true bench.out_dir=$R/b120-tp2-profile
run b120-tp2-nccl $TR $B $M120 parallel.tp_size=2 parallel.all_reduce=nccl "bench.batch_sizes=[1,8]" bench.out_dir=$R/b120-tp2-nccl
run b20-tp2 $TR $B $M20 parallel.tp_size=2 "bench.batch_sizes=[1,8,64,256]" bench.out_dir=$R/b20-tp2
run b20-ep2 $TR $B $M20 parallel.ep_size=2 "bench.batch_sizes=[1,8,64]" bench.baseline=true bench.out_dir=$R/b20-ep2
run b120-dp2 $TR $B $M120 parallel.dp_size=2 "bench.batch_sizes=[1,8,64]" bench.out_dir=$R/b120-dp2
run b20-dp2 $TR $B $M20 parallel.dp_size=2 "bench.batch_sizes=[1,8,64]" bench.out_dir=$R/b20-dp2
run b20-ep2-transformers $TR -m runtime.bench $M20 parallel.ep_size=2 parallel.plan=transformers $LEN \
    "bench.batch_sizes=[1,8]" bench.out_dir=$R/b20-ep2-transformers
stamp "all done"
