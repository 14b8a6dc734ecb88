"""Lightning's EarlyStopping, watching phase B only where a phase B follows.

Phase A trains the head alone and plateaus within a few epochs; a patience counted there ended runs
before their strategy unfroze anything, and the record of a ``blocks_2`` run was then a frozen
backbone's. The phase B epochs are what early stopping is for: there it counts as Lightning's does.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EarlyStopping

from tlexp.model.finetune import PhasedFinetuning


class PhaseBEarlyStopping(EarlyStopping):
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not _before_phase_b(trainer):
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not _before_phase_b(trainer):
            super().on_validation_end(trainer, pl_module)


def _before_phase_b(trainer: pl.Trainer) -> bool:
    phases = next((c for c in trainer.callbacks if isinstance(c, PhasedFinetuning)), None)
    return phases is not None and bool(phases.units) and phases.phase_at(trainer.current_epoch) == "A"
