"""The prepared GPU run (experiments/gpu_run.sh) rehearsed in its tiny CPU mode: every step runs, the results
land under OUT as the device tool returns them (at most 8 files, 2 folders down), the ladder has 3 seeds; a
second call on the same machine goes on where the first stopped; a ladder whose processes fail goes on as one gang."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from .conftest import ROOT, make_imagefolder

pytestmark = pytest.mark.slow
STEPS = ("data", "ladder", "report", "bench", "step ops", "forms", "gpu tests",
         "test test_cuda_out_of_memory_fails_saying_what_to_change")


def gpu_run(env: dict, out: Path, *args: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, str]:
    """The script in its tiny mode, and the run.log it wrote."""
    res = subprocess.run(["bash", "experiments/gpu_run.sh", "--tiny", *args, str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    log = (out / "run.log").read_text()
    assert res.returncode == 0, log[-4000:] + res.stderr[-2000:]
    return res, log


def kill_one_run(db_path: Path, rung: int, seed: int) -> str:
    """The FINISHED job run of `rung` and `seed` in the store made KILLED, as a budget's end leaves it; its id."""
    db = sqlite3.connect(db_path)
    (run,) = db.execute("select r.run_uuid from runs r join tags a on a.run_uuid = r.run_uuid and a.key = 'rung' "
                        "join tags b on b.run_uuid = r.run_uuid and b.key = 'seed' where a.value = ? and "
                        "b.value = ? and r.status = 'FINISHED'", (str(rung), str(seed))).fetchone()
    db.execute("update runs set status = 'KILLED' where run_uuid = ?", (run,))
    db.commit()
    db.close()
    return run


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """The first call, all steps, with a stand-in nvidia-smi (utilization %, memory MiB, power W) on the PATH."""
    tmp = tmp_path_factory.mktemp("gpu_run")
    smi = tmp / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\ncase \"$*\" in *utilization*) echo '37, 1234, 123.4' ;; *) echo '123.4' ;; esac\n")
    smi.chmod(0o755)
    # a wheels' folder left by an earlier run by hand (another Python's wheels, say): with Hydra and MLflow
    # installed the script must not put it on the path
    stray = tmp / "site" / "mlflow"
    stray.mkdir(parents=True)
    (stray / "__init__.py").write_text("raise ImportError('gpu_run.sh put SITE on PYTHONPATH over an install')\n")
    env = {**os.environ, "PYTHON": sys.executable, "DATA": str(make_imagefolder(tmp, "tar", per_class=80)),
           "WORK": str(tmp / "work"), "OMP_NUM_THREADS": "1", "GPU_RUN_BUDGET": "400", "SITE": str(tmp / "site"),
           "PATH": f"{smi.parent}:{os.environ['PATH']}"}
    res, log = gpu_run(env, tmp / "out")
    return SimpleNamespace(tmp=tmp, env=env, out=tmp / "out", log=log, stdout=res.stdout)


def test_every_step_runs_in_order_with_the_tests_beside_the_ladder(first):
    log = first.log
    for step in STEPS:
        assert f"== {step}: exit 0" in log or f"== {step}: done," in log, step  # forms: both runs ended 0
    at = {step: log.index(f"== {step} (at most") for step in STEPS}
    assert at["data"] < at["gpu tests"] < at["report"] and at["data"] < at["ladder"] < at["report"], at
    assert at["report"] < at["bench"] < at["forms"] < at["step ops"] < at[STEPS[-1]], at
    assert log.index("---- the GPU tests' output") > log.index("== report: exit 0")  # joined after the report
    assert re.search(r"\| 8 \| capacity \| \d+ \|", log)  # the ops of each rung's step, rung 0 to 8
    assert "12 skipped" in log and "1 skipped" in log  # the 11 GPU tests (2 parametrized twice), with their reason
    assert "Launching 27 jobs in 2 processes, 1 at a time in each" in log  # the ladder: two gangs, two processes
    assert log.count("Launching 14 jobs in this process") == 1 and log.count("Launching 13 jobs in this process") == 1
    assert re.search(r"== ladder: exit 0 after \d+s, GPU busy mean 37 % \(max 37 %\), power mean 123 W \(max 123 W\), "
                     r"memory up to 1234 MiB", log)
    assert re.search(r"streams: [\d,]+ training steps in \d+ s, [\d,]+ steps/s in all; CPU \d+ % of one core", log)


