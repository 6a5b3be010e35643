"""python -m cifar_ablation [-m] [overrides]: one Hydra job = one training run = one MLflow run."""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, check_trick_overrides, ordered_tricks, semantic_hash, validate

log = logging.getLogger("cifar_ablation")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    validate(cfg)  # bad values fail here, before any data is read or run opened
    import torch  # heavy imports after the checks: a bad command line answers in a second or two

    from .data import load_images
    from .tracking import finished_run, job_run, open_experiment
    from .train import pick_device, train

    tricks = ordered_tricks(cfg.trick, cfg.ablation.order)
    client, exp_id = open_experiment(cfg)  # made by the launcher's callback already: a lookup here
    if not cfg.force:
        done = finished_run(client, exp_id, semantic_hash(cfg))
        if done is not None:
            log.info("skipping %s seed %s: FINISHED run %s already holds this config (force=true re-runs it)",
                     tricks or "baseline", cfg.seed, done.info.run_id)
            return done.data.metrics.get("val_acc")
    with job_run(cfg, tricks, client, exp_id) as run:
        images = load_images(cfg.data)
        run.set_tags({"data_source": images.source, "data_checksum": images.checksum,
                      "train_images": len(images.train_y), "val_images": len(images.test_y)})
        state = run.load_checkpoint() if run.resumed else None
        if state is not None:  # the kill may have come between the checkpoint and its metrics
            if state["epoch"] not in run.logged_steps("val_acc"):
                run.log_metrics(state["metrics"], state["epoch"])
            log.info("resuming from the checkpoint of epoch %d", state["epoch"])

        def on_epoch(epoch: int, metrics: dict, state_fn) -> None:
            if cfg.train.checkpoint:  # checkpoint first, then metrics: each epoch is logged exactly once
                run.save_checkpoint({**state_fn(), "metrics": metrics})
            run.log_metrics(metrics, epoch)

        job_num = OmegaConf.select(HydraConfig.get(), "job.num", default=0)  # unset outside a multirun
        device = pick_device(cfg.device, job_num or 0)
        run.set_tags({"device": device})
        try:
            metrics = train(cfg, images, on_epoch, state, device)
        except torch.cuda.OutOfMemoryError as e:
            raise MemoryError(f"CUDA out of memory on {device}: lower train.batch_size (now {cfg.train.batch_size}) "
                              f"or train.eval_batch_size (now {cfg.train.eval_batch_size}), run fewer jobs per GPU "
                              "(hydra.launcher.n_jobs), or keep train.amp=true. " + str(e).split("\n")[0]) from e
    return metrics["val_acc"]


def cli() -> None:
    try:
        check_trick_overrides(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
    main()


if __name__ == "__main__":
    cli()
