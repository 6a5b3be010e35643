"""What a run is, as MLflow records it: its parameters (the flattened resolved config) and its semantic hash
(the config minus the keys that cannot change its result), which finds a config's earlier runs to skip or resume.

Every key of conf/ is classified here as changing the result or not; tests/test_config.py fails when a key is
added to conf/ without being put in one of the two lists.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Keys (or whole subtrees) that change what a run computes: part of its semantic hash.
SEMANTIC = ("seed", "trick", "model", "optim", "train.epochs", "train.batch_size",
            "train.eval_batch_size", "train.label_smoothing", "train.amp", "train.channels_last",
            "data.name", "data.root", "data.path", "data.subset", "data.val_subset")
# Keys that do not: where and how a run executes and is tracked. Left out of the semantic hash.
NON_SEMANTIC = ("device", "force", "jobs_per_device", "mlflow", "train.progress_every_s", "train.checkpoint",
                "train.compile", "train.cuda_graph", "train.cudnn_benchmark", "ablation.design", "ablation.fraction",
                "ablation.slide",
                # where a trick set sits in a design, not what it trains: tricks apply in their declared order
                # (tricks.py), so a ladder in another order, or a factorial, reuses the runs it shares
                "ablation.order",
                "ablation.params",  # its effect is in trick.* (merged there for the chosen tricks)
                "data.cache_dir",
                "data.download")


def plain(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers, without Hydra's own node."""
    out = OmegaConf.to_container(cfg, resolve=True)
    out.pop("hydra", None)
    return out


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """MLflow params: one per leaf key ('optim.lr'), values as strings (MLflow's limit: 6000 characters)."""
    return flatten(plain(cfg))


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """Plain containers as flat_params writes them: {'a.b': 'value'} (an empty dict is a leaf)."""
    if isinstance(node, dict) and node:
        return {k: v for key, child in node.items() for k, v in flatten(child, f"{prefix}{key}.").items()}
    return {prefix[:-1]: str(node)[:6000]}


def table_params(ablation: dict[str, Any]) -> dict[str, str]:
    """What a design's table is built from, as params of the sweep's run (tables.settings reads them): its trick
    order, a factorial's fraction and the slide's numbers. The sweep's own, whatever order its reused runs
    were trained in."""
    return flatten({"ablation": {k: ablation[k] for k in ("order", "fraction", "slide")}})


def semantic_hash(cfg: DictConfig, without: tuple[str, ...] = NON_SEMANTIC) -> str:
    """Hash of the resolved config minus the NON_SEMANTIC keys: equal for runs that compute the same thing."""
    config = plain(cfg)
    for key in without:
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    config["trick"] = {k: config["trick"][k] for k in sorted(config.get("trick") or {})}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def hashes(cfg: DictConfig) -> tuple[str, str]:
    """(semantic_hash, the hash runs were tagged with before ablation.order left it): a store's older runs of
    this config are found by the second, where the order is this config's."""
    return semantic_hash(cfg), semantic_hash(cfg, tuple(k for k in NON_SEMANTIC if k != "ablation.order"))


def is_semantic(key: str) -> bool:
    return any(key == c or key.startswith(c + ".") for c in SEMANTIC)


def group_key(params: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """One configuration, from a run's logged params: what changes its result, but the seed (replicates differ
    in it)."""
    return tuple(sorted((k, v) for k, v in params.items() if is_semantic(k) and k != "seed"))


def classified(key: str) -> list[str]:
    """The entries of SEMANTIC and NON_SEMANTIC that cover a dotted key (exactly one, for every key of conf/)."""
    return [c for c in SEMANTIC + NON_SEMANTIC if key == c or key.startswith(c + ".")]
