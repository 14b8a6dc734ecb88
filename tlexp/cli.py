"""The console scripts: Hydra entry points that import the heavy modules only when a job runs.

Hydra answers ``--help``, ``--cfg`` and shell tab completion from the configuration alone, so
torch and Lightning (seconds to import) are left out until the task itself starts.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from tlexp.hydra_config import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _train(cfg: DictConfig) -> float | None:
    from tlexp.train import job

    return job(cfg)


def train() -> None:
    """``tlexp-train``; with ``--cfg``, a config the run would refuse is refused here too (exit 2)."""
    args = sys.argv[1:]
    if {"--cfg", "-c"} & set(args) and not {"-m", "--multirun"} & set(args):
        _refuse_bad_config(args)
    _train()


# Hydra's flags that take a value: their value is not an override.
_VALUED = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
           "--info", "--experimental-rerun"}


def _refuse_bad_config(args: list[str]) -> None:
    """Compose what ``--cfg`` shows and run the checks a job runs first (tlexp/config.py, the strategy name)."""
    from tlexp.config import check_config
    from tlexp.errors import TlexpError
    from tlexp.hydra_config import compose
    from tlexp.model.strategies import parse_strategy

    overrides = [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] not in _VALUED)]
    try:
        cfg = compose(*overrides)
    except Exception:  # noqa: BLE001 -- an override Hydra cannot compose: Hydra says why, as without --cfg
        return
    try:
        check_config(cfg)
        parse_strategy(cfg.strategy)
    except TlexpError as exc:
        print(f"tlexp-train: error: {exc}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def predict(cfg: DictConfig) -> None:
    from tlexp.predict import job

    job(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def export(cfg: DictConfig) -> None:
    from tlexp.export import job

    job(cfg)
