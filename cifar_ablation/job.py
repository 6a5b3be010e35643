"""One Hydra job: validate, claim its MLflow run (skip / join a live twin / resume / create), train, close the run.

job_steps() is the job as a generator (train.training() inside its MLflow run): run_job() runs it straight
through, as every launcher but one does; the streams launcher (streams.py) interleaves several jobs' generators in
one process. user_errors() is how a bad config or unreadable data ends the program: one `error:` line.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .checks import UserError
from .designs import ordered_tricks

log = logging.getLogger("cifar_ablation")
TRACEBACK_ENV = "CIFAR_ABLATION_TRACEBACK"  # =1: a UserError shows its traceback too


@contextmanager
def user_errors() -> Iterator[None]:
    """A UserError becomes SystemExit("error: ..."): it passes through Hydra, which would print its banner and a
    traceback around any other exception (FAILED runs keep theirs)."""
    try:
        yield
    except UserError as e:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        raise SystemExit(f"error: {e}") from None


class AlreadyRunning(UserError):
    """Another live process is training this very config (a single run; a sweep's job joins that run instead)."""


def run_job(cfg: DictConfig) -> float | None:
    from .train import run_through

    return run_through(job_steps(cfg))


def job_steps(cfg: DictConfig):
    """The job, yielding (the run's device) after its setup and after each training step; returns val_acc."""
    # torch and MLflow are imported here, not above: cli() refuses an unknown trick before paying for them, and a
    # bad value is refused before MLflow is imported (the checks need torch: the tricks' hooks are beside them)
    from .config import apply_trick_params, validate

    apply_trick_params(cfg)  # ablation.params into the chosen tricks
    validate(cfg)  # bad values fail here, before any data is read or run opened

    import torch

    from .data import load_images
    from .jobrun import claim, job_run
    from .lineage import log_datasets, log_or_warn
    from .steps import device_tags
    from .tracking import open_experiment
    from .train import build, pick_device, training

    tricks = ordered_tricks(cfg.trick, cfg.ablation.order)
    client, exp_id = open_experiment(cfg)  # made by the launcher's callback already: a lookup here
    c = claim(cfg, client, exp_id)  # skip, refuse (a live twin), resume or create
    if reused(c, f"{','.join(tricks) or 'baseline'} seed {cfg.seed}", client):  # its final val_acc (a live one: none)
        return c.run.data.metrics.get("val_acc") if c.run.info.status == "FINISHED" else None
    with job_run(cfg, tricks, client, exp_id, c) as run:
        images = load_images(cfg.data)
        job_num = OmegaConf.select(HydraConfig.get(), "job.num", default=0)  # unset outside a multirun
        device = pick_device(cfg.device, job_num or 0)
        run.set_tags({"data_source": images.source, "data_checksum": images.checksum, "device": device,
                      "train_images": len(images.train_y), "val_images": len(images.test_y),
                      **device_tags(cfg, device)})
        log_datasets(client, run.run_id, images)
        start, last = run.start_state(), {}

        def on_epoch(epoch: int, metrics: dict, state_fn) -> None:
            run.end_epoch(epoch, metrics, state_fn)
            last["state"] = state_fn  # its ["model"]: the net as this epoch left it

        try:
            metrics = yield from training(cfg, images, on_epoch, start, device)
        except torch.cuda.OutOfMemoryError as e:
            raise MemoryError(f"CUDA out of memory on {device}: lower train.batch_size (now {cfg.train.batch_size}) "
                              f"or train.eval_batch_size (now {cfg.train.eval_batch_size}), run fewer jobs per GPU "
                              "(jobs_per_device, with hydra/launcher=parallel or streams), or keep train.amp=true. "
                              + str(e).split("\n")[0]) from e
        if cfg.mlflow.log_model:  # every epoch trained (a relaunch after the last one trains none: its checkpoint)
            net = build(cfg, images)
            net.load_state_dict((last["state"]() if last else start)["model"])
            run.flush()  # the last epoch's metrics, which the model takes over
            log_or_warn(run, cfg.mlflow.tracking_uri, exp_id, net, images, cfg.train.epochs)
    return metrics["val_acc"]


def reused(c, name: str, client) -> bool:
    """Whether an earlier run answers the job `name`: a FINISHED run of its config (skipped), or, in a sweep, the
    run a live process is training it in (refused: the sweep's end waits for it, sweep.SweepTracking). Either
    joins the sweep being launched, whose report shows it. Outside a sweep a live twin stops the job."""
    from .jobrun import REFUSE, SKIP, join_sweep
    from .tracking import PARENT_ENV

    if c.action == REFUSE and not os.environ.get(PARENT_ENV):
        raise AlreadyRunning(f"{held_by(c.run)}; wait for it, or, if that process is gone, start a new run with "
                             "force=true")
    if c.action == SKIP:
        log.info("skipping %s: FINISHED run %s already holds this config (force=true re-runs it)", name,
                 c.run.info.run_id)
    elif c.action == REFUSE:
        log.warning("not training %s: %s; its run joins this sweep, which waits for it at its end", name,
                    held_by(c.run))
    else:
        return False
    join_sweep(client, c.run.info.run_id, moved=False)
    return True


def held_by(run) -> str:
    """Who trains a refused claim's config: '... is being trained right now by another process (run, pid, host)'."""
    tags = run.data.tags
    return (f"config {tags.get('config_hash')} is being trained right now by another process (run "
            f"{run.info.run_id}, pid {tags.get('pid')} on {tags.get('host')})")
