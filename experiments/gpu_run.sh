#!/usr/bin/env bash
# The prepared run on a bare GPU machine (issue #10), in this order: the data decoded once; the slide's 27-run
# ladder (one sweep) and its report, the GPU tests beside it; the full-size benchmark; the two recipe forms side
# by side (the tests cut earlier beside them); the ops, kernels and replay of each rung's step; the out-of-memory
# test alone. Everything it produces goes under OUT as it comes, at most 8 files (what the device tool returns):
#   run.log             every step's output and its wall time
#   bench.json          the benchmark's numbers
#   mlflow.db           the tracking store (re-report it later: report --tracking-uri sqlite:///…)
#   slide_ladder/       ladder.md, ladder.csv and the three figures
#
#   experiments/gpu_run.sh [--tiny] [--steps ladder,bench,forms,tests] [OUT]   (make gpu-run; OUT: $OUT, gpu_out)
#
# --steps picks steps (default: all four). One H100 call of 600 s may not hold them all (second H100 run,
# experiments/slide_ladder/NOTES.md: the ladder alone took ~600 s), so a session calls it twice on the same warm
# machine, the second call at once with the budget left: WORK (default /tmp/cifar_ablation_gpu) keeps the store,
# the decoded data and which steps ended well, so the second call goes on where the first stopped (the ladder's
# FINISHED jobs are skipped and a cut job resumes from its last epoch's checkpoint). A ladder the first call cut
# missed its one call anyway: the second call runs the bench and the forms first and finishes the ladder after them.
# The ladder's jobs are shared among PROCS processes (default 9 under MPS, 1 without), each training its share side
# by side on CUDA streams (hydra/launcher=streams; RUNS at a time in all, default 27; LAUNCHER=parallel: one process
# per job). Processes share the GPU through MPS (nvidia-cuda-mps-control) where it starts (MPS=0: never): without it
# they take turns on the GPU instead of running their kernels side by side. Should the ladder's processes fail as
# it starts, it goes on as one gang in one process.
# 150 s into the ladder py-spy (carried as a wheel) records its processes for 10 s: where their threads' time goes.
# The GPU tests check results, not speed: they run in the background beside the trainings measured for accuracy
# (the ladder, the forms), never beside the benchmark; the out-of-memory test runs with nothing else on the GPU.
# The GPU machine has python3 with torch but no Hydra or MLflow, no network, and no ../shared: carry the wheels
# (make gpu-prep: experiments/gpu_prep.sh) and the data (data/cifar10-jpeg.tar.gz) in the checkout; the script
# installs the wheels into SITE (default /tmp/site) when Hydra is missing. --tiny is the same script at toy sizes on
# the CPU, for rehearsal here (tests/test_gpu_run.py runs it in .venv; make gpu-rehearse under the GPU machine's
# Python 3.12 and torch 2.11, from the wheels: experiments/gpu_rehearse.sh).
# Budget (seconds of the whole run): GPU_RUN_BUDGET, default 540 (the device tool allows 600 per command).
set -uo pipefail
cd "$(dirname "$0")/.."
TINY=0 STEPS=ladder,bench,forms,tests
while [ $# -gt 0 ]; do
  case $1 in
    --tiny) TINY=1; shift ;;
    --steps) STEPS=$2; shift 2 ;;
    *) break ;;
  esac
done
OUT=${1:-${OUT:-gpu_out}}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}  # where the carried wheels go (pip --target), ahead of the image's packages on PYTHONPATH
WORK=${WORK:-$([ $TINY = 1 ] && mktemp -d /tmp/gpu_run.XXXX || echo /tmp/cifar_ablation_gpu)}
BUDGET=${GPU_RUN_BUDGET:-540}
T0=$(date +%s)
mkdir -p "$OUT/slide_ladder" "$WORK"
LOG="$OUT/run.log"
export PYTHONUNBUFFERED=1

