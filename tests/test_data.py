"""Both data formats load, get cached, subset and normalize; bad sources fail clearly."""
from __future__ import annotations

import io
import tarfile

import pytest
import torch
from omegaconf import OmegaConf

from cifar_ablation.data import DataError, DeviceLoader, load_images, stratified_subset

from .conftest import CLASSES, TINY, run_cli, runs_in


def data_cfg(tmp_path, **kw):
    base = {"name": "imagefolder", "path": None, "root": None, "download": False, "subset": None,
            "val_subset": None, "cache_dir": str(tmp_path / "cache")}
    return OmegaConf.create({**base, **kw})


@pytest.mark.parametrize("kind", ["dir", "tar", "tar.gz"])
def test_imagefolder_loads_directories_and_archives(tmp_path, imagefolder, kind):
    path = imagefolder(kind, per_class=12)
    images = load_images(data_cfg(tmp_path, path=str(path)))
    assert images.classes == CLASSES
    assert images.train_x.shape == (36, 3, 32, 32) and images.train_x.dtype == torch.uint8
    assert images.test_x.shape == (18, 3, 32, 32)
    assert torch.equal(images.train_y.bincount(), torch.tensor([12, 12, 12]))
    # the class is the dominant colour channel of each synthetic image
    dominant = images.train_x.float().mean(dim=(2, 3)).argmax(1)
    assert torch.equal(dominant, images.train_y)
    assert len(images.checksum) == 64


def test_all_formats_decode_to_the_same_tensors(tmp_path, imagefolder):
    a = load_images(data_cfg(tmp_path, path=str(imagefolder("dir"))))
    b = load_images(data_cfg(tmp_path, path=str(imagefolder("tar.gz"))))
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)


def test_cifar10_format_loads(tmp_path, cifar10_root):
    images = load_images(data_cfg(tmp_path, name="cifar10", root=str(cifar10_root)))
    assert images.train_x.shape == (50, 3, 32, 32) and images.test_x.shape == (10, 3, 32, 32)
    assert images.classes[:2] == ["c0", "c1"] and images.source.startswith("cifar10:")


def test_cifar10_absent_offline_says_how_to_use_a_local_copy(tmp_path):
    with pytest.raises(DataError, match=r"data=imagefolder data\.path="):
        load_images(data_cfg(tmp_path, name="cifar10", root=str(tmp_path / "none"), download=False))


def from_site(monkeypatch, site) -> None:
    """torchvision's CIFAR-10 download pointed at a local stand-in for its site (URL and the archive's md5)."""
    from torchvision.datasets import CIFAR10
    monkeypatch.setattr(CIFAR10, "url", site.url)
    monkeypatch.setattr(CIFAR10, "tgz_md5", site.md5)


def test_cifar10_is_downloaded_by_torchvision_once_and_unpacked_whole(tmp_path, cifar10_site, monkeypatch):
    """data=cifar10 on a new machine: torchvision fetches the archive, checks its md5 and unpacks it; an
    incomplete folder left there (a copy cut short) is replaced whole; the next job downloads nothing."""
    site = cifar10_site(per_batch=8)
    from_site(monkeypatch, site)
    root = tmp_path / "data"
    (root / "cifar-10-batches-py").mkdir(parents=True)
    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"half a file")
    images = load_images(data_cfg(tmp_path, name="cifar10", root=str(root), download=True))
    assert site.gets == 1
    assert images.train_x.shape == (40, 3, 32, 32) and images.test_x.shape == (8, 3, 32, 32)
    assert images.source == f"cifar10:{root}" and images.classes[0] == "c0"
    assert sorted(p.name for p in root.iterdir()) == [".cifar-10.lock", "cifar-10-batches-py",
                                                       "cifar-10-python.tar.gz"]  # no unpacking folder left
    again = load_images(data_cfg(tmp_path, name="cifar10", root=str(root), download=True,
                                 cache_dir=str(tmp_path / "cache2")))
    assert site.gets == 1 and torch.equal(again.train_x, images.train_x) and again.checksum == images.checksum


@pytest.mark.parametrize("fault", ["corrupt", "incomplete", "offline"])
def test_a_failed_cifar10_download_is_a_clear_error_and_leaves_no_folder(tmp_path, cifar10_site, monkeypatch,
                                                                         fault):
    site = cifar10_site(drop=("test_batch",) if fault == "incomplete" else ())
    from_site(monkeypatch, site)
    if fault == "corrupt":  # what a download cut short looks like to torchvision: the wrong md5
        from torchvision.datasets import CIFAR10
        monkeypatch.setattr(CIFAR10, "tgz_md5", "0" * 32)
    if fault == "offline":
        site.httpd.shutdown()
        site.httpd.server_close()
    root = tmp_path / "data"
    with pytest.raises(DataError) as e:
        load_images(data_cfg(tmp_path, name="cifar10", root=str(root), download=True))
    expect = {"corrupt": "could not be downloaded (RuntimeError: File not found or corrupted.)",
              "incomplete": "unpacked without ['test_batch']", "offline": "could not be downloaded (URLError"}
    assert expect[fault] in str(e.value)
    if fault != "incomplete":
        assert "Offline? " in str(e.value) and "data=imagefolder data.path=" in str(e.value)
    assert not (root / "cifar-10-batches-py").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".unpacking")]


def test_cifar10_partly_there_without_download_names_what_is_missing(tmp_path, cifar10_root):
    (cifar10_root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"lacks data_batch_3\) and data\.download=false"):
        load_images(data_cfg(tmp_path, name="cifar10", root=str(cifar10_root), download=False))


def test_decoded_once_then_read_from_cache(tmp_path, imagefolder):
    path = imagefolder("tar")
    cfg = data_cfg(tmp_path, path=str(path))
    first = load_images(cfg)
    files = list((tmp_path / "cache").glob("*.pt"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = load_images(cfg)
    assert files[0].stat().st_mtime_ns == mtime and torch.equal(first.train_x, again.train_x)
    meta = torch.device("meta")  # a device other than the CPU, without one: copied there once, then shared
    copies = again.on(meta)
    assert copies[0].device == meta and copies[0].shape == again.train_x.shape
    assert all(a is b for a, b in zip(again.on(meta), copies))


def test_corrupt_cache_is_rebuilt_not_trusted(tmp_path, imagefolder):
    cfg = data_cfg(tmp_path, path=str(imagefolder("tar")))
    good = load_images(cfg)
    cache = next((tmp_path / "cache").glob("*.pt"))
    t = torch.load(cache, weights_only=True)
    t["train_x"][0] = 0  # silent garbage: right shape, wrong pixels
    torch.save(t, cache)
    assert torch.equal(load_images(cfg).train_x, good.train_x)
    cache.write_bytes(cache.read_bytes()[:100])  # truncated
    assert torch.equal(load_images(cfg).train_x, good.train_x)


def test_truncated_archive_is_a_clear_error(tmp_path, imagefolder):
    path = imagefolder("tar.gz", per_class=30)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_images(data_cfg(tmp_path, path=str(path)))


@pytest.mark.parametrize("name", ["../evil/train/cat/1.png", "/abs/train/cat/1.png"])
def test_archive_members_outside_the_target_are_refused(tmp_path, name):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(DataError, match="outside the archive"):
        load_images(data_cfg(tmp_path, path=str(path)))


def test_archive_links_are_refused(tmp_path):
    path = tmp_path / "link.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("train/cat/1.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DataError, match="is a link"):
        load_images(data_cfg(tmp_path, path=str(path)))


def test_subset_is_stratified_and_deterministic(tmp_path, imagefolder):
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    keep = stratified_subset(y, 30)
    assert torch.equal(y[keep].bincount(), torch.tensor([10, 10, 10]))
    assert torch.equal(keep, stratified_subset(y, 30))
    images = load_images(data_cfg(tmp_path, path=str(imagefolder("dir", per_class=20)), subset=30, val_subset=15))
    assert torch.equal(images.train_y.bincount(), torch.tensor([10, 10, 10]))
    assert len(images.test_y) == 15


def test_device_loader_normalizes_with_training_stats_and_reshuffles(tmp_path, imagefolder):
    images = load_images(data_cfg(tmp_path, path=str(imagefolder("dir", per_class=20))))
    mean, std = images.channel_stats()
    g = torch.Generator().manual_seed(0)
    loader = DeviceLoader(images.train_x, images.train_y, mean, std, 16, torch.device("cpu"), train=True, gen=g)
    assert len(loader) == 60 // 16  # full batches only
    xs = torch.cat([x for x, _ in DeviceLoader(images.train_x, images.train_y, mean, std, 60, torch.device("cpu"))])
    assert xs.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (xs.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2
    first = [y.tolist() for _, y in loader]
    second = [y.tolist() for _, y in loader]
    assert first != second  # a new permutation each epoch
    val = DeviceLoader(images.test_x, images.test_y, mean, std, 7, torch.device("cpu"))
    assert torch.equal(torch.cat([y for _, y in val]), images.test_y)  # every image, in order, once


def test_more_classes_than_the_net_has_outputs_fails_before_training_naming_the_key(tmp_path, imagefolder, tracking_db):
    """Three classes, model.num_classes=2: the run fails at once saying what to set (it failed mid-epoch with
    torch's "Target 2 is out of bounds"); fewer classes than outputs train (unused outputs)."""
    res = run_cli([*TINY, "data=imagefolder", f"data.path={imagefolder('dir', per_class=10)}",
                   f"data.cache_dir={tmp_path}/cache", "model.num_classes=2",
                   f"mlflow.tracking_uri=sqlite:///{tracking_db}",
                   "mlflow.experiment=classes"], tmp_path)
    assert res.returncode != 0
    message = ("model.num_classes=2 is not allowed; model.num_classes must be at least 3: the data has 3 classes "
               "(cat, dog, frog)")
    assert f"error: invalid config: {message}" in res.stderr, res.stderr[-2000:]
    _, (run,) = runs_in(tracking_db, "classes")
    assert run.info.status == "FAILED" and message in run.data.tags["failure_reason"]
    assert "train_loss" not in run.data.metrics
