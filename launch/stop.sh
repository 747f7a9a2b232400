#!/usr/bin/env bash
# Stop a training run on every worker, by the pid train.sh recorded.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE_HEAD="usage: launch/stop.sh --name NAME --zone ZONE --project PROJECT [flags]

Send SIGTERM to the process in \$HOME/dsjax-logs/RUN.pid on every worker. A
TPU can be held by one process only, so stop a run before starting the next
one on the same TPU. Workers where it already exited are skipped."
USAGE_TAIL="example:
  launch/stop.sh --name ds-v5p --zone us-east5-a --project my-proj --dry-run"

add_target_flags
flag_value --run-name RUN_NAME DSJAX_RUN_NAME latest "which run to stop (default: the newest one)"
add_dry_run_flag
parse_flags "$@"

((${#POSITIONAL[@]} == 0)) || die "unexpected argument '${POSITIONAL[0]}' (see --help)"
check_target
check_match --run-name '^[A-Za-z0-9._-]+$' "a plain file name (letters, digits, '.', '_', '-')"

pid_file="$REMOTE_LOGS/$RUN_NAME.pid"
gcloud_ssh all all "if [ -f $pid_file ] && kill -0 \$(cat $pid_file) 2>/dev/null; then kill \$(cat $pid_file); fi"
