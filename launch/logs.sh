#!/usr/bin/env bash
# Show (or follow) the training log of one worker.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE_HEAD="usage: launch/logs.sh --name NAME --zone ZONE --project PROJECT [flags]

Print the last lines of \$HOME/dsjax-logs/RUN.log on one worker; with --follow,
keep streaming (Ctrl-C stops the tail, not the training). Worker 0 of node 0
is the process that reports metrics; other workers help when one crashed."
USAGE_TAIL="examples:
  launch/logs.sh --name ds-v5p --zone us-east5-a --project my-proj --follow
  launch/logs.sh --name ds-ms --zone us-east5-b --project my-proj --num-slices 4 --node 3 --worker 7 --lines 500"

add_target_flags
flag_value --run-name RUN_NAME DSJAX_RUN_NAME latest "which run's log (default: the newest one)"
flag_value --worker WORKER DSJAX_WORKER 0 "worker (host) index within the slice"
flag_value --node NODE DSJAX_NODE 0 "slice index (queued resources / multislice only)"
flag_value --lines LINES DSJAX_LINES 100 "how many lines to print first"
flag_bool --follow FOLLOW DSJAX_FOLLOW false "keep streaming new lines"
add_dry_run_flag
parse_flags "$@"

((${#POSITIONAL[@]} == 0)) || die "unexpected argument '${POSITIONAL[0]}' (see --help)"
check_target
check_match --run-name '^[A-Za-z0-9._-]+$' "a plain file name (letters, digits, '.', '_', '-')"
check_match --worker '^[0-9]+$' "a worker index (0, 1, ...)"
check_match --node '^[0-9]+$' "a node index (0, 1, ...)"
check_match --lines '^[0-9]+$' "a line count"
if ! is_true "$QUEUED" && [[ $NODE != 0 ]]; then die "--node needs a queued resource (--queued or --num-slices)"; fi
if is_true "$QUEUED" && ((NODE >= NUM_SLICES)) && ((NUM_SLICES > 1)); then
  die "--node $NODE is out of range for --num-slices $NUM_SLICES"
fi

follow=""
if is_true "$FOLLOW"; then follow=" -F"; fi
gcloud_ssh "$WORKER" "$NODE" "tail -n $LINES$follow $REMOTE_LOGS/$RUN_NAME.log"
