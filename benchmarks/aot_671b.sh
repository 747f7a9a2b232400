#!/usr/bin/env bash
# AOT-compile DeepSeek-V3 671B's training step for the recommended meshes (no TPU needed: libtpu's
# compiler runs on this host). Each compile takes minutes and ~4 GB of host RAM. Not part of CI.
# Usage: benchmarks/aot_671b.sh [extra key=value overrides for both runs]
set -u
cd "$(dirname "$0")/.." || exit
export JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 TF_CPP_MIN_LOG_LEVEL=3
noise='^(WARNING|E0000|=== Source|learning/|Failed to find host)|^$'
run() {
  echo "== dsjax compile $*"
  dsjax compile "$@" 2>&1 | grep -Ev "$noise"
  rc=${PIPESTATUS[0]}
  echo "== exit status $rc (0 fits, 3 does not fit)"
  return "$rc"
}
# v5p-512 (256 chips): FSDP 32 x EP 8, bf16 AdamW moments (V3), 1 x 2048 tokens per chip
# (configs/pretrain_v3_671b_v5p512.yaml; 4096 tokens per chip needs 101 GiB of the 88.5 GiB HBM).
run --config configs/pretrain_v3_671b_v5p512.yaml --topology v5p-512 "$@"
status=$?  # the script's status is v5p-512's: that one must fit
# v6e-256 (256 chips of 32 GB): the same run; see launch/README.md for why it does not fit.
run --config configs/pretrain_v3_671b_v5p512.yaml --topology v6e-256 "$@"
exit $status
