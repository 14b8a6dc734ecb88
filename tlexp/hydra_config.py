"""Where the CLIs find their Hydra configuration.

A source checkout (editable install, or ``PYTHONPATH`` pointing at it) reads the repository's
``conf/``; an installed wheel carries the same files as the package ``tlexp.conf`` (pyproject.toml).
"""

from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir, initialize_config_module
from omegaconf import DictConfig

_CHECKOUT = Path(__file__).resolve().parent.parent / "conf"
CONFIG_PATH = str(_CHECKOUT) if (_CHECKOUT / "train.yaml").is_file() else "pkg://tlexp.conf"


def compose(*overrides: str) -> DictConfig:
    """``tlexp-train``'s configuration with ``overrides`` (its command-line syntax), for library use.

    The same defaults as the CLI; nothing is run and no run directory is made.
    """
    where = (
        initialize_config_module("tlexp.conf", version_base="1.3") if CONFIG_PATH.startswith("pkg://")
        else initialize_config_dir(CONFIG_PATH, version_base="1.3")
    )
    with where:
        return hydra_compose("train", overrides=list(overrides))
