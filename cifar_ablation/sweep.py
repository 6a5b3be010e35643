"""The sweep's parent run, kept by the launching process (a Hydra callback): opened before any job starts, once
every job's config has passed the checks (check_jobs), every job nests under it; progress lines while jobs end
(progress.py); closed with the sweep's true state and holding the sweep's report, so that clicking the sweep in
the MLflow UI shows the ablation:

    description   the report's table (Markdown): each configuration's val accuracy, Δ, CI and verdict
    artifacts     report/<design>.md, .csv and the figures (also under the sweep's folder, multirun/…/report)
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .checks import ConfigError, UserError
from .config import validate
from .factorial import check_factorial, plan
from .identity import table_params
from .interrupts import held
from .job import user_errors

# MLflow (tracking.py, progress.py) is imported where the store is first opened, after the config is checked: Hydra
# makes this callback as it starts, and a bad value then stops the command a second sooner (2.3 s, not 4.0)
if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from .progress import Progress

log = logging.getLogger("cifar_ablation.sweep")
WAIT_POLL_S = 5.0  # how often a sweep at its end looks whether the runs another process trains for it ended
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# launchers whose jobs run on this machine: another (SLURM's, through submitit) may train them where there is a
# GPU and this machine, a login node, has none
HERE = {"hydra._internal.core_plugins.basic_launcher.BasicLauncher",
        "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
        "hydra_plugins.cifar_ablation_launcher.streams_launcher.StreamsLauncher"}


def runs_here(config: DictConfig) -> bool:
    """Whether the sweep's launcher runs its jobs on this machine."""
    return config.hydra.launcher.get("_target_") in HERE


def check_chdir(config: DictConfig) -> None:
    """hydra.job.chdir=true would move each job into its output folder, away from the launch directory that the
    config's relative paths (data.path, data.root, data.cache_dir, the default sqlite store) mean: refused."""
    if config.hydra.job.chdir:
        raise ConfigError("hydra.job.chdir", True, "false: the config's relative paths (data.path, data.root, "
                          "data.cache_dir, a sqlite tracking URI) mean the launch directory, which each job would leave")


def valid(config: DictConfig, here: bool = True) -> bool:
    """Whether the config passes validate(). Hydra turns a callback's exception into a warning and goes on, so
    the callback only skips its work; the job validates again and stops with the error."""
    try:
        validate(config, here)
    except UserError:
        return False
    return True


