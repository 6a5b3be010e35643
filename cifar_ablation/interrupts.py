"""How a job's process is asked to stop, and what its run says of it: SIGINT (Ctrl-C) raises KeyboardInterrupt,
SIGTERM raises Terminated, and SLURM's SIGUSR2 (its warning of a time limit or a preemption, which submitit
handles by requeueing the job and exiting the process) is named in the reason of the run it stopped. A run
stopped any of these ways closes KILLED, and the next launch (or the requeued job) resumes it."""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Any, Iterator


class Terminated(BaseException):
    """SIGTERM, turned into an exception so the run is closed as KILLED (like KeyboardInterrupt for SIGINT)."""


def raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"interrupted by signal {signum}")


@contextmanager
def job_signals() -> Iterator[set]:
    """While a run is open: SIGTERM raises Terminated (the run closes KILLED), and a SIGUSR2 handler already
    there is chained so that the run's reason can name it: submitit's, which SLURM's warning of a job's time
    limit (the launcher's signal_delay_s) or of a preemption calls; it requeues the job, then exits the process
    (SystemExit). Yields the set of such signals seen. Outside the main thread signals are left to the host."""
    seen: set = set()
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    chained = previous[signal.SIGUSR2]

    def on_usr2(signum: int, frame: Any) -> None:
        seen.add("SIGUSR2")
        chained(signum, frame)
    try:
        signal.signal(signal.SIGTERM, raise_terminated)
        if callable(chained):
            signal.signal(signal.SIGUSR2, on_usr2)
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield seen
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def interruption(e: BaseException, seen: set) -> str:
    """A KILLED run's reason: what stopped it and, after SLURM's SIGUSR2, why."""
    what = f"{type(e).__name__}: {str(e) or 'interrupted by signal'}"  # a SystemExit's str is its exit code
    if "SIGUSR2" in seen:
        what += (" after SIGUSR2, SLURM's warning of the job's time limit or of its preemption: submitit requeued "
                 "the job, which resumes this run from its last checkpoint when it starts again")
    return what


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises Terminated for as long as a gang runs (each job's run also sets this while it is open, and
    puts back what it found: with several open at once, what it found may be the sweep's exit handler)."""
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
