"""Callbacks that tests inject through the config (``+callbacks.<name>._target_=tests.helpers...``)."""

from __future__ import annotations

import os
import signal as signal_module

from pytorch_lightning.callbacks import Callback


def _kill() -> None:
    os.kill(os.getpid(), signal_module.SIGKILL)  # no cleanup, like a pre-empted job


class KillAtEpochStart(Callback):
    """SIGKILL the training process as epoch ``epoch`` starts."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            _kill()


class KillAtTestStart(Callback):
    """SIGKILL the process after fitting, as the test of the best checkpoint begins."""

    def on_test_start(self, trainer, pl_module) -> None:
        _kill()


class SignalAtEpochStart(Callback):
    """Send ``signal`` (a name: SIGTERM, SIGINT) to the training process as epoch ``epoch`` starts."""

    def __init__(self, signal: str, epoch: int):
        self.signum = getattr(signal_module, signal)
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), self.signum)
