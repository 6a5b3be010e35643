"""The training step, two ways: eager (every op launched from Python), or captured once as a CUDA graph and
replayed: one launch for the batch (gather, normalize, the batch tricks), forward, loss, backward (with the
L1/L2 term's gradient) and the optimizer step.

A step is called with the batch's indices into the training split (DeviceLoader.indices()); train_epoch() calls
whichever step train.setup() chose, then its schedule() (outside the graph: the learning rate is a tensor the
graph reads, filled in place by the scheduler, and put back should a scheduler replace it). Both kinds
accumulate the epoch's loss and correct count on the device, so an epoch talks to the host once.

The graph follows PyTorch's whole-network capture recipe: the first WARMUP steps run eagerly on a side stream
(real training steps, not thrown away), the optimizer is capturable (its state on the device), gradients are
set to None before capture so that backward allocates them from the graph's pool, and autocast's weight cache
is off. Random numbers stay graph-safe: dropout draws from the device's default generator, which every capture
registers, and the batch tricks from the run's own generator, registered with the graph here; each replay
advances both generators' offsets as the eager ops would. Inside the graph the batch is 38 ops with the
translate crop and 70 with crop-and-resize (the top rung's tricks, counted on the CPU: experiments/slide_ladder/
NOTES.md), which would otherwise be launched from Python every step; the step's only input is then a copy of
the batch's indices. Should the
batch fail to capture, the step is captured without it (the loader's batch copied into static buffers).
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Any

import torch
import torch.nn.functional as F

from . import tricks

log = logging.getLogger(__name__)


class Launches:
    """Wall time this process spends inside CUDA graph launches (replay calls), all runs together: the streams
    launcher's pace line reports its share of the wall. A launch that finds the GPU's queue full waits in it."""
    seconds = 0.0


WARMUP = 3   # eager steps before capture (PyTorch's recipe uses 3; on a side stream)
MODES = ("auto", "true", "false")


class EagerStep:
    """One optimizer step per call, every op launched from Python. Accumulates loss·n and correct count."""

    kind = "eager"

    def __init__(self, p: Any):
        self.p, self.smoothing = p, float(p.cfg.train.label_smoothing)  # read once: not an OmegaConf lookup a step
        self.loss_sum = torch.zeros((), device=p.device)
        self.correct = torch.zeros((), device=p.device, dtype=torch.long)

    def reset(self) -> None:
        """Zero the accumulators in place (a captured graph keeps writing into these very tensors)."""
        self.loss_sum.zero_()
        self.correct.zero_()

    def ops(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward, loss, backward (+ the loss tricks' gradients), optimizer step, accumulate; returns the loss
        (the cross-entropy: a loss trick's term is never formed, tricks.py)."""
        p = self.p
        with p.autocast():
            logits = p.forward(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.smoothing)
        loss.backward()
        tricks.add_loss_gradients(p.model, p.tricks)
        p.opt.step()
        loss = loss.detach()  # the caller keeps it: it must not keep the autograd graph (and its streams) alive
        self.loss_sum += loss * len(y)
        self.correct += (logits.argmax(1) == y).sum()
        return loss

    def schedule(self) -> None:
        """The learning rate schedule's step, after each training step."""
        self.p.sched.step()

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        """One training step on the training images at idx."""
        self.p.opt.zero_grad(set_to_none=True)
        return self.ops(*self.batch(idx))

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.p.train_loader.batch(idx)
        return x.contiguous(memory_format=self.p.fmt), y


