"""hydra/launcher=streams: a sweep's jobs trained `runs` at a time inside the launching process, each on its own
CUDA stream (the engine: cifar_ablation/streams.py). Hydra finds launchers only in the hydra_plugins package,
hence this file; it is light to import (Hydra imports every plugin to list them).

It runs cifar-ablation's jobs (cifar_ablation.job.job_steps, the generator form of the app's task), not an
arbitrary task function. Each job is started as Hydra's basic launcher starts one (run_job: its output folder,
saved config, log file, callbacks), except that the task only primes it: sets it up and opens its MLflow run.
Hydra's on_job_end callbacks therefore see a job at that point; the JobReturn the sweeper reads is completed
when the job ends.

With `processes` > 1 the jobs are split into that many consecutive shares, each trained as a gang in a process
of its own (spawned; cifar_ablation/gangs.py): one gang took ~750–880 training steps/s on an H100 however many
runs it held (experiments/slide_ladder/NOTES.md); several gangs have several launching threads.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path
from typing import Any, Sequence

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


class StreamsLauncher(Launcher):
    def __init__(self, runs: int = 9, processes: int = 1) -> None:
        # SystemExit, the app's one `error:` line: Hydra would wrap an exception in its instantiation error
        if int(runs) < 1:
            raise SystemExit(f"error: invalid config: hydra.launcher.runs={runs} is not allowed (by default "
                             "jobs_per_device per GPU); the runs trained at once must be an integer >= 1")
        if int(processes) < 1:
            raise SystemExit(f"error: invalid config: hydra.launcher.processes={processes} is not allowed; the "
                             "processes the runs are shared among must be an integer >= 1 (1: all in the "
                             "launching process)")
        self.runs, self.processes = int(runs), int(processes)
        self.config: DictConfig | None = None
        self.hydra_context: Any = None
        self.task_function: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if self.processes > 1 and len(job_overrides) > 1:
            from cifar_ablation.gangs import launch_in_processes

            return launch_in_processes(self, job_overrides, initial_job_idx)
        return self.launch_here(job_overrides, initial_job_idx)

    def launch_here(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """The jobs as one gang in this process, `runs` at a time; their JobReturns once every one has ended."""
        from cifar_ablation.interrupts import sigterm_interrupts
        from cifar_ablation.streams import Gang

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs in this process, {self.runs} at a time on their own streams")
        returns: list[JobReturn | None] = [None] * len(job_overrides)
        pending, gang = deque(enumerate(job_overrides)), Gang()
        with sigterm_interrupts():
            try:
                said = time.monotonic()
                while pending or gang.members:
                    if pending and len(gang.members) < self.runs:  # one job joins per round: the others' steps
                        i, overrides = pending.popleft()             # keep the GPU busy while it sets up
                        returns[i] = self._start(initial_job_idx + i, overrides, gang)
                    gang.round()
                    if time.monotonic() - said > 60:
                        said = time.monotonic()
                        log.info(f"streams: {len(gang.members)} runs training, {len(pending)} waiting; {gang.pace()}")
            except BaseException as e:
                gang.stop(e)
                raise
            finally:
                log.info(f"streams: {gang.pace()}")
        return returns

    def _start(self, num: int, overrides: Sequence[str], gang: Any) -> JobReturn:
        """Hydra's run_job for job `num`, its task priming the job into the gang; the JobReturn is final when
        the job ends (at once for a skipped config or one that fails to start)."""
        from cifar_ablation.job import job_steps, user_errors
        from cifar_ablation.streams import Member

        log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config):
            config.hydra.job.id = num
            config.hydra.job.num = num
        holder: dict[str, JobReturn] = {}

        def on_end(value: Any, error: BaseException | None) -> None:
            ret = holder["ret"]
            ret.status, ret.return_value = (JobStatus.COMPLETED, value) if error is None else (JobStatus.FAILED, error)

        def prime(cfg: DictConfig) -> Any:
            with user_errors():
                member, value = Member.prime(num, job_steps(cfg), on_end, own_logs=True)
            gang.add(member)
            return value  # a skipped config's val_acc; a member's is set by on_end

        holder["ret"] = ret = run_job(hydra_context=self.hydra_context, task_function=prime, config=config,
                                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret
