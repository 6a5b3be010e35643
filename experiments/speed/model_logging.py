"""What logging a run's trained net as an MLflow model costs (cifar_ablation/lineage.py): the slide's net with
every trick's layers, then the capacity rung's widths, each twice in one process (the first pays torch.export's
import), into a fresh sqlite store; seconds and megabytes of each.

    python experiments/speed/model_logging.py [--data ARCHIVE]     (default: the JPEG mirror beside the checkout)
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlflow
from omegaconf import OmegaConf

from cifar_ablation.data import load_images
from cifar_ablation.lineage import log_trained_model
from cifar_ablation.model import Arch, build_model

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    images = load_images(OmegaConf.create(dict(name="imagefolder", path=args.data, cache_dir=str(tmp / "cache"),
                                               subset=500, val_subset=100)))
    uri = f"sqlite:///{tmp}/m.db"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("cost", artifact_location=str(tmp / "mlruns"))
    tricks = dict(batchnorm=True, conv_dropout=0.2, dense_dropout=0.3, instancenorm="input")
    nets = [("the slide's net", Arch(**tricks)), ("capacity x4, dense x2", Arch(widths=[128, 256, 512], dense=1024,
                                                                              **tricks))]
    for name, arch in nets * 2:
        run = client.create_run(exp).info.run_id
        t = time.perf_counter()
        model_id = log_trained_model(client, uri, exp, run, build_model(arch), images, step=1)
        seconds = time.perf_counter() - t
        size = sum(f.stat().st_size for f in (tmp / "mlruns").rglob("*") if f.is_file() and model_id in str(f))
        print(f"{name}: {seconds:.2f} s, {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