def job_overrides(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides, as Hydra's basic sweeper makes them from its params and the command line's sweeps
    (glob() included), in its order; None for another sweeper."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hc = config.hydra
    if hc.sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    params = [f"{k}={v}" for k, v in (hc.sweeper.get("params") or {}).items()] + list(hc.overrides.task)
    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    overrides = OverridesParser.create(config_loader=loader).parse_overrides(params)
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def check_jobs(config: DictConfig, jobs: list[list[str]]) -> None:
    """Every job's config, composed as its launcher will compose it, passes the checks before any job starts: a
    bad value in a sweep's last job stops the sweep before its first trains. UserError naming the job and what
    the sweep varies in it. Jobs another machine will run are not asked for this one's CUDA device or files.
    Hydra composes each job from the files as its launcher will (dev CPU: 2.2 s for the ladder's 27, 15 s for a
    6-trick factorial's 192): seconds at the start of a sweep that trains for hours, whose jobs each pay it again."""
    from hydra.core.global_hydra import GlobalHydra

    from .config import apply_trick_params

    loader, here = GlobalHydra.instance().config_loader(), runs_here(config)
    values: dict[str, set[str]] = {}
    for job in jobs:
        for o in job:
            values.setdefault(o.partition("=")[0], set()).add(o.partition("=")[2])
    if len(jobs) >= 20:
        log.info("checking the configs of the sweep's %d jobs before any starts", len(jobs))
    for k, job in enumerate(jobs, 1):
        try:
            cfg = loader.load_sweep_config(config, job)  # Hydra's own errors too: a group option no file has
            apply_trick_params(cfg)
            validate(cfg, here)
        except (UserError, HydraException) as e:
            text = re.sub(r":\s*\n\s*", ": ", str(e).split("Config search path")[0].strip())  # Hydra's lines as one
            text = re.sub(r"\s*\n\s*", "; ", re.sub(r"\n\s*\t", ", ", text))
            swept = " ".join(o for o in job if len(values[o.partition("=")[0]]) > 1)
            raise UserError(f"{text} (job {k} of {len(jobs)}{': ' + swept if swept else ''}; no job was started)") from e


class SweepTracking(Callback):
    """Prepares the store before any job starts; for a multirun, opens the parent run, prints progress, and
    closes the parent with the sweep's true state and its report."""

    def __init__(self) -> None:
        self.client: MlflowClient | None = None
        self.parent: str | None = None
        self.progress: Progress | None = None
        self.folder = Path(".")

    def __getstate__(self) -> dict:
        """Launchers pickle their callbacks into each job process (joblib, submitit): there, this is inert."""
        return {"client": None, "parent": None, "progress": None, "folder": self.folder}

    # A UserError leaves a callback as SystemExit (user_errors): Hydra makes any Exception of a callback a warning.
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with user_errors():
            check_chdir(config)
        if valid(config):
            from .tracking import open_experiment

            with user_errors():  # a store this MLflow cannot open
                open_experiment(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with user_errors():
            check_chdir(config)
            if config.ablation.design == "factorial":  # before Hydra's sweeper composes every one of its 2**k jobs
                check_factorial(list(config.ablation.order), config.ablation.fraction)
        try:
            jobs = job_overrides(config)
        except Exception as e:  # an override Hydra will refuse itself, a plugin's sweeper config
            log.debug("could not list the sweep's jobs: %s", e)
            jobs = None
        if jobs is not None:  # the sweep's own config leaves a swept key at its default, which the jobs replace
            with user_errors():
                check_jobs(config, jobs)
        elif not valid(config, runs_here(config)):  # no store, no parent run: the first job reports the error
            return
        from mlflow.entities import Param

        from .progress import Progress
        from .tracking import PARENT_ENV, ROLE, SWEEP, open_experiment

        with user_errors():
            self.client, exp_id = open_experiment(config)
        name = f"sweep {config.ablation.design} {time.strftime('%Y-%m-%d %H:%M:%S')}"
        run = self.client.create_run(exp_id, run_name=name, tags={ROLE: SWEEP, "design": config.ablation.design})
        self.parent = run.info.run_id
        self.client.set_tag(self.parent, "sweep_id", self.parent)
        params = table_params(OmegaConf.to_container(config.ablation, resolve=True))  # its table's (tables.settings)
        self.client.log_batch(self.parent, params=[Param(k, v) for k, v in params.items()])
        self.folder = Path(config.hydra.sweep.dir)
        if config.ablation.design == "factorial":  # what the design confounds, before anything trains
            text = plan(list(config.ablation.order), config.ablation.fraction).describe()
            log.info("factorial design: %s", text)
            self.client.log_text(self.parent, text + "\n", "factorial_design.txt")
            self.client.set_tag(self.parent, "factorial_design", text.splitlines()[0])
        total = len(jobs) if jobs else None
        if total:
            self.client.set_tag(self.parent, "jobs", str(total))
        self.progress = Progress(self.client, exp_id, self.parent, total)
        os.environ[PARENT_ENV] = self.parent
        atexit.register(self.close, interrupted=True)
        if threading.current_thread() is threading.main_thread():  # SIGTERM exits through atexit, not around it
            signal.signal(signal.SIGTERM, _exit_on_sigterm)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self.progress is not None:  # the basic launcher's jobs end in this process: no need to wait a poll
            self.progress.poll()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent is None:
            return
        try:
            self._wait_for_others(self.parent)
        except BaseException:  # a Ctrl-C or SIGTERM while it waits: the sweep ends as stopped
            self.close(interrupted=True)
            raise
        parent, text = self.parent, self.close()
        if text:  # no job raised, yet some run did not finish: one another sweep was training for it
            raise SystemExit(f"error: sweep {parent} FAILED: some jobs did not finish ({text}); the same command "
                             "again resumes or retrains them")

    def close(self, interrupted: bool = False) -> str:
        """FINISHED when every job finished; FAILED (interrupted or some job did not finish) otherwise: then the
        job states as text. A Ctrl-C or SIGTERM that comes meanwhile waits until the sweep run is closed (it would
        leave it RUNNING)."""
        if self.parent is None:
            return ""
        with held():
            return self._close(interrupted)

    def _wait_for_others(self, parent: str) -> None:
        """Until no run of the sweep is RUNNING in a live process: at its end, such a run is one another process
        was training when a job of this sweep reached its config (job.reused), and the sweep's state and report
        hold it once it ends. Ctrl-C stops the wait."""
        from .tracking import process_alive, sweep_jobs

        exp_id, said = self.client.get_run(parent).info.experiment_id, False
        while live := [r.info.run_id for r in sweep_jobs(self.client, exp_id, parent)
                       if r.info.status == "RUNNING" and process_alive(r)]:
            if not said:
                log.info("waiting for %d run(s) another process is training for this sweep (%s); Ctrl-C stops "
                         "waiting, and the sweep ends FAILED with them listed (should that process be gone, "
                         "force=true trains them anew)", len(live), ", ".join(live))
                said = True
            time.sleep(WAIT_POLL_S)

    def _close(self, interrupted: bool) -> str:
        from .tracking import PARENT_ENV

        parent, self.parent = self.parent, None
        os.environ.pop(PARENT_ENV, None)
        states = self._settle(parent)
        if self.progress is not None:
            self.progress.stop()
        ok = not interrupted and set(states) <= {"FINISHED"}
        text = ", ".join(f"{k}: {v}" for k, v in sorted(states.items())) or "none"
        self.client.set_tag(parent, "job_states", text)
        if not ok:
            self.client.set_tag(parent, "failure_reason", "the sweep ended early: a job raised, or the launcher was "
                                f"stopped (jobs: {text})" if interrupted else f"some jobs did not finish: {text}")
        publish(self.client, parent, self.folder / "report", figures=not interrupted)
        self.client.set_terminated(parent, "FINISHED" if ok else "FAILED")
        log.info("sweep run %s %s (jobs: %s)", parent, "FINISHED" if ok else "FAILED", text)
        return "" if ok else text

    def _settle(self, parent: str) -> dict[str, int]:
        """The sweep's job states; a RUNNING job whose process is dead (SIGKILL, OOM) is closed KILLED."""
        from .tracking import process_alive, sweep_jobs

        exp_id = self.client.get_run(parent).info.experiment_id
        counts: dict[str, int] = {}
        for r in sweep_jobs(self.client, exp_id, parent):
            status = r.info.status
            if status == "RUNNING" and not process_alive(r):
                status = "KILLED"
                self.client.set_tag(r.info.run_id, "failure_reason", "its process died without closing the run "
                                    "(SIGKILL or out of memory); launch the same command again to resume it")
                self.client.set_terminated(r.info.run_id, status)
            counts[status] = counts.get(status, 0) + 1
        return counts


def publish(client: MlflowClient, parent: str, out: Path, figures: bool = True) -> None:
    """The sweep's report onto its parent run: the table as its description, the files as artifacts. (Its
    numbers are not logged as metrics: the UI's charts would mix them with the jobs' curves.) A report that
    cannot be made never keeps the sweep open."""
    from .report import more_seeds_elsewhere, render, write_files
    from .tables import build_table
    from .tracking import sweep_jobs

    try:
        sweep = client.get_run(parent)
        runs = sweep_jobs(client, sweep.info.experiment_id, parent)
        if not runs:
            return
        table = build_table(runs, sweep=sweep)
        table.notes += more_seeds_elsewhere(client, sweep.info.experiment_id, table)
        text = render(table, f"{table.design.name} — sweep {parent} ({len(runs)} runs)")
        files = write_files(client, table, text, out, figures)
        client.set_tag(parent, "mlflow.note.content", text)
        for f in files:
            client.log_artifact(parent, str(f), "report")
        log.info("sweep report: %s (also on the sweep's run in MLflow)", out / f"{table.design.name}.md")
    except Exception as e:  # noqa: BLE001 — the sweep's state matters more than its report
        log.warning("could not write the sweep's report: %s: %s", type(e).__name__, e)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """The launcher's SIGTERM: exit with 128 + 15 through the atexit hook that closes the sweep run (FAILED, its
    dead jobs KILLED), where the default action would leave it RUNNING. A job in progress in this very process
    (Hydra's basic launcher) has its own handler meanwhile: it ends KILLED first."""
    raise SystemExit(128 + signum)
