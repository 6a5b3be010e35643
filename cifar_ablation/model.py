"""The slide's VGG-style CNN, built from an `Arch` description that the tricks edit.

    [IN] -> block(w1) -> block(w2) -> block(w3) -> flatten -> Dense(dense) + ReLU -> [dropout] -> Dense(10)
    block(w) = convs_per_block x (Conv3x3(w, padding same) -> [BN] -> ReLU), MaxPool2x2, [dropout]

Bracketed parts exist only when a trick asks for them (see tricks.py). Softmax lives in the loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Arch:
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    convs_per_block: int = 2
    dense: int = 512
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    batchnorm: bool = False
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    instancenorm: str | None = None  # None | "input" | "blocks"
    conv_dropout: float = 0.0
    dense_dropout: float = 0.0


def conv_block(c_in: int, c_out: int, arch: Arch) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(arch.convs_per_block):
        layers.append(nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=not arch.batchnorm))
        if arch.batchnorm:
            layers.append(nn.BatchNorm2d(c_out, momentum=arch.bn_momentum, eps=arch.bn_eps))
        if arch.instancenorm == "blocks" and i == 0:
            layers.append(nn.InstanceNorm2d(c_out, affine=True))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.MaxPool2d(2))
    if arch.conv_dropout > 0:
        layers.append(nn.Dropout(arch.conv_dropout))
    return layers


def build_model(arch: Arch) -> nn.Sequential:
    layers: list[nn.Module] = []
    if arch.instancenorm == "input":
        layers.append(nn.InstanceNorm2d(arch.in_channels, affine=True))
    c_in = arch.in_channels
    for width in arch.widths:
        layers += conv_block(c_in, width, arch)
        c_in = width
    side = arch.image_size // 2 ** len(arch.widths)
    layers += [nn.Flatten(), nn.Linear(c_in * side * side, arch.dense, bias=not arch.batchnorm)]
    if arch.batchnorm:
        layers.append(nn.BatchNorm1d(arch.dense, momentum=arch.bn_momentum, eps=arch.bn_eps))
    layers.append(nn.ReLU(inplace=True))
    if arch.dense_dropout > 0:
        layers.append(nn.Dropout(arch.dense_dropout))
    layers.append(nn.Linear(arch.dense, arch.num_classes))
    return nn.Sequential(*layers)


def kernels(model: nn.Module) -> list[torch.Tensor]:
    """The kernel weights that L1/L2 regularization acts on: convolutions and dense layers, no biases."""
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
