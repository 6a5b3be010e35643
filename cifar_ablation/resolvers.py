"""The OmegaConf resolvers conf/ uses, registered when the package is imported (light: no torch at import)."""
from __future__ import annotations

from omegaconf import OmegaConf

from .designs import design_sweep


def device_slots(per_device: int) -> int:
    """Concurrent jobs for hydra/launcher=parallel: per_device for every visible GPU (per_device on CPU)."""
    import torch  # only when hydra/launcher=parallel resolves n_jobs: the package itself imports no torch

    return int(per_device) * max(1, torch.cuda.device_count())


def register_resolvers() -> None:
    for name, fn in (("design_sweep", design_sweep), ("device_slots", device_slots)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
