"""Per-epoch metrics and wall time, kept in the checkpoint so a resumed run's record is whole.

An epoch's ``seconds`` run from the previous epoch's end (or the start of fitting), so they include
what Lightning does between epochs: building that epoch's data loaders and feature-cache entries.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pytorch_lightning.callbacks import Callback

TRAIN_KEYS = ("train/acc", "train/loss")
VAL_KEYS = ("val/acc", "val/loss")


class EpochHistory(Callback):
    """``phase_at(epoch)`` names an epoch's phase (``PhasedFinetuning.phase_at``, the one owner of phases)."""

    def __init__(self, phase_at: Callable[[int], str]):
        self.phase_at = phase_at
        self.epochs: list[dict] = []
        self.wall_time_s = 0.0
        self._since = self._epoch_since = time.perf_counter()
        self._lrs: dict = {}
        self._validated = False  # this epoch; Lightning keeps the last validation's figures (check_val_every_n_epoch > 1)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._epoch_since = time.perf_counter()

    def _tick(self) -> None:
        now = time.perf_counter()
        self.wall_time_s += now - self._since
        self._since = now

    def on_validation_end(self, trainer, pl_module) -> None:
        self._validated = self._validated or not trainer.sanity_checking

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._validated = False
        # the rates this epoch trains with (an epoch-wise scheduler has stepped by epoch end)
        self._lrs = {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(trainer.optimizers[0].param_groups)}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch}
        keys = TRAIN_KEYS + VAL_KEYS if self._validated else TRAIN_KEYS
        row.update({k.replace("/", "_"): float(metrics[k]) for k in keys if k in metrics})
        row.update(self._lrs)
        row["phase_b"] = self.phase_at(trainer.current_epoch) == "B"
        now = time.perf_counter()
        row["seconds"], self._epoch_since = now - self._epoch_since, now
        self.epochs = [e for e in self.epochs if e["epoch"] < row["epoch"]] + [row]
        self._tick()

    def elapsed(self) -> float:
        self._tick()
        return self.wall_time_s

    def state_dict(self) -> dict:
        self._tick()
        return {"epochs": self.epochs, "wall_time_s": self.wall_time_s}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epochs = list(state_dict["epochs"])
        self.wall_time_s = float(state_dict["wall_time_s"])
        self._since = time.perf_counter()
