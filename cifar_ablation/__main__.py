"""python -m cifar_ablation [-m] [overrides]: one Hydra job = one training run = one MLflow run (job.py)."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from .checks import CONF_DIR, UserError, check_command_line
from .job import run_job, user_errors


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        return run_job(cfg)


def cli() -> None:
    try:
        check_command_line(sys.argv[1:])
    except UserError as e:
        sys.exit(f"error: {e}")
    main()


if __name__ == "__main__":
    cli()
