"""The whole config, checked before any data is read or run opened.

Every bad value raises ConfigError naming the key, the value and what is allowed (the combinators are in
checks.py; each trick's parameters are checked by the checks registered beside its hook in tricks.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from .checks import (ConfigError, UserError, boolean, check_tracking_uri, interval, non_empty, number, one_of,
                     node_paths, open_node, optional, require, unknown_key)
from .designs import DESIGNS, SINGLE
from .factorial import RESOLUTIONS, check_factorial
from .steps import graph_blocker
from .tricks import TRICKS

DEVICES = ("auto", "cuda", "cpu")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("onecycle", "cosine", "constant")
DATASETS = ("cifar10", "imagefolder")


def validate(cfg: DictConfig, here: bool = True) -> None:
    """Fail fast, before any data is read or a run is opened. A flat list: one line per key. here=False: the run
    will train on another machine (a SLURM node), so what this one has (a CUDA device, the data's files) is not
    asked of it; that run checks it where it starts."""
    validate_keys(cfg)
    validate_tricks(cfg)
    require(cfg, "ablation.design", one_of(SINGLE, *DESIGNS))
    validate_factorial(cfg)
    check_tracking_uri(str(cfg.mlflow.tracking_uri))
    require(cfg, "seed", number(0, integer=True))
    require(cfg, "jobs_per_device", number(1, integer=True))
    require(cfg, "device", device_name)
    if here and cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda", "auto or cpu on this machine: torch sees no CUDA device")
    for key in ("train.epochs", "train.batch_size", "train.eval_batch_size"):
        require(cfg, key, number(1, integer=True))
    require(cfg, "train.label_smoothing", number(0, 1, hi_open=True))
    for key in ("force", "train.amp", "train.channels_last", "train.compile", "train.checkpoint",
                "train.cudnn_benchmark", "optim.nesterov", "mlflow.log_model", "mlflow.log_system_metrics"):
        require(cfg, key, boolean)
    require(cfg, "train.progress_every_s", number(0))
    require(cfg, "train.cuda_graph", lambda v: None if v == "auto" or isinstance(v, bool) else "auto, true or false")
    if cfg.train.cuda_graph is True:
        device = torch.device("cuda" if cfg.device != "cpu" and (torch.cuda.is_available() or not here) else "cpu")
        blocker = graph_blocker(cfg, device)
        if blocker:
            raise ConfigError("train.cuda_graph", True, f"auto or false for this run: {blocker}")

    require(cfg, "optim.name", one_of(*OPTIMIZERS))
    require(cfg, "optim.lr", number(0, lo_open=True))
    require(cfg, "optim.weight_decay", number(0))
    require(cfg, "optim.momentum", number(0, 1, hi_open=True))
    require(cfg, "optim.betas", interval(0, 1))
    require(cfg, "optim.schedule", one_of(*SCHEDULES))
    require(cfg, "optim.warmup_frac", number(0, 1, lo_open=True, hi_open=True))

    require(cfg, "model.convs_per_block", number(1, integer=True))
    require(cfg, "model.dense", number(1, integer=True))
    require(cfg, "model.num_classes", number(2, integer=True))
    widths = cfg.model.widths
    if not isinstance(widths, ListConfig) or not 1 <= len(widths) <= 5 or any(number(1, integer=True)(w) for w in widths):
        raise ConfigError("model.widths", widths, "a list of 1 to 5 positive integers (32 / 2**len must stay >= 1)")

    validate_data(cfg, here)
    require(cfg, "mlflow.tracking_uri", non_empty("tracking URI"))
    require(cfg, "mlflow.experiment", non_empty("experiment name"))


def device_name(v) -> str | None:
    """auto, cuda or cpu; `cuda:1` is told how a GPU of several is chosen."""
    problem = one_of(*DEVICES)(v)
    if problem and str(v).startswith("cuda:"):
        problem += " (one GPU of several: CUDA_VISIBLE_DEVICES=N; a sweep's jobs take the visible GPUs in turn)"
    return problem


def validate_keys(cfg: DictConfig) -> None:
    """Every key of the config is one some file of conf/ has (under ablation.params, apply_trick_params checks
    them): a key added with a + (+optim.lrr=0.01, Hydra's own advice for a misspelled key) would be read by
    nothing, and the run would train as if it were not there."""
    for key in node_paths(cfg):
        problem = None if open_node(key) else unknown_key(key)
        if problem:
            raise UserError(f"invalid config: {problem[0]} is not a key of the config{problem[1]}; nothing would "
                            "read it")


def apply_trick_params(cfg: DictConfig) -> None:
    """ablation.params.<trick>.<param>: a trick's parameter wherever that trick is chosen, so that a sweep over
    trick sets (a design) can set one without turning the trick on in every job. Merged into cfg.trick in place,
    before validate() checks the values."""
    params = OmegaConf.select(cfg, "ablation.params", default=None) or {}
    for name, values in params.items():
        if name not in TRICKS:
            raise ConfigError("ablation.params", name, f"a map keyed by known tricks: {', '.join(TRICKS)}")
        if not isinstance(values, DictConfig):
            raise ConfigError(f"ablation.params.{name}", values, f"a map of {name}'s parameters to values")
        for param in values:
            if param not in TRICKS[name].checks:
                raise ConfigError(f"ablation.params.{name}", param,
                                  f"a parameter of {name}: {', '.join(TRICKS[name].checks)}")
        if name in (cfg.get("trick") or {}):
            with open_dict(cfg):
                cfg.trick[name] = OmegaConf.merge(cfg.trick[name], values)


def validate_tricks(cfg: DictConfig) -> None:
    """Every chosen trick is known and its parameters pass the checks registered with its hook; the order is
    a list of known tricks without repeats."""
    known = ", ".join(TRICKS)
    for name in cfg.get("trick") or {}:
        if name not in TRICKS:
            raise ConfigError("trick", name, f"a list of known tricks: {known}")
        for param, check in TRICKS[name].checks.items():
            require(cfg, f"trick.{name}.{param}", check)
    order = list(cfg.ablation.order)
    for name in order:
        if name not in TRICKS:
            raise ConfigError("ablation.order", order, f"a list of known tricks ({known})")
    if len(set(order)) != len(order):
        raise ConfigError("ablation.order", order, "a list without repeats")


def validate_factorial(cfg: DictConfig) -> None:
    """ablation.fraction: a resolution, or null for the full factorial, whose size stays within reach."""
    require(cfg, "ablation.fraction", optional(one_of(*RESOLUTIONS)))
    if cfg.ablation.design == "factorial":
        check_factorial(list(cfg.ablation.order), cfg.ablation.fraction)


def validate_data(cfg: DictConfig, here: bool = True) -> None:
    require(cfg, "data.name", one_of(*DATASETS))
    for key in ("data.subset", "data.val_subset"):
        require(cfg, key, optional(number(10, integer=True)))
    if cfg.data.name == "cifar10":
        require(cfg, "data.download", boolean)
    if cfg.data.name == "imagefolder":
        path = cfg.data.path
        if not path:
            raise ConfigError("data.path", path, "a directory or .tar/.tar.gz archive laid out train/<class>/*, "
                              "test/<class>/* (e.g. data.path=../shared/data/cifar10-jpeg.tar.gz)")
        if here and not Path(path).exists():
            raise ConfigError("data.path", path, f"an existing directory or archive; {Path(path).resolve()} does not exist")
