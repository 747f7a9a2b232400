#!/usr/bin/env bash
# One try on a lent GPU (H100/H200): every kernel check and benchmark of the open GPU work, each under
# its own time limit so that the whole sweep ends within ~8 minutes and a hang or crash in one part
# still leaves the others' results. Writes everything to ${OUT:-/tmp}/device_sweep.txt.
#
#   benchmarks/device_sweep.sh
#
# Parts (seconds allowed): the compiled Pallas kernels against their references, FP8 grouped kernels
# included (device_check.py, 150); MLA attention prefill at V3 head dims, b=2 s=4096 h=16, forward and
# forward+backward, with tokamax beside it (mla_kernels.py, 90); absorbed decode with a 32k latent
# cache at batch 16 and 64 (45 each); the grouped matmul at V3 expert shapes with routed (uneven)
# groups, against a dense matmul of the same FLOPs and tokamax.ragged_dot (moe_kernels.py, 90); FP8 vs
# BF16 per op (fp8_ops.py, 60); the small_moe training step with the Pallas paths, BF16 and FP8
# (train_step.py, 120).
#
# tokamax is not in the device machine's image (Python 3.12; it has flax, absl-py, jaxtyping, tqdm):
# bring it and its missing dependencies as wheels in .whl/ at the repository root (git-ignored: add
# `/.whl/` to .git/info/exclude and name .whl in the device tool's carry); this script installs them
# into /tmp/site when present. 10 wheels, 3.6 MB, prepared on a machine with pip access with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl tokamax==0.0.12 einshape==1.0 pydantic==2.11.7 pydantic-core==2.33.2 annotated-types==0.7.0 \
#     typing-inspection==0.4.1 qwix==0.1.8 typeguard==2.13.3 immutabledict==4.2.1 tensorboardx==2.6.4
set -u
cd "$(dirname "$0")/.." || exit 2
out=${OUT:-/tmp}/device_sweep.txt
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
part() {  # part SECONDS TITLE COMMAND...
  local limit=$1 title=$2
  shift 2
  echo "=== $title ($(date -u +%T), limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -Ev '^(WARNING|I0000|E0000|W0000)'
  echo "=== exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
  part 150 "kernels vs references" python3 benchmarks/device_check.py
  part 90 "MLA prefill" python3 benchmarks/mla_kernels.py --batch 2 --seq 4096 --heads 16 --cache-len 1024 --decode-batch 1
  part 45 "MLA decode b=16 32k" python3 benchmarks/mla_kernels.py --batch 1 --seq 256 --heads 1 --cache-len 32768 --decode-batch 16
  part 45 "MLA decode b=64 32k" python3 benchmarks/mla_kernels.py --batch 1 --seq 256 --heads 1 --cache-len 32768 --decode-batch 64
  part 90 "grouped matmul, V3 shapes" python3 benchmarks/moe_kernels.py --preset v3 --reps 5
  part 60 "FP8 vs BF16 per op" python3 benchmarks/fp8_ops.py
  part 120 "small_moe step, Pallas paths, BF16 and FP8" python3 benchmarks/train_step.py --config small_moe \
    --batch 8 --seq 1024 --steps 3 --no-hf --dtype bfloat16 --attention-impl pallas --moe-impls pallas,blocked --fp8 both
} 2>&1 | tee "$out"
