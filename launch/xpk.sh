#!/usr/bin/env bash
# Submit dsjax training as an xpk workload on a GKE cluster with TPU node pools.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE_HEAD="usage: launch/xpk.sh --cluster CLUSTER --zone ZONE --project PROJECT --config FILE --workdir gs://... [flags] [key=value ...]

Run 'dsjax train' as an xpk workload (a JobSet, one pod per TPU host). The
cluster comes from 'xpk cluster create' (not done here). xpk sets the multislice
(MEGASCALE_*) environment itself, so --num-slices is the only multislice knob.
Image: with --docker-image, a prebuilt image with dsjax installed; otherwise
xpk builds --base-docker-image plus this checkout (copied to /app) and each pod
runs pip install -e '.[tpu]' before training.
Trailing key=value arguments are config overrides, passed through verbatim."
USAGE_TAIL="example:
  launch/xpk.sh --cluster ds-v5p --zone us-east5-a --project my-proj --tpu-type v5p-512 --num-slices 2 \\
      --workload ds-v3-pretrain --config configs/deepseek_v3_671b.yaml --workdir gs://my-bucket/runs/v3 --dry-run"

flag_value --cluster CLUSTER DSJAX_XPK_CLUSTER "" "GKE cluster made by xpk cluster create (required)"
flag_value --workload WORKLOAD DSJAX_XPK_WORKLOAD "" "workload name (default: dsjax-YYYYmmdd-HHMMSS)"
flag_value --zone ZONE DSJAX_ZONE "" "GCE zone of the cluster (required)"
flag_value --project PROJECT DSJAX_PROJECT "${CLOUDSDK_CORE_PROJECT:-}" "GCP project (required; also CLOUDSDK_CORE_PROJECT)"
flag_value --tpu-type TPU_TYPE DSJAX_ACCELERATOR_TYPE v5p-8 "TPU type per slice, e.g. v5p-512, v6e-256"
flag_value --num-slices NUM_SLICES DSJAX_NUM_SLICES 1 "slices; > 1 is multislice over DCN"
flag_value --docker-image DOCKER_IMAGE DSJAX_DOCKER_IMAGE "" "prebuilt image with dsjax installed"
flag_value --base-docker-image BASE_IMAGE DSJAX_BASE_DOCKER_IMAGE python:3.11 "base image when building from this checkout"
flag_value --max-restarts MAX_RESTARTS DSJAX_MAX_RESTARTS 0 "JobSet restarts on failure (resume comes from the workdir checkpoints)"
flag_value --config CONFIG DSJAX_CONFIG "" "config YAML, relative to the repo root (required)"
flag_value --workdir WORKDIR DSJAX_WORKDIR "" "gs:// directory for checkpoints and metrics (required)"
add_dry_run_flag
parse_flags "$@"

require --cluster --zone --project --config --workdir
if [[ -z $WORKLOAD ]]; then WORKLOAD=dsjax-$(date +%Y%m%d-%H%M%S); fi
check_match --workload '^[a-z]([-a-z0-9]*[a-z0-9])?$' "a valid workload name (lowercase letters, digits, '-')"
check_match --tpu-type '^v[0-9]+[a-z]*-[0-9]+$' "a TPU type like v5p-512 or v6e-256"
check_match --num-slices '^[1-9][0-9]*$' "a positive integer"
check_match --max-restarts '^[0-9]+$' "a non-negative integer"
check_match --workdir '^gs://[^/]+' "a gs:// path (every pod must see the same checkpoints)"

train=(dsjax train --config "$CONFIG" --workdir "$WORKDIR")
for kv in ${POSITIONAL[@]+"${POSITIONAL[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_.]*=.* ]] || die "override '$kv' is not key=value"
  train+=("$kv")
done

if [[ -n $DOCKER_IMAGE ]]; then
  image=(--docker-image="$DOCKER_IMAGE")
  command=$(join_quoted "${train[@]}")
else
  repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  image=(--base-docker-image="$BASE_IMAGE" --script-dir="$repo_root")
  command="pip install --quiet -e \".[tpu]\" && $(join_quoted "${train[@]}")"
fi

run xpk workload create --cluster="$CLUSTER" --workload="$WORKLOAD" --zone="$ZONE" --project="$PROJECT" \
  --tpu-type="$TPU_TYPE" --num-slices="$NUM_SLICES" "${image[@]}" --max-restarts="$MAX_RESTARTS" \
  --command="$command"
