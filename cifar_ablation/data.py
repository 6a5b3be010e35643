"""Images in, device batches out.

load_images() reads CIFAR-10 (torchvision's format, downloaded when possible) or an image folder / archive
laid out train/<class>/*, test/<class>/*, decoded once into a uint8 tensor cache keyed by the source's
checksum (sources.py), and returns it (optionally a stratified subset). DeviceLoader holds a split whole on
the device and yields normalized, shuffled, augmented batches in a few batched tensor ops, airbench-style.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .sources import (CIFAR10_FILES, CIFAR10_FOLDER, DataError, cached, cifar10_missing, decode_imagefolder,
                      ensure_cifar10, read_cifar10_batches, sha256_files)

__all__ = ["DataError", "DeviceLoader", "Images", "Normalize", "load_images", "stratified_subset"]


@dataclass
class Images:
    train_x: torch.Tensor  # (N, 3, H, W) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    source: str            # what was read: a path or "cifar10:<root>"
    checksum: str          # sha256 of the source (archive bytes, or every file's name and bytes)
    _stats: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    _copies: dict = field(default_factory=dict, repr=False, compare=False)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """train_x, train_y, test_x, test_y on `device`, copied there once per object: the runs that one process
        trains (the streams launcher's, a basic launcher's in turn) share them, read-only."""
        key = str(device)
        if key not in self._copies:
            self._copies[key] = tuple(t.to(device) for t in (self.train_x, self.train_y, self.test_x, self.test_y))
        return self._copies[key]

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of the training images, in [0, 1] units (computed once per object)."""
        if self._stats is None:
            x = self.train_x.double() / 255
            self._stats = x.mean(dim=(0, 2, 3)).float(), x.std(dim=(0, 2, 3)).float()
        return self._stats


def abspath(path: str | os.PathLike) -> Path:
    """Paths in configs are relative to the launch directory (hydra.job.chdir=true is refused: sweep.check_chdir)."""
    return Path(path).expanduser().resolve()


def stratified_subset(y: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the first n images taking classes in turn: the first ~n/K of every class, in index order."""
    rank = torch.empty_like(y)
    for c in y.unique():
        idx = (y == c).nonzero().squeeze(1)
        rank[idx] = torch.arange(len(idx))
    keep = torch.argsort(rank * len(y) + torch.arange(len(y)))[:n]
    return keep.sort().values


def load_images(data_cfg: Any) -> Images:
    cache_dir = abspath(data_cfg.cache_dir)
    if data_cfg.name == "cifar10":
        root = abspath(data_cfg.root)
        missing = cifar10_missing(root)
        if missing and not data_cfg.download:
            raise DataError(f"CIFAR-10 is not under {root} ({CIFAR10_FOLDER}/ lacks {', '.join(missing)}) and "
                            f"data.download=false. Set data.download=true, point data.root at the folder holding "
                            f"{CIFAR10_FOLDER}, or use a local image copy: data=imagefolder data.path=PATH "
                            "(e.g. data.path=../shared/data/cifar10-jpeg.tar.gz).")
        if missing:
            ensure_cifar10(root)
        folder = root / CIFAR10_FOLDER
        files = [folder / n for n in CIFAR10_FILES]
        checksum, source = sha256_files(files, root), f"cifar10:{root}"
        cache_file, decode = cache_dir / f"cifar10-{checksum[:16]}.pt", lambda: read_cifar10_batches(folder)
    else:
        path = abspath(data_cfg.path)
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        checksum, source = sha256_files(files, None if path.is_file() else path), str(path)
        cache_file, decode = cache_dir / f"imagefolder-{checksum[:16]}.pt", lambda: decode_imagefolder(path)
    key = (source, checksum, data_cfg.subset, data_cfg.val_subset)
    if _LAST.get("key") == (*key, _stat(cache_file)):
        return _LAST["images"]
    t = cached(cache_file, decode)
    images = Images(t["train_x"], t["train_y"], t["test_x"], t["test_y"], list(t["classes"]), source, checksum)
    images.train_x, images.train_y = _first(images.train_x, images.train_y, data_cfg.subset)
    images.test_x, images.test_y = _first(images.test_x, images.test_y, data_cfg.val_subset)
    _LAST.update(key=(*key, _stat(cache_file)), images=images)
    return images


# The last images this process loaded, with what they were loaded from: the next job of a launcher that runs
# several in one process (basic, streams) gets the same object, read-only, unless the source or the cache file
# changed (a cache read costs a digest of every tensor, and the channel statistics are computed once per object).
_LAST: dict[str, Any] = {}


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _first(x: torch.Tensor, y: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The stratified first n images of a split (all of them when n is None or not smaller)."""
    if n is None or n >= len(y):
        return x, y
    keep = stratified_subset(y, int(n))
    return x[keep], y[keep]


# --- device batches --------------------------------------------------------------------------------------

class Normalize(torch.nn.Module):
    """uint8 images to what the net takes: x * scale - shift per channel, scale = 1 / (255 std) and shift =
    mean / std with the training split's mean and std ([0, 1] units). The loader's normalization, and the first
    layer of the model a run logs (lineage.py), so that both compute the same numbers."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", (1 / (255 * std)).view(1, -1, 1, 1))
        self.register_buffer("shift", (mean / std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale - self.shift


class DeviceLoader:
    """One split held whole on the device as uint8. Each epoch: one permutation (training) or none
    (evaluation); each batch: gather, normalize with the training set's mean/std, then `augment`
    (the batch tricks, training only). drop_last keeps every training batch full (BatchNorm needs > 1).

    Iterating gives the batches; a training step that wants the batch made inside its own CUDA graph takes
    indices() and batch() apart: the indices are the only thing that changes from step to step."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, batch_size: int,
                 device: torch.device, *, train: bool = False, gen: torch.Generator | None = None,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.x, self.y = x.to(device), y.to(device)
        self.normalize = Normalize(mean, std).to(device)
        self.batch_size, self.train, self.gen, self.augment = min(batch_size, len(y)), train, gen, augment

    def __len__(self) -> int:
        n, b = len(self.y), self.batch_size
        return n // b if self.train else -(-n // b)

    def indices(self) -> Iterator[torch.Tensor | slice]:
        """Each batch's images, one epoch: views of one permutation (training), else slices in order."""
        n, b = len(self.y), self.batch_size
        order = torch.randperm(n, generator=self.gen, device=self.x.device) if self.train else None
        for i in range(len(self)):
            yield order[i * b:(i + 1) * b] if order is not None else slice(i * b, (i + 1) * b)

    def batch(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalized (and, training, augmented) images at idx, and their labels."""
        x = self.normalize.forward(self.x[idx])  # forward(): no module-call overhead in each eager step
        if self.augment is not None:
            x = self.augment(x)
        return x, self.y[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self.batch(idx) for idx in self.indices())
