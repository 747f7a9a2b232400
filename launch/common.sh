# shellcheck shell=bash
# Shared helpers for the launch/ scripts: flag declaration and parsing, --help,
# validation with errors that name the flag, and the run-or-print helper behind
# --dry-run. Sourced, never executed. Written for bash >= 3.2 (macOS laptops):
# no associative arrays, no namerefs, empty arrays expanded with ${a[@]+...}.

# Layout on every TPU worker (paths relative to the remote $HOME, expanded
# there, never here). Used by the scripts that source this file.
# shellcheck disable=SC2016,SC2034
REMOTE_SRC='$HOME/dsjax'
# shellcheck disable=SC2016,SC2034
REMOTE_VENV='$HOME/dsjax-venv'
# shellcheck disable=SC2016,SC2034
REMOTE_LOGS='$HOME/dsjax-logs'

_FLAG_NAMES=()   # --zone
_FLAG_VARS=()    # ZONE
_FLAG_KINDS=()   # value | bool | list
_FLAG_ENVS=()    # DSJAX_ZONE
_FLAG_HELPS=()   # one line
POSITIONAL=()    # arguments that are not flags (train.sh: key=value overrides)
USAGE_HEAD=""    # set by each script: synopsis + description
USAGE_TAIL=""    # optional: examples

die() {
  echo "error: $*" >&2
  exit 2
}

# _declare KIND --flag VAR ENV DEFAULT HELP: the variable starts as $ENV, or DEFAULT.
_declare() {
  local kind=$1 flag=$2 var=$3 env=$4 default=$5 help=$6
  _FLAG_NAMES+=("$flag")
  _FLAG_VARS+=("$var")
  _FLAG_KINDS+=("$kind")
  _FLAG_ENVS+=("$env")
  _FLAG_HELPS+=("$help")
  printf -v "$var" '%s' "${!env:-$default}"
}

# flag_value --flag VAR ENV DEFAULT HELP
flag_value() { _declare value "$@"; }

# flag_bool --flag VAR ENV DEFAULT(true|false) HELP; `--flag` sets true, `--flag=false` false.
flag_bool() { _declare bool "$@"; }

# flag_list --flag VAR ENV HELP: repeatable; VAR holds the values one per line
# (so does ENV). Read back with: while IFS= read -r x; do ...; done <<<"$VAR"
flag_list() { _declare list "$1" "$2" "$3" "" "$4"; }

usage() {
  local i default
  printf '%s\n\nFlags (default from the env var in brackets):\n' "$USAGE_HEAD"
  for i in "${!_FLAG_NAMES[@]}"; do
    default=${!_FLAG_VARS[i]}
    if [[ ${_FLAG_KINDS[i]} != bool ]]; then
      printf '  %-26s %s [%s]%s\n' "${_FLAG_NAMES[i]} VALUE" "${_FLAG_HELPS[i]}" \
        "${_FLAG_ENVS[i]}" "${default:+ (now: $default)}"
    else
      printf '  %-26s %s [%s]%s\n' "${_FLAG_NAMES[i]}" "${_FLAG_HELPS[i]}" \
        "${_FLAG_ENVS[i]}" "${default:+ (now: $default)}"
    fi
  done
  printf '  %-26s %s\n' "-h, --help" "show this help and exit"
  if [[ -n $USAGE_TAIL ]]; then printf '\n%s\n' "$USAGE_TAIL"; fi
}

# _flag_index --flag: prints the index of a declared flag, fails if unknown.
_flag_index() {
  local i
  for i in "${!_FLAG_NAMES[@]}"; do
    if [[ ${_FLAG_NAMES[i]} == "$1" ]]; then
      echo "$i"
      return 0
    fi
  done
  return 1
}

