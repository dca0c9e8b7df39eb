# Sourced by the GPU session scripts after they set R (their results folder): R made, NVLink multicast off,
# versions recorded, and the two helpers every step goes through.
#   R=${1:-/tmp/res}; . "$(dirname "$0")/../lib.sh"
set -u
mkdir -p "$R"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast, ever
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
PY=python3
stamp() { echo "[$(date +%T)] $*" | tee -a "$R/progress.txt"; }
run() {  # run NAME LIMIT_S CMD...: output in $R/NAME.log; `timeout` puts each in its own process group
    local name=$1 limit=$2; shift 2
    stamp "start $name"
    timeout "$limit" "$@" > "$R/$name.log" 2>&1
    stamp "end $name rc=$?"
}
$PY -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)' \
    > "$R/versions.txt"