log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
wanted() { [[ ",$STEPS," == *",$1,"* ]]; }
# step NAME SECONDS CMD...: run CMD with at most SECONDS (never past the budget), its output into STEP_OUT (default
# the log). A step that exited 0 is marked in WORK/done: a later call on the same machine skips it. NEED=N: start
# it only with N seconds of budget left (a step cut short is run whole again by the next call).
step() {
  local name=$1 limit=$2 start rc mark="$WORK/done/${1// /_}"
  shift 2
  if [ -e "$mark" ]; then log "== $name: done in an earlier call"; return 0; fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  if [ "$limit" -le 5 ]; then log "== $name: skipped, the budget is spent"; return 1; fi
  if [ "$(left)" -lt "${NEED:-0}" ]; then log "== $name: not started, it needs ${NEED}s, $(left)s are left"; return 1; fi
  log "== $name (at most ${limit}s): $*"
  start=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >>"${STEP_OUT:-$LOG}" 2>&1
  rc=$?
  log "== $name: exit $rc after $(( $(date +%s) - start ))s$(gpu_use "$start")"
  [ $rc = 0 ] && mkdir -p "$WORK/done" && touch "$mark"
  return $rc
}

# The GPU's utilization every 2 s while the script runs (nvidia-smi, where there is one), summed up per step:
# with the gang's CPU line (the launcher's pace), it says whether the GPU or the launching thread held the runs back.
# The board's power draw too, where this nvidia-smi reports it: "busy" counts the time any kernel runs, however few
# of the multiprocessors it keeps working; a busy GPU drawing little power runs small kernels that leave most idle.
GPU_USE=$WORK/gpu_use.csv
gpu_use() {  # gpu_use START: ", GPU busy mean X % (max Y %), power mean P W (max Q W), memory up to Z MiB"
  [ -s "$GPU_USE" ] || return 0
  awk -F', *' -v t="$1" '$1 >= t { n++; u += $2; if ($2 > m) m = $2; if ($3 > mem) mem = $3 }
    $1 >= t && $4 ~ /^[0-9.]+$/ { np++; w += $4; if ($4 > wm) wm = $4 }
    END { if (!n) exit
          printf ", GPU busy mean %.0f %% (max %d %%)", u / n, m
          if (np) printf ", power mean %.0f W (max %.0f W)", w / np, wm
          printf ", memory up to %d MiB, %d samples", mem, n }' "$GPU_USE"
}
if command -v nvidia-smi >/dev/null; then
  SMI_FIELDS=utilization.gpu,memory.used
  nvidia-smi --query-gpu=power.draw --format=csv,noheader,nounits -i 0 2>/dev/null | grep -qE '^[0-9.]+$' \
    && SMI_FIELDS+=,power.draw
  ( while :; do
      echo "$(date +%s), $(nvidia-smi --query-gpu=$SMI_FIELDS --format=csv,noheader,nounits -i 0)"
      sleep 2
    done >>"$GPU_USE" 2>/dev/null ) &
  SAMPLER=$!
fi
MPS_ON=0
cleanup() {
  [ -n "${SAMPLER:-}" ] && kill "$SAMPLER" 2>/dev/null
  [ -n "${TESTS_PID:-}" ] && pkill -TERM -P "$TESTS_PID" 2>/dev/null  # the background tests' timeouts pass it on
  [ -n "${SPY_PID:-}" ] && kill "$SPY_PID" 2>/dev/null
  [ $MPS_ON = 1 ] && echo quit | timeout 10 nvidia-cuda-mps-control
}
trap cleanup EXIT

