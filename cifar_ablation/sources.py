"""Where images come from, decoded once: an image folder or archive laid out train/<class>/*, test/<class>/*,
or CIFAR-10 in torchvision's format (downloaded by torchvision when absent), into a dict of uint8 tensors kept
in a cache file keyed by the source's checksum and verified by its own digest on every read.

Several jobs may start at once on a new machine (a parallel launcher's processes, a SLURM array on a shared
disk): one downloads CIFAR-10 and one decodes a source into its cache while the others wait on a file lock
beside it, then read what it made. A download or an unpacking cut short leaves nothing that looks complete.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import torch
from filelock import FileLock

from .checks import UserError

log = logging.getLogger(__name__)
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
CACHE_VERSION = 1
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


class DataError(UserError):
    """The data cannot be read as asked; the message says what to do."""


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


def cifar10_missing(root: Path) -> list[str]:
    """The files of torchvision's CIFAR-10 that root/cifar-10-batches-py lacks."""
    return [n for n in CIFAR10_FILES if not (root / CIFAR10_FOLDER / n).is_file()]


def ensure_cifar10(root: Path) -> None:
    """CIFAR-10 under root, downloaded by torchvision when absent: one process at a time (a file lock in root),
    the archive checked against torchvision's md5 and unpacked beside the final folder, which it replaces
    whole. A process that waited finds the folder complete and downloads nothing."""
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / ".cifar-10.lock"):
        if not cifar10_missing(root):
            return
        log.info("downloading CIFAR-10 into %s", root)
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import download_and_extract_archive
        with tempfile.TemporaryDirectory(dir=root, prefix=".unpacking-") as tmp:
            try:  # the archive stays in root: a download cut short is found corrupt by its md5 and fetched anew
                download_and_extract_archive(CIFAR10.url, str(root), extract_root=tmp, filename=CIFAR10.filename,
                                             md5=CIFAR10.tgz_md5)
            except Exception as e:  # URLError offline, HTTP errors, an md5 mismatch
                raise DataError(
                    f"CIFAR-10 is not under {root} and could not be downloaded ({type(e).__name__}: {e}). "
                    "Offline? Put torchvision's cifar-10-batches-py under data.root=DIR, or train from a local "
                    "copy laid out train/<class>/*, test/<class>/*: data=imagefolder data.path=PATH "
                    "(e.g. data.path=../shared/data/cifar10-jpeg.tar.gz).") from e
            unpacked, lacking = Path(tmp) / CIFAR10_FOLDER, cifar10_missing(Path(tmp))
            if lacking:
                raise DataError(f"{CIFAR10.url} unpacked without {lacking}")
            shutil.rmtree(root / CIFAR10_FOLDER, ignore_errors=True)  # an incomplete copy of the user's
            os.replace(unpacked, root / CIFAR10_FOLDER)


# --- cache ------------------------------------------------------------------------------------------------

def tensor_digest(t: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for k in ("train_x", "train_y", "test_x", "test_y"):
        h.update(t[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def _read_cache(cache_file: Path) -> dict[str, Any] | None:
    """The cached tensors when the file is there and passes its digest; None (saying why) when not."""
    if not cache_file.exists():
        return None
    try:
        t = torch.load(cache_file, weights_only=True)
        if t.get("version") == CACHE_VERSION and t.get("digest") == tensor_digest(t):
            return t
        log.warning("cache %s failed its checksum; rebuilding it", cache_file)
    except Exception as e:  # truncated or not a torch file
        log.warning("cache %s is unreadable (%s); rebuilding it", cache_file, e)
    return None


def cached(cache_file: Path, decode: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Load the decoded tensors from cache_file, verifying their digest; (re)build it when absent or corrupt,
    one process at a time (a lock file beside it): the others wait, then read what it wrote."""
    t = _read_cache(cache_file)
    if t is not None:
        return t
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(cache_file.with_suffix(".lock")):
        t = _read_cache(cache_file)  # another process may have made it while this one waited
        if t is not None:
            return t
        log.info("decoding images once into %s", cache_file)
        t = decode()
        t["version"], t["digest"] = CACHE_VERSION, tensor_digest(t)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        torch.save(t, tmp)
        os.replace(tmp, cache_file)  # atomic: a reader without the lock never sees half a file
    return t
