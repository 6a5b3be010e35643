"""Config checks that run before any training, and the ablation designs generated from one trick order.

Every bad value raises ConfigError naming the key, the value and what is allowed.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

# A check returns None for a good value, else a phrase saying what is allowed.
Check = Callable[[Any], "str | None"]

DEVICES = ("auto", "cuda", "cpu")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("onecycle", "cosine", "constant")
DATASETS = ("cifar10", "imagefolder")
DESIGNS = ("single", "ladder", "leave_one_out", "one_at_a_time")
# Keys that do not change a run's result: left out of its semantic hash (see semantic_hash).
NON_SEMANTIC = ("device", "force", "jobs_per_device", "mlflow", "train.progress_every_s", "train.checkpoint", "train.compile",
                "ablation.design", "ablation.slide", "data.cache_dir", "data.download")


class ConfigError(ValueError):
    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"invalid config: {key}={value!r} is not allowed; {key} must be {allowed}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           integer: bool = False) -> Check:
    left = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
    right = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
    allowed = (("an integer" if integer else "a number") + " " + " and ".join(s for s in (left, right) if s)).strip()

    def check(v: Any) -> str | None:
        if not _is_number(v) or (integer and not isinstance(v, int)) or v != v:
            return allowed
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return allowed
        if hi is not None and (v > hi or (hi_open and v == hi)):
            return allowed
        return None
    return check


def one_of(*values: str) -> Check:
    return lambda v: None if v in values else "one of " + ", ".join(values)


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def interval(lo: float, hi: float | None, *, lo_open: bool = False) -> Check:
    """A [a, b] pair of numbers with a <= b inside (lo, hi]."""
    inner = number(lo, hi, lo_open=lo_open)
    allowed = f"a pair [a, b] of numbers with {lo} {'<' if lo_open else '<='} a <= b" + ("" if hi is None else f" <= {hi}")

    def check(v: Any) -> str | None:
        if not isinstance(v, (list, tuple, ListConfig)) or len(v) != 2 or any(inner(x) for x in v) or v[0] > v[1]:
            return allowed
        return None
    return check


def _require(cfg: DictConfig, key: str, check: Check) -> None:
    value = OmegaConf.select(cfg, key, default=None)
    allowed = check(value)
    if allowed:
        raise ConfigError(key, value, allowed)


def validate(cfg: DictConfig) -> None:
    """Fail fast, before any data is read or a run is opened."""
    from .tricks import TRICKS  # tricks imports the checks above

    known = ", ".join(TRICKS)
    for name in cfg.get("trick") or {}:
        if name not in TRICKS:
            raise ConfigError("trick", name, f"a list of known tricks: {known}")
        for param, check in TRICKS[name].checks.items():
            _require(cfg, f"trick.{name}.{param}", check)
    order = list(cfg.ablation.order)
    for name in order:
        if name not in TRICKS:
            raise ConfigError("ablation.order", order, f"a list of known tricks ({known})")
    if len(set(order)) != len(order):
        raise ConfigError("ablation.order", order, "a list without repeats")
    _require(cfg, "ablation.design", one_of(*DESIGNS))

    _require(cfg, "seed", number(0, integer=True))
    _require(cfg, "jobs_per_device", number(1, integer=True))
    _require(cfg, "device", one_of(*DEVICES))
    if cfg.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("device", "cuda", "auto or cpu on this machine: torch sees no CUDA device")
    for key in ("train.epochs", "train.batch_size", "train.eval_batch_size"):
        _require(cfg, key, number(1, integer=True))
    _require(cfg, "train.label_smoothing", number(0, 1, hi_open=True))
    for key in ("force", "train.amp", "train.channels_last", "train.compile", "train.checkpoint", "optim.nesterov"):
        _require(cfg, key, boolean)
    _require(cfg, "train.progress_every_s", number(0))

    _require(cfg, "optim.name", one_of(*OPTIMIZERS))
    _require(cfg, "optim.lr", number(0, lo_open=True))
    _require(cfg, "optim.weight_decay", number(0))
    _require(cfg, "optim.momentum", number(0, 1, hi_open=True))
    _require(cfg, "optim.betas", interval(0, 1))
    _require(cfg, "optim.schedule", one_of(*SCHEDULES))
    _require(cfg, "optim.warmup_frac", number(0, 1, lo_open=True, hi_open=True))

    _require(cfg, "model.convs_per_block", number(1, integer=True))
    _require(cfg, "model.dense", number(1, integer=True))
    _require(cfg, "model.num_classes", number(2, integer=True))
    widths = cfg.model.widths
    if not isinstance(widths, ListConfig) or not 1 <= len(widths) <= 5 or any(number(1, integer=True)(w) for w in widths):
        raise ConfigError("model.widths", widths, "a list of 1 to 5 positive integers (32 / 2**len must stay >= 1)")

    _require(cfg, "data.name", one_of(*DATASETS))
    for key in ("data.subset", "data.val_subset"):
        _require(cfg, key, lambda v: None if v is None else number(10, integer=True)(v))
    if cfg.data.name == "cifar10":
        _require(cfg, "data.download", boolean)
    if cfg.data.name == "imagefolder":
        path = cfg.data.path
        if not path:
            raise ConfigError("data.path", path, "a directory or .tar/.tar.gz archive laid out train/<class>/*, "
                              "test/<class>/* (e.g. data.path=../shared/data/cifar10-jpeg.tar.gz)")
        if not Path(path).exists():
            raise ConfigError("data.path", path, f"an existing directory or archive; {Path(path).resolve()} does not exist")

    _require(cfg, "mlflow.tracking_uri", lambda v: None if isinstance(v, str) and v else "a non-empty tracking URI")
    _require(cfg, "mlflow.experiment", lambda v: None if isinstance(v, str) and v else "a non-empty experiment name")


# --- tricks and designs -------------------------------------------------------------------------------

def ordered_tricks(chosen: Any, order: Any) -> list[str]:
    """The chosen tricks in ablation order (others after, by name): a trick set's one canonical spelling."""
    order = list(order)
    return sorted(chosen, key=lambda t: (order.index(t) if t in order else len(order), t))


