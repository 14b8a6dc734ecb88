"""Callbacks that tests inject through the config (``+callbacks.<name>._target_=tests.helpers...``, Hydra's under ``+hydra.callbacks``)."""

from __future__ import annotations

import multiprocessing
import os
import signal as signal_module
import subprocess
import threading
import time
from pathlib import Path

import torch
from hydra.experimental.callback import Callback as HydraCallback
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
            if self.signum == signal_module.SIGINT:
                # A shell starts background jobs with SIGINT ignored, and children inherit that;
                # a terminal's Ctrl+C reaches Python's default handler, so restore it.
                signal_module.signal(signal_module.SIGINT, signal_module.default_int_handler)
            os.kill(os.getpid(), self.signum)


class SigtermToWorkersAtEpoch(Callback):
    """SIGTERM the training process and its data-loader workers after the first batch of epoch ``epoch``,
    as ``kill -TERM -<pgid>`` does (``timeout``, SLURM's ``scancel``, ``docker stop``): each process gets it
    from outside (a worker signalled by its parent exits quietly; by another process it dies of the signal)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            workers = [str(w.pid) for w in multiprocessing.active_children()]
            assert workers, "no loader workers to signal"
            subprocess.run(["kill", "-TERM", str(os.getpid()), *workers], check=True)
            time.sleep(1)  # they die meanwhile (not joined: joining reaps them, which hides their death from torch)


class SigtermAtTest(Callback):
    """SIGTERM the process as the test begins (``when=start``) or ``delay`` s after it ends (``when=end``: profiling)."""

    def __init__(self, when: str, delay: float = 0.0):
        self.when, self.delay = when, delay

    def on_test_start(self, trainer, pl_module) -> None:
        if self.when == "start":
            os.kill(os.getpid(), signal_module.SIGTERM)

    def on_test_end(self, trainer, pl_module) -> None:
        if self.when == "end":
            threading.Timer(self.delay, os.kill, (os.getpid(), signal_module.SIGTERM)).start()


class SaveWeightsPerRank(Callback):
    """``<dirpath>/{start,end}_rank<R>.pt``: each process's weights before and after fitting."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def _save(self, trainer, pl_module, when: str) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.dirpath / f"{when}_rank{trainer.global_rank}.pt")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, "start")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, "end")


class KillAtJobEnd(HydraCallback):
    """A Hydra callback: as the job returns, write the matplotlib figures and TensorBoard writer threads still open
    (``figures writers``) to ``path``, then SIGKILL."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_job_end(self, config, job_return, **kwargs) -> None:
        import matplotlib.pyplot as plt

        writers = sum(type(t).__name__ == "_AsyncWriterThread" for t in threading.enumerate())  # one per open event file
        self.path.write_text(f"{len(plt.get_fignums())} {writers}")
        _kill()
