"""Reseed the global RNG every epoch from (seed, epoch), for the model's own randomness (dropout).

Lightning checkpoints hold no RNG state; deriving it from the epoch makes epoch k's dropout masks the
same whether the process started at epoch 0 or resumed at k. (Shuffling and augmentation are seeded
by ``data.EpochSeededSampler`` and never touch this stream.)
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback


class ReseedEachEpoch(Callback):
    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        pl.seed_everything(self.seed * 100_003 + trainer.current_epoch, workers=True, verbose=False)
