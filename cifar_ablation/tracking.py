"""MLflow bookkeeping shared by every process: the store and experiment (made once, before jobs start), who owns
a run, and which job runs belong to a sweep. The sweep's parent run is sweep.py's; one job's own run, jobrun.py's.

Everything goes through a Client (an MlflowClient) with explicit run ids, so concurrent jobs and the in-process
basic launcher never share fluent "active run" state.
"""
from __future__ import annotations

import functools
import inspect
import os
import re
import socket
from pathlib import Path
from typing import Any, Callable

import mlflow
from filelock import FileLock
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from .checks import UserError, check_tracking_uri
from .interrupts import held

PARENT_ENV = "CIFAR_ABLATION_SWEEP_RUN"   # the sweep's parent run id, inherited by every job process
ROLE, SWEEP, JOB, REPORT = "cifar_ablation.role", "sweep", "job", "report"
# A job run belongs to every sweep that created, resumed or reused it (skipped as already FINISHED): each of
# those sweeps tags it f"{MEMBER}<sweep id>" = "1". Its sweep_id tag names the sweep that trained it last.
MEMBER = "in_sweep."
# MLflow 3 UIs open an experiment in the view its kind names: model training, not the GenAI view.
KIND = {"mlflow.experimentKind": "custom_model_development"}


class Client(MlflowClient):
    """MlflowClient whose every public call holds Ctrl-C, SIGTERM and SLURM's SIGUSR2 until it returns
    (interrupts.held): a stop comes between two calls to the store, never inside one, where it would leave a
    sqlite store locked and the run RUNNING. A call waits at most its own length: milliseconds, or the upload
    of a checkpoint (most of those are the background writer's, whose thread signals never reach)."""


def _holding(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with held():
            return fn(*args, **kwargs)
    return call


for _name, _fn in vars(MlflowClient).items():
    if inspect.isfunction(_fn) and not _name.startswith("_"):
        setattr(Client, _name, _holding(_fn))


def system_metrics(uri: str, run_id: str, resumed: bool) -> Any:
    """MLflow's system metrics monitor for a job run, started (a thread that logs the machine's CPU, memory,
    disk and network use and, through NVML, each NVIDIA GPU's utilization, memory and power as system/*
    metrics every 10 s, or MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL): its finish() stops it. A resumed run
    goes on from its last step. Every run of a process reports the same machine (a gang's too)."""
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start/stop lines, once per run
    monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, tracking_uri=uri)
    monitor.start()
    return monitor


def default_uri() -> str:
    """The store a reader (report, UI) opens by default: MLflow's own MLFLOW_TRACKING_URI where set, else the
    sqlite file the jobs write by default (conf/config.yaml's mlflow.tracking_uri says the same)."""
    return os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")


def sqlite_file(uri: str) -> Path | None:
    """The file of a sqlite:/// store; None for any other store (a server, a database)."""
    return Path(uri[len("sqlite:///"):]).expanduser() if uri.startswith("sqlite:///") else None


def client_for(uri: str) -> Client:
    """A client whose store is ready. A sqlite store is created (schema, migrations) under a file lock beside it:
    MLflow's own creation is not safe when several launchers start at once on a new store (it fails with
    'duplicate column name' or 'table ... already exists')."""
    db = sqlite_file(uri)
    if db is None:
        return Client(tracking_uri=uri)
    db.parent.mkdir(parents=True, exist_ok=True)  # a new store's folder (not every MLflow made it)
    with FileLock(db.with_name(db.name + ".lock")):
        try:  # the store's creation or upgrade happens here, one process at a time
            client = Client(tracking_uri=uri)
            client.search_experiments(max_results=1)
        except MlflowException as e:
            raise newer_store(db, e) from None
    return client


def newer_store(db: Path, e: MlflowException) -> Exception:
    """What to say when MLflow cannot open a sqlite store's schema. MLflow upgrades a store an older MLflow wrote
    as it opens it; a store a newer one wrote (the published stores: MLflow 3.17) stops it with "run 'mlflow db
    upgrade'", which cannot help: this MLflow knows no newer schema. Any other error is returned as it was."""
    found = re.search(r"out-of-date database schema \(found version (\w+)", str(e))
    if not found:
        return e
    return UserError(f"the store {db} was written by a newer MLflow than this one ({mlflow.__version__}): its schema "
                     f"({found[1]}) is unknown here. Upgrade MLflow where you read it: pip install -U mlflow")


def reader(uri: str) -> MlflowClient:
    """A client for a reader (report, UI); UserError, saying why, where the sqlite file it names does not exist
    (reading must not create an empty store) or holds a store this MLflow cannot read (check_tracking_uri too)."""
    check_tracking_uri(uri, "--tracking-uri")
    db = sqlite_file(uri)
    if db is not None and not db.exists():
        raise UserError(f"no MLflow store at {db.resolve()} (--tracking-uri {uri}): run a sweep first (make demo), "
                        "or point --tracking-uri at the store it wrote")
    return client_for(uri)


def check_active(exp, uri: str, key: str) -> None:
    """UserError for an experiment deleted in the MLflow UI (or `mlflow experiments delete`): MLflow keeps its name
    until `mlflow gc` and refuses runs in it, and its runs are deleted with it. `key`: where its name was given."""
    if exp.lifecycle_stage == "deleted":
        raise UserError(f"the experiment {exp.name!r} (id {exp.experiment_id}) in {uri} was deleted (the MLflow UI's "
                        f"Delete, or `mlflow experiments delete`): restore it with `mlflow experiments restore "
                        f"--experiment-id {exp.experiment_id}` (MLFLOW_TRACKING_URI={uri}), or choose another {key}")


def experiment_id(client: MlflowClient, experiment: str) -> str:
    """A reader's experiment (report, UI): its id; LookupError naming what the store has instead, UserError where
    it was deleted (check_active)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise LookupError(f"no experiment {experiment!r} in this store; it has: {', '.join(names) or 'none'}")
    check_active(exp, client.tracking_uri, "--experiment")
    return exp.experiment_id


def open_experiment(cfg: DictConfig) -> tuple[MlflowClient, str]:
    """Create the store's schema and the experiment if needed; return the experiment id. Call it once in the
    launching process (SweepTracking does) before jobs start: sqlite stores created by racing processes
    break, and racing set_experiment calls can misfile runs. Artifacts go to ./mlruns/<experiment id>."""
    client = client_for(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is None:
        try:
            return client, client.create_experiment(cfg.mlflow.experiment, tags=KIND)
        except MlflowException:  # another launcher made it first
            exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    check_active(exp, cfg.mlflow.tracking_uri, "mlflow.experiment")
    for k, v in KIND.items():
        if k not in exp.tags:  # an experiment made before this tag, or by hand
            client.set_experiment_tag(exp.experiment_id, k, v)
    return client, exp.experiment_id


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
    if "SLURM_JOB_ID" in os.environ:  # as scontrol and scancel take it: ARRAYID_TASK for an array's task
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        tags["slurm_job"] = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{task}" if task else os.environ["SLURM_JOB_ID"]
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
