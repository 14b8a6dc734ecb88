"""A Hydra callback: a finished multirun names the command that turns its records into the table."""

from __future__ import annotations

import shlex

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class PointAtTable(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        print(f"sweep done; its table and plots: tlexp-table {shlex.quote(str(config.hydra.sweep.dir))} --print")  # pasted as is
