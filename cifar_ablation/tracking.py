"""MLflow bookkeeping shared by every process: the store and experiment (made once, before jobs start), who owns
a run, and the sweep's parent run, closed with the sweep's true state. One job's own run is jobrun.py.

Everything goes through MlflowClient with explicit run ids, so concurrent jobs and the in-process basic
launcher never share fluent "active run" state.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from .checks import UserError
from .config import validate
from .factorial import plan

log = logging.getLogger(__name__)
PARENT_ENV = "CIFAR_ABLATION_SWEEP_RUN"   # the sweep's parent run id, inherited by every job process
ROLE, SWEEP, JOB, REPORT = "cifar_ablation.role", "sweep", "job", "report"
# A job run belongs to every sweep that created, resumed or reused it (skipped as already FINISHED): each of
# those sweeps tags it f"{MEMBER}<sweep id>" = "1". Its sweep_id tag names the sweep that trained it last.
MEMBER = "in_sweep."


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


def sweep_jobs(client: MlflowClient, exp_id: str, sweep_id: str) -> list:
    """The job runs of one sweep, each once: those it trained, and those it resumed or reused. (Runs logged
    before membership tags existed are found by their sweep_id.)"""
    runs: dict[str, Any] = {}
    for which in (f"tags.sweep_id = '{sweep_id}'", f"tags.`{MEMBER}{sweep_id}` = '1'"):
        for r in client.search_runs([exp_id], f"tags.`{ROLE}` = '{JOB}' and {which}", max_results=50000):
            runs.setdefault(r.info.run_id, r)
    return list(runs.values())


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


def valid(config: DictConfig) -> bool:
    """Whether the config passes validate(). Hydra turns a callback's exception into a warning and goes on, so
    the callback only skips its work; the job validates again and stops with the error."""
    try:
        validate(config)
    except UserError:
        return False
    return True


class SweepTracking(Callback):
    """Hydra callback, run in the launching process: prepares the store before any job starts; for a
    multirun, opens a parent run that every job nests under, and closes it with the sweep's true state."""

    def __init__(self) -> None:
        self.client: MlflowClient | None = None
        self.parent: str | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if valid(config):
            open_experiment(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not valid(config):  # no store, no parent run: the first job reports the error
            return
        self.client, exp_id = open_experiment(config)
        name = f"sweep {config.ablation.design} {time.strftime('%Y-%m-%d %H:%M:%S')}"
        run = self.client.create_run(exp_id, run_name=name, tags={ROLE: SWEEP, "design": config.ablation.design})
        self.parent = run.info.run_id
        self.client.set_tag(self.parent, "sweep_id", self.parent)
        if config.ablation.design == "factorial":  # what the design confounds, before anything trains
            text = plan(list(config.ablation.order), config.ablation.fraction).describe()
            log.info("factorial design: %s", text)
            self.client.log_text(self.parent, text + "\n", "factorial_design.txt")
            self.client.set_tag(self.parent, "factorial_design", text.splitlines()[0])
        os.environ[PARENT_ENV] = self.parent
        atexit.register(self.close, interrupted=True)
        if threading.current_thread() is threading.main_thread():  # SIGTERM exits through atexit, not around it
            signal.signal(signal.SIGTERM, _exit_on_sigterm)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.close()

    def close(self, interrupted: bool = False) -> None:
        """FINISHED when every job finished; FAILED (interrupted or some job did not finish) otherwise."""
        if self.parent is None:
            return
        parent, self.parent = self.parent, None
        os.environ.pop(PARENT_ENV, None)
        exp_id = self.client.get_run(parent).info.experiment_id
        counts: dict[str, int] = {}
        for r in sweep_jobs(self.client, exp_id, parent):
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


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """The launcher's SIGTERM: exit with 128 + 15 through the atexit hook that closes the sweep run (FAILED, its
    dead jobs KILLED), where the default action would leave it RUNNING. A job in progress in this very process
    (Hydra's basic launcher) has its own handler meanwhile: it ends KILLED first."""
    raise SystemExit(128 + signum)
