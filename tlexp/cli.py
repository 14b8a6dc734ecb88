"""The console scripts: Hydra entry points that import the heavy modules only when a job runs.

Hydra answers ``--help``, ``--cfg`` and shell tab completion from the configuration alone, so
torch and Lightning (seconds to import) are left out until the task itself starts.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from tlexp.hydra_config import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def train(cfg: DictConfig) -> float | None:
    from tlexp.train import job

    return job(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def predict(cfg: DictConfig) -> None:
    from tlexp.predict import job

    job(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def export(cfg: DictConfig) -> None:
    from tlexp.export import job

    job(cfg)
