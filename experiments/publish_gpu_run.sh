#!/usr/bin/env bash
# After a GPU run (experiments/gpu_run.sh): its files into experiments/ under a name of their own, and the reports
# made again here from a copy of the run's store, so that what is published is exactly what the store says
# (tests/test_published.py checks that of the ladder). Writing the READMEs and NOTES.md stays a person's job: the
# script ends with what to update.
#
#   experiments/publish_gpu_run.sh FROM NAME     (make gpu-publish FROM=... NAME=h100-2026-12-01)
#
# FROM: the run's OUT as the device tool returned it (run.log, bench.json, mlflow.db, slide_ladder/).
# NAME: the store's name, e.g. the card and the date. DEST: the experiments folder (default: this checkout's).
# It writes, refusing to overwrite an earlier NAME:
#   slide_ladder/NAME.db           the run's store, as it came (the reports read a copy: a report logs a run)
#   slide_ladder/NAME-run.log      the run's log
#   slide_ladder/ladder.{md,csv} and its three figures: the report of the ladder's 27 runs (every sweep of them);
#                                  a ladder the run did not finish (a rung with fewer seeds than the recipe's)
#                                  goes to slide_ladder/NAME-partial/ instead, the published ladder left as it is
#   slide_ladder/forms/            the report of the two recipe forms, where the run measured them
#   speed/NAME-bench.json          the benchmark's numbers, where the run measured them
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# = 2 ] || { sed -n '2,18p' "$0" | cut -c3-; exit 2; }
FROM=$1 NAME=$2
DEST=${DEST:-experiments}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
[ -f "$FROM/mlflow.db" ] || { echo "error: no $FROM/mlflow.db: FROM is the run's OUT (run.log, mlflow.db, ...)"; exit 1; }
[[ $NAME =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || { echo "error: NAME='$NAME': letters, digits, '.', '_' and '-'"; exit 1; }
for f in "$DEST/slide_ladder/$NAME.db" "$DEST/speed/$NAME-bench.json"; do
  [ -e "$f" ] && { echo "error: $f exists: publish under another NAME"; exit 1; }
done
mkdir -p "$DEST/slide_ladder" "$DEST/speed"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

report() {  # report EXPERIMENT OUT [ARGS...]: from a copy of the store, every sweep of the experiment
  local experiment=$1 out=$2
  shift 2
  cp "$FROM/mlflow.db" "$tmp/store.db"
  "$PY" -m cifar_ablation.report --tracking-uri "sqlite:///$tmp/store.db" --experiment "$experiment" --sweep all \
    --out "$out" "$@"
}
cp "$FROM/mlflow.db" "$DEST/slide_ladder/$NAME.db"
[ -f "$FROM/run.log" ] && cp "$FROM/run.log" "$DEST/slide_ladder/$NAME-run.log"
report slide-ladder "$tmp/ladder"
# complete: every rung of the recipe's order, each with every seed of its sweep (conf/experiment/slide_ladder.yaml)
if "$PY" - "$tmp/ladder/ladder.csv" <<'PY'
import csv, sys
from omegaconf import OmegaConf
rungs = len(OmegaConf.load("conf/config.yaml").ablation.order) + 1
seeds = len(str(OmegaConf.load("conf/experiment/slide_ladder.yaml").hydra.sweeper.params.seed).split(","))
rows = list(csv.DictReader(open(sys.argv[1])))
sys.exit(not (len(rows) == rungs and all(r["n"] == str(seeds) for r in rows)))
PY
then
  cp -r "$tmp/ladder/." "$DEST/slide_ladder/"
else
  mkdir -p "$DEST/slide_ladder/$NAME-partial"
  cp -r "$tmp/ladder/." "$DEST/slide_ladder/$NAME-partial/"
  echo "this run's ladder is not complete (a rung with fewer seeds than the recipe's, or none): its report went"
  echo "to $DEST/slide_ladder/$NAME-partial/, and the published ladder.md stays the earlier run's"
fi
if "$PY" -c "import sys; from mlflow.tracking import MlflowClient as C
sys.exit(C(f'sqlite:///{sys.argv[1]}').get_experiment_by_name('slide-ladder-forms') is None)" "$FROM/mlflow.db"; then
  report slide-ladder-forms "$DEST/slide_ladder/forms" --no-figures
else
  echo "no recipe forms in this run's store (experiment slide-ladder-forms): nothing published for them"
fi
if [ -f "$FROM/bench.json" ]; then
  cp "$FROM/bench.json" "$DEST/speed/$NAME-bench.json"
else
  echo "no bench.json in $FROM: nothing published for the benchmark"
fi
cat <<EOF

published under $DEST as $NAME. By hand, then \`pytest tests/test_published.py\`:
  - $DEST/slide_ladder/README.md: "its store is \`$NAME.db\`", the table (ladder.md's), the wall time (run.log)
  - README.md's Results: the capacity rung and the baseline as ladder.md has them
  - $DEST/speed/README.md: a section naming $NAME-bench.json, its numbers, the machine and the command
  - $DEST/slide_ladder/NOTES.md: the machine, every attempt, what run.log's summary says
EOF
