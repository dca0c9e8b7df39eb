#!/usr/bin/env bash
# Tenth session, one H200 (issue 14), in order of value; each step's log in $R:
#   A. in parallel: the GPU tests of what the ninth session built (the projections' GEMV, decode attention's merge
#      in the kernel, the repaired register-operand MXFP4 blocks, async scheduling) in four pytest processes, and
#      the 120b's synthetic checkpoint into /dev/shm;
#   B. with the GPU quiet: the GEMV against cuBLAS at the projections' shapes, the flash merge and its split size,
#      the register-operand blocks (if their test passed);
#   C. the 120b's batch 1 / 8 / 64 with the GEMV on (if its tokens test passed) and off, in one script; then the
#      GEMV and the merge in the kernel together at batch 1 / 8, profiled (if the merge's test passed).
#
#   bash docs/bench/2026-12-02-h200-tenth/run.sh /tmp/res     (in the background; poll $R/progress.txt)
set -u
R=${1:-/tmp/res}
mkdir -p "$R"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
PY=python3
FAST="attention=triton generation.compile=true experts=mxfp4"
B120="model=gpt-oss-120b model.path=/dev/shm/ck120 bench.input_len=1024 bench.output_len=128 bench.repetitions=2 bench.plots=false bench.table=$R/table.csv"
stamp() { echo "[$(date +%T)] $*" | tee -a "$R/progress.txt"; }
run() { local name=$1 limit=$2; shift 2; stamp "start $name"; timeout "$limit" "$@" > "$R/$name.log" 2>&1; stamp "end $name rc=$?"; }
passed() { grep -q "^PASSED.*$1" "$R"/tests-*.log; }
$PY -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)' > "$R/versions.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$R/versions.txt"
T="$PY -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu.py"
run tests-gemv 600 $T -k gemv &
run tests-flash 600 $T -k flash_merge &
run tests-rega 600 $T -k reg_a_blocks &
run tests-async 600 $T -k async_scheduling &
[ -d /dev/shm/ck120 ] || run synth120 600 $PY -m runtime.synth model=gpt-oss-120b synth.format=mxfp4 synth.out=/dev/shm/ck120 &
wait
grep -hE '^(PASSED|FAILED|ERROR)|passed|failed' "$R"/tests-*.log | grep -vE '^PASSED' >> "$R/progress.txt"
grep -hcE '^PASSED' "$R"/tests-*.log >> "$R/progress.txt"
run gemv 240 $PY -m runtime.kernels.microbench --gemv --tokens 1 2 8 16
grep -E "^ +[0-9]+ " "$R/gemv.log" >> "$R/progress.txt"
if passed test_gemv_projections_give_cublas_tokens; then
  run bench120-gemv 600 $PY -m runtime.bench $B120 $FAST generation.gemv_max_tokens=16 'bench.batch_sizes=[1,8,64]' \
      bench.out_dir=$R/bench120-gemv
  grep -E "batch +[0-9]+:" "$R/bench120-gemv.log" | tail -3 >> "$R/progress.txt"
fi
run bench120 600 $PY -m runtime.bench $B120 $FAST 'bench.batch_sizes=[1,8,64]' bench.out_dir=$R/bench120
grep -E "batch +[0-9]+:" "$R/bench120.log" | tail -3 >> "$R/progress.txt"
run flash 240 $PY -m runtime.kernels.microbench --flash --tokens 1 8 16 --split-keys 64 128 256
grep -E "^ +[0-9]+ |SPLIT" "$R/flash.log" >> "$R/progress.txt"
if passed "test_flash_merge_in_kernel_equals_torch_merge.1-1100"; then
  G=0; passed test_gemv_projections_give_cublas_tokens && G=16
  run bench120-merge 600 $PY -c "import runpy, sys; import runtime.kernels.flash as f; f.MERGE_IN_KERNEL = True; \
sys.argv = ['runtime.bench'] + sys.argv[1:]; runpy.run_module('runtime.bench', run_name='__main__')" \
      $B120 $FAST generation.gemv_max_tokens=$G 'bench.batch_sizes=[1,8]' bench.profile=true bench.out_dir=$R/bench120-merge
  grep -E "batch +[0-9]+:" "$R/bench120-merge.log" | tail -2 >> "$R/progress.txt"
fi
if passed "test_mxfp4_moe_reg_a_blocks.32-2048"; then
  run moe120-rega 300 $PY -m runtime.kernels.microbench --format mxfp4 --experts 128 --tokens 1 8 64 1024 --reg-a
  run moe20-rega 300 $PY -m runtime.kernels.microbench --format mxfp4 --tokens 64 256 512 2048 --reg-a
  cat "$R"/moe*-rega.log | grep -E "mxfp4|bf16" >> "$R/progress.txt"
fi
stamp "all done"
#
# Run by hand after the script (the reg-a test's 2,048-token case had failed on a forced tile over the shared-memory
# limit, so the script skipped the register-operand microbenches; the 20b with the three constants that became the
# defaults):
#   python3 -m runtime.kernels.microbench --format mxfp4 --tokens 64 256 512 --reg-a > $R/moe20-rega.log
#   python3 -m runtime.kernels.microbench --format mxfp4 --experts 128 --tokens 64 256 512 --reg-a > $R/moe120-rega.log
#   python3 -m runtime.synth model=gpt-oss-20b synth.format=mxfp4 synth.out=/dev/shm/ck20
#   python3 -c "import runpy, sys; import runtime.kernels.flash as f; import runtime.kernels.moe_mxfp4 as m; \
#     f.MERGE_IN_KERNEL = True; f.SPLIT_KEYS = 128; m.REG_A_BLOCKS = True; sys.argv = ['runtime.bench'] + sys.argv[1:]; \
#     runpy.run_module('runtime.bench', run_name='__main__')" model=gpt-oss-20b model.path=/dev/shm/ck20 \
#     attention=triton generation.compile=true experts=mxfp4 bench.input_len=1024 bench.output_len=128 \
#     bench.repetitions=2 'bench.batch_sizes=[1,64]' bench.plots=false bench.table=$R/table.csv \
#     bench.out_dir=$R/bench20-rega-merge > $R/bench20-rega-merge.log
