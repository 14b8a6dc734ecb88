"""Callbacks that tests inject through the config (``+callbacks.<name>._target_=tests.helpers...``)."""

from __future__ import annotations

import os
import signal

from pytorch_lightning.callbacks import Callback


class KillAtEpochStart(Callback):
    """SIGKILL the training process as epoch ``epoch`` starts: no cleanup, like a pre-empted job."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)
