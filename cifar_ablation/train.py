"""The training loop: one run of one trick set, readable top to bottom.

train() builds the model the tricks describe, trains it on DeviceLoader batches (batch tricks applied to
training batches only, the loss trick added to the loss), evaluates every epoch and hands each epoch's
metrics to `on_epoch` (the MLflow run, in practice). It knows nothing of Hydra or MLflow.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from . import tricks
from .data import DeviceLoader, Images
from .model import Arch, build_model, count_parameters

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


def pick_device(name: str, slot: int = 0) -> torch.device:
    """auto: CUDA when present. With several visible GPUs, job `slot` (Hydra's job number) takes GPU
    slot % count, so a parallel launcher spreads a sweep round-robin over the GPUs."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", slot % torch.cuda.device_count())
    return torch.device(name)


def make_optimizer(model: torch.nn.Module, cfg: Any, total_steps: int):
    params = model.parameters()
    if cfg.name == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay)
    else:
        cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        opt = cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
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


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DeviceLoader, autocast: Any) -> tuple[float, float]:
    model.eval()
    loss_sum = torch.zeros((), device=loader.x.device)
    correct = torch.zeros((), device=loader.x.device, dtype=torch.long)
    for x, y in loader:
        with autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    n = len(loader.y)
    return loss_sum.item() / n, correct.item() / n


def eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def build(cfg: Any, images: Images) -> torch.nn.Module:
    arch = Arch(**OmegaConf.to_container(cfg.model), image_size=images.train_x.shape[-1])
    return build_model(tricks.edit_arch(arch, cfg.trick))


OnEpoch = Callable[[int, "dict[str, float]", Callable[[], dict]], None]


def train(cfg: Any, images: Images, on_epoch: OnEpoch = lambda epoch, metrics, state: None,
          state: dict | None = None, device: torch.device | None = None) -> dict[str, float]:
    """Train and evaluate; after each epoch call on_epoch(epoch, metrics, state_fn), where state_fn()
    returns a checkpoint that `state=` resumes from. Returns the last epoch's metrics."""
    device = device or pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device).manual_seed(cfg.seed)  # all augmentation randomness of the run
    cuda = device.type == "cuda"
    # NHWC: faster convolutions with cuDNN and with oneDNN on CPU (1.3x for this net on 2 cores, measured)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format

    model = build(cfg, images).to(device, memory_format=fmt)
    mean, std = images.channel_stats()
    augment = lambda x: tricks.augment(x, cfg.trick, gen)  # noqa: E731
    train_loader = DeviceLoader(images.train_x, images.train_y, mean, std, cfg.train.batch_size, device,
                                train=True, gen=gen, augment=augment)
    val_loader = DeviceLoader(images.test_x, images.test_y, mean, std, cfg.train.eval_batch_size, device)
    epochs = cfg.train.epochs
    opt, sched = make_optimizer(model, cfg.optim, epochs * len(train_loader))
    autocast = lambda: torch.autocast("cuda", torch.bfloat16, enabled=cuda and cfg.train.amp)  # noqa: E731
    step = torch.compile(model) if cfg.train.compile else model
    log.info("model: %s parameters, %d train / %d val images, %d steps per epoch on %s",
             f"{count_parameters(model):,}", len(train_loader.y), len(val_loader.y), len(train_loader), device)

    start_epoch = 1
    if state is not None:  # resume: every piece of state the next epoch depends on
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if cuda and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        gen.set_state(state["gen_rng"])
        start_epoch = state["epoch"] + 1

    metrics: dict[str, float] = dict(state["metrics"]) if state is not None else {}
    started = time.perf_counter()
    for epoch in range(start_epoch, epochs + 1):
        t0 = last_print = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for i, (x, y) in enumerate(train_loader):
            x = x.contiguous(memory_format=fmt)
            with autocast():
                logits = step(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.train.label_smoothing)
            extra = tricks.penalty(model, cfg.trick)
            total = loss if extra is None else loss + extra
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            if i == 0 and epoch == start_epoch and cfg.train.compile:
                if cuda:
                    torch.cuda.synchronize()
                metrics["compile_seconds"] = time.perf_counter() - t0
            if cfg.train.progress_every_s and time.perf_counter() - last_print > cfg.train.progress_every_s:
                last_print = time.perf_counter()
                left = (last_print - t0) / (i + 1) * (len(train_loader) - i - 1)
                log.info("epoch %d/%d  step %d/%d  loss %.3f  epoch ETA %s", epoch, epochs, i + 1,
                         len(train_loader), loss.item(), eta(left))
        seen = len(train_loader) * train_loader.batch_size
        train_loss, train_acc = loss_sum.item() / seen, correct.item() / seen
        if not math.isfinite(train_loss):
            raise NonFiniteLoss(f"train loss is {train_loss} at epoch {epoch}: lower optim.lr "
                                f"(now {cfg.optim.lr}) or the l1l2 strengths, or turn on batchnorm")
        train_seconds = time.perf_counter() - t0 - metrics.get("compile_seconds", 0.0) * (epoch == start_epoch)
        val_loss, val_acc = evaluate(model, val_loader, autocast)
        epoch_seconds = time.perf_counter() - t0
        metrics.update(train_loss=train_loss, train_acc=train_acc, val_loss=val_loss, val_acc=val_acc,
                       lr=sched.get_last_lr()[0], epoch_seconds=epoch_seconds,
                       images_per_second=seen / max(train_seconds, 1e-9))
        done = epoch - start_epoch + 1
        remaining = (time.perf_counter() - started) / done * (epochs - epoch)
        log.info("epoch %d/%d  train loss %.4f acc %.2f%%  val loss %.4f acc %.2f%%  %.1fs (%s img/s)  ETA %s",
                 epoch, epochs, train_loss, 100 * train_acc, val_loss, 100 * val_acc, epoch_seconds,
                 f"{metrics['images_per_second']:,.0f}", eta(remaining))
        on_epoch(epoch, dict(metrics), lambda: checkpoint_state(model, opt, sched, gen, epoch))
        metrics.pop("compile_seconds", None)
    return metrics


def checkpoint_state(model, opt, sched, gen: torch.Generator, epoch: int) -> dict:
    cuda = gen.device.type == "cuda"
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "torch_rng": torch.get_rng_state(), "gen_rng": gen.get_state(), "epoch": epoch,
            "cuda_rng": torch.cuda.get_rng_state(gen.device) if cuda else None}
