"""The training loop: one run of one trick set, readable top to bottom.

train() is a short driver: setup() builds the model the tricks describe and puts the data on the device,
restore() resumes from a checkpoint_state(), then each epoch is train_epoch() (batch tricks applied to
training batches only, the loss trick added to the loss) and evaluate(), and its metrics go to `on_epoch`
(the MLflow run, in practice: jobrun.JobRun.end_epoch). It knows nothing of Hydra or MLflow.

The loop is written as a generator, training(), that yields after setup and after each training step (and, with
None, between evaluation batches and while the GPU finishes an epoch: settled()): train() runs it straight
through, and the streams launcher (streams.py) interleaves several runs' generators in one process, each on its
own CUDA stream, so that no run's epoch end holds the others.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from . import tricks
from .checks import ConfigError
from .data import DeviceLoader, Images
from .model import Arch, build_model, count_parameters
from .steps import EagerStep, bf16_autocast, captures, fused_adam_captures, make_step

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


def check_finite(loss: float, cfg: Any, epoch: int, where: str = "") -> None:
    """Stop a diverged run, saying what to change."""
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"train loss is {loss} at epoch {epoch}{where}: lower optim.lr (now {cfg.optim.lr}) "
                            "or the l1l2 strengths, or turn on batchnorm")


def pick_device(name: str, slot: int = 0) -> torch.device:
    """auto: CUDA when present. With several visible GPUs, job `slot` (Hydra's job number) takes GPU
    slot % count, so a parallel launcher spreads a sweep round-robin over the GPUs."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", slot % torch.cuda.device_count())
    return torch.device(name)


def make_optimizer(model: torch.nn.Module, cfg: Any, total_steps: int, graph: bool = False):
    """The optimizer and its per-step schedule. graph=True (Adam/AdamW only): capturable, with the learning rate
    a tensor on the device that the schedule fills in place, so a captured step reads each new value, and
    fused: one kernel for the whole update (+ one for the step counts) where the capturable multi-tensor form
    issues 17 multi-tensor ops (torch's _multi_tensor_adam), kernels every replay runs one after another
    (where the fused form does not record into a graph, the multi-tensor one: steps.fused_adam_captures)."""
    params = list(model.parameters())
    if cfg.name == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay)
    else:
        cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        lr = torch.tensor(float(cfg.lr), device=params[0].device) if graph else cfg.lr
        fused = graph and (params[0].device.type != "cuda" or fused_adam_captures(cls, params[0].device))
        opt = cls(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, capturable=graph,
                  fused=fused or None)
    if cfg.schedule == "onecycle" and total_steps >= 4:
        # each phase needs 2+ steps; very short runs (smoke tests) stretch the warm-up to 2 steps
        pct = min(max(cfg.warmup_frac, 2 / total_steps), 0.5)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps,
                                                    pct_start=pct, cycle_momentum=cfg.name == "sgd")
    elif cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return opt, sched


def eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def build(cfg: Any, images: Images) -> torch.nn.Module:
    """The net the config and its tricks describe, for these images (their size; as many outputs as classes)."""
    k = len(images.classes)
    if k > cfg.model.num_classes:  # the loss would fail at the first label past the outputs, mid-epoch
        raise ConfigError("model.num_classes", cfg.model.num_classes,
                          f"at least {k}: the data has {k} classes ({', '.join(images.classes[:10])}"
                          f"{', ...' if k > 10 else ''})")
    arch = Arch(**OmegaConf.to_container(cfg.model), image_size=images.train_x.shape[-1])
    return build_model(tricks.edit_arch(arch, cfg.trick))


@dataclass
class Parts:
    """Everything one run trains with. `forward` is the model as called in training: torch.compile's wrapper
    of `model` with train.compile, else `model` itself (both share the parameters)."""
    cfg: Any
    device: torch.device
    model: torch.nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    opt: torch.optim.Optimizer
    sched: Any
    gen: torch.Generator          # all augmentation randomness of the run
    train_loader: DeviceLoader
    val_loader: DeviceLoader
    fmt: torch.memory_format
    tricks: dict                  # the chosen tricks' parameters as plain values (tricks.plain), for every step
    amp: bool                     # bf16 autocast: train.amp on a CUDA device with native bf16 (steps.bf16_autocast)
    step: EagerStep | None = None  # the training step (steps.py): eager, or captured as a CUDA graph

    def autocast(self):
        """bf16 autocast on CUDA with train.amp; a no-op context on CPU. No weight cache: a captured graph
        must not keep casts made outside it (and each weight is cast once per step anyway)."""
        return torch.autocast("cuda", torch.bfloat16, enabled=self.amp, cache_enabled=False)


