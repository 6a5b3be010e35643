"""The prepared GPU run (experiments/gpu_run.sh) rehearsed in its tiny CPU mode: every step runs, the results
land under OUT as the device tool returns them (at most 8 files, 2 folders down), the ladder has 3 seeds."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from .conftest import ROOT


@pytest.mark.slow
def test_gpu_run_script_in_tiny_cpu_mode(tmp_path, imagefolder):
    out = tmp_path / "out"
    smi = tmp_path / "bin" / "nvidia-smi"  # stands in for the GPU machine's: utilization %, memory MiB
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho '37, 1234'\n")
    smi.chmod(0o755)
    env = {**os.environ, "PYTHON": sys.executable, "DATA": str(imagefolder("tar", per_class=80)),
           "WORK": str(tmp_path / "work"), "OMP_NUM_THREADS": "1", "GPU_RUN_BUDGET": "400",
           "PATH": f"{smi.parent}:{os.environ['PATH']}"}
    res = subprocess.run(["bash", "experiments/gpu_run.sh", "--tiny", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    log = (out / "run.log").read_text()
    assert res.returncode == 0, log[-4000:] + res.stderr[-2000:]
    steps = ("data", "ladder", "report", "bench", "step ops", "forms", "gpu tests",
             "test test_cuda_out_of_memory_fails_saying_what_to_change")
    for step in steps:
        assert f"== {step}: exit 0" in log or f"== {step}: done," in log, step  # forms: both runs ended 0
    # in this order, the tests in the background from the ladder's start (their output after the ladder's report)
    at = {step: log.index(f"== {step} (at most") for step in steps}
    assert at["data"] < at["gpu tests"] < at["report"] and at["data"] < at["ladder"] < at["report"], at
    assert at["report"] < at["bench"] < at["forms"] < at["step ops"] < at[steps[-1]], at
    assert log.index("---- the GPU tests' output") > log.index("== report: exit 0")
    assert re.search(r"\| 8 \| capacity \| \d+ \|", log)  # the ops of each rung's step, rung 0 to 8
    assert "10 skipped" in log and "1 skipped" in log  # the 9 GPU tests (2 parametrized twice), with their reason
    assert "Launching 27 jobs in 2 processes, 1 at a time in each" in log  # the ladder: two gangs, two processes
    assert log.count("Launching 14 jobs in this process") == 1 and log.count("Launching 13 jobs in this process") == 1
    assert re.search(r"== ladder: exit 0 after \d+s, GPU busy mean 37 % \(max 37 %\), memory up to 1234 MiB", log)
    assert re.search(r"streams: [\d,]+ training steps in \d+ s, [\d,]+ steps/s in all; CPU \d+ % of one core", log)
    # the summary at the end, where the device tool's output tail shows it
    tail = res.stdout[res.stdout.index("==== summary of"):]
    assert "fallbacks from the captured step: none" in tail and "none (no CUDA)" in tail
    assert "== ladder: exit 0" in tail and "FINISHED (jobs: FINISHED: 27)" in tail
    assert re.search(r"SKIPPED \[1\] tests/test_faults.py:\d+: CUDA out-of-memory needs a CUDA device", tail)
    assert "| 8 | capacity | 212 |" in tail and "| ratio trainer / textbook |" in tail
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

    # a second call on the same machine (the same WORK) goes on where the first stopped: nothing is run again but
    # what the first call cut (here: the tests, their mark taken back), after the bench, beside the forms
    (tmp_path / "work" / "done" / "gpu_tests").unlink()
    again = subprocess.run(["bash", "experiments/gpu_run.sh", "--tiny", str(tmp_path / "2")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    log2 = (tmp_path / "2" / "run.log").read_text()
    assert again.returncode == 0, log2[-3000:]
    for step in ("data", "ladder", "report", "bench", "step ops", "forms",
                 "test test_cuda_out_of_memory_fails_saying_what_to_change"):
        assert f"== {step}: done in an earlier call" in log2, step
    assert log2.index("== bench: done") < log2.index("== gpu tests (at most")  # not started beside the ladder
    assert "== gpu tests: exit 0" in log2

    # the ladder's processes fail as it starts (here: 0 processes, which the launcher refuses): it goes on as one
    # gang in one process, and finishes
    env3 = {**env, "WORK": str(tmp_path / "work3"), "PROCS": "0"}
    third = subprocess.run(["bash", "experiments/gpu_run.sh", "--tiny", "--steps", "ladder", str(tmp_path / "3")],
                           cwd=ROOT, env=env3, capture_output=True, text=True, timeout=300)
    log3 = (tmp_path / "3" / "run.log").read_text()
    assert third.returncode == 0, log3[-3000:]
    assert "hydra.launcher.processes=0" in log3 and "it goes on as one gang in one process" in log3
    assert "Launching 27 jobs in this process" in log3 and log3.split("==== summary of")[0].count("== ladder: exit 0") == 1
