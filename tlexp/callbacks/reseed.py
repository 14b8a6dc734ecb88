"""Reseed the global RNGs every epoch from (seed, epoch, rank), for the model's own randomness (dropout).

Lightning checkpoints hold no RNG state; deriving it from the epoch makes epoch k's dropout masks the
same whether the process started at epoch 0 or resumed at k. (Shuffling and augmentation are seeded
by ``tlexp.data.datamodule.EpochSeededSampler`` and never touch this stream.) Under DDP each rank gets its own stream.

Not ``pl.seed_everything``: it also rewrites ``PL_GLOBAL_SEED``, from which Lightning seeds the
``DistributedSampler`` of every loader it builds later, so a DDP run's data order would depend on
the epoch its process started at (a resumed run would shuffle differently).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from pytorch_lightning.callbacks import Callback

from tlexp.seeds import RESEED, mix


class ReseedEachEpoch(Callback):
    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        seed = mix(RESEED, self.seed, trainer.current_epoch, trainer.global_rank)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
