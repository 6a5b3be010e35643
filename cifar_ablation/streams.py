"""Several training runs in one process, each on its own CUDA stream: the engine of `hydra/launcher=streams`.

Processes that share a GPU take turns on it (time-slicing) unless an MPS daemon runs; the kernels of one
process's streams run side by side. The slide's net at batch 128 fills a fraction of an H100: 9 ladder jobs as 9
processes without MPS reached 74,300 images/s in all, less than the base net alone, 132k (first H100 run,
experiments/slide_ladder/NOTES.md).

A Member is one job as a generator (job.job_steps: one training step per next(), or, yielding None, an evaluation
batch or a look at whether the GPU has caught up with it at an epoch's end); a Gang advances its members in turn,
round-robin, from this one thread, so each member's step is launched on its stream while the others' are still
running, and no member's epoch end holds the thread while the GPU finishes its work. Each member keeps what
the process would otherwise share between runs:
    stream     its CUDA stream (on the CPU: none, the steps simply interleave);
    rng        its copy of the global CPU generator's state, and on CUDA its own state object of the device's
               default generator (installed with graphsafe_set_state; a graph captured in its turn keeps it),
               so that dropout draws what the run draws alone: a run trained here gives the numbers it gives
               alone (bit for bit on the CPU, tested) and resumes exactly;
    handlers   its job's log handlers (Hydra configures them per job), its lines tagged with its job number.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterator

import torch

from .interrupts import Terminated
from .steps import Launches

log = logging.getLogger("cifar_ablation.streams")


class _JobTag(logging.Filter):
    """Prefix a member's log lines with its job number (once per record: its handlers share the record); the
    sweep's own lines (progress, written while a job's handlers are in place) stay untagged."""

    def __init__(self, num: int):
        super().__init__()
        self.tag = f"#{num} "

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "job_tagged", False) and record.name != "cifar_ablation.sweep":
            record.msg, record.job_tagged = self.tag + str(record.msg), True
        return True


@dataclass
class Member:
    num: int                                      # Hydra's job number
    steps: Generator[torch.device, None, Any]     # job.job_steps(cfg), primed: set up, first step not taken
    device: torch.device
    on_end: Callable[[Any, BaseException | None], None]  # called once with (return value, None) or (None, error)
    stream: Any = None                            # torch.cuda.Stream on CUDA
    cpu_rng: torch.Tensor = field(default_factory=torch.get_rng_state)
    cuda_rng: Any = None                          # a torch.Generator holding this run's own CUDA RNG state object
    handlers: list[logging.Handler] | None = None  # its job's own log handlers (None: the process's)

    @classmethod
    def prime(cls, num: int, steps: Generator, on_end: Callable,
              own_logs: bool = False) -> "tuple[Member | None, Any]":
        """Run a job up to its first training step (validate, claim, open the run, set up, restore), in the
        caller's context (Hydra's run_job: its config and log handlers): (the member, None), or (None, the
        job's value) when it ended there (a skipped config). Its random state is taken after setup seeded it.
        own_logs: the root logger's handlers now are this job's own (Hydra made them for it): keep them for its
        turns, tagging its lines."""
        try:
            device = next(steps)
        except StopIteration as done:
            return None, done.value
        m = cls(num, steps, device, on_end, handlers=list(logging.getLogger().handlers) if own_logs else None)
        for h in m.handlers or []:
            h.addFilter(_JobTag(num))
        if device.type == "cuda":  # PyTorch hands out 32 streams per priority, round-robin; the high-priority
            m.stream = torch.cuda.Stream(device, priority=-1)  # ones are left to the members: up to 32, no two share
            m.stream.wait_stream(torch.cuda.current_stream(device))  # the setup ran on the default stream
            m.cuda_rng = torch.cuda.default_generators[device.index].clone_state()
        return m, None

    @contextmanager
    def turn(self) -> Iterator[None]:
        """This member's stream, random state and log handlers, for one step; the process's own put back."""
        root, handlers = logging.getLogger(), logging.getLogger().handlers
        cuda_gen = torch.cuda.default_generators[self.device.index] if self.cuda_rng is not None else None
        own_cuda = cuda_gen.graphsafe_get_state() if cuda_gen is not None else None
        torch.set_rng_state(self.cpu_rng)
        if cuda_gen is not None:
            cuda_gen.graphsafe_set_state(self.cuda_rng)
        if self.handlers is not None:
            root.handlers = self.handlers
        try:
            with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
                yield
        finally:
            self.cpu_rng = torch.get_rng_state()
            if cuda_gen is not None:
                cuda_gen.graphsafe_set_state(own_cuda)
            root.handlers = handlers

    def end(self, value: Any, error: BaseException | None) -> None:
        if self.stream is not None:  # nothing of its queued work may outlive its tensors
            self.stream.synchronize()
        self.on_end(value, error)


class Gang:
    """Members advanced in turn. A member whose job raises ends FAILED (its run says why) and the others go on;
    an interruption (Ctrl-C, SIGTERM, or an error of the launcher itself) is passed to every member, so each run
    closes KILLED and resumes from its last checkpoint on the next launch."""

    def __init__(self) -> None:
        self.members: list[Member] = []
        self.steps, self.started, self.cpu = 0, time.perf_counter(), time.process_time()
        self.launches = Launches.seconds

    def load(self) -> dict[str, float]:
        """What held the gang back, since it began: its training steps, the wall (s), the process's CPU time over
        the wall (near 1: the one launching thread may be what limits the gang), and on CUDA the share of the
        wall spent inside graph launches (a launch waits there while the GPU's queue is full: near the CPU's
        share, the GPU held the thread)."""
        wall = max(time.perf_counter() - self.started, 1e-9)
        return {"steps": self.steps, "wall_s": wall, "cpu_share": (time.process_time() - self.cpu) / wall,
                "launch_share": (Launches.seconds - self.launches) / wall}

    def pace(self) -> str:
        """load() as a line for the log. The GPU's own utilization tells the rest: experiments/gpu_run.sh logs it."""
        n = self.load()
        line = (f"{n['steps']:,} training steps in {n['wall_s']:.0f} s, {n['steps'] / n['wall_s']:,.0f} steps/s in "
                f"all; CPU {100 * n['cpu_share']:.0f} % of one core")
        if n["launch_share"]:
            line += f", {100 * n['launch_share']:.0f} % of the wall inside CUDA graph launches"
        return line

    def add(self, m: Member | None) -> None:
        if m is not None:
            self.members.append(m)

    def round(self) -> None:
        """One step of each member (or what it does between steps: None, not counted in the pace)."""
        for m in list(self.members):
            with m.turn():
                try:
                    self.steps += next(m.steps) is not None
                    continue
                except StopIteration as done:
                    value, error = done.value, None
                except Exception as e:  # the job's run is FAILED already, with the reason
                    value, error = None, e
            self.members.remove(m)
            m.end(value, error)

    def stop(self, why: BaseException) -> None:
        """Interrupt every member still running (KILLED; Ctrl-C and SIGTERM as themselves, anything else as
        SIGTERM would): each closes its run before this returns."""
        cause = why if isinstance(why, (KeyboardInterrupt, Terminated)) else Terminated(
            f"stopped with the launcher, by another job's {type(why).__name__} ({why}); launch again to resume")
        while self.members:
            m = self.members.pop(0)
            with m.turn():
                try:
                    m.steps.throw(cause)
                except BaseException as e:  # noqa: BLE001 — the cause, coming back out
                    m.end(None, e)
                else:
                    m.end(None, cause)
