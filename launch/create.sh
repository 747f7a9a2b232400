#!/usr/bin/env bash
# Create the TPU: a TPU VM (one slice, immediate) or a queued resource (one
# slice with --queued, or N slices over DCN with --num-slices N).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE_HEAD="usage: launch/create.sh --name NAME --zone ZONE --project PROJECT [flags]

Create a Cloud TPU for dsjax training.
  1 slice, default      gcloud compute tpus tpu-vm create (fails fast without capacity)
  1 slice, --queued     gcloud compute tpus queued-resources create --node-id=NAME
  N slices (multislice) gcloud compute tpus queued-resources create --node-count=N --node-prefix=NAME
The runtime version follows the accelerator unless --runtime-version is given:
  v4-* tpu-ubuntu2204-base, v5litepod-* v2-alpha-tpuv5-lite, v5p-* v2-alpha-tpuv5, v6e-* v2-alpha-tpuv6e."
USAGE_TAIL="examples:
  launch/create.sh --name ds-v5p --zone us-east5-a --project my-proj --accelerator-type v5p-512 --spot
  launch/create.sh --name ds-ms --zone us-east5-b --project my-proj --accelerator-type v6e-256 --num-slices 4 --reserved --dry-run"

add_target_flags
flag_value --accelerator-type ACCELERATOR DSJAX_ACCELERATOR_TYPE v5p-8 "TPU type per slice, e.g. v5p-512, v6e-256"
flag_value --runtime-version RUNTIME DSJAX_RUNTIME_VERSION "" "TPU software version (default: from the accelerator)"
flag_bool --spot SPOT DSJAX_SPOT false "Spot capacity (preemptible, cheaper)"
flag_bool --reserved RESERVED DSJAX_RESERVED false "consume the project's reservation"
add_dry_run_flag
parse_flags "$@"

((${#POSITIONAL[@]} == 0)) || die "unexpected argument '${POSITIONAL[0]}' (see --help)"
check_target
check_match --accelerator-type '^v[0-9]+[a-z]*-[0-9]+$' "a TPU type like v5p-512 or v6e-256"
if is_true "$SPOT" && is_true "$RESERVED"; then die "--spot and --reserved are mutually exclusive"; fi

if [[ -z $RUNTIME ]]; then
  case $ACCELERATOR in
    v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    *) die "--runtime-version is required for accelerator $ACCELERATOR" ;;
  esac
fi

capacity=()
if is_true "$SPOT"; then capacity=(--spot); fi
if is_true "$RESERVED"; then capacity=(--reserved); fi

common=(--zone="$ZONE" --project="$PROJECT" --accelerator-type="$ACCELERATOR")
if ! is_true "$QUEUED"; then
  run gcloud compute tpus tpu-vm create "$NAME" "${common[@]}" --version="$RUNTIME" \
    ${capacity[@]+"${capacity[@]}"}
  exit 0
fi

if ((NUM_SLICES > 1)); then
  nodes=(--node-count="$NUM_SLICES" --node-prefix="$NAME")
else
  nodes=(--node-id="$NAME")
fi
run gcloud compute tpus queued-resources create "$NAME" "${common[@]}" --runtime-version="$RUNTIME" \
  "${nodes[@]}" ${capacity[@]+"${capacity[@]}"}
if ! is_true "$DRY_RUN"; then
  echo "queued; it is usable once ACTIVE: gcloud compute tpus queued-resources describe $NAME --zone=$ZONE --project=$PROJECT" >&2
fi