def setup(cfg: Any, images: Images, device: torch.device) -> Parts:
    """Seed, build the model the tricks describe, put both splits on the device, make optimizer and schedule."""
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":  # fixed shapes: let cuDNN time its algorithms once (in the warm-up steps)
        torch.backends.cudnn.benchmark = bool(cfg.train.cudnn_benchmark)
    else:  # subnormal floats, which a loss near 0 makes of the gradients and Adam's moments, cost an x86 CPU ~15x
        torch.set_flush_denormal(True)  # per op: 10 s an epoch instead of 0.7 (dev CPU, a test's easy data); as 0
    gen = torch.Generator(device).manual_seed(cfg.seed)
    # NHWC: faster convolutions with cuDNN and with oneDNN on CPU (1.3x for this net on 2 cores, measured)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = build(cfg, images).to(device, memory_format=fmt)
    mean, std = images.channel_stats()
    train_x, train_y, test_x, test_y = images.on(device)
    params = tricks.plain(cfg.trick)  # read every step (the batch and loss tricks): plain values, not OmegaConf's
    train_loader = DeviceLoader(train_x, train_y, mean, std, cfg.train.batch_size, device,
                                train=True, gen=gen, augment=lambda x: tricks.augment(x, params, gen))
    val_loader = DeviceLoader(test_x, test_y, mean, std, cfg.train.eval_batch_size, device)
    capture = captures(cfg, device)  # a captured step needs a capturable optimizer with a tensor lr
    opt, sched = make_optimizer(model, cfg.optim, cfg.train.epochs * len(train_loader), graph=capture)
    forward = torch.compile(model) if cfg.train.compile else model
    p = Parts(cfg, device, model, forward, opt, sched, gen, train_loader, val_loader, fmt, params,
              amp=bf16_autocast(cfg, device))
    p.step = make_step(p, capture)
    return p


def checkpoint_state(p: Parts, epoch: int) -> dict:
    """Every piece of state the next epoch depends on; restore() puts it back."""
    cuda = p.device.type == "cuda"
    return {"model": p.model.state_dict(), "optimizer": p.opt.state_dict(), "scheduler": p.sched.state_dict(),
            "torch_rng": torch.get_rng_state(), "gen_rng": p.gen.get_state(), "epoch": epoch,
            "cuda_rng": torch.cuda.get_rng_state(p.device) if cuda else None}


def restore(p: Parts, state: dict) -> int:
    """Put a checkpoint_state() back; returns the epoch to go on with."""
    p.model.load_state_dict(state["model"])
    p.opt.load_state_dict(_as_this_optimizer(state["optimizer"], p.opt))
    p.sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if p.device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], p.device)
    p.gen.set_state(state["gen_rng"])
    return state["epoch"] + 1


Steps = Generator[torch.device | None, None, Any]  # the run's device after each step, None between; its result


def settled(p: Parts) -> Steps:
    """Yields None until the GPU has run all the work this run has queued, so that reading its numbers next (an
    epoch's loss, its accuracy, its checkpoint) finds them ready: in a gang (streams.py) the launching thread goes
    on with the other runs meanwhile, instead of waiting inside this one's .item(). Nothing is queued on a CPU."""
    if p.device.type != "cuda":
        return
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(p.device))
    while not done.query():
        yield None


def train_epoch(p: Parts, epoch: int, time_first_step: bool = False) -> Steps:
    """One pass over the training batches, one p.step (which makes the batch from its indices: gather,
    normalize, batch tricks) and one schedule step per batch, yielding after each. Returns mean loss, accuracy,
    and (with time_first_step) the seconds of the first step."""
    cfg, loader = p.cfg, p.train_loader
    # read once, not per step: one OmegaConf lookup (cfg.train.x) took 28 us on the dev CPU, the loop's whole step
    # 5-7 us without it (experiments/speed/loop_cost.py; NOTES.md, seventh session)
    every, on_cpu = cfg.train.progress_every_s, p.device.type == "cpu"
    t0 = last_print = time.perf_counter()
    first_step = None
    p.model.train()
    p.step.reset()
    for i, idx in enumerate(loader.indices()):
        loss = p.step(idx)
        p.step.schedule()
        if on_cpu:  # each step's loss is at hand (no GPU to wait for): a diverged run stops at once
            check_finite(loss.item(), cfg, epoch, f", step {i + 1}/{len(loader)}")
        if i == 0 and time_first_step:
            if p.device.type == "cuda":
                torch.cuda.synchronize()
            first_step = time.perf_counter() - t0
        if every and time.perf_counter() - last_print > every:
            last_print = time.perf_counter()
            left = (last_print - t0) / (i + 1) * (len(loader) - i - 1)
            log.info("epoch %d/%d  step %d/%d  loss %.3f  epoch ETA %s", epoch, cfg.train.epochs, i + 1,
                     len(loader), loss.item(), eta(left))
        yield p.device
    yield from settled(p)
    seen = len(loader) * loader.batch_size
    return p.step.loss_sum.item() / seen, p.step.correct.item() / seen, first_step