def design_configs(design: str, order: Any) -> list[list[str]]:
    """The trick sets a design sweeps, in the order its table shows them."""
    order = list(order)
    if design == "ladder":
        return [order[:i] for i in range(len(order) + 1)]
    if design == "leave_one_out":
        return [order] + [[t for t in order if t != left] for left in order]
    if design == "one_at_a_time":
        return [[]] + [[t] for t in order]
    raise ConfigError("ablation.design", design, "one of ladder, leave_one_out, one_at_a_time")


def design_sweep(design: str, order: Any) -> str:
    """Hydra sweep syntax for a design's trick sets: '[],[noise],[noise,batchnorm],...'."""
    return ",".join("[" + ",".join(s) + "]" for s in design_configs(design, order))


def rung(tricks: list[str], order: Any) -> int | None:
    """The ladder rung of a trick set: n when it is the first n tricks of the order, else None."""
    order = list(order)
    return len(tricks) if tricks == order[:len(tricks)] else None


def semantic_hash(cfg: DictConfig) -> str:
    """Hash of the resolved config minus keys that do not change the result (device, paths, tracking...)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    for key in NON_SEMANTIC:
        *parents, leaf = key.split(".")
        node = plain
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    plain["trick"] = {k: plain["trick"][k] for k in sorted(plain.get("trick") or {})}
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def check_trick_overrides(argv: list[str]) -> None:
    """Hydra reports an unknown option of a multi-select group without listing the valid ones, and only when
    the job that names it starts: check every trick named on the command line (sweeps included) up front."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    valid = sorted(p.stem for p in (CONF_DIR / "trick").glob("*.yaml"))
    args = [a for a in argv if "=" in a and not a.startswith("-")]
    for o in OverridesParser.create().parse_overrides(args):
        if o.key_or_group != "trick" or o.is_delete():
            continue
        values = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
        for v in values:
            for name in v if isinstance(v, list) else [v]:
                if name not in valid:
                    raise ConfigError("trick", name, "a list of known tricks, from: " + ", ".join(valid) +
                                      " (e.g. 'trick=[noise,batchnorm]'; 'trick=[]' is the baseline)")


def device_slots(per_device: int) -> int:
    """Concurrent jobs for hydra/launcher=parallel: per_device for every visible GPU (per_device on CPU)."""
    import torch
    return int(per_device) * max(1, torch.cuda.device_count())


def register_resolvers() -> None:
    for name, fn in (("design_sweep", design_sweep), ("device_slots", device_slots)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def abspath(path: str | os.PathLike) -> Path:
    """Paths in configs are relative to the launch directory (Hydra's job.chdir is off)."""
    return Path(path).expanduser().resolve()
