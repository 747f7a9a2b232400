#!/usr/bin/env bash
# Install dsjax on every worker of the TPU (every node when multislice).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE_HEAD="usage: launch/setup.sh --name NAME --zone ZONE --project PROJECT [flags]

Put the dsjax source in \$HOME/dsjax on every worker and install it, with the
[tpu] extra, into the venv \$HOME/dsjax-venv. The TPU VM images ship an older
Python than dsjax needs, so uv provides the interpreter (--python).
Source: with --repo-url, git clone/fetch of --ref on each worker; without it,
this checkout's tracked and unignored files (git ls-files), packed and copied."
USAGE_TAIL="examples:
  launch/setup.sh --name ds-v5p --zone us-east5-a --project my-proj
  launch/setup.sh --name ds-ms --zone us-east5-b --project my-proj --num-slices 4 \\
      --repo-url https://github.com/ORG/dsjax.git --ref v0.1.0 --dry-run"

add_target_flags
flag_value --repo-url REPO_URL DSJAX_REPO_URL "" "git URL to clone on the workers (default: copy this checkout)"
flag_value --ref REF DSJAX_REF main "branch, tag or commit to check out (with --repo-url)"
flag_value --python PYTHON DSJAX_PYTHON 3.11 "Python version for the venv on the workers"
flag_value --tarball TARBALL DSJAX_TARBALL /tmp/dsjax-src.tgz "local and remote path of the packed source (without --repo-url)"
add_dry_run_flag
parse_flags "$@"

((${#POSITIONAL[@]} == 0)) || die "unexpected argument '${POSITIONAL[0]}' (see --help)"
check_target
check_match --python '^3\.[0-9]+$' "a Python version like 3.11"

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
q_src=$REMOTE_SRC

if [[ -n $REPO_URL ]]; then
  # fetch + detached FETCH_HEAD: the same path for a fresh clone, a re-run, a branch, a tag or a sha.
  fetch="{ test -d $q_src/.git || git clone --quiet $(shell_quote "$REPO_URL") $q_src; }"
  fetch+=" && git -C $q_src fetch --quiet origin $(shell_quote "$REF")"
  fetch+=" && git -C $q_src checkout --quiet --detach FETCH_HEAD"
else
  tarball=$(shell_quote "$TARBALL")
  run_shell "git -C $(shell_quote "$repo_root") ls-files -z --cached --others --exclude-standard | tar -C $(shell_quote "$repo_root") -czf $tarball --null -T -"
  gcloud_scp_all "$TARBALL" "$TARBALL"
  fetch="mkdir -p $q_src && tar -xzf $tarball -C $q_src"
fi

# shellcheck disable=SC2016 # expanded on the worker
uv='$HOME/.local/bin/uv'
install="$fetch"
install+=" && { test -x $uv || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
install+=" && $uv venv --quiet --allow-existing --python $PYTHON $REMOTE_VENV"
install+=" && cd $q_src && $uv pip install --quiet --python $REMOTE_VENV/bin/python -e \".[tpu]\""
gcloud_ssh all all "$install"
