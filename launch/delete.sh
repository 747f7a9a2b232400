#!/usr/bin/env bash
# Delete the TPU VM, or the queued resource together with its nodes.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE_HEAD="usage: launch/delete.sh --name NAME --zone ZONE --project PROJECT [flags]

Delete what create.sh made: 'tpu-vm delete' for a TPU VM, 'queued-resources
delete --force' (the request and all its nodes) for a queued resource.
gcloud asks for confirmation unless --yes."
USAGE_TAIL="example:
  launch/delete.sh --name ds-ms --zone us-east5-b --project my-proj --num-slices 4 --yes"

add_target_flags
flag_bool --yes YES DSJAX_YES false "do not ask for confirmation (gcloud --quiet)"
add_dry_run_flag
parse_flags "$@"

((${#POSITIONAL[@]} == 0)) || die "unexpected argument '${POSITIONAL[0]}' (see --help)"
check_target

quiet=()
if is_true "$YES"; then quiet=(--quiet); fi
if is_true "$QUEUED"; then
  run gcloud compute tpus queued-resources delete "$NAME" --zone="$ZONE" --project="$PROJECT" --force \
    ${quiet[@]+"${quiet[@]}"}
else
  run gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" --project="$PROJECT" \
    ${quiet[@]+"${quiet[@]}"}
fi
