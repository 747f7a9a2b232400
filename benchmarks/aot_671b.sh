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
# Each run prints per-chip memory against XLA's limit, the largest buffers live at the peak and the
# estimated step time / MFU (launch/README.md, "Estimated step time").
# v5p-512 (256 chips): FSDP 32 x EP 8, bf16 AdamW moments (V3) (configs/pretrain_v3_671b_v5p512.yaml).
run --config configs/pretrain_v3_671b_v5p512.yaml --topology v5p-512 "$@"
status=$?  # the script's status is v5p-512's: that one must fit
# Two v6e-256 slices over DCN (mesh.dcn=2, 512 chips of 32 GB): configs/pretrain_v3_671b_v6e256x2.yaml.
run --config configs/pretrain_v3_671b_v6e256x2.yaml --topology v6e-256 "$@"
exit $status
