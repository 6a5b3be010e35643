"""One Hydra job's MLflow run, and everything about resuming it, in one place.

    claim_run()   decides, from a config's earlier runs, whether this job skips (a FINISHED run holds the config),
                  is refused (a live process is training it), resumes an interrupted run, or creates a new one;
    job_run()     opens or reopens that run and closes it FINISHED, FAILED (reason + traceback) or KILLED;
    JobRun        is what training talks to: the state to start from, and the end of each epoch (checkpoint
                  first, then metrics, so a kill between the two still logs every epoch exactly once). Both are
                  written by one background thread from a CPU copy of the state, so that training (and the other
                  runs of a streams launcher) go on meanwhile; a run is closed only once its writes are in.
"""
from __future__ import annotations

import logging
import os
import queue
import subprocess
import tempfile
import threading
import time
import traceback
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from .designs import rung
from .identity import flat_params, hashes, semantic_hash
from .interrupts import Terminated, interruption, job_signals
from .tracking import JOB, MEMBER, PARENT_ENV, ROLE, owner, process_alive, system_metrics

log = logging.getLogger(__name__)
SKIP, REFUSE, RESUME, CREATE = "skip", "refuse", "resume", "create"


@dataclass(frozen=True)
class Claim:
    action: str        # SKIP | REFUSE | RESUME | CREATE
    run: Any = None    # the earlier run it acts on: the finished, the live or the interrupted one


def claim_run(earlier: list, me: dict[str, str], force: bool, alive: Callable[[Any], bool]) -> Claim:
    """What a job does, given its config's earlier job runs (newest first), who it is (owner()), force, and
    whether a RUNNING run's process is alive. force=true re-runs a finished config and ignores a live twin; an
    interrupted run (KILLED, or RUNNING with its process gone) is resumed either way, the newest first."""
    if not force:
        done = next((r for r in earlier if r.info.status == "FINISHED"), None)
        if done is not None:
            return Claim(SKIP, done)
        live = next((r for r in earlier if r.info.status == "RUNNING" and alive(r)
                     and r.data.tags.get("pid") != me["pid"]), None)
        if live is not None:
            return Claim(REFUSE, live)
    old = next((r for r in earlier if r.info.status == "KILLED" or (r.info.status == "RUNNING" and not alive(r))),
               None)
    return Claim(RESUME, old) if old is not None else Claim(CREATE)


def claim(cfg: DictConfig, client: MlflowClient, exp_id: str) -> Claim:
    """claim_run over this config's earlier runs in the store (those tagged with its hash as older versions
    computed it too: identity.hashes)."""
    found = {r.info.run_id: r for h in dict.fromkeys(hashes(cfg)) for r in client.search_runs(
        [exp_id], f"tags.config_hash = '{h}' and tags.`{ROLE}` = '{JOB}'", order_by=["attributes.start_time DESC"])}
    earlier = sorted(found.values(), key=lambda r: r.info.start_time, reverse=True)
    return claim_run(earlier, owner(), cfg.force, process_alive)


