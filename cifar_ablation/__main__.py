"""python -m cifar_ablation [-m] [overrides]: one Hydra job = one training run = one MLflow run."""
from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from .config import ConfigError, check_trick_overrides, ordered_tricks, semantic_hash, validate
from .data import load_images
from .tracking import finished_run, job_run, open_experiment
from .train import train

log = logging.getLogger("cifar_ablation")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    validate(cfg)  # bad values fail here, before any data is read or run opened
    tricks = ordered_tricks(cfg.trick, cfg.ablation.order)
    if not cfg.force:
        client, exp_id = open_experiment(cfg)
        done = finished_run(client, exp_id, semantic_hash(cfg))
        if done is not None:
            log.info("skipping %s seed %s: FINISHED run %s already holds this config (force=true re-runs it)",
                     tricks or "baseline", cfg.seed, done.info.run_id)
            return done.data.metrics.get("val_acc")
    with job_run(cfg, tricks) as run:
        images = load_images(cfg.data)
        run.set_tags({"data_source": images.source, "data_checksum": images.checksum,
                      "train_images": len(images.train_y), "val_images": len(images.test_y)})
        metrics = train(cfg, images, on_epoch=lambda epoch, m, state: run.log_metrics(m, epoch))
    return metrics["val_acc"]


def cli() -> None:
    try:
        check_trick_overrides(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
    main()


if __name__ == "__main__":
    cli()
