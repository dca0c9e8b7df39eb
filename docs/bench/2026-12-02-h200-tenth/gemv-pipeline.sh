#!/usr/bin/env bash
# Tried in the tenth session and not kept: the MXFP4 decode GEMV with its weight and input loads pipelined
# (tl.range num_stages=3, which Triton 3.6 lowers to cp.async into shared memory) and its scales loaded a tile ahead
# (gemv-pipeline.patch), against the tree as it is, one layer of the 120b (128 experts) at 1 / 8 / 64 tokens and
# of the 20b (32) at 1 / 8; each printed relative error is the result's against the torch reference. On the H200
# the pipelined GEMV was slower (res2/): 0.224 vs 0.165 ms at 8 tokens on the 120b.
#   bash docs/bench/2026-12-02-h200-tenth/gemv-pipeline.sh /tmp/res2
set -u  # run from the repository root
R=${1:-/tmp/res2}
mkdir -p "$R"
rm -rf /tmp/new && cp -r . /tmp/new && (cd /tmp/new && git apply docs/bench/2026-12-02-h200-tenth/gemv-pipeline.patch)
for tree in /tmp/new .; do
  name=$([ "$tree" = . ] && echo old || echo new)
  (cd $tree && timeout 100 python3 -m runtime.kernels.microbench --format mxfp4 --experts 128 --tokens 1 8 64 \
      > "$R/moe120-$name.log" 2>&1; timeout 60 python3 -m runtime.kernels.microbench --format mxfp4 --tokens 1 8 \
      > "$R/moe20-$name.log" 2>&1)
  grep -hE "^ +[0-9]+ +mxfp4" "$R/moe120-$name.log" "$R/moe20-$name.log" | sed "s/^/$name /"
done
