#!/usr/bin/env bash
# Start `dsjax train` on every worker, detached, one log file per worker.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE_HEAD="usage: launch/train.sh --name NAME --zone ZONE --project PROJECT --config FILE --workdir gs://... [flags] [key=value ...]

Run 'dsjax train --config FILE --workdir DIR key=value...' on every worker at
once (every node when multislice), under nohup so it outlives the ssh session.
Each worker writes \$HOME/dsjax-logs/RUN.log and RUN.pid on its own disk;
latest.log and latest.pid point at the newest run (see logs.sh, stop.sh).
Trailing key=value arguments are config overrides, passed through verbatim."
USAGE_TAIL="examples:
  launch/train.sh --name ds-v5p --zone us-east5-a --project my-proj \\
      --config configs/deepseek_v3_671b.yaml --workdir gs://my-bucket/runs/v3 steps=1000
  launch/train.sh ... --env LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true --dry-run"

add_target_flags
flag_value --config CONFIG DSJAX_CONFIG "" "config YAML, relative to the repo root (required)"
flag_value --workdir WORKDIR DSJAX_WORKDIR "" "gs:// directory for checkpoints and metrics, shared by all workers (required)"
flag_value --run-name RUN_NAME DSJAX_RUN_NAME "" "log name on the workers (default: run-YYYYmmdd-HHMMSS)"
flag_list --env ENV_VARS DSJAX_ENV "KEY=VALUE exported for dsjax, e.g. LIBTPU_INIT_ARGS=...; repeatable"
add_dry_run_flag
parse_flags "$@"

check_target
require --config --workdir
check_match --workdir '^gs://[^/]+' "a gs:// path (every worker must see the same checkpoints)"
if [[ -z $RUN_NAME ]]; then RUN_NAME=run-$(date +%Y%m%d-%H%M%S); fi
check_match --run-name '^[A-Za-z0-9._-]+$' "a plain file name (letters, digits, '.', '_', '-')"

train=("$REMOTE_VENV/bin/dsjax" train --config "$CONFIG" --workdir "$WORKDIR")
for kv in ${POSITIONAL[@]+"${POSITIONAL[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_.]*=.* ]] || die "override '$kv' is not key=value"
  train+=("$kv")
done
exports=""
while IFS= read -r kv; do
  [[ -n $kv ]] || continue
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*=.* ]] || die "--env: '$kv' is not KEY=VALUE"
  exports+="export $(shell_quote "$kv") && "
done <<<"$ENV_VARS"

# $REMOTE_VENV starts with $HOME: keep it unquoted so the worker's shell expands it.
train_line="$REMOTE_VENV/bin/dsjax $(join_quoted "${train[@]:1}")"
log="$REMOTE_LOGS/$RUN_NAME"
remote="mkdir -p $REMOTE_LOGS && cd $REMOTE_SRC && ${exports}"
remote+="nohup $train_line > $log.log 2>&1 < /dev/null & echo \$! > $log.pid"
remote+=" && ln -sfn $RUN_NAME.log $REMOTE_LOGS/latest.log && ln -sfn $RUN_NAME.pid $REMOTE_LOGS/latest.pid"
gcloud_ssh all all "$remote"
if ! is_true "$DRY_RUN"; then
  echo "started $RUN_NAME; follow it with: launch/logs.sh --name $NAME --zone $ZONE --project $PROJECT --follow" >&2
fi
