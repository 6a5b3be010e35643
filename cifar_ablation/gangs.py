"""hydra/launcher=streams with `processes` > 1: a sweep's jobs split into consecutive shares, each share trained as
one gang (streams.py) in a process of its own, all shares at once.

Why: one gang took ~750–880 training steps/s on an H100 whether it held 1, 9 or 27 runs, its one launching
thread at 100 % of a core (second H100 run, experiments/slide_ladder/NOTES.md); where that thread is the
limit, P processes have P threads. On one GPU their kernels run side by side only under MPS (`nvidia-cuda-mps-control
-d`); without it the processes take turns on the GPU.

The shares are consecutive, so a sweep sent out seed by seed (conf/experiment/slide_ladder.yaml) gives each
process whole seeds where the counts allow. Each process trains ceil(runs / P) of its share at a time.

Signals: the processes run in process groups of their own, so that a terminal's Ctrl-C (or `timeout`'s
SIGTERM to a group) reaches only the launching process, which passes it on once to each of them and waits
while they close their runs KILLED, then stops as it would alone. A second Ctrl-C while it waits kills them
(their runs are then closed KILLED by the sweep, whose processes are dead). Should the launching process itself
die, each gets SIGTERM (Linux: PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import pickle
import signal
import time
from multiprocessing import connection as mp_connection
from typing import Any, Sequence

import cloudpickle
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus

from .interrupts import Terminated, sigterm_interrupts

log = logging.getLogger(__name__)
WAIT_FOR_CLOSE_S = 300  # how long the launching process waits for the gangs to close their runs after a signal


def shares(n: int, parts: int) -> list[range]:
    """0..n-1 in `parts` consecutive ranges whose lengths differ by at most one (the longer ones first)."""
    parts = min(parts, n)
    size, extra = divmod(n, parts)
    out, start = [], 0
    for k in range(parts):
        stop = start + size + (k < extra)
        out.append(range(start, stop))
        start = stop
    return out


def launch_in_processes(launcher: Any, job_overrides: Sequence[Sequence[str]],
                        initial_job_idx: int) -> list[JobReturn]:
    """Every job's JobReturn, in job order, once every share has ended. A share that ends without them (a user
    error found when a job starts, a crash, a killed process) stops the others, as an error stops a gang: their
    runs end KILLED, and the same command resumes them; the launcher then raises that share's error."""
    parts = {initial_job_idx + part.start: part for part in shares(len(job_overrides), launcher.processes)}
    runs_each = max(1, math.ceil(launcher.runs / len(parts)))
    log.info(f"Launching {len(job_overrides)} jobs in {len(parts)} processes, {runs_each} at a time in each on "
             "their own streams")
    ctx = mp.get_context("spawn")
    # Hydra's context and singletons (its config store, OmegaConf's resolvers: local functions) as Hydra's
    # joblib launcher sends them, with cloudpickle
    hydra_state = cloudpickle.dumps((launcher.hydra_context, launcher.config, Singleton.get_state()))
    procs, results = {}, {}  # a pipe each (not one queue: a share stopped while it writes breaks only its own)
    for first, part in parts.items():
        receiving, sending = ctx.Pipe(duplex=False)
        results[receiving] = first
        args = (first, [list(job_overrides[i]) for i in part], runs_each, hydra_state, sending, os.getpid())
        procs[first] = ctx.Process(target=_share, args=args, name=f"gang-{first}")
        procs[first].start()
        sending.close()
    got: dict[int, tuple[str, Any]] = {}
    with sigterm_interrupts():
        try:
            _collect(procs, results, got)
        except (KeyboardInterrupt, Terminated) as e:
            _stop(procs, results, got, signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM)
            raise
        failed = [(first, kind, value) for first, (kind, value) in got.items() if kind != "done"]
        if failed:
            _stop(procs, results, got, signal.SIGTERM)
            first, kind, value = failed[0]
            if kind == "SystemExit" and str(value).startswith("error:"):
                raise SystemExit(value)  # a user error: its one line, as a sweep in one process gives it
            raise RuntimeError(f"the process training jobs {first}..{first + len(parts[first]) - 1} ended without "
                               f"their results ({kind}: {value}); the other processes were stopped, their runs "
                               "KILLED: launch the same command again to resume them all")
    return [ret for first in sorted(got) for ret in got[first][1]]


