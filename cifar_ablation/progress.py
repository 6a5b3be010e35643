"""Sweep progress, printed by the launching process: after each job, one line with job k of N, the states so
far and an ETA. It reads the sweep's job runs from MLflow, so it sees every launcher alike (in-process,
parallel processes, SLURM jobs on other nodes).

    sweep 1f3c…: job 3 of 8 done (FINISHED 2, skipped 1; running 2); ETA 1 min 40 s

N is the number of jobs Hydra's basic sweeper will launch (sweep.job_overrides); another sweeper leaves it unknown.
The ETA is the jobs left times the sweep's pace so far: the time since the sweep began over the jobs it
trained (a skipped job, already FINISHED in an earlier sweep, takes no time). With parallel jobs that pace is
already per job slot, so the ETA needs no worker count.
"""
from __future__ import annotations

import logging
import threading
import time

from .tracking import sweep_jobs

log = logging.getLogger("cifar_ablation.sweep")
DONE = ("FINISHED", "FAILED", "KILLED")


def duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m // 60} h {m % 60} min" if m >= 60 else f"{m} min {s} s" if m else f"{s} s"


def line(runs: list, sweep_id: str, total: int | None, elapsed: float) -> str:
    """One progress line from the sweep's job runs."""
    done = [r for r in runs if r.info.status in DONE]
    counts: dict[str, int] = {}
    for r in done:  # a job another sweep trained was skipped here
        state = "skipped" if r.data.tags.get("sweep_id") != sweep_id else r.info.status
        counts[state] = counts.get(state, 0) + 1
    states = ", ".join(f"{k} {v}" for k, v in counts.items())
    running = len(runs) - len(done)
    text = f"sweep {sweep_id[:6]}…: job {len(done)}{f' of {total}' if total else ''} done ({states}"
    text += f"; running {running})" if running else ")"
    trained = len(done) - counts.get("skipped", 0)
    if total and trained and total > len(done):
        text += f"; ETA {duration((total - len(done)) * elapsed / trained)}"
    return text


class Progress:
    """Polls the sweep's runs in a daemon thread; prints a line whenever the finished jobs' states change. poll()
    may also be called directly (after an in-process job, at the sweep's end)."""

    def __init__(self, client, exp_id: str, sweep_id: str, total: int | None, every_s: float = 3.0) -> None:
        self.client, self.exp_id, self.sweep_id, self.total = client, exp_id, sweep_id, total
        self.start, self.reported, self.every_s = time.monotonic(), [], every_s
        self.lock, self.stopped = threading.Lock(), threading.Event()
        threading.Thread(target=self._loop, name="sweep-progress", daemon=True).start()

    def _loop(self) -> None:
        while not self.stopped.wait(self.every_s):
            self.poll()

    def poll(self) -> None:
        with self.lock:
            try:
                runs = sweep_jobs(self.client, self.exp_id, self.sweep_id)
            except Exception as e:  # a busy store: the next poll will do
                log.debug("progress poll failed: %s", e)
                return
            states = sorted(r.info.status for r in runs if r.info.status in DONE)
            if states and states != self.reported:  # a job ended (or a KILLED one was requeued and resumed)
                self.reported = states
                log.info(line(runs, self.sweep_id, self.total, time.monotonic() - self.start))

    def stop(self) -> None:
        self.stopped.set()
        self.poll()