@torch.no_grad()
def evaluate(p: Parts) -> Steps:
    """Mean loss and accuracy over the whole validation split, unaugmented; yields None after each batch (a gang's
    other runs launch meanwhile)."""
    p.model.eval()
    loss_sum = torch.zeros((), device=p.device)
    correct = torch.zeros((), device=p.device, dtype=torch.long)
    for x, y in p.val_loader:
        with p.autocast():
            logits = p.model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        yield None
    yield from settled(p)
    n = len(p.val_loader.y)
    return loss_sum.item() / n, correct.item() / n


def _as_this_optimizer(saved: dict, opt: torch.optim.Optimizer) -> dict:
    """A saved optimizer state with this run's kind of step: train.cuda_graph may differ from the run that saved
    it (it does not change the result), and a captured step needs a capturable optimizer with a tensor lr, an
    eager one a float lr. The values stay the saved ones."""
    groups = []
    for g, mine in zip(saved["param_groups"], opt.param_groups):
        g = dict(g)
        for key in ("capturable", "fused"):  # how this run steps, not what it learnt
            if key in mine:
                g[key] = mine[key]
        lr = float(g["lr"])
        g["lr"] = torch.tensor(lr, device=mine["lr"].device) if isinstance(mine["lr"], torch.Tensor) else lr
        groups.append(g)
    return {**saved, "param_groups": groups}


OnEpoch = Callable[[int, "dict[str, float]", Callable[[], dict]], None]


def train(cfg: Any, images: Images, on_epoch: OnEpoch = lambda epoch, metrics, state: None,
          state: dict | None = None, device: torch.device | None = None) -> dict[str, float]:
    """Train and evaluate; after each epoch call on_epoch(epoch, metrics, state_fn), where state_fn()
    returns a checkpoint that `state=` resumes from. Returns the last epoch's metrics. With train.compile the
    first epoch's metrics also hold compile_seconds (the first step), which its images/s leaves out."""
    return run_through(training(cfg, images, on_epoch, state, device))


def run_through(steps: Generator[Any, None, Any]) -> Any:
    """Run a generator to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def training(cfg: Any, images: Images, on_epoch: OnEpoch = lambda epoch, metrics, state: None,
             state: dict | None = None, device: torch.device | None = None) -> Steps:
    """train(), one step at a time: yields the run's device once set up (and restored), then after every
    training step, and None between (while evaluating, or waiting for the GPU to finish an epoch: settled());
    returns the last epoch's metrics."""
    p = setup(cfg, images, device or pick_device(cfg.device))
    epochs, seen = cfg.train.epochs, len(p.train_loader) * p.train_loader.batch_size
    log.info("model: %s parameters, %d train / %d val images, %d steps per epoch on %s",
             f"{count_parameters(p.model):,}", len(p.train_loader.y), len(p.val_loader.y), len(p.train_loader),
             p.device)
    first = restore(p, state) if state is not None else 1
    metrics: dict[str, float] = dict(state["metrics"]) if state is not None else {}
    yield p.device
    started = time.perf_counter()
    for epoch in range(first, epochs + 1):
        t0 = time.perf_counter()
        timed = cfg.train.compile and epoch == first  # the first step compiles: timed apart
        train_loss, train_acc, compile_seconds = yield from train_epoch(p, epoch, time_first_step=timed)
        check_finite(train_loss, cfg, epoch)  # on a GPU, once per epoch: a step's check would wait for it
        train_seconds = time.perf_counter() - t0 - (compile_seconds or 0.0)
        val_loss, val_acc = yield from evaluate(p)
        epoch_seconds = time.perf_counter() - t0
        metrics = dict(train_loss=train_loss, train_acc=train_acc, val_loss=val_loss, val_acc=val_acc,
                       lr=float(p.sched.get_last_lr()[0]), epoch_seconds=epoch_seconds,
                       images_per_second=seen / max(train_seconds, 1e-9))
        remaining = (time.perf_counter() - started) / (epoch - first + 1) * (epochs - epoch)
        log.info("epoch %d/%d  train loss %.4f acc %.2f%%  val loss %.4f acc %.2f%%  %.1fs (%s img/s)  ETA %s",
                 epoch, epochs, train_loss, 100 * train_acc, val_loss, 100 * val_acc, epoch_seconds,
                 f"{metrics['images_per_second']:,.0f}", eta(remaining))
        logged = metrics if compile_seconds is None else {**metrics, "compile_seconds": compile_seconds}
        on_epoch(epoch, dict(logged), lambda: checkpoint_state(p, epoch))
    return metrics
