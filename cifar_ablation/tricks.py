"""The generalization tricks of the slides, one hook each.

A trick is `conf/trick/<name>.yaml` (its parameters, under the key <name>) plus one function here,
registered with `@trick(stage, **checks)` under the function's name. The stage says where it acts:

  arch   edits the model description before the model is built   (batchnorm, dropout, instancenorm, capacity)
  batch  transforms a training batch on the device, per image     (flip, crop, noise)
  loss   a term of the training loss: adds the term's gradient after backward    (l1l2)

The checks name each parameter and what values it allows; config.validate runs them before training.
A loss trick never forms its term: the term's value is not logged, and its gradient, added to the parameters'
gradients with multi-tensor (foreach) ops, is the one autograd would give, in a few kernels per step where the
term through autograd took ~127 ops (l1l2 over the net's 8 kernels: experiments/slide_ladder/NOTES.md).
Batch hooks only ever see training batches: evaluation data is never augmented, and they run in BATCH_ORDER.
An arch hook edits fields of model.Arch, which build_model reads: a new kind of layer needs a field there and
its branch in build_model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from .checks import Check, interval, number, one_of
from .model import Arch, kernels


@dataclass(frozen=True)
class Trick:
    name: str
    stage: str  # "arch" | "batch" | "loss"
    hook: Callable
    checks: dict[str, Check] = field(default_factory=dict)


TRICKS: dict[str, Trick] = {}
STAGES = ("arch", "batch", "loss")
# The order batch tricks are applied in: geometry first (flip, crop), then noise on the final pixels.
BATCH_ORDER = ("flip", "crop", "noise")


def trick(stage: str, **checks: Check) -> Callable:
    def register(fn: Callable) -> Callable:
        if stage not in STAGES:
            raise ValueError(f"trick {fn.__name__}: stage {stage!r} is not one of {', '.join(STAGES)}")
        if stage == "batch" and fn.__name__ not in BATCH_ORDER:
            raise ValueError(f"batch trick {fn.__name__}: add it to tricks.BATCH_ORDER ({', '.join(BATCH_ORDER)})")
        TRICKS[fn.__name__] = Trick(fn.__name__, stage, fn, checks)
        return fn
    return register


def _chosen(tricks_cfg: Any, stage: str) -> list[tuple[Trick, Any]]:
    names = BATCH_ORDER if stage == "batch" else TRICKS
    return [(TRICKS[name], tricks_cfg[name]) for name in names if TRICKS[name].stage == stage and name in tricks_cfg]


def plain(tricks_cfg: Any) -> dict[str, SimpleNamespace]:
    """The chosen tricks' parameters as plain Python values (`params.p`, `params.scale[0]`), for the hooks that run
    every step (batch, loss): read through OmegaConf, each lookup of a parameter cost ~28 us on the dev CPU."""
    return {name: SimpleNamespace(**OmegaConf.to_container(params, resolve=True))
            for name, params in tricks_cfg.items()}


def edit_arch(arch: Arch, tricks_cfg: Any) -> Arch:
    for t, cfg in _chosen(tricks_cfg, "arch"):
        t.hook(arch, cfg)
    return arch


def augment(x: torch.Tensor, tricks_cfg: Any, gen: torch.Generator) -> torch.Tensor:
    """Apply the chosen batch tricks in BATCH_ORDER."""
    for t, cfg in _chosen(tricks_cfg, "batch"):
        x = t.hook(x, cfg, gen)
    return x


@torch.no_grad()
def add_loss_gradients(model: torch.nn.Module, tricks_cfg: Any) -> None:
    """After backward: each chosen loss trick adds its term's gradient to the parameters' gradients."""
    for t, cfg in _chosen(tricks_cfg, "loss"):
        t.hook(model, cfg)


def _coin(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """One Bernoulli(p) draw per image, shaped to broadcast over (C, H, W)."""
    return (torch.rand(x.shape[0], generator=gen, device=x.device) < p).view(-1, 1, 1, 1)


# --- arch --------------------------------------------------------------------------------------------

@trick("arch", momentum=number(0, 1, lo_open=True), eps=number(0, lo_open=True))
def batchnorm(arch: Arch, cfg: Any) -> None:
    arch.batchnorm, arch.bn_momentum, arch.bn_eps = True, float(cfg.momentum), float(cfg.eps)


@trick("arch", p=number(0, 1, hi_open=True), conv_p=number(0, 1, hi_open=True))
def dropout(arch: Arch, cfg: Any) -> None:
    arch.dense_dropout, arch.conv_dropout = float(cfg.p), float(cfg.conv_p)


@trick("arch", position=one_of("input", "blocks"))
def instancenorm(arch: Arch, cfg: Any) -> None:
    arch.instancenorm = cfg.position


@trick("arch", width_mult=number(0, lo_open=True), dense_mult=number(0, lo_open=True))
def capacity(arch: Arch, cfg: Any) -> None:
    arch.widths = [max(1, round(w * cfg.width_mult)) for w in arch.widths]
    arch.dense = max(1, round(arch.dense * cfg.dense_mult))


# --- batch (applied in BATCH_ORDER) ----------------------------------------------------------------------

@trick("batch", p=number(0, 1))
def flip(x: torch.Tensor, cfg: Any, gen: torch.Generator) -> torch.Tensor:
    return torch.where(_coin(x, cfg.p, gen), x.flip(3), x)


def crop_boxes(n: int, size: int, cfg: Any, gen: torch.Generator, device: torch.device,
               tries: int = 10) -> torch.Tensor:
    """RandomResizedCrop's boxes, batched, same distribution: per image up to `tries` draws of area fraction
    ~ U(scale) and aspect ~ logU(ratio), the first whose box fits the image wins (torchvision's rejection
    loop), else the whole image; position ~ U. Returns (n, 4) boxes x1, y1, x2, y2 in pixels (not rounded
    to whole pixels: roi_align resamples anyway); images not drawn (1 - p) keep the full box."""
    u = torch.rand(n, tries, 2, generator=gen, device=device)
    area = (cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * u[..., 0]) * size * size
    log_r = math.log(cfg.ratio[0]) + (math.log(cfg.ratio[1]) - math.log(cfg.ratio[0])) * u[..., 1]
    w, h = (area * log_r.exp()).sqrt(), (area / log_r.exp()).sqrt()
    fits = (w <= size) & (h <= size)
    first = fits.float().argmax(1, keepdim=True)          # index of the first fitting draw (0 if none)
    # Python scalars, not torch.tensor(..., device=...): a host-to-device copy would wait for the stream each step
    w = torch.where(fits.any(1), w.gather(1, first).squeeze(1), float(size))
    h = torch.where(fits.any(1), h.gather(1, first).squeeze(1), float(size))
    pos = torch.rand(n, 3, generator=gen, device=device)
    x1, y1 = (size - w) * pos[:, 0], (size - h) * pos[:, 1]
    boxes = torch.stack([x1, y1, x1 + w, y1 + h], dim=1)
    full = torch.zeros_like(boxes)
    full[:, 2:] = size
    return torch.where((pos[:, 2] < cfg.p).unsqueeze(1), boxes, full)


def translate(x: torch.Tensor, cfg: Any, gen: torch.Generator) -> torch.Tensor:
    """torchvision's RandomCrop(size, padding=pad, padding_mode='reflect'), batched: each image (with
    probability p; else the centre window, itself) is reflect-padded by `pad` and cut back to its size at a
    uniformly drawn offset."""
    n, c, h, w = x.shape
    pad = int(cfg.pad)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    off = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen, device=x.device)
    off = torch.where(_coin(x, cfg.p, gen).view(n, 1), off, torch.full_like(off, pad))
    rows = (off[:, :1] + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    cols = (off[:, 1:] + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


@trick("batch", p=number(0, 1), scale=interval(0, 1, lo_open=True), ratio=interval(0, None, lo_open=True),
       mode=one_of("resize", "translate"), pad=number(1, 16, integer=True))
def crop(x: torch.Tensor, cfg: Any, gen: torch.Generator) -> torch.Tensor:
    """mode=resize: the slide's crop-and-resize (RandomResizedCrop); mode=translate: a reflect-pad-and-crop
    translation (RandomCrop with padding), the form fast CIFAR-10 recipes use."""
    if cfg.mode == "translate":
        return translate(x, cfg, gen)
    from torchvision.ops import roi_align  # imported on first use: torchvision takes seconds to import

    n, _, size, _ = x.shape
    boxes = crop_boxes(n, size, cfg, gen, x.device)
    index = torch.arange(n, device=x.device, dtype=boxes.dtype).unsqueeze(1)
    # aligned=True and one sample per output pixel make roi_align a bilinear resize of each box
    # (the full box reproduces the image exactly).
    return roi_align(x, torch.cat([index, boxes], 1), output_size=size, spatial_scale=1.0,
                     sampling_ratio=1, aligned=True)


@trick("batch", p=number(0, 1), std=number(0))
def noise(x: torch.Tensor, cfg: Any, gen: torch.Generator) -> torch.Tensor:
    eps = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    return x + _coin(x, cfg.p, gen) * eps * cfg.std


# --- loss ----------------------------------------------------------------------------------------------

@trick("loss", l1=number(0), l2=number(0))
def l1l2(model: torch.nn.Module, cfg: Any) -> None:
    """The term l1 * sum|W| + l2 * sum W^2 over the kernels (Keras' regularizers.l1_l2): adds its gradient,
    l1 * sign(W) + 2 * l2 * W, to each kernel's gradient (sign(0) = 0: abs's subgradient in autograd too).
    Every kernel takes part in the forward pass, so each has its gradient here."""
    ws = kernels(model)
    grads = [w.grad for w in ws]
    if cfg.l1:
        torch._foreach_add_(grads, torch._foreach_sign(ws), alpha=float(cfg.l1))
    if cfg.l2:
        torch._foreach_add_(grads, ws, alpha=2 * float(cfg.l2))