class GraphStep(EagerStep):
    """The whole step captured as one CUDA graph after WARMUP eager steps, then replayed. With strict=False
    (train.cuda_graph=auto) a failed warm-up or capture logs the reason and goes on eagerly, losing nothing:
    a failed capture executes none of its ops. Out of memory in a warm-up step is the run's error, not the
    capture's (the eager step would meet it too). `batch_inside`: whether the graph makes the batch too."""

    kind = "cuda_graph"

    def __init__(self, p: Any, strict: bool):
        super().__init__(p)
        self.strict, self.warmed, self.graph, self.side, self.batch_inside = strict, 0, None, None, False
        self.lrs = [g["lr"] for g in p.opt.param_groups]  # the learning-rate tensors the graph will read
        self.fallback: str | None = None   # why the step runs eagerly after all
        self.timed = False                 # the first replay has been timed

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        if self.fallback is not None:
            return super().__call__(idx)
        try:
            if self.graph is None and self.warmed < WARMUP:
                return self._warm_up(idx)
            if self.graph is None:
                self._capture(idx)
        except Exception as e:
            if self.strict or (isinstance(e, torch.OutOfMemoryError) and self.warmed < WARMUP):
                raise  # a warm-up step is an eager step: out of memory there, it would be out of memory eagerly
            self.fallback = _reason(e)
            self.kind = "eager"
            log.warning("CUDA graph capture failed, training eagerly from here on (train.cuda_graph=auto): %s",
                        self.fallback)
            return super().__call__(idx)
        if self.batch_inside:
            self.idx.copy_(idx)
        else:
            x, y = self.batch(idx)
            self.x.copy_(x)
            self.y.copy_(y)
        if not self.timed:
            self._first_replay()
        else:
            t = time.perf_counter()
            self.graph.replay()
            Launches.seconds += time.perf_counter() - t
        return self.loss

    def _first_replay(self) -> None:
        """The first replay, timed once (in the capture's call, where waiting is allowed): the launch's CPU time
        with this stream's queue empty, and the step's time on the GPU (other runs may share it meanwhile). The
        two say what bounds a run: the thread's launches, or the GPU's execution of the step's kernels."""
        self.timed = True
        if self.p.device.type != "cuda":
            self.graph.replay()
            return
        stream = torch.cuda.current_stream(self.p.device)
        stream.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        t = time.perf_counter()
        self.graph.replay()
        launch = time.perf_counter() - t
        end.record(stream)
        end.synchronize()
        log.info("graph replay: its launch takes %.0f us of CPU, the step %.3f ms on the GPU (first replay; other "
                 "runs' kernels may share the GPU meanwhile)", launch * 1e6, start.elapsed_time(end))

    def schedule(self) -> None:
        """The schedule's step; then each group's learning rate is the very tensor the graph reads. The torch
        versions tested here fill a tensor learning rate in place; a scheduler that assigns a new value instead
        would leave the graph on a stale rate: its value is copied into the captured tensor and that is put back."""
        super().schedule()
        for group, lr in zip(self.p.opt.param_groups, self.lrs):
            if isinstance(lr, torch.Tensor) and group["lr"] is not lr:
                lr.fill_(float(group["lr"]))
                group["lr"] = lr

    def _warm_up(self, idx: torch.Tensor) -> torch.Tensor:
        if self.side is None:  # one side stream for all the warm-up steps
            self.side = torch.cuda.Stream(self.p.device)
        side = self.side
        side.wait_stream(torch.cuda.current_stream(self.p.device))
        with torch.cuda.stream(side):
            loss = super().__call__(idx)
        torch.cuda.current_stream(self.p.device).wait_stream(side)
        self.warmed += 1
        return loss

    def _capture(self, idx: torch.Tensor) -> None:
        """Record the step on static buffers (recording runs nothing: the replay in __call__ does): the batch's
        indices, with the batch made inside the graph; should that capture fail, the batch itself (with
        train.cuda_graph=true too: it asks for a graph, and still gets one)."""
        self.idx = idx.clone()
        try:
            self.graph = self._record(lambda: self.batch(self.idx), generators=[self.p.gen])
            self.batch_inside = True
        except Exception as e:
            why = _reason(e)  # retried below, once the failed graph and its traceback are gone
        if not self.batch_inside:
            log.warning("the batch could not be captured with the step (%s): it is made outside the graph", why)
            drawn = self.p.gen.get_state()  # a batch to shape the buffers, its random draws given back:
            self.x, self.y = (torch.empty_like(t) for t in self.batch(idx))  # __call__ makes this step's batch
            self.p.gen.set_state(drawn)
            self.graph = self._record(lambda: (self.x, self.y), generators=[])
        log.info("training step captured as a CUDA graph after %d eager warm-up steps (the batch %s)",
                 self.warmed, "inside it" if self.batch_inside else "made outside it")

    def _record(self, batch: Any, generators: list[torch.Generator]) -> "torch.cuda.CUDAGraph":
        self.p.opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        for gen in generators:  # besides the default generator, which every capture registers
            graph.register_generator_state(gen)
        with torch.cuda.graph(graph):
            self.loss = self.ops(*batch())
        return graph


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


