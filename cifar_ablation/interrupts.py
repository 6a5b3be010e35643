"""How a job's process is asked to stop, and what its run says of it: SIGINT (Ctrl-C) raises KeyboardInterrupt,
SIGTERM raises Terminated, and SLURM's SIGUSR2 (its warning of a time limit or a preemption, which submitit
handles by requeueing the job and exiting the process) is named in the reason of the run it stopped. A run
stopped any of these ways closes KILLED, and the next launch (or the requeued job) resumes it. None of them is
acted on inside a call to the MLflow store (held()), nor while a run is opened or closed (JobSignals.hold())."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator


class Terminated(BaseException):
    """SIGTERM, turned into an exception so the run is closed as KILLED (like KeyboardInterrupt for SIGINT)."""


def raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"interrupted by signal {signum}")


STOPS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR2", None)) if s is not None)


def _note(signals: Any, came: list[int]) -> None:
    """From now on these signals are only noted in `came` (held: held(), JobSignals.hold())."""
    for s in signals:
        signal.signal(s, lambda signum, frame: came.append(signum))


def _install(handlers: dict[int, Any]) -> None:
    """These handlers put in place; None (a handler set outside Python) is left alone: Python cannot put it back."""
    for s, handler in handlers.items():
        if handler is not None:
            signal.signal(s, handler)


def _send(came: list[int]) -> None:
    """What was held, sent on once each, in the order it came, to the handlers in place now."""
    for s in dict.fromkeys(came):
        signal.raise_signal(s)


@contextmanager
def held() -> Iterator[None]:
    """SIGTERM, SIGINT and SIGUSR2 noted, not acted on, until the block ends; then sent again, to the handlers it
    found. For a call that must not be cut in the middle: an MLflow store's (tracking.Client). An exception raised
    by a signal's handler inside SQLAlchemy leaves its connection behind, holding a sqlite store's write lock:
    every write after it, the run's own closing included, waits 20 s and fails ('database is locked'), and the
    run stays RUNNING (seen in CI; tests/test_jobrun.py provokes it). In the main thread only: elsewhere signals
    are not delivered to Python; a handler set outside Python (None) is left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    found = {s: h for s in STOPS if (h := signal.getsignal(s)) is not None}
    _note(found, came)
    try:
        yield
    finally:
        _install(found)
        _send(came)


class JobSignals:
    """The signal handling of one open run (job_signals()). `seen` names the signals that came; `handlers` are the
    run's own. hold() is for the run's opening and closing: from then on SIGTERM, SIGINT and SIGUSR2 are noted, not
    acted on (a stop must not come between the run's creation and the code that closes it, nor cut the closing
    short and leave the run without its reason or RUNNING: such as the SIGTERM that SLURM sends a job submitit has
    just requeued); release() puts the run's handlers back and sends on what came meanwhile; what is still held is
    sent again once job_signals() has put back the handlers it found."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.held: list[int] = []
        self.handlers: dict[int, Any] = {}

    def hold(self) -> None:
        if threading.current_thread() is threading.main_thread():  # elsewhere signals are the host's
            _note(self.handlers, self.held)

    def release(self) -> None:
        if threading.current_thread() is threading.main_thread():
            _install(self.handlers)
        came, self.held = self.held, []
        _send(came)


@contextmanager
def job_signals() -> Iterator[JobSignals]:
    """While a run is open: SIGTERM raises Terminated (the run closes KILLED), and a SIGUSR2 handler already
    there is chained so that the run's reason can name it: submitit's, which SLURM's warning of a job's time
    limit (the launcher's signal_delay_s) or of a preemption calls; it requeues the job, then exits the process
    (SystemExit). Stops are held while that handler runs (a SIGTERM raised inside it would replace its exit
    with Terminated, or cut its checkpoint short). Outside the main thread signals are left to the host."""
    js, usr2 = JobSignals(), getattr(signal, "SIGUSR2", None)  # POSIX only
    previous = {s: signal.getsignal(s) for s in STOPS}
    chained = previous.get(usr2)

    def on_usr2(signum: int, frame: Any) -> None:
        # submitit's handler checkpoints and requeues the job, then exits; SLURM answers the requeue with a SIGTERM
        # that may come before that exit: held meanwhile, it can neither cut the handler short nor replace its exit
        js.seen.add("SIGUSR2")
        js.hold()
        chained(signum, frame)
        js.release()  # it returned (a process of rank > 0 requeues nothing): stops act again
    run = {signal.SIGTERM: raise_terminated, signal.SIGINT: previous[signal.SIGINT],
           usr2: on_usr2 if callable(chained) else chained}
    js.handlers = {s: h for s, h in run.items() if s is not None and h is not None}  # None: set outside Python
    try:
        _install(js.handlers)
    except ValueError:  # not the main thread
        previous, js.handlers = {}, {}
    try:
        yield js
    finally:
        _install(previous)
        _send(js.held)  # what came while the run closed, now to the handlers it would have met


def interruption(e: BaseException, seen: set) -> str:
    """A KILLED run's reason: what stopped it and, after SLURM's SIGUSR2 (in `seen`), why."""
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
