#!/usr/bin/env bash
# Before a GPU run (issue #10; make gpu-prep): what experiments/gpu_run.sh needs there and the GPU machine lacks,
# into git-ignored folders of the checkout that the device tool's `carry` takes along:
#   .whl/                    wheels for its Python 3.12: Hydra, MLflow, pytest, pyDOE3, py-spy (the image has torch
#                            and the scientific stack), MLflow's without its UI's built JavaScript (slim_wheel.py)
#   data/cifar10-jpeg.tar.gz the JPEG mirror (the GPU machine has no network and no ../shared)
# and checks that all that travels (tracked files, untracked ones git does not ignore, the two carried paths) fits
# the device tool's 64 MiB.
#
#   experiments/gpu_prep.sh [MIRROR]     (default ../shared/data/cifar10-jpeg.tar.gz)
set -euo pipefail
cd "$(dirname "$0")/.."
MIRROR=${1:-../shared/data/cifar10-jpeg.tar.gz}
LIMIT=$(( 64 * 1024 * 1024 ))
rm -rf .whl  # afresh: two versions of one package stop the whole install there
# MLflow and pyDOE3 within pyproject.toml's ranges
bash ../shared/tools/offline-wheels.sh .whl 'mlflow>=3.17,<3.18' submitit joblib 'pyDOE3>=1.0.3' pytest py-spy
for w in .whl/mlflow-[0-9]*.whl; do python3 experiments/slim_wheel.py "$w" mlflow/server/js/; done
mkdir -p data && cp "$MIRROR" data/cifar10-jpeg.tar.gz
bytes() { xargs -0 -r du -cb 2>/dev/null | awk '$2 == "total" { s += $1 } END { print s + 0 }'; }
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | bytes)
carried=$(printf '%s\0' .whl data/cifar10-jpeg.tar.gz | bytes)
total=$(( tree + carried ))
echo "travels: $(( total / 1024 / 1024 )) MiB of $(( LIMIT / 1024 / 1024 )) (the checkout $(( tree / 1024 )) KiB, .whl and the data $(( carried / 1024 )) KiB)"
[ "$total" -le "$LIMIT" ] || { echo "gpu-prep: that is over the device tool's limit: carry less"; exit 1; }
