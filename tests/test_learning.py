"""On real CIFAR-10 (the JPEG mirror) the trainer learns clearly above chance on CPU, and is deterministic."""
from __future__ import annotations

import pytest
import torch

from cifar_ablation.data import load_images
from cifar_ablation.train import train

from .conftest import JPEG_ARCHIVE

SMALL = ["data=imagefolder", f"data.path={JPEG_ARCHIVE}", "data.subset=2000", "data.val_subset=1000",
         "model.widths=[16,32,64]", "model.dense=128", "train.batch_size=64", "device=cpu"]


def test_learns_clearly_above_chance_on_real_cifar10(make_cfg, jpeg_cache):
    cfg = make_cfg(*SMALL, f"data.cache_dir={jpeg_cache}", "trick=[batchnorm,flip]", "train.epochs=4")
    images = load_images(cfg.data)
    assert images.classes[0] == "airplane" and images.checksum.startswith("58c58e3a")
    epochs = []
    metrics = train(cfg, images, on_epoch=lambda e, m, state: epochs.append((e, m)))
    assert [e for e, _ in epochs] == [1, 2, 3, 4]
    assert set(metrics) >= {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds",
                            "images_per_second"}
    # 10 classes: chance is 10%. 2,000 images and 4 epochs of a small net reach well above it.
    print(f"val_acc after 4 epochs: {metrics['val_acc']:.3f}")
    assert metrics["val_acc"] > 0.30, metrics
    assert epochs[-1][1]["train_loss"] < epochs[0][1]["train_loss"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path (bf16 autocast, device-side data) needs a GPU")
def test_cuda_path_learns_clearly_above_chance(make_cfg, jpeg_cache):
    cfg = make_cfg(*SMALL, f"data.cache_dir={jpeg_cache}", "trick=[batchnorm,flip,crop,noise]", "train.epochs=4",
                   "device=cuda")
    images = load_images(cfg.data)
    metrics = train(cfg, images, device=torch.device("cuda"))
    assert metrics["val_acc"] > 0.30, metrics
