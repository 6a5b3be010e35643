"""MLflow bookkeeping: the store and experiment (made once, before jobs start), one run per Hydra job,
a parent run per sweep, and true end states (FINISHED, FAILED with the reason, KILLED) on every path.

Everything goes through MlflowClient with explicit run ids, so concurrent jobs and the in-process basic
launcher never share fluent "active run" state.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from hydra.experimental.callback import Callback
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from .config import rung, semantic_hash, validate

log = logging.getLogger(__name__)
PARENT_ENV = "CIFAR_ABLATION_SWEEP_RUN"   # the sweep's parent run id, inherited by every job process
ROLE, SWEEP, JOB, REPORT = "cifar_ablation.role", "sweep", "job", "report"


class Terminated(BaseException):
    """SIGTERM, turned into an exception so the run is closed as KILLED (like KeyboardInterrupt for SIGINT)."""


def client_for(uri: str) -> MlflowClient:
    if uri.startswith("sqlite:///"):  # MLflow 3.17 makes the folder itself; older releases in our range may not
        Path(uri[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def open_experiment(cfg: DictConfig) -> tuple[MlflowClient, str]:
    """Create the store's schema and the experiment if needed; return the experiment id. Call it once in the
    launching process (SweepTracking does) before jobs start: sqlite stores created by racing processes
    break, and racing set_experiment calls can misfile runs. Artifacts go to ./mlruns/<experiment id>."""
    client = client_for(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is not None:
        return client, exp.experiment_id
    try:
        return client, client.create_experiment(cfg.mlflow.experiment)
    except MlflowException:  # another launcher made it first
        return client, client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def flat_params(cfg: DictConfig) -> dict[str, str]:
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = str(node)[:6000]
    walk(plain, "")
    return out


class SweepTracking(Callback):
    """Hydra callback, run in the launching process: prepares the store before any job starts; for a
    multirun, opens a parent run that every job nests under, and closes it with the sweep's true state."""

    def __init__(self) -> None:
        self.client: MlflowClient | None = None
        self.parent: str | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        validate(config)
        open_experiment(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        validate(config)  # what every job shares fails once, before any job or parent run exists
        self.client, exp_id = open_experiment(config)
        name = f"sweep {config.ablation.design} {time.strftime('%Y-%m-%d %H:%M:%S')}"
        run = self.client.create_run(exp_id, run_name=name, tags={ROLE: SWEEP, "design": config.ablation.design})
        self.parent = run.info.run_id
        self.client.set_tag(self.parent, "sweep_id", self.parent)
        os.environ[PARENT_ENV] = self.parent
        atexit.register(self.close, interrupted=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.close()

    def close(self, interrupted: bool = False) -> None:
        """FINISHED when every job finished; FAILED (interrupted or some job did not finish) otherwise."""
        if self.parent is None:
            return
        parent, self.parent = self.parent, None
        os.environ.pop(PARENT_ENV, None)
        exp_id = self.client.get_run(parent).info.experiment_id
        jobs = self.client.search_runs([exp_id], f"tags.sweep_id = '{parent}' and tags.`{ROLE}` = '{JOB}'")
        counts: dict[str, int] = {}
        for r in jobs:
            status = r.info.status
            if status == "RUNNING" and not process_alive(r):  # SIGKILL, OOM killer, a dead worker
                status = "KILLED"
                self.client.set_tag(r.info.run_id, "failure_reason", "its process died without closing the run "
                                    "(SIGKILL or out of memory); launch the same command again to resume it")
                self.client.set_terminated(r.info.run_id, status)
            counts[status] = counts.get(status, 0) + 1
        states = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none"
        self.client.set_tag(parent, "job_states", states)
        ok = not interrupted and set(counts) <= {"FINISHED"}
        if not ok:
            self.client.set_tag(parent, "failure_reason", "the sweep ended early: a job raised, or the launcher was "
                                f"stopped (jobs: {states})" if interrupted else f"some jobs did not finish: {states}")
        self.client.set_terminated(parent, "FINISHED" if ok else "FAILED")
        log.info("sweep run %s %s (jobs: %s)", parent, "FINISHED" if ok else "FAILED", states)


class JobRun:
    """The MLflow run of one Hydra job, with its checkpoint kept as run artifacts in two slots
    (checkpoint/a.pt, checkpoint/b.pt by epoch parity): a kill while one is written leaves the other whole."""

    def __init__(self, client: MlflowClient, run_id: str, resumed: bool = False):
        self.client, self.run_id, self.resumed = client, run_id, resumed

    def save_checkpoint(self, state: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / ("a.pt" if state["epoch"] % 2 else "b.pt")
            torch.save(state, path)
            self.client.log_artifact(self.run_id, str(path), "checkpoint")

    def load_checkpoint(self) -> dict | None:
        """The newest checkpoint slot that loads (weights_only: a checkpoint is data, never code)."""
        best = None
        with tempfile.TemporaryDirectory() as tmp:
            for a in self.client.list_artifacts(self.run_id, "checkpoint"):
                try:
                    state = torch.load(self.client.download_artifacts(self.run_id, a.path, tmp), weights_only=True)
                except Exception as e:  # half-written slot
                    log.warning("ignoring unreadable checkpoint %s: %s", a.path, e)
                    continue
                if best is None or state["epoch"] > best["epoch"]:
                    best = state
        return best

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def job_tags(cfg: DictConfig, tricks: list[str]) -> dict[str, str]:
    r = rung(tricks, cfg.ablation.order)
    return {ROLE: JOB, "tricks": ",".join(tricks) or "baseline", "rung": "-" if r is None else str(r),
            "trick_added": (tricks[-1] if tricks else "baseline") if r is not None else "-",
            "seed": str(cfg.seed), "design": cfg.ablation.design, "config_hash": semantic_hash(cfg),
            "git_commit": git_commit()}


def finished_run(client: MlflowClient, exp_id: str, config_hash: str):
    runs = client.search_runs([exp_id], f"tags.config_hash = '{config_hash}' and attributes.status = 'FINISHED'",
                              max_results=1)
    return runs[0] if runs else None


def owner() -> dict[str, str]:
    """Who runs a job: host and pid, and the SLURM job (a requeued SLURM job keeps its id on a new node)."""
    tags = {"host": socket.gethostname(), "pid": str(os.getpid())}
    if "SLURM_JOB_ID" in os.environ:
        job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
        tags["slurm_job"] = f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return tags


def process_alive(run) -> bool:
    """Whether the process that owns a RUNNING run is alive. Known for runs started on this host, and for an
    earlier incarnation of this very SLURM job (dead: we are its requeue); other hosts' runs count as alive."""
    tags, me = run.data.tags, owner()
    if "slurm_job" in me and tags.get("slurm_job") == me["slurm_job"]:
        return tags.get("pid") == me["pid"] and tags.get("host") == me["host"]
    if tags.get("host") != me["host"] or not tags.get("pid", "").isdigit():
        return True
    try:
        os.kill(int(tags["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def interrupted(run) -> bool:
    """KILLED, or RUNNING with its process gone: a run to resume."""
    return run.info.status == "KILLED" or (run.info.status == "RUNNING" and not process_alive(run))


class AlreadyRunning(RuntimeError):
    """Another live process is training this very config."""


@contextmanager
def job_run(cfg: DictConfig, tricks: list[str], client: MlflowClient, exp_id: str) -> Iterator[JobRun]:
    """Open the job's run (or resume its interrupted one); close it FINISHED, FAILED (reason tag +
    traceback artifact) or KILLED."""
    tags = job_tags(cfg, tricks)
    me = owner()
    earlier = client.search_runs([exp_id], f"tags.config_hash = '{tags['config_hash']}' and tags.`{ROLE}` = '{JOB}'",
                                 order_by=["attributes.start_time DESC"])
    old = next((r for r in earlier if interrupted(r)), None)  # the newest one
    live = [r for r in earlier if r.info.status == "RUNNING" and process_alive(r) and r.data.tags.get("pid") != me["pid"]]
    if live and not cfg.force:
        raise AlreadyRunning(f"config {tags['config_hash']} is being trained right now by another process "
                             f"(run {live[0].info.run_id}, pid {live[0].data.tags.get('pid')} on "
                             f"{live[0].data.tags.get('host')}); wait for it, or, if that process is gone, "
                             "start a new run with force=true")
    if old is not None:
        run_id = old.info.run_id
        client.update_run(run_id, status="RUNNING")
        log.info("resuming interrupted run %s (%s)", run_id, old.info.status)
    else:
        parent = os.environ.get(PARENT_ENV)
        if parent:
            tags["mlflow.parentRunId"] = parent
        run_id = client.create_run(exp_id, run_name=f"{tags['tricks']} s{cfg.seed}", tags=tags).info.run_id
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals to the host
        previous = None
    status = "FAILED"
    try:
        if old is None:
            client.set_tag(run_id, "sweep_id", os.environ.get(PARENT_ENV) or run_id)  # a single run: a sweep of one
            params = [Param(k, v) for k, v in flat_params(cfg).items()]
            for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
                client.log_batch(run_id, params=params[i:i + 100])
            client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        elif "failure_reason" in old.data.tags:
            client.delete_tag(run_id, "failure_reason")
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in me.items()])
        log.info("MLflow run %s in experiment %r (%s)", run_id, cfg.mlflow.experiment, cfg.mlflow.tracking_uri)
        yield JobRun(client, run_id, resumed=old is not None)
        status = "FINISHED"
    except (KeyboardInterrupt, Terminated) as e:
        status = "KILLED"
        client.set_tag(run_id, "failure_reason", f"{type(e).__name__}: interrupted by signal")
        raise
    except BaseException as e:
        client.set_tag(run_id, "failure_reason", f"{type(e).__name__}: {e}"[:5000])
        client.log_text(run_id, traceback.format_exc(), "traceback.txt")
        raise
    finally:
        client.set_terminated(run_id, status)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signum}")
