"""Where the CLIs find their Hydra configuration.

A source checkout (editable install, or ``PYTHONPATH`` pointing at it) reads the repository's
``conf/``; an installed wheel carries the same files as the package ``tlexp.conf`` (pyproject.toml).
"""

import sys
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir, initialize_config_module
from omegaconf import DictConfig, OmegaConf

_CHECKOUT = Path(__file__).resolve().parent.parent / "conf"
CONFIG_PATH = str(_CHECKOUT) if (_CHECKOUT / "train.yaml").is_file() else "pkg://tlexp.conf"


def sweep_jobs(setting: int | str, accelerator: str, cache_budget_gb: float = 0) -> int:
    """``perf.sweep_jobs`` for the local launcher (conf/hydra/launcher/local.yaml); torch is imported only for ``auto``."""
    if setting != "auto":
        whole = isinstance(setting, int) and not isinstance(setting, bool)  # true is an int to Python; null, 2.5 are not
        jobs = setting if whole else int(setting) if isinstance(setting, str) and setting.isdigit() else 0
        if jobs < 1:  # read by Hydra before any job starts: one line, as a job's config errors are
            print(f"tlexp-train: error: perf.sweep_jobs={setting}: give auto (several at once on one GPU) or a number of jobs >= 1",
                  file=sys.stderr)
            raise SystemExit(2)
        return jobs
    from tlexp.speed.defaults import side_by_side_jobs

    # a nonsense budget counts as none here: the job's own config check names it (tlexp/config.py)
    budget = cache_budget_gb if isinstance(cache_budget_gb, int | float) and not isinstance(cache_budget_gb, bool) else 0
    return side_by_side_jobs(accelerator, budget)


OmegaConf.register_new_resolver("tlexp_sweep_jobs", sweep_jobs, replace=True)


def initialized():
    """Hydra set up on tlexp's configuration (a context), as the CLIs find it."""
    if CONFIG_PATH.startswith("pkg://"):
        return initialize_config_module("tlexp.conf", version_base="1.3")
    return initialize_config_dir(CONFIG_PATH, version_base="1.3")


def compose(*overrides: str, config_name: str = "train") -> DictConfig:
    """``tlexp-train``'s configuration (or another tool's) with ``overrides`` (its command-line syntax), for library use.

    The same defaults as the CLI; nothing is run and no run directory is made.
    """
    with initialized():
        return hydra_compose(config_name, overrides=list(overrides))
