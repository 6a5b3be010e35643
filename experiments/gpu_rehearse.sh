#!/usr/bin/env bash
# The prepared GPU run (experiments/gpu_run.sh) rehearsed here as the GPU machine will run it, short of the GPU:
# Python 3.12 with the image's torch 2.11 and scientific stack (experiments/gpu_image.txt, in a venv of its own,
# IMAGE, default .gpu-image/, made once: ~5 GB, ~2 min), Hydra, MLflow, pytest and py-spy only from the carried
# wheels (.whl/, installed by the script itself with pip --target into a fresh SITE), the carried mirror
# (data/cifar10-jpeg.tar.gz, decoded whole), the tiny sizes on the CPU. tests/test_gpu_run.py rehearses the script
# in .venv (Python 3.11, torch 2.14.1, everything installed); what only this catches: a wheel .whl lacks, an API
# torch 2.11 lacks, a difference of Python 3.12.
#
#   experiments/gpu_rehearse.sh [OUT]     (make gpu-prep gpu-rehearse; OUT default gpu_rehearsal; PY312: the
#                                          interpreter, default python3.12 on the PATH or pyenv's newest 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-.gpu-image}
OUT=${1:-gpu_rehearsal}
if [ -z "${PY312:-}" ]; then  # the first that runs (a pyenv shim on the PATH may not)
  for c in $(command -v python3.12) "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { PY312=$c; break; }
  done
fi
[ -n "${PY312:-}" ] || { echo "gpu-rehearse: no Python 3.12 found: set PY312"; exit 1; }
[ -d .whl ] && [ -f data/cifar10-jpeg.tar.gz ] || { echo "gpu-rehearse: no .whl/ or data/: run make gpu-prep first"; exit 1; }

if [ ! -e "$IMAGE/.made" ] || [ experiments/gpu_image.txt -nt "$IMAGE/.made" ]; then
  rm -rf "$IMAGE"
  "$PY312" -m venv "$IMAGE"
  sed -n '/^# torch$/,/^# --no-deps$/p' experiments/gpu_image.txt | grep -v '^#' >"$IMAGE/with-deps.txt"
  sed -n '/^# --no-deps$/,$p' experiments/gpu_image.txt | grep -v '^#' >"$IMAGE/no-deps.txt"
  "$IMAGE/bin/python" -m pip install -q -r "$IMAGE/with-deps.txt"
  "$IMAGE/bin/python" -m pip install -q --no-deps -r "$IMAGE/no-deps.txt"
  touch "$IMAGE/.made"
fi
"$IMAGE/bin/python" -c "import hydra" 2>/dev/null && { echo "gpu-rehearse: $IMAGE holds Hydra: it must come from .whl"; exit 1; }

tmp=$(mktemp -d /tmp/gpu_rehearse.XXXX)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$OUT"
# as on the GPU machine: nothing of this checkout's .venv on the paths, python3 is the image's
rc=0
env -u PYTHONPATH -u VIRTUAL_ENV PATH="$PWD/$IMAGE/bin:/usr/bin:/bin" PYTHON=python3 \
  SITE="$tmp/site" WORK="$tmp/work" DATA= OMP_NUM_THREADS=1 GPU_RUN_BUDGET=${GPU_RUN_BUDGET:-400} \
  bash experiments/gpu_run.sh --tiny "$OUT" || rc=$?
grep -q "== wheels: exit 0" "$OUT/run.log" || { echo "gpu-rehearse: the wheels were not installed from .whl"; exit 1; }
echo "gpu-rehearse: exit $rc; $OUT/run.log"
exit $rc