def _collect(procs: dict, results: dict, got: dict) -> None:
    """Results until every share has sent its own, or one has ended without (got: first job -> (kind, value))."""
    while results and all(kind == "done" for kind, _ in got.values()):
        _drain(procs, results, got, wait=1)
    if all(kind == "done" for kind, _ in got.values()):
        for p in procs.values():
            p.join()


def _stop(procs: dict, results: dict, got: dict, sig: int) -> None:
    """Pass the launching process's interruption on, once, to every share still training; wait while they close
    their runs (a second interruption, or WAIT_FOR_CLOSE_S, kills them)."""
    live = [p for first, p in procs.items() if first not in got and p.exitcode is None]
    log.info(f"passing {signal.Signals(sig).name} on to {len(live)} training processes; waiting for them to close "
             "their runs (Ctrl-C again to kill them)")
    for p in live:
        os.kill(p.pid, sig)
    try:
        deadline = time.monotonic() + WAIT_FOR_CLOSE_S
        while results and time.monotonic() < deadline:
            _drain(procs, results, got, wait=1)
    except (KeyboardInterrupt, Terminated):
        pass
    for p in procs.values():
        p.join(5)
        if p.exitcode is None:
            p.kill()
            p.join()


def _drain(procs: dict, results: dict, got: dict, wait: float) -> None:
    """The messages (or ends: a share that closed its pipe unsent) that arrive within `wait` seconds."""
    for conn in mp_connection.wait(list(results), timeout=wait):
        first = results.pop(conn)
        try:
            got[first] = conn.recv()
        except (EOFError, OSError):
            procs[first].join(5)
            got[first] = ("died", f"exit code {procs[first].exitcode}")


def _share(first: int, overrides: list[list[str]], runs: int, hydra_state: bytes, results: Any,
           launcher_pid: int) -> None:
    """One share's process: its own process group, SIGTERM should the launcher die, then the gang; its result
    (kind, value) sent down its pipe: ("done", JobReturns), or the exception's name and text."""
    os.setpgid(0, 0)
    _term_with_parent(launcher_pid)
    from hydra.core.utils import setup_globals
    from hydra_plugins.cifar_ablation_launcher.streams_launcher import StreamsLauncher

    hydra_context, config, state = pickle.loads(hydra_state)
    setup_globals()
    Singleton.set_state(state)
    launcher = StreamsLauncher(runs=runs)
    launcher.setup(hydra_context=hydra_context, task_function=None, config=config)
    try:
        rets = launcher.launch_here(overrides, first)
    except BaseException as e:  # noqa: BLE001 — the interruption, after the gang closed its runs
        results.send((type(e).__name__, str(e)))
        raise SystemExit(1) from None
    results.send(("done", [_sendable(r) for r in rets]))


def _term_with_parent(pid: int) -> None:
    """SIGTERM to this process when the launching process dies (Linux; elsewhere nothing)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _sendable(ret: JobReturn) -> JobReturn:
    """What the sweeper reads of a job that ended in another process: its overrides, status and value (its
    configs stay behind: Hydra's structured-config classes do not pickle across processes; its callbacks have
    run). A failed job's exception travels as itself where it can, else as a RuntimeError with its text."""
    value = ret._return_value
    if ret.status == JobStatus.FAILED:
        try:
            pickle.loads(pickle.dumps(value))
        except Exception:  # noqa: BLE001 — any exception that cannot be rebuilt from its pickle
            value = RuntimeError(f"{type(value).__name__}: {value}")
    return JobReturn(overrides=ret.overrides, working_dir=ret.working_dir, task_name=ret.task_name,
                     status=ret.status, _return_value=value)
