"""Reseed every epoch from (seed, epoch) so a resumed run draws the same shuffles and augmentations.

Lightning checkpoints hold no RNG state; deriving it from the epoch makes the random stream of epoch
k the same whether the process started at epoch 0 or resumed at k.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback


class ReseedEachEpoch(Callback):
    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        pl.seed_everything(self.seed * 100_003 + trainer.current_epoch, workers=True, verbose=False)