# --- 1. environment: Hydra and MLflow from the carried wheels where missing; the data; MPS ------------------
if ! $PY -c "import hydra, mlflow" 2>/dev/null; then  # SITE only where they are missing: never over an install
  [ -d "$SITE/hydra" ] || step wheels 120 $PY -m pip install -q --no-index --no-deps --no-compile \
    --target "$SITE" .whl/*.whl || exit 1
  export PYTHONPATH=$SITE:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
DATA=${DATA:-}
for f in data/cifar10-jpeg.tar.gz ../shared/data/cifar10-jpeg.tar.gz; do
  [ -z "$DATA" ] && [ -f "$f" ] && DATA=$(realpath "$f")
done
[ -n "$DATA" ] || { log "no data: put cifar10-jpeg.tar.gz in data/ or set DATA"; exit 1; }
export CIFAR_ABLATION_JPEG=$DATA
log "python: $($PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")')"
log "data: $DATA; store: $WORK/mlflow.db; steps: $STEPS; tiny: $TINY"
CACHE=$WORK/cache                    # one decode of the archive, shared by the tests, the bench and the ladder
export CIFAR_ABLATION_TEST_CACHE=$CACHE
if [ $TINY = 0 ] && [ "${MPS:-1}" = 1 ] && command -v nvidia-cuda-mps-control >/dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=$WORK/mps CUDA_MPS_LOG_DIRECTORY=$WORK/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  # each MPS call under a timeout: not yet run on an H200 (the device tool's machines run under Firecracker or
  # gVisor, whose GPU proxy may not carry MPS); a client that hangs costs 40 s of the budget, not all of it
  if timeout 20 nvidia-cuda-mps-control -d 2>>"$LOG" || [ -S "$CUDA_MPS_PIPE_DIRECTORY/control" ]; then
    if timeout 40 $PY -c "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()" >>"$LOG" 2>&1; then
      log "MPS: on (the runs' kernels share the GPU)"
      MPS_ON=1
    else
      log "MPS: a CUDA client failed under it; going on without"
      echo quit | timeout 10 nvidia-cuda-mps-control
      unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    fi
  else
    log "MPS: the daemon did not start; going on without"
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
fi
if [ $TINY = 1 ]; then  # RUN: the sizes of one run; SIZE: those of the ladder's sweep
  RUN=(data.subset=200 data.val_subset=100 'model.widths=[8,16]' model.dense=32 train.batch_size=50
       train.eval_batch_size=100 train.epochs=1 device=cpu)
  SIZE=("${RUN[@]}" jobs_per_device=${RUNS:-2})
  PROCS=${PROCS:-2}
  BENCH=(--subset 200 --val-subset 100 --epochs 3 --batch-size 50 --workers 0 --concurrent 2 --device cpu)
  OPS=(--device cpu --batch-size 8)
else
  RUN=()
  SIZE=(jobs_per_device=${RUNS:-27})
  # the processes the ladder's runs are shared among, one launching thread each: one gang's thread held the second
  # H100 run's whole ladder to ~750 training steps/s, and 9 processes under MPS went furthest in its bench
  PROCS=${PROCS:-$([ $MPS_ON = 1 ] && echo 9 || echo 1)}
  BENCH=(--subset 50000 --val-subset 10000 --epochs 4 --batch-size 128 --workers 8 --concurrent 9
         --layouts 9x1,3x3,1x9)  # the layout that went furthest first: a bench cut short still has it
  OPS=(--device cuda --batch-size 128)
fi
STORE=sqlite:///$WORK/mlflow.db
# py-spy: carried as a wheel (make gpu-prep) into SITE; here beside the Python (make install)
SPY=$(command -v py-spy || ls "$SITE/bin/py-spy" "$(dirname "$(command -v "$PY")")/py-spy" 2>/dev/null | head -1)
SPY_AT=$([ $TINY = 1 ] && echo 2 || echo 150) SPY_S=$([ $TINY = 1 ] && echo 3 || echo 10)
save() { cp "$WORK/mlflow.db" "$OUT/mlflow.db" 2>/dev/null; }

# --- 2. the data, decoded once into the cache the tests, the ladder, the bench and the forms read ----------------
step data 120 $PY -c "import sys; from omegaconf import OmegaConf; from cifar_ablation.data import load_images
i = load_images(OmegaConf.create(dict(name='imagefolder', path=sys.argv[1], cache_dir=sys.argv[2], subset=None,
                                      val_subset=None)))
print(f'{len(i.train_y)} training and {len(i.test_y)} test images of {i.source}, decoded into {sys.argv[2]}')" \
  "$DATA" "$CACHE" || exit 1

# --- the GPU tests, one at a time in the background (each reports as it ends; their output joins run.log when they
# have all ended); --tiny: all in one pytest call (on a CPU each is skipped with its reason, and one start of
# pytest costs ~5 s here). The out-of-memory test runs apart, at the end: it asks for more memory than the GPU has,
# and beside it under MPS the other processes could meet the shortage.
TESTS=(tests/test_gpu.py::test_graph_and_eager_steps_give_the_same_loss_curve:90
       tests/test_gpu.py::test_the_batch_made_inside_the_graph_is_the_eager_batch:90
       tests/test_gpu.py::test_a_training_step_never_waits_for_the_gpu:90
       tests/test_gpu.py::test_a_gangs_turns_never_wait_for_the_gpu:90
       tests/test_gpu.py::test_a_captured_steps_adam_is_the_fused_kernel:45
       tests/test_gpu.py::test_no_autograd_node_outlives_a_step_on_the_graph_path:60
       tests/test_gpu.py::test_a_short_cuda_run_on_the_graph_path_learns:90
       tests/test_gpu.py::test_a_killed_cuda_run_resumes_on_the_graph_path:180
       tests/test_gpu.py::test_runs_side_by_side_on_streams_train_as_they_do_alone:180
       tests/test_learning.py::test_cuda_path_learns_clearly_above_chance:90)
APART=tests/test_faults.py::test_cuda_out_of_memory_fails_saying_what_to_change:60
PYTEST=($PY -m pytest -q -p no:cacheprovider -rA --tb=short -s)
start_tests() {  # the tests not yet passed, in the background
  local t id todo=()
  wanted tests || return 0
  if [ $TINY = 1 ]; then
    [ -e "$WORK/done/gpu_tests" ] || todo=("gpu tests:120:${TESTS[*]%:*}")
  else
    for t in "${TESTS[@]}"; do  # test_file::name:seconds
      id=${t%:*}
      [ -e "$WORK/done/test_${id##*::}" ] || todo+=("test ${id##*::}:${t##*:}:$id")
    done
  fi
  [ ${#todo[@]} = 0 ] && return 0
  ( export STEP_OUT=$WORK/tests.log
    for t in "${todo[@]}"; do  # name:seconds:ids
      IFS=: read -r name limit ids <<<"$t"
      step "$name" "$limit" "${PYTEST[@]}" $ids
    done ) &
  TESTS_PID=$!
}
wait_tests() {  # until the background tests end; then their output into the log
  [ -n "${TESTS_PID:-}" ] || return 0
  wait "$TESTS_PID"
  TESTS_PID=
  if [ -s "$WORK/tests.log" ]; then
    { echo "---- the GPU tests' output"; cat "$WORK/tests.log"; echo "---- (end of the tests' output)"; } >>"$LOG"
    : >"$WORK/tests.log"
  fi
}

# --- 3. the ladder, then its report -------------------------------------------------------------------------
ladder() {  # ladder PROCESSES: one sweep of 27 jobs, seed 0's nine first (conf/experiment/slide_ladder.yaml);
  # per-epoch checkpoints, so a job the budget cuts resumes from its last epoch in the next call
  local share=()
  [ "$LAUNCHER" = streams ] && share=("hydra.launcher.processes=$1")
  step ladder 600 $PY -m cifar_ablation experiment=slide_ladder data=imagefolder "data.path=$DATA" \
    "hydra/launcher=$LAUNCHER" train.progress_every_s=60 "${SIZE[@]}" "${share[@]}" "data.cache_dir=$CACHE" \
    "mlflow.tracking_uri=$STORE" mlflow.experiment=slide-ladder "hydra.sweep.dir=$WORK/multirun/ladder"
}
# py-spy on the ladder's launching threads: SPY_AT s into the ladder (its processes set up and captured), SPY_S s
# of each gang process's stacks, native frames too, summed up (experiments/speed/spy_table.py) into run.log after
# the ladder: where each main thread's time goes (graph launches, other CUDA calls, waiting, CPU work), which the
# pace lines leave open. Each sample stops the process for a moment: a few seconds' slowdown of the ladder at most.
spy_on_ladder() {  # once SPY_AT s have passed and all PROCS gang processes run (or 120 s more, whatever runs then)
  local launcher pids waited
  mkdir -p "$WORK/spy" "$WORK/done"
  for (( waited = 0; ; waited++ )); do
    sleep 1
    launcher=$(ps -eo pid=,args= | awk '$2 != "timeout" && /-m cifar_ablatio[n] experiment=slide_ladder/ {print $1; exit}')
    [ -n "$launcher" ] || { echo "py-spy: no ladder process left to record"; return; }
    pids=$(pgrep -P "$launcher" -f spawn_main)  # the gangs' processes (none: the launcher is the one gang)
    [ "$waited" -lt "$SPY_AT" ] && continue
    [ "$PROCS" = 1 ] || [ "$(wc -w <<<"$pids")" -ge "$PROCS" ] || [ "$waited" -ge $(( SPY_AT + 120 )) ] && break
  done
  pids=${pids:-$launcher}
  for pid in $pids; do
    timeout $(( SPY_S + 30 )) "$SPY" record --pid "$pid" --duration "$SPY_S" --rate 100 --native --idle --threads \
      --format raw --output "$WORK/spy/spy-$pid.txt" >>"$WORK/spy/py-spy.log" 2>&1 &
  done
  wait
  ls "$WORK"/spy/spy-*.txt >/dev/null 2>&1 || { echo "py-spy recorded nothing:"; tail -5 "$WORK/spy/py-spy.log"; return; }
  $PY experiments/speed/spy_table.py --seconds "$SPY_S" "$WORK"/spy/spy-*.txt && touch "$WORK/done/spy"
}
ladder_and_report() {
  LAUNCHER=${LAUNCHER:-streams}
  [ -e "$WORK/done/ladder" ] || start_tests  # beside the ladder; when it is done already, beside the forms
  LADDER_START=$(date +%s)
  touch "$WORK/ladder_started"
  if [ -n "$SPY" ] && [ ! -e "$WORK/done/spy" ]; then
    spy_on_ladder >"$WORK/spy.md" 2>&1 &
    SPY_PID=$!
  fi
  ladder "$PROCS"
  rc=$?
  if [ $rc != 0 ] && [ $rc != 124 ] && [ "$LAUNCHER" = streams ] && [ "$PROCS" != 1 ] \
     && [ $(( $(date +%s) - LADDER_START )) -lt 150 ]; then
    log "the ladder in $PROCS processes failed as it started (above): it goes on as one gang in one process"
    ladder 1
    rc=$?
  fi
  [ $rc = 124 ] && log "the budget ended inside the ladder: the next call's ladder step goes on from here"
  save
  BUDGET=$(( BUDGET + 40 ))  # the report runs even when the ladder used the whole budget
  step report 40 $PY -m cifar_ablation.report --tracking-uri "$STORE" --experiment slide-ladder --sweep all \
    --out "$OUT/slide_ladder"
  [ -e "$WORK/done/ladder" ] || rm -f "$WORK/done/report"  # the report of a ladder cut short: made again next call
  BUDGET=$(( BUDGET - 40 ))
  save
  if [ -n "${SPY_PID:-}" ]; then  # ends within a second once the ladder has, or when its recording is summed up
    wait "$SPY_PID"
    SPY_PID=
    { echo "---- py-spy on the ladder's processes, ${SPY_AT}s into it"; cat "$WORK/spy.md"; } >>"$LOG"
  fi
  wait_tests
}
# A ladder an earlier call cut did not fit one call: its end comes after the bench and the forms, which no call has
# measured yet, so that a short second call spends its budget on them rather than on a ladder that missed anyway.
CUT_EARLIER=$([ -e "$WORK/ladder_started" ] && [ ! -e "$WORK/done/ladder" ] && echo 1 || echo 0)
if wanted ladder && [ $CUT_EARLIER = 0 ]; then
  ladder_and_report
fi

# --- 4. the benchmark at full size, alone on the GPU
if wanted bench; then
  NEED=$([ $TINY = 1 ] && echo 0 || echo 150) step bench 240 $PY -m cifar_ablation.bench --data "$DATA" \
    "${BENCH[@]}" --json "$OUT/bench.json" --override "data.cache_dir=$CACHE"
fi

# --- 5. with what budget is left: the top rung in the forms the recipe departs from (seed 0, side by side), and
# the tests not yet passed beside them: the slide's crop-and-resize at capacity x4, the translate crop at x2.
# They start only with FORMS_NEED seconds left (a form cut short is lost: it keeps no checkpoints); else the time
# goes to the step ops, and the next call runs the forms
FORMS_NEED=$([ $TINY = 1 ] && echo 30 || echo 120)
ORDER=$($PY -c 'from omegaconf import OmegaConf as C; print(",".join(C.load("conf/config.yaml").ablation.order))')
ALL="trick=[$ORDER]"  # the top rung: every trick of the one trick order
form() {  # form LIMIT OVERRIDES...: one run of the top rung in the background
  local limit=$1
  shift
  timeout --signal=TERM --kill-after=15 "$limit" $PY -m cifar_ablation "$ALL" seed=0 data=imagefolder \
    "data.path=$DATA" "data.cache_dir=$CACHE" "$@" train.checkpoint=false train.progress_every_s=0 \
    "${RUN[@]}" "mlflow.tracking_uri=$STORE" mlflow.experiment=slide-ladder-forms >>"$LOG" 2>&1 &
}
start_tests
if wanted forms && [ -e "$WORK/done/forms" ]; then
  log "== forms: done in an earlier call"
elif wanted forms && [ "$(left)" -lt $FORMS_NEED ]; then
  log "== forms: not started, $(left)s are left (the next call runs them)"
elif wanted forms; then
  log "== forms (at most $(left)s): crop=resize at capacity x4, crop=translate at capacity x2"
  FORMS_START=$(date +%s)
  form "$(left)" trick.crop.mode=resize trick.capacity.width_mult=4 trick.capacity.dense_mult=2
  p1=$!
  form "$(left)" trick.crop.mode=translate trick.capacity.width_mult=2 trick.capacity.dense_mult=2
  p2=$!
  wait $p1; r1=$?
  wait $p2; r2=$?
  [ $r1 = 0 ] && [ $r2 = 0 ] && mkdir -p "$WORK/done" && touch "$WORK/done/forms"
  log "== forms: $([ -e "$WORK/done/forms" ] && echo done || echo 'cut or failed (the next call runs what is left)')$(gpu_use "$FORMS_START")"
fi
wait_tests

# --- 6. the ops and kernels one step of each rung issues, and its captured step alone on the GPU
# (experiments/speed/step_ops.py, into run.log: beside each run's first replay in the ladder's log); then the
# out-of-memory test, alone
if wanted bench; then
  step "step ops" 120 $PY experiments/speed/step_ops.py "${OPS[@]}"
fi
if wanted ladder && [ $CUT_EARLIER = 1 ]; then
  log "the ladder an earlier call cut goes on now, after the bench and the forms"
  ladder_and_report
fi
if wanted tests; then
  id=${APART%:*}
  step "test ${id##*::}" "${APART##*:}" "${PYTEST[@]}" "$id"
fi

save
log "done in $(( $(date +%s) - T0 ))s"

# --- the lines to read first, at the end (the device tool returns the output's last 12,000 characters): the
# tables (the ladder's, the bench's, the step ops'), each ladder run's first replay (job k: rung k % 9, seed k / 9),
# the gangs' final pace, the sweeps' ends, the tests' results, any fallback from the captured step, every step's end
summary() {
  awk '
    /^\[[0-9:]+ \+[0-9]+s\] == / && !/\(at most/ { steps = steps "  " $0 "\n" }
    /== ladder \(at most/ { ladder = 1 } /== ladder: / { ladder = 0 }
    /capture failed|could not be captured|did not record|training eagerly|failed as it started/ { falls = falls "  " $0 "\n" }
    ladder && /graph replay: its launch takes/ {
      match($0, /#[0-9]+ /); job = substr($0, RSTART + 1, RLENGTH - 2)
      match($0, /takes [0-9]+ us/); us = substr($0, RSTART + 6, RLENGTH - 9)
      match($0, /step [0-9.]+ ms/); ms = substr($0, RSTART + 5, RLENGTH - 8)
      replays = replays sprintf("  #%s rung %d seed %d: launch %s us, step %s ms on the GPU\n", job, job % 9, int(job / 9), us, ms)
    }
    /streams: [0-9,]+ training steps in/ { sub(/^.*streams: /, ""); paces = paces "  " $0 "\n" }
    /sweep run [0-9a-f]+ (FINISHED|FAILED|KILLED)/ { sub(/^.*sweep run /, "sweep run "); sweeps = sweeps "  " $0 "\n" }
    /^(PASSED|FAILED|ERROR|SKIPPED) / || /^=* ?[0-9]+ (passed|failed|skipped|error)/ { tests = tests "  " $0 "\n" }
    /^\| / { tables = tables $0 "\n" }
    END {  # the most telling last: a tail cut short loses the tables first (they are in run.log and OUT too)
      printf "==== summary of %s (the whole log above)\ntables:\n%s", FILENAME, tables
      printf "first replays of the ladder runs:\n%sgangs (final pace):\n%ssweeps:\n%sGPU tests:\n%s", replays ? replays : "  none (no CUDA)\n", paces, sweeps, tests ? tests : "  none ran\n"
      printf "fallbacks from the captured step: %ssteps:\n%s", falls ? "\n" falls : "none\n", steps
    }' "$LOG"
}
summary | tee -a "$LOG"
