"""Images in, device batches out.

load_images() reads CIFAR-10 (torchvision's format, downloaded when possible) or an image folder / archive
laid out train/<class>/*, test/<class>/*, decodes it once into a uint8 tensor cache keyed by the source's
checksum, and returns it (optionally a stratified subset). DeviceLoader holds a split whole on the device
and yields normalized, shuffled, augmented batches in a few batched tensor ops, airbench-style.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import torch

from .checks import UserError
log = logging.getLogger(__name__)
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
CACHE_VERSION = 1


class DataError(UserError):
    """The data cannot be read as asked; the message says what to do."""


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
    """Paths in configs are relative to the launch directory (Hydra's job.chdir is off)."""
    return Path(path).expanduser().resolve()


# --- sources ---------------------------------------------------------------------------------------------

def sha256_files(paths: list[Path], root: Path | None = None) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        if root is not None:
            h.update(str(p.relative_to(root)).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _member_key(name: str) -> tuple[str, str, str] | None:
    """(split, class, file) for an image at [prefix/]split/class/file; None for anything else."""
    parts = PurePosixPath(name).parts
    for i in range(len(parts) - 2):
        if parts[i] in SPLITS and len(parts) - i == 3 and name.lower().endswith(IMAGE_SUFFIXES):
            return parts[i], parts[i + 1], parts[i + 2]
    return None


def _archive_members(path: Path) -> Iterator[tuple[tuple[str, str, str], bytes]]:
    with tarfile.open(path, "r:*") as tar:
        for m in tar:
            name = m.name
            if name.startswith("/") or ".." in PurePosixPath(name).parts:
                raise DataError(f"refusing archive {path}: member {name!r} points outside the archive")
            if m.issym() or m.islnk():
                raise DataError(f"refusing archive {path}: member {name!r} is a link")
            key = _member_key(name)
            if key and m.isfile():
                yield key, tar.extractfile(m).read()


def _folder_members(path: Path) -> Iterator[tuple[tuple[str, str, str], bytes]]:
    for split in SPLITS:
        for f in sorted((path / split).glob("*/*")):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                yield (split, f.parent.name, f.name), f.read_bytes()


def decode_imagefolder(path: Path) -> dict[str, Any]:
    from torchvision.io import ImageReadMode, decode_image  # torchvision is slow to import: only on a cache miss

    members = _archive_members(path) if path.is_file() else _folder_members(path)
    items: dict[str, list[tuple[str, str, torch.Tensor]]] = {s: [] for s in SPLITS}
    try:
        for (split, cls, name), raw in members:
            img = decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
            items[split].append((cls, name, img))
    except (tarfile.TarError, EOFError, OSError, RuntimeError) as e:  # RuntimeError: undecodable image
        raise DataError(f"cannot read {path}: {e} (truncated or corrupt? re-copy it)") from e
    classes = sorted({c for c, _, _ in items["train"]})
    if not classes or not items["test"]:
        raise DataError(f"{path} holds no images laid out train/<class>/* and test/<class>/* "
                        f"(found {len(items['train'])} train, {len(items['test'])} test images)")
    out: dict[str, Any] = {"classes": classes}
    for split in SPLITS:
        rows = sorted(items[split], key=lambda r: (r[0], r[1]))
        unknown = {c for c, _, _ in rows} - set(classes)
        if unknown:
            raise DataError(f"{path}: test classes {sorted(unknown)} have no training images")
        shapes = {tuple(img.shape) for _, _, img in rows}
        if len(shapes) != 1:
            raise DataError(f"{path}: images of several sizes {sorted(shapes)[:3]}...; all must be equal")
        out[f"{split}_x"] = torch.stack([img for _, _, img in rows])
        out[f"{split}_y"] = torch.tensor([classes.index(c) for c, _, _ in rows], dtype=torch.int64)
    return out


def read_cifar10_batches(folder: Path) -> dict[str, Any]:
    """torchvision's CIFAR-10 python format: pickled dicts of 'data' (N x 3072 uint8) and 'labels'."""
    def read(name: str) -> dict:
        with open(folder / name, "rb") as f:
            return pickle.load(f, encoding="latin1")
    out: dict[str, Any] = {"classes": list(read("batches.meta")["label_names"])}
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        batches = [read(n) for n in names]
        out[f"{split}_x"] = torch.cat([torch.from_numpy(b["data"]).view(-1, 3, 32, 32) for b in batches])
        out[f"{split}_y"] = torch.tensor([y for b in batches for y in b["labels"]], dtype=torch.int64)
    return out


def download_cifar10(root: Path) -> None:
    """torchvision downloads, checks (md5) and unpacks cifar-10-batches-py under root."""
    from torchvision.datasets import CIFAR10
    try:
        CIFAR10(str(root), train=True, download=True)
    except Exception as e:  # URLError offline, HTTP errors, md5 mismatch
        raise DataError(
            f"CIFAR-10 is not under {root} and could not be downloaded ({type(e).__name__}: {e}). Offline? "
            "Put torchvision's cifar-10-batches-py under data.root=DIR, or train from a local copy laid out "
            "train/<class>/*, test/<class>/*: data=imagefolder data.path=PATH "
            "(e.g. data.path=../shared/data/cifar10-jpeg.tar.gz).") from e


# --- cache ------------------------------------------------------------------------------------------------

def tensor_digest(t: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for k in ("train_x", "train_y", "test_x", "test_y"):
        h.update(t[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def cached(cache_file: Path, decode: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Load the decoded tensors from cache_file, verifying their digest; (re)build it when absent or corrupt."""
    if cache_file.exists():
        try:
            t = torch.load(cache_file, weights_only=True)
            if t.get("version") == CACHE_VERSION and t.get("digest") == tensor_digest(t):
                return t
            log.warning("cache %s failed its checksum; rebuilding it", cache_file)
        except Exception as e:  # truncated or not a torch file
            log.warning("cache %s is unreadable (%s); rebuilding it", cache_file, e)
    log.info("decoding images once into %s", cache_file)
    t = decode()
    t["version"], t["digest"] = CACHE_VERSION, tensor_digest(t)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
    torch.save(t, tmp)
    os.replace(tmp, cache_file)  # atomic: concurrent jobs never read a half-written cache
    return t


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
        folder = root / "cifar-10-batches-py"
        if not (folder / "test_batch").exists():
            if not data_cfg.download:
                raise DataError(f"CIFAR-10 is not under {root} (no {folder}/test_batch) and data.download=false. "
                                "Set data.download=true, point data.root at the folder holding cifar-10-batches-py, "
                                "or use a local image copy: data=imagefolder data.path=PATH "
                                "(e.g. data.path=../shared/data/cifar10-jpeg.tar.gz).")
            download_cifar10(root)
        files = sorted(folder.glob("*batch*"))
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
