#!/usr/bin/env bash
# Seventh session, second step (same machine): max load on the 20b, 1,024 in / 1,024 out at concurrency 512,
# our bf16 experts kernel on the MXFP4 checkpoint dequantized at load (experts=triton) and the MXFP4 kernel.
#   bash docs/bench/2026-12-01-h200-seventh/b.sh /tmp/res
set -u
R=${1:-/tmp/res}
mkdir -p "$R"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
PY=python3
OUT="bench.plots=false bench.table=$R/table.csv"
stamp() { echo "[$(date +%T)] $*" | tee -a "$R/progress.txt"; }
run() { local name=$1; shift; stamp "start $name"; timeout 900 "$@" > "$R/$name.log" 2>&1; stamp "end $name rc=$?"; }
while pgrep -f moe20-max > /dev/null || pgrep -f "runtime.kernels.microbench" > /dev/null; do sleep 2; done
[ -d /dev/shm/ck20 ] || run synth20 $PY -m runtime.synth model=gpt-oss-20b synth.format=mxfp4 synth.out=/dev/shm/ck20
for ex in triton mxfp4; do
  run serve20-max-$ex $PY -m runtime.bench bench.mode=serve model=gpt-oss-20b model.path=/dev/shm/ck20 \
      attention=triton experts=$ex generation.compile=true 'bench.concurrency=[512]' bench.num_prompts=1024 \
      bench.input_len=1024 bench.output_len=1024 $OUT bench.out_dir=$R/serve20-max-$ex
  grep -E "output tok/s|tok/s|cache|warm" "$R/serve20-max-$ex.log" | tail -6 >> "$R/progress.txt"
done
stamp "b done"