# parse_flags "$@": accepts --flag VALUE, --flag=VALUE, bare --bool, and `--`;
# everything else goes to POSITIONAL.
parse_flags() {
  local arg name value idx
  while (($#)); do
    arg=$1
    shift
    case $arg in
      -h | --help)
        usage
        exit 0
        ;;
      --)
        POSITIONAL+=("$@")
        return 0
        ;;
      --*)
        name=${arg%%=*}
        idx=$(_flag_index "$name") || die "unknown flag $name (see --help)"
        if [[ ${_FLAG_KINDS[idx]} == bool ]]; then
          value=true
          if [[ $arg == *=* ]]; then value=${arg#*=}; fi
          [[ $value == true || $value == false ]] || die "$name takes true or false, got '$value'"
        elif [[ $arg == *=* ]]; then
          value=${arg#*=}
        else
          # A value that looks like a flag is a forgotten value: `--zone --dry-run`
          # must not create a TPU in zone "--dry-run". Use --flag=--value for those.
          if (($# == 0)) || [[ $1 == --* ]]; then die "$name needs a value"; fi
          value=$1
          shift
        fi
        if [[ ${_FLAG_KINDS[idx]} == list && -n ${!_FLAG_VARS[idx]} ]]; then
          value="${!_FLAG_VARS[idx]}"$'\n'"$value"
        fi
        printf -v "${_FLAG_VARS[idx]}" '%s' "$value"
        ;;
      *) POSITIONAL+=("$arg") ;;
    esac
  done
}

# require --flag ...: each named flag must be non-empty.
require() {
  local flag idx
  for flag in "$@"; do
    idx=$(_flag_index "$flag") || die "internal: require of undeclared $flag"
    [[ -n ${!_FLAG_VARS[idx]} ]] || die "$flag is required (or set ${_FLAG_ENVS[idx]})"
  done
}

# check_match --flag REGEX WHAT: the flag's value must match REGEX.
check_match() {
  local flag=$1 regex=$2 what=$3 idx value
  idx=$(_flag_index "$flag") || die "internal: check of undeclared $flag"
  value=${!_FLAG_VARS[idx]}
  [[ $value =~ $regex ]] || die "$flag: '$value' is not $what"
}

is_true() { [[ $1 == true ]]; }

# shell_quote ARG: ARG as one shell word, readable: bare when safe,
# --flag='value' for flags, 'value' otherwise.
shell_quote() {
  local s=$1 q="'\\''"
  if [[ $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
    printf "%s'%s'" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]//\'/$q}"
  else
    printf "'%s'" "${s//\'/$q}"
  fi
}

# join_quoted ARG...: the arguments as one shell command line.
join_quoted() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(shell_quote "$a")"; done
  printf '%s' "$out"
}

# run CMD ARG...: with --dry-run print `+ CMD ARG...` on stdout; otherwise echo
# the same line on stderr (a log of what ran) and run it.
run() {
  if is_true "${DRY_RUN:-false}"; then
    printf '+ %s\n' "$(join_quoted "$@")"
  else
    printf '+ %s\n' "$(join_quoted "$@")" >&2
    "$@"
  fi
}

# run_shell LINE: like run, for a local pipeline that is one shell line.
run_shell() {
  if is_true "${DRY_RUN:-false}"; then
    printf '+ %s\n' "$1"
  else
    printf '+ %s\n' "$1" >&2
    bash -c "set -euo pipefail; $1"
  fi
}

# --- TPU addressing, shared by every script that talks to an existing TPU ----

add_dry_run_flag() {
  flag_bool --dry-run DRY_RUN DSJAX_DRY_RUN false "print the commands (prefixed '+ ') instead of running them"
}

add_target_flags() {
  flag_value --name NAME DSJAX_TPU_NAME "" "TPU VM name, or queued-resource id when queued (required)"
  flag_value --zone ZONE DSJAX_ZONE "" "GCE zone, e.g. us-east5-a (required)"
  flag_value --project PROJECT DSJAX_PROJECT "${CLOUDSDK_CORE_PROJECT:-}" "GCP project (required; also CLOUDSDK_CORE_PROJECT)"
  flag_value --num-slices NUM_SLICES DSJAX_NUM_SLICES 1 "slices; > 1 is multislice over DCN and implies --queued"
  flag_bool --queued QUEUED DSJAX_QUEUED false "the TPU is a queued resource (always true for multislice)"
}

# check_target: validate the flags from add_target_flags; sets QUEUED for multislice.
check_target() {
  require --name --zone --project
  check_match --name '^[a-z]([-a-z0-9]*[a-z0-9])?$' "a valid TPU name (lowercase letters, digits, '-')"
  check_match --num-slices '^[1-9][0-9]*$' "a positive integer"
  if ((NUM_SLICES > 1)); then QUEUED=true; fi
}

# gcloud_ssh WORKER NODE REMOTE_CMD: ssh into WORKER (a number or `all`) of NODE
# (queued resources only: a number or `all`) and run REMOTE_CMD.
gcloud_ssh() {
  local worker=$1 node=$2 cmd=$3
  if is_true "$QUEUED"; then
    run gcloud compute tpus queued-resources ssh "$NAME" --zone="$ZONE" --project="$PROJECT" \
      --worker="$worker" --node="$node" --command="$cmd"
  else
    run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --project="$PROJECT" \
      --worker="$worker" --command="$cmd"
  fi
}

# gcloud_scp_all LOCAL REMOTE: copy LOCAL to REMOTE on every worker (every node).
gcloud_scp_all() {
  local src=$1 dest=$2
  if is_true "$QUEUED"; then
    run gcloud compute tpus queued-resources scp "$src" "$NAME:$dest" --zone="$ZONE" --project="$PROJECT" \
      --worker=all --node=all
  else
    run gcloud compute tpus tpu-vm scp "$src" "$NAME:$dest" --zone="$ZONE" --project="$PROJECT" \
      --worker=all
  fi
}