def test_py_spy_records_each_of_the_ladders_processes_while_they_train(first):
    """Both gang processes, each main thread's samples sorted (on the CPU none in a graph launch; torch's CUDA
    libraries may show while it is imported), the table in run.log after the ladder and in the summary."""
    section = re.split(r"---- py-spy on the ladder's processes, \d+s into it", first.log)[1].split("\n==")[0]
    rows = re.findall(r"^\| \d+ \| (\d+) \| (\d+) % \| (\d+) % \| (\d+) % \| (\d+) % \| [\d.]+ \|$", section, re.M)
    assert len(rows) == 2, section[:3000]
    for samples, launch, *shares in rows:
        assert int(samples) >= 100 and launch == "0" and 98 <= int(launch) + sum(map(int, shares)) <= 102, rows
    assert "| the main threads' commonest stacks, 3 s each" in section
    assert "| py-spy, the ladder's gang processes (pid) |" in first.stdout[first.stdout.index("==== summary of"):]


def test_the_summary_ends_the_output(first):
    """Where the device tool's output tail (its last 12,000 characters) shows it."""
    tail = first.stdout[first.stdout.index("==== summary of"):]
    assert "fallbacks from the captured step: none" in tail and "none (no CUDA)" in tail
    assert "== ladder: exit 0" in tail and "FINISHED (jobs: FINISHED: 27)" in tail
    assert re.search(r"SKIPPED \[1\] tests/test_faults.py:\d+: CUDA out-of-memory needs a CUDA device", tail)
    assert "| 8 | capacity | 212 |" in tail and "| ratio trainer / textbook |" in tail


def test_the_results_land_as_the_device_tool_returns_them(first):
    out = first.out
    bench = json.loads((out / "bench.json").read_text())
    assert [(r["layout"], r["runs"]) for r in bench["layouts"]] == [("1x2", 2), ("2x1", 2)]
    assert all(r["aggregate_images_per_second"] > 0 and "steady_images_per_second" in r for r in bench["layouts"])
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(f.parts) <= 3 for f in files), files
    assert {"run.log", "bench.json", "mlflow.db"} <= {str(f) for f in files}
    rows = list(csv.DictReader(open(out / "slide_ladder" / "ladder.csv")))
    assert [r["row"] for r in rows][:2] == ["0 baseline", "1 noise"] and len(rows) == 9
    assert all(r["n"] == "3" for r in rows), [(r["row"], r["n"]) for r in rows]  # seeds 0, 1, 2
    assert (out / "slide_ladder" / "ladder_accuracy.png").exists()


def test_a_second_call_goes_on_where_the_first_stopped(first):
    """On the same machine (the same WORK) nothing is run again but what the first call cut (here: the tests,
    their mark taken back), and that after the bench, beside the forms."""
    (first.tmp / "work" / "done" / "gpu_tests").unlink()
    _, log = gpu_run(first.env, first.tmp / "2", timeout=120)
    for step in STEPS:
        if step != "gpu tests":
            assert f"== {step}: done in an earlier call" in log, step
    assert log.index("== bench: done") < log.index("== gpu tests (at most")  # not started beside the ladder
    assert "== gpu tests: exit 0" in log


def test_steps_picks_what_a_call_runs(first, tmp_path):
    """`--steps forms` on the first call's WORK: the forms are said done in an earlier call, and nothing else starts
    (no ladder, report, bench, step ops or tests)."""
    _, log = gpu_run(first.env, tmp_path / "out", "--steps", "forms", timeout=120)
    assert "== forms: done in an earlier call" in log
    for other in ("ladder", "report", "bench", "step ops", "gpu tests", "test test_"):
        assert f"== {other}" not in log.split("==== summary of")[0].replace("== data", ""), other