@functools.cache
def fused_adam_captures(cls: type, device: torch.device) -> bool:
    """Whether Adam's (or AdamW's) fused kernel, capturable with a tensor learning rate (a captured step's
    optimizer), records into a CUDA graph and replays on this device: tried once per class and process on a
    4-element parameter (PyTorch's own tests capture it; should this torch not, captured steps use the
    multi-tensor form instead of training eagerly)."""
    try:
        w = torch.zeros(4, device=device, requires_grad=True)
        opt = cls([w], lr=torch.tensor(1e-3, device=device), capturable=True, fused=True)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # the optimizer's state made before capture, as in a real warm-up
            w.grad = torch.ones_like(w)
            opt.step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()
        graph.replay()
        torch.cuda.synchronize(device)
        if not bool((w < 0).all()):  # three steps of Adam against a positive gradient
            raise RuntimeError(f"its replay left the parameter at {w.tolist()}")
        return True
    except Exception as e:  # noqa: BLE001 — any failure: the proven form instead
        log.warning("%s's fused kernel did not record into a CUDA graph here (%s): captured steps use its "
                    "multi-tensor form", cls.__name__, _reason(e))
        return False


def bf16_autocast(cfg: Any, device: torch.device) -> bool:
    """train.amp's bf16 autocast: on CUDA devices of compute capability 8.0 or more (Ampere on), whose cuDNN
    convolves in bf16. On older GPUs (a T4, a V100: 7.x) bf16 is emulated or refused, so they train in float32,
    saying so once per process; the run's `precision` tag records which."""
    if device.type != "cuda" or not cfg.train.amp:
        return False
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return True
    _warn_once(f"train.amp: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no "
               "native bf16 (cuDNN's bf16 convolutions need 8.0 or more): training in float32")
    return False


def device_tags(cfg: Any, device: torch.device) -> dict[str, str]:
    """A run's `precision` (bf16 autocast or float32) and, on CUDA, its `gpu` (name and compute capability):
    runs from an H100 and a T4 told apart in MLflow."""
    tags = {"precision": "bf16 autocast" if bf16_autocast(cfg, device) else "float32"}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        tags["gpu"] = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    return tags


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    log.warning(message)


def graph_blocker(cfg: Any, device: torch.device) -> str | None:
    """Why this run cannot capture its step (None: it can)."""
    if device.type != "cuda":
        return f"the device is {device.type}: CUDA graphs need a CUDA device"
    if cfg.train.compile:
        return "train.compile=true: torch.compile makes its own graphs"
    if cfg.optim.name == "sgd":
        return "optim.name=sgd: its momentum (and the one-cycle momentum schedule) would be frozen into the graph"
    return None


def captures(cfg: Any, device: torch.device) -> bool:
    """train.cuda_graph on this device: auto captures where nothing blocks it (and says why not on CUDA);
    true insists (validate() refuses it where it cannot); false never captures."""
    mode, blocker = str(cfg.train.cuda_graph).lower(), graph_blocker(cfg, device)
    if mode == "true" and blocker is not None:
        raise RuntimeError(f"train.cuda_graph=true, but {blocker}")
    if mode == "auto" and blocker is not None and device.type == "cuda":
        log.info("training step: eager, %s", blocker)
    return mode != "false" and blocker is None


def make_step(p: Any, capture: bool) -> EagerStep:
    return GraphStep(p, strict=str(p.cfg.train.cuda_graph).lower() == "true") if capture else EagerStep(p)
