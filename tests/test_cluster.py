"""The real thing users outgrow one machine with: a SLURM cluster (single node, with accounting) running sweeps
through Hydra's submitit launcher, into an `mlflow server` backed by PostgreSQL, with MLflow's basic-auth,
listening beyond loopback. Services start from nothing here (tests/services/stack.py) and stop afterwards."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from cifar_ablation.report import main as report_main
from cifar_ablation.tracking import JOB, MEMBER, ROLE, SWEEP

from .conftest import TINY, run_cli
from .services import stack

NEED = stack.missing(stack.SLURM_PACKAGES) + ([] if stack.PG_BIN else ["postgresql"])
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    bool(NEED) or os.geteuid() != 0,
    reason=f"needs root and Debian's slurm-wlm, slurmdbd, munge, mariadb-server, postgresql (missing: "
           f"{', '.join(NEED) or 'none'}; `make services` installs them as root)")]
SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=test", "hydra.launcher.gpus_per_task=null",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Cluster:
    root: Path
    uri: str            # the tracking server, on this machine's network address
    password: str
    env: dict           # what a user's shell has: SLURM_CONF and MLflow's credentials

    def client(self) -> MlflowClient:
        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=self.password)
        return MlflowClient(self.uri)

    def runs(self, experiment: str) -> list:
        c = self.client()
        exp = c.get_experiment_by_name(experiment)
        return c.search_runs([exp.experiment_id], max_results=1000) if exp else []


@pytest.fixture(scope="module")
def cluster():
    # not under pytest's tmp folder: that is root's alone (0700), and postgres and mysql must reach theirs
    root = Path(tempfile.mkdtemp(prefix="cifar-ablation-cluster-"))
    root.chmod(0o755)
    with stack.slurm(root / "slurm") as slurm_env, stack.postgres(root) as (pg, pg_password), \
            stack.mlflow_server(root, pg, pg_password) as server:
        env = {**slurm_env, **ONE_THREAD, "MLFLOW_TRACKING_USERNAME": server["username"],
               "MLFLOW_TRACKING_PASSWORD": server["password"]}
        yield Cluster(root, server["uri"], server["password"], env)
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ.pop(k, None)
    shutil.rmtree(root, ignore_errors=True)


def job_args(tmp_path: Path, data: Path, cluster: Cluster, experiment: str) -> list[str]:
    return [*TINY, "data=imagefolder", f"data.path={data}", f"data.cache_dir={tmp_path}/cache",
            f"mlflow.tracking_uri={cluster.uri}", f"mlflow.experiment={experiment}"]


def test_the_server_refuses_whoever_has_no_password(cluster):
    url = cluster.uri + "/api/2.0/mlflow/experiments/search?max_results=1"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=10)
    assert e.value.code == 401
    res = run_cli(["train.epochs=1", f"mlflow.tracking_uri={cluster.uri}", "mlflow.experiment=nobody"],
                  cluster.root, env={"MLFLOW_TRACKING_PASSWORD": "wrong", "MLFLOW_TRACKING_USERNAME": "admin"})
    assert res.returncode != 0 and "401" in res.stderr + res.stdout
    assert cluster.client().get_experiment_by_name("nobody") is None


SLOW = ["train.epochs=8", "model.widths=[32,64]", "model.dense=64", "data.subset=600", "train.batch_size=20"]


def launch(args: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cifar_ablation", "-m", *args], cwd=cwd, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_until(what: str, check, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def job_at_epoch(cluster: Cluster, experiment: str, tricks: str, epoch: int):
    """The job run of `tricks` once it has logged `epoch` epochs (and is still RUNNING), else None."""
    client = cluster.client()
    for r in cluster.runs(experiment):
        if r.data.tags.get(ROLE) == JOB and r.data.tags["tricks"] == tricks and r.info.status == "RUNNING":
            if len(client.get_metric_history(r.info.run_id, "val_acc")) >= epoch:
                return r
    return None


def scontrol(cluster: Cluster, *args: str) -> str:
    return subprocess.run(["scontrol", *args], env={**os.environ, **cluster.env}, capture_output=True,
                          text=True).stdout


def start_requeued(cluster: Cluster, job: str) -> None:
    """A requeued job may be held (~120 s) before it starts again: let it start now, and wait until it has."""
    def restarted() -> bool:
        scontrol(cluster, "update", f"JobId={job}", "StartTime=now")
        show = scontrol(cluster, "show", "job", job)
        return "Restarts=1" in show and ("JobState=RUNNING" in show or "JobState=COMPLETED" in show)
    wait_until("the requeued job to start", restarted, 180)


def test_requeued_jobs_resume_their_own_runs(cluster, tmp_path, imagefolder):
    """Two ways SLURM stops a job and starts it again, in one array at epoch 2: `scontrol requeue` (SIGTERM: the
    run goes KILLED), and its warning of the time limit (SIGUSR2, which the launcher asks for signal_delay_s before
    it; sent here as slurmd sends it, to the job's steps): submitit's handler requeues the job and exits the
    process, and the run goes KILLED naming the warning (before, FAILED, and the job started over in a new run).
    Each job, back (SLURM_RESTART_COUNT=1), resumes its own run from its checkpoint: one metric per epoch, final
    metrics equal to an uninterrupted run's of the same config, the sweep FINISHED."""
    args = ["trick=[flip],[noise]", "seed=0",
            *job_args(tmp_path, imagefolder("tar", per_class=200), cluster, "requeue"), *SLOW]
    proc = launch([*args, *SLURM], tmp_path, cluster.env)
    client, env = cluster.client(), {**os.environ, **cluster.env}
    run = {t: wait_until(f"epoch 2 of {t}", lambda t=t: job_at_epoch(cluster, "requeue", t, 2)) for t in ("flip", "noise")}
    job = {t: r.data.tags["slurm_job"] for t, r in run.items()}
    scontrol(cluster, "requeue", job["flip"])
    subprocess.run(["scancel", "--signal=USR2", job["noise"]], env=env, check=True)
    closed = {t: wait_until(f"{t}'s run to close", lambda t=t: (c := client.get_run(run[t].info.run_id)).info.status
                            != "RUNNING" and c, 120) for t in run}
    for t in run:
        start_requeued(cluster, job[t])
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    assert {t: c.info.status for t, c in closed.items()} == {"flip": "KILLED", "noise": "KILLED"}, \
        {t: c.data.tags.get("failure_reason") for t, c in closed.items()}
    assert closed["noise"].data.tags["failure_reason"].startswith(
        "SystemExit: -1 after SIGUSR2, SLURM's warning of the job's time limit or of its preemption: submitit "
        "requeued the job")

    twin = run_cli(["-m", *args, "mlflow.experiment=requeue-twin"], tmp_path, env=cluster.env, timeout=600)
    assert twin.returncode == 0, twin.stderr[-3000:]
    runs = cluster.runs("requeue")
    again = {r.data.tags["tricks"]: r for r in runs if r.data.tags[ROLE] == JOB}
    plain = {r.data.tags["tricks"]: r for r in cluster.runs("requeue-twin") if r.data.tags[ROLE] == JOB}
    assert [r.info.status for r in runs if r.data.tags[ROLE] == SWEEP] == ["FINISHED"]
    for t in ("flip", "noise"):
        assert again[t].info.run_id == run[t].info.run_id and again[t].info.status == "FINISHED"
        assert again[t].data.tags["slurm_job"] == job[t] and again[t].data.tags["pid"] != run[t].data.tags["pid"]
        for key in ("val_acc", "train_loss"):
            assert [m.step for m in client.get_metric_history(again[t].info.run_id, key)] == list(range(1, 9)), key
            assert again[t].data.metrics[key] == plain[t].data.metrics[key], (t, key)


def test_a_sweep_runs_as_a_slurm_array_and_scancel_then_relaunch_resumes_skips_and_reports_it(cluster, tmp_path,
                                                                                               imagefolder):
    """A sweep as one SLURM array into the authenticated server, each job's trained net logged as a model through
    it. scancel of a running job: its run KILLED with the reason, the sweep FAILED. The same command again skips
    the finished job, resumes the cancelled one from its checkpoint, nests it under the new sweep, and the new
    sweep's report holds both configurations. The password is nowhere MLflow or Hydra keep things."""
    args = ["trick=[],[flip]", "seed=0", *job_args(tmp_path, imagefolder("tar", per_class=200), cluster, "cancel"),
            *SLOW, *SLURM, "mlflow.log_model=true"]
    proc = launch(args, tmp_path, cluster.env)
    run = wait_until("epoch 2 of [flip]", lambda: job_at_epoch(cluster, "cancel", "flip", 2))
    subprocess.run(["scancel", run.data.tags["slurm_job"]], env={**os.environ, **cluster.env}, check=True)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode != 0, out[-3000:]
    runs = cluster.runs("cancel")
    (first,) = [r for r in runs if r.data.tags[ROLE] == SWEEP]
    jobs = {r.data.tags["tricks"]: r for r in runs if r.data.tags[ROLE] == JOB}
    assert first.info.status == "FAILED" and "jobs:" in first.data.tags["failure_reason"]
    assert jobs["flip"].info.status == "KILLED" and "Terminated" in jobs["flip"].data.tags["failure_reason"]
    assert jobs["baseline"].info.status == "FINISHED"
    array = {r.data.tags["slurm_job"].split("_")[0] for r in jobs.values()}  # one array, a task per job
    assert len(array) == 1 and sorted(r.data.tags["slurm_job"].split("_")[1] for r in jobs.values()) == ["0", "1"]

    again = run_cli(["-m", *args], tmp_path, env=cluster.env, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    runs = cluster.runs("cancel")
    (second,) = [r for r in runs if r.data.tags[ROLE] == SWEEP and r.info.run_id != first.info.run_id]
    jobs = {r.data.tags["tricks"]: r for r in runs if r.data.tags[ROLE] == JOB}
    assert second.info.status == "FINISHED" and len(jobs) == 2
    base, flip = jobs["baseline"], jobs["flip"]
    # the finished job was skipped (trained by the first sweep), yet belongs to the second
    assert base.data.tags["sweep_id"] == first.info.run_id and base.data.tags[f"{MEMBER}{second.info.run_id}"] == "1"
    assert flip.info.run_id == run.info.run_id and flip.info.status == "FINISHED"
    assert flip.data.tags["mlflow.parentRunId"] == second.info.run_id  # the UI nests it under the new sweep
    client = cluster.client()
    assert [m.step for m in client.get_metric_history(flip.info.run_id, "val_acc")] == list(range(1, 9))
    assert report_main(["--tracking-uri", cluster.uri, "--experiment", "cancel", "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "ladder.md").read_text()
    assert "| 0 | baseline | 1 |" in text and "| 1 | flip | 1 |" in text and "Missing" not in text

    # each job's trained net went through the server into PostgreSQL and its artifact store, as a model: the
    # baseline's by the first sweep, the resumed flip's by the second
    models = client.search_logged_models([second.info.experiment_id])
    assert sorted(m.source_run_id for m in models) == sorted(r.info.run_id for r in jobs.values())
    assert all(m.status == LoggedModelStatus.READY for m in models)
    # the password is nowhere MLflow or Hydra keep things: params, tags, saved configs, job folders, the models
    for r in runs:
        assert cluster.password not in str(r.data.params) + str(r.data.tags)
    files = [*tmp_path.rglob("*"), *(cluster.root / "artifacts").rglob("*")]
    leaks = [p for p in files if p.is_file() and cluster.password.encode() in p.read_bytes()]
    assert len(list((cluster.root / "artifacts").rglob("model.pt2"))) >= 2 and not leaks


def test_sixteen_concurrent_jobs_write_through_the_server_and_nothing_is_lost(cluster, tmp_path, imagefolder):
    """16 job processes at once (hydra/launcher=parallel on this node) through the authenticated,
    PostgreSQL-backed server: every run, metric value and artifact arrives."""
    seeds = ",".join(str(s) for s in range(16))
    res = run_cli(["-m", f"seed={seeds}", "hydra/launcher=parallel", "jobs_per_device=16",
                   *job_args(tmp_path, imagefolder("tar", per_class=40), cluster, "sixteen"), "train.epochs=1"],
                  tmp_path, env=cluster.env, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    count(cluster.client(), cluster.runs("sixteen"))


def count(client: MlflowClient, runs: list) -> None:
    """Every job's run, metric values and artifacts, counted."""
    jobs = [r for r in runs if r.data.tags[ROLE] == JOB]
    assert sorted(int(r.data.tags["seed"]) for r in jobs) == list(range(16))
    assert len({r.data.tags["pid"] for r in jobs}) == 16  # sixteen processes, each its own writer
    counted = {"runs": 0, "metric values": 0, "artifacts": 0}
    for r in jobs:
        assert r.info.status == "FINISHED"
        counted["runs"] += 1
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_second"):
            steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
            assert steps == [1], (r.data.tags["seed"], key, steps)
            counted["metric values"] += len(steps)
        names = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "checkpoint"} <= names, names
        counted["artifacts"] += len(names)
    assert counted == {"runs": 16, "metric values": 16 * 7, "artifacts": 16 * 2}
    print(f"16 concurrent writers through the server: {counted}")