def test_a_ladder_the_run_did_not_finish_is_published_apart(first, tmp_path):
    """Its report goes to NAME-partial/; the published ladder.md (a complete ladder's) is left as it is. Here the
    first call's store with one run of rung 8, seed 2 made KILLED, as a budget's end leaves it."""
    out = tmp_path / "out"
    shutil.copytree(first.out, out)
    kill_one_run(out / "mlflow.db", rung=8, seed=2)
    dest = tmp_path / "experiments"
    (dest / "slide_ladder").mkdir(parents=True)
    (dest / "slide_ladder" / "ladder.md").write_text("the published ladder")
    res = subprocess.run(["bash", "experiments/publish_gpu_run.sh", str(out), "gpu-cut"], cwd=ROOT,
                         env={**first.env, "DEST": str(dest)}, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (dest / "slide_ladder" / "ladder.md").read_text() == "the published ladder"
    assert "this run's ladder is not complete" in res.stdout
    rows = list(csv.DictReader(open(dest / "slide_ladder" / "gpu-cut-partial" / "ladder.csv")))
    assert [r["n"] for r in rows] == ["3"] * 8 + ["2"], rows


def test_a_ladder_an_earlier_call_cut_goes_on_after_the_bench_and_the_forms_as_one_gang_if_its_processes_fail(
        first, tmp_path):
    """A ladder cut by the budget missed its one call anyway: a second call measures what no call has yet (the
    bench, the forms) before it finishes the ladder. Its processes fail as it starts (here because there are 0 of
    them, which the launcher refuses): it goes on as one gang in one process, which skips the 26 finished jobs and
    resumes the killed one, as a relaunch after a failed start does (none of 27 trains twice). On the first call's
    WORK, its ladder's marks taken back and one run made KILLED, as a cut leaves it."""
    work = tmp_path / "work"
    shutil.copytree(first.tmp / "work", work)
    for mark in ("ladder", "report"):
        (work / "done" / mark).unlink()
    (work / "done" / "gpu_tests").touch()  # whatever test_a_second_call... did to the first call's WORK
    killed = kill_one_run(work / "mlflow.db", rung=8, seed=2)
    _, log = gpu_run({**first.env, "WORK": str(work), "PROCS": "0"}, tmp_path / "out", timeout=300)
    order = ["== bench: done in an earlier call", "== forms: done in an earlier call", "the ladder an earlier call cut",
             "== ladder (at most", "== report (at most", "== test test_cuda_out_of_memory_fails_saying_what_to_change:"]
    assert [log.index(line) for line in order] == sorted(log.index(line) for line in order), log[-3000:]
    assert "hydra.launcher.processes=0" in log and "it goes on as one gang in one process" in log
    assert "Launching 27 jobs in this process" in log and log.split("==== summary of")[0].count("== ladder: exit 0") == 1
    assert log.count("skipping ") == 26 and f"resuming interrupted run {killed}" in log
    assert "FINISHED (jobs: FINISHED: 27)" in log


def test_the_run_publishes_under_its_name_as_the_published_results_are_checked(first, tmp_path):
    """experiments/publish_gpu_run.sh on the first call's OUT: the store as it came, the reports made again from
    a copy (the ladder's, as tests/test_published.py makes it; the two forms'), the log and the bench's numbers;
    an earlier name is never overwritten."""
    env = {**first.env, "DEST": str(tmp_path / "experiments")}
    publish = ["bash", "experiments/publish_gpu_run.sh", str(first.out), "gpu-2026-11-28"]
    res = subprocess.run(publish, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ladder, speed = tmp_path / "experiments" / "slide_ladder", tmp_path / "experiments" / "speed"
    assert (ladder / "gpu-2026-11-28.db").read_bytes() == (first.out / "mlflow.db").read_bytes()
    assert (ladder / "ladder.md").read_text() == (first.out / "slide_ladder" / "ladder.md").read_text()
    assert (ladder / "ladder_accuracy.png").exists() and (ladder / "gpu-2026-11-28-run.log").exists()
    forms = list(csv.DictReader(open(ladder / "forms" / "each_vs_baseline.csv")))
    assert sorted("mode=resize" in r["row"] for r in forms) == [False, True], forms  # both forms, told apart
    assert json.loads((speed / "gpu-2026-11-28-bench.json").read_text()) == json.loads((first.out / "bench.json").read_text())
    assert "its store is `gpu-2026-11-28.db`" in res.stdout  # what to write by hand
    again = subprocess.run(publish, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "exists: publish under another NAME" in again.stdout
