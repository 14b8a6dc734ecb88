"""Reseed the global RNGs every epoch from (seed, epoch, rank), for the model's own randomness (dropout).

Lightning checkpoints hold no RNG state; deriving it from the epoch makes epoch k's dropout masks the
same whether the process started at epoch 0 or resumed at k. (Shuffling and augmentation are seeded
by ``tlexp.data.datamodule.EpochSeededSampler`` and never touch this stream.) Under DDP each rank gets its own stream.

Validation inside an epoch (``trainer.val_check_interval`` < 1) leaves the stream where it found it:
it draws from it (a loader's base seed, a feature-cache entry built only when not on disk yet), and
the rest of the epoch must not depend on that (a resumed run finds the cache warm).

Not ``pl.seed_everything``: it also rewrites ``PL_GLOBAL_SEED``, from which Lightning seeds the
``DistributedSampler`` of every loader it builds later, so a DDP run's data order would depend on
the epoch its process started at (a resumed run would shuffle differently).
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from pytorch_lightning.callbacks import Callback, Timer

from tlexp.seeds import RESEED, mix


class ReseedEachEpoch(Callback):
    def __init__(self, seed: int):
        self.seed = seed
        self._states: tuple | None = None  # the streams as the last training batch left them

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        seed = mix(RESEED, self.seed, trainer.current_epoch, trainer.global_rank)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Where a validation may follow: before it builds its loaders (and draws from the stream).

        The copy (~45 us on a CPU) is skipped after batches no validation can follow: a launch-bound GPU step is ms.
        """
        if not _validation_may_follow(trainer, batch_idx):
            self._states = None
            return
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self._states = (random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._states is None or trainer.sanity_checking:  # before any epoch: the first epoch's reseed follows
            return
        python, numpy, cpu, cuda = self._states
        self._states = None
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _validation_may_follow(trainer, batch_idx: int) -> bool:
    """Lightning validates after an epoch's last batch, every ``val_check_batch`` batches (counted across epochs
    without ``check_val_every_n_epoch``), on a clock (``val_check_batch`` None) and when asked to stop, which
    Lightning's ``Timer`` (``max_time``) asks after this callback has run."""
    every, batches = trainer.val_check_batch, trainer.num_training_batches
    return (
        every is None or every < batches or trainer.check_val_every_n_epoch is None or math.isinf(batches)
        or batch_idx + 1 >= batches or trainer.should_stop or any(isinstance(c, Timer) for c in trainer.callbacks)
    )
