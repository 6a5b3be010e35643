"""What survives what: real processes, real signals, a real sqlite store."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch

from cifar_ablation.lineage import fluent_store
from cifar_ablation.report import main as report_main
from cifar_ablation.tracking import JOB, ROLE, SWEEP

from .conftest import TINY, run_cli, runs_in

# Enough images and width that an epoch lasts long enough (~1 s) to be interrupted.
SLOW = ["data=imagefolder", "data.val_subset=200", "model.widths=[16,32]", "model.dense=64",
        "train.batch_size=50", "train.epochs=4", "device=cpu", "train.progress_every_s=0"]


@pytest.fixture
def slow_data(imagefolder, tmp_path) -> list[str]:
    return [f"data.path={imagefolder('tar', per_class=300)}", f"data.cache_dir={tmp_path}/cache"]


def start(args: list[str], cwd, own_group: bool = False, env: dict | None = None) -> subprocess.Popen:
    """The CLI as a child process that takes Ctrl-C as a terminal's foreground job does, even where the tests
    run in the background (a shell starts background jobs with SIGINT ignored, and children inherit that).
    own_group: in a new process group, as a terminal gives its foreground job, so that os.killpg(proc.pid,
    SIGINT) is a Ctrl-C reaching the launcher and whatever shares its group."""
    def foreground():
        if own_group:
            os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "cifar_ablation", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=foreground)


def wait_for(proc: subprocess.Popen, text: str, timeout: float = 180) -> str:
    seen, deadline = [], time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
        assert time.time() < deadline, "".join(seen)
    raise AssertionError(f"process ended before printing {text!r}:\n" + "".join(seen))


SAMPLE_EVERY_S = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}  # MLflow's system metrics: each second
CPU_USE = "system/cpu_utilization_percentage"


def test_sigkill_then_relaunch_resumes_the_same_run_exactly(tmp_path, slow_data, tracking_db):
    db = tracking_db
    args = [*SLOW, *slow_data, f"mlflow.tracking_uri=sqlite:///{db}"]
    proc = start([*args, "mlflow.experiment=resume"], tmp_path, env=SAMPLE_EVERY_S)
    wait_for(proc, "epoch 2/4")
    client, (run,) = runs_in(db, "resume")
    for _ in range(100):  # its system metrics' first sample (each second) before the kill
        if client.get_metric_history(run.info.run_id, CPU_USE):
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    client, runs = runs_in(db, "resume")
    assert [r.info.status for r in runs] == ["RUNNING"]  # nobody could close it
    killed = runs[0].info.run_id
    assert len(client.get_metric_history(killed, "val_acc")) < 4

    before = client.get_metric_history(killed, CPU_USE)
    again = run_cli([*args, "mlflow.experiment=resume"], tmp_path, env=SAMPLE_EVERY_S)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming interrupted run " + killed in again.stdout + again.stderr
    client, runs = runs_in(db, "resume")
    assert [(r.info.run_id, r.info.status) for r in runs] == [(killed, "FINISHED")]
    for key in ("val_acc", "train_loss", "lr"):
        assert sorted(m.step for m in client.get_metric_history(killed, key)) == [1, 2, 3, 4], key

    # MLflow's system metrics: sampled before the kill and after the relaunch, which went on from the last step
    steps = [m.step for m in client.get_metric_history(killed, CPU_USE)]
    assert before and len(steps) > len(before) and sorted(steps) == list(range(len(steps))), (before, steps)
    assert {"system/system_memory_usage_megabytes", "system/disk_usage_percentage"} <= set(runs[0].data.metrics)

    ref = run_cli([*args, "mlflow.experiment=reference", "mlflow.log_system_metrics=false"], tmp_path,
                  env=SAMPLE_EVERY_S)
    assert ref.returncode == 0, ref.stderr[-3000:]
    _, (reference,) = runs_in(db, "reference")
    assert not [k for k in reference.data.metrics if k.startswith("system/")]  # switched off
    resumed = client.get_run(killed)
    for key in ("val_acc", "val_loss", "train_acc", "train_loss"):
        assert resumed.data.metrics[key] == reference.data.metrics[key], key  # exact, on CPU
    # each logged the net it trained as its one model (mlflow.log_model is on by default): the same net
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    with fluent_store(f"sqlite:///{db}"):
        nets = [mlflow.pytorch.load_model(f"runs:/{r.info.run_id}/model") for r in (resumed, reference)]
    assert [len(client.search_logged_models([r.info.experiment_id])) for r in (resumed, reference)] == [1, 1]
    assert len(resumed.inputs.dataset_inputs) == 2  # its datasets, logged by both launches, kept once
    with torch.no_grad():
        assert torch.equal(nets[0](x), nets[1](x))


def test_sigterm_and_sigint_leave_the_run_killed(tmp_path, slow_data, tracking_db):
    """Each signal leaves the run KILLED. Before the SIGTERM, a second terminal launches the very same config:
    alone, it stops with one error line; as a sweep's job (in another trick order, which names the same config),
    it joins the running run, and the sweep waits for it at its end, then ends FAILED saying it did not finish."""
    db = tracking_db
    for sig in (signal.SIGTERM, signal.SIGINT):
        args = [*SLOW, *slow_data, "train.epochs=50", f"mlflow.tracking_uri=sqlite:///{db}",
                f"mlflow.experiment={sig.name}"]
        proc = start(args, tmp_path)
        wait_for(proc, "epoch 1/50")
        if sig == signal.SIGTERM:  # meanwhile, someone launches the very same config
            twin = run_cli(args, tmp_path)
            assert twin.returncode != 0 and "Traceback" not in twin.stderr, twin.stderr[-3000:]
            assert twin.stderr.strip().splitlines()[-1].startswith("error: config ") and \
                "is being trained right now by another process" in twin.stderr
            sweep = start(["-m", *args, "ablation.order=[flip,noise]"], tmp_path)
            wait_for(sweep, "waiting for 1 run(s) another process is training for this sweep")
            assert proc.poll() is None  # the first run goes on undisturbed
        proc.send_signal(sig)
        assert proc.wait(timeout=60) != 0
        client, runs = runs_in(db, sig.name)
        (run,) = [r for r in runs if r.data.tags[ROLE] == JOB]
        assert run.info.status == "KILLED" and "interrupted by signal" in run.data.tags["failure_reason"], sig.name
        if sig == signal.SIGTERM:  # the sweep's wait ends with the run
            out, _ = sweep.communicate(timeout=120)
            (parent,) = [r for r in runs_in(db, sig.name)[1] if r.data.tags[ROLE] == SWEEP]
            assert sweep.returncode != 0 and parent.info.status == "FAILED", out[-3000:]
            assert f"error: sweep {parent.info.run_id} FAILED: some jobs did not finish (KILLED: 1)" in out
            assert client.get_run(run.info.run_id).data.tags[f"in_sweep.{parent.info.run_id}"] == "1"


def test_diverging_job_fails_with_reason_and_the_sweep_goes_on(tmp_path, imagefolder, capsys, tracking_db):
    db = tracking_db
    data = imagefolder("tar", per_class=80)
    res = run_cli(["-m", "optim.lr=1e30,0.001", *TINY, "data=imagefolder", f"data.path={data}",
                   f"data.cache_dir={tmp_path}/cache", f"mlflow.tracking_uri=sqlite:///{db}",
                   "mlflow.experiment=diverge"], tmp_path)
    assert res.returncode != 0  # the sweep reports its failure...
    client, runs = runs_in(db, "diverge")
    jobs = {r.data.params["optim.lr"]: r for r in runs if r.data.tags[ROLE] == JOB}
    assert jobs["0.001"].info.status == "FINISHED"  # ...after running every job
    bad = jobs["1e+30"]
    assert bad.info.status == "FAILED"
    assert bad.data.tags["failure_reason"].startswith("NonFiniteLoss: train loss is nan")
    assert "optim.lr" in bad.data.tags["failure_reason"]
    assert "traceback.txt" in [a.path for a in client.list_artifacts(bad.info.run_id)]
    (parent,) = [r for r in runs if r.data.tags[ROLE] == SWEEP]
    assert parent.info.status == "FAILED"
    assert not [r for r in runs if r.info.status == "RUNNING"]

    assert report_main(["--tracking-uri", f"sqlite:///{db}", "--experiment", "diverge", "--out",
                        str(tmp_path / "r"), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "Ignored 1 run(s) that did not finish" in out and "FAILED: NonFiniteLoss" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA out-of-memory needs a CUDA device")
def test_cuda_out_of_memory_fails_saying_what_to_change(tmp_path, imagefolder, tracking_db):
    db = tracking_db
    # one block on 4096 images at once, in float32, so wide that its first activation alone (4096 images x width
    # x 32 x 32 x 4 bytes) is larger than this GPU's memory: 5120 channels on an 80 GB H100, 9216 on an H200
    width = 1024 * (torch.cuda.get_device_properties(0).total_memory // (4096 * 32 * 32 * 4 * 1024) + 1)
    res = run_cli([f"model.widths=[{width}]", "model.convs_per_block=2", "train.batch_size=4096", "train.epochs=1",
                   "train.amp=false",
                   "device=cuda", "data=imagefolder", f"data.path={imagefolder('tar', per_class=1400)}",
                   f"data.cache_dir={tmp_path}/cache", f"mlflow.tracking_uri=sqlite:///{db}",
                   "mlflow.experiment=oom"], tmp_path)
    assert res.returncode != 0
    _, (run,) = runs_in(db, "oom")
    assert run.info.status == "FAILED"
    assert "CUDA out of memory" in run.data.tags["failure_reason"]
    assert "lower train.batch_size (now 4096)" in run.data.tags["failure_reason"]


@pytest.mark.slow
def test_sigterm_to_a_parallel_launcher_leaves_no_sweep_running(tmp_path, slow_data, tracking_db):
    """The launching process of a joblib sweep gets SIGTERM (a scheduler's kill, `kill PID`): its sweep run is
    closed FAILED with the jobs' states, not left RUNNING; a relaunch then resumes the interrupted jobs."""
    db = tracking_db
    args = ["-m", "seed=0,1", "hydra/launcher=parallel", "jobs_per_device=2", *SLOW, *slow_data, "train.epochs=30",
            f"mlflow.tracking_uri=sqlite:///{db}", "mlflow.experiment=term"]
    proc = start(args, tmp_path)
    wait_for(proc, "epoch 1/30")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    _, runs = runs_in(db, "term")
    (parent,) = [r for r in runs if r.data.tags[ROLE] == SWEEP]
    assert parent.info.status == "FAILED" and "launcher was stopped" in parent.data.tags["failure_reason"]


@pytest.mark.slow
def test_ctrl_c_then_relaunch_gathers_the_resumed_runs_into_the_new_sweep(tmp_path, slow_data, capsys, tracking_db):
    """A 2-job parallel sweep stopped with Ctrl-C (SIGINT to the terminal's whole process group), then the same
    command again: both runs resume, finish with every epoch once, nest under the new sweep, and its report
    holds both configurations."""
    db = tracking_db
    args = ["-m", "trick=[],[flip]", "hydra/launcher=parallel", "jobs_per_device=2", *SLOW, *slow_data,
            "train.epochs=8", f"mlflow.tracking_uri=sqlite:///{db}", "mlflow.experiment=relaunch"]

    proc = start(args, tmp_path, own_group=True)
    wait_for(proc, "epoch 2/8")
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) != 0
    _, runs = runs_in(db, "relaunch")
    (first,) = [r for r in runs if r.data.tags[ROLE] == SWEEP]
    assert first.info.status == "FAILED"

    again = run_cli(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    client, runs = runs_in(db, "relaunch")
    second = next(r for r in runs if r.data.tags[ROLE] == SWEEP and r.info.run_id != first.info.run_id)
    jobs = [r for r in runs if r.data.tags[ROLE] == JOB]
    assert len(jobs) == 2 and second.info.status == "FINISHED"
    for r in jobs:
        assert r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == second.info.run_id
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_acc")) == list(range(1, 9))
    assert report_main(["--tracking-uri", f"sqlite:///{db}", "--experiment", "relaunch", "--out",
                        str(tmp_path / "r"), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert f"sweep {second.info.run_id} (2 runs)" in out and "Missing" not in out