class JobRun:
    """The MLflow run of one Hydra job, with its checkpoint kept as run artifacts in two slots
    (checkpoint/a.pt, checkpoint/b.pt by epoch parity): a kill while one is written leaves the other whole."""

    def __init__(self, client: MlflowClient, run_id: str, resumed: bool = False, checkpoint: bool = True):
        self.client, self.run_id, self.resumed, self.checkpoint = client, run_id, resumed, checkpoint
        self.pending: Future | None = None  # the last epoch's writes, on WRITER

    def start_state(self) -> dict | None:
        """The checkpoint to resume from (None: start afresh). The kill may have come between a checkpoint
        and its metrics: those are logged here, so every epoch is logged exactly once."""
        state = self.load_checkpoint() if self.resumed else None
        if state is not None:
            if state["epoch"] not in self.logged_steps("val_acc"):
                self.log_metrics(state["metrics"], state["epoch"])
            log.info("resuming from the checkpoint of epoch %d", state["epoch"])
        return state

    def end_epoch(self, epoch: int, metrics: dict[str, float], state_fn: Callable[[], dict]) -> None:
        """train()'s on_epoch: the checkpoint first, then the metrics, written in the background from a copy
        taken now. One epoch's writes at most are pending: the previous ones are waited for (and their error
        raised) first."""
        state = to_cpu({**state_fn(), "metrics": metrics}) if self.checkpoint else None
        self.flush()
        self.pending = WRITER.submit(self._write, epoch, dict(metrics), state)

    def _write(self, epoch: int, metrics: dict[str, float], state: dict | None) -> None:
        if state is not None:
            self.save_checkpoint(state)
        self.log_metrics(metrics, epoch)

    def flush(self) -> None:
        """Wait for the pending writes; raise their error, if any."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

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


class Writer:
    """One daemon thread per process that runs the submitted writes in order. Daemon: a Ctrl-C landing while
    it starts (a ThreadPoolExecutor's worker is then unknown to its exit hook) must not keep the interpreter
    from exiting; every run flushes its writes before it closes (job_run), so none is lost at exit."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def submit(self, fn: Callable, *args: Any) -> Future:
        future: Future = Future()
        self.queue.put((future, fn, args))
        with self.lock:
            if self.thread is None or not self.thread.is_alive():  # first use, or a forked child
                self.thread = threading.Thread(target=self._run, name="mlflow-writer", daemon=True)
                self.thread.start()
        return future

    def _run(self) -> None:
        while True:
            future, fn, args = self.queue.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 — handed to whoever waits on the future
                    future.set_exception(e)


WRITER = Writer()


def to_cpu(obj: Any) -> Any:
    """A copy of a checkpoint state that training can no longer change: every tensor copied to the CPU, every
    dict, list and tuple rebuilt (other values are immutable, or replaced rather than changed by training)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


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


def job_tags(cfg: DictConfig, tricks: list[str]) -> dict[str, str]:
    r = rung(tricks, cfg.ablation.order)
    return {ROLE: JOB, "tricks": ",".join(tricks) or "baseline", "rung": "-" if r is None else str(r),
            "trick_added": (tricks[-1] if tricks else "baseline") if r is not None else "-",
            "seed": str(cfg.seed), "design": cfg.ablation.design, "config_hash": semantic_hash(cfg),
            "git_commit": git_commit()}


def join_sweep(client: MlflowClient, run_id: str, moved: bool) -> None:
    """Record that the sweep being launched (if any) uses this run. A run it resumes moves into it (sweep id and
    the UI's nesting); a FINISHED run it reuses as it is stays nested under the sweep that trained it."""
    parent = os.environ.get(PARENT_ENV)
    if parent:
        tags = {f"{MEMBER}{parent}": "1", **({"sweep_id": parent, "mlflow.parentRunId": parent} if moved else {})}
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def _bookkeeping(cfg: DictConfig, client: MlflowClient, run_id: str, old) -> None:
    """A new run gets its sweep id, params and resolved config; a resumed one joins the sweep resuming it and
    loses its old failure reason. Both get the owner tags of the process that runs them now."""
    join_sweep(client, run_id, moved=old is not None)
    if old is None:
        client.set_tag(run_id, "sweep_id", os.environ.get(PARENT_ENV) or run_id)  # a single run: a sweep of one
        params = [Param(k, v) for k, v in flat_params(cfg).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
            client.log_batch(run_id, params=params[i:i + 100])
        client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    elif "failure_reason" in old.data.tags:
        client.delete_tag(run_id, "failure_reason")
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in owner().items()])


@contextmanager
def job_run(cfg: DictConfig, tricks: list[str], client: MlflowClient, exp_id: str, c: Claim) -> Iterator[JobRun]:
    """Open the job's run as claimed (reopen the interrupted run, or create one nested under the sweep); close
    it FINISHED, FAILED (reason tag + traceback artifact) or KILLED (SIGINT, SIGTERM as Terminated, or an exit
    asked of the process: submitit's after SLURM's SIGUSR2; interrupts.py), which the next launch resumes.
    Everything after the run exists happens inside the try, and a stop asked while it is opened waits for the
    try (signals held): no path leaves it RUNNING."""
    old = c.run if c.action == RESUME else None
    status, monitor = "FAILED", None
    with job_signals() as signals:
        signals.hold()
        if old is not None:
            run_id = old.info.run_id
            client.update_run(run_id, status="RUNNING")
            log.info("resuming interrupted run %s (%s)", run_id, old.info.status)
        else:
            tags, parent = job_tags(cfg, tricks), os.environ.get(PARENT_ENV)
            if parent:
                tags["mlflow.parentRunId"] = parent
            run_id = client.create_run(exp_id, run_name=f"{tags['tricks']} seed={cfg.seed}", tags=tags).info.run_id
        run = JobRun(client, run_id, resumed=old is not None, checkpoint=cfg.train.checkpoint)
        try:
            signals.release()  # what came while the run was opened is raised here: the run closes KILLED
            _bookkeeping(cfg, client, run_id, old)
            if cfg.mlflow.log_system_metrics:
                monitor = system_metrics(cfg.mlflow.tracking_uri, run_id, resumed=old is not None)
            log.info("MLflow run %s in experiment %r (%s)", run_id, cfg.mlflow.experiment, cfg.mlflow.tracking_uri)
            yield run
            signals.hold()  # closing: no signal cuts it short
            run.flush()  # the last checkpoint and metrics are in the store before the run says FINISHED
            status = "FINISHED"
        except BaseException as e:
            signals.hold()
            if isinstance(e, (KeyboardInterrupt, Terminated, SystemExit)):  # asked to stop: resumable
                status = "KILLED"
                client.set_tag(run_id, "failure_reason", interruption(e, signals.seen))
            else:
                client.set_tag(run_id, "failure_reason", f"{type(e).__name__}: {e}"[:5000])
                client.log_text(run_id, traceback.format_exc(), "traceback.txt")
            raise
        finally:
            if monitor is not None:
                monitor.finish()  # its last sample in the store while the run is open
            if status != "FINISHED":  # the last finished epoch's checkpoint still lands: a relaunch resumes from it
                try:
                    run.flush()
                except Exception as e:  # noqa: BLE001 — the run's own failure is the one to report
                    log.warning("run %s: its last writes failed too: %s: %s", run_id, type(e).__name__, e)
            client.set_terminated(run_id, status)
