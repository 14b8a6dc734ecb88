"""``tune.lr_find=true``: Lightning's learning-rate range test, run on phase A (backbone frozen).

The search sees phase A's parameters only, so its suggestion is the head's rate; phase B keeps
``finetune.backbone_lr_factor`` times it. It gets a trainer of its own: the run's trainer would let
the search run into phase B's epochs (and stop at ``max_epochs`` on small data). Lightning restores
the weights after the search.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from unittest import mock

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BaseFinetuning, Callback
from pytorch_lightning.tuner import Tuner
from pytorch_lightning.tuner import lr_finder as lightning_lr_finder
from pytorch_lightning.utilities.parsing import lightning_setattr

from tlexp.callbacks.dashboard import tensorboard_writers
from tlexp.errors import TlexpError
from tlexp.features.cache import FrozenPrefixCache
from tlexp.report.plotting import closing_figures

log = logging.getLogger(__name__)
CHECKPOINT_KEY = "tlexp_lr_find"


class FoundRate(Callback):
    """The range test's result, kept in every checkpoint. A resumed run does not search again (the checkpoint's
    optimizer holds the rates): it records the first start's result and, where that trained at the suggestion,
    the module's rate is the suggestion again, as Lightning's ``update_attr`` set it then."""

    def __init__(self):
        self.result: dict | None = None

    def search(self, trainer: pl.Trainer, module, datamodule, tune: dict, run_dir: Path) -> None:
        self.result = find_lr(trainer, module, datamodule, tune, run_dir)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self.result

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.result = checkpoint.get(CHECKPOINT_KEY)
        if self.result and self.result["used"]:
            lightning_setattr(pl_module, "learning_rate", self.result["suggestion"])


def find_lr(trainer: pl.Trainer, module, datamodule, tune: dict, run_dir: Path) -> dict:
    """Run the range test, save ``lr_find.png``; with ``use_suggestion`` train at the suggested rate.

    ``trainer`` is the run's: the search copies its device and precision and logs to its TensorBoard.
    """
    BaseFinetuning.freeze(module.backbone, train_bn=False)  # phase A; the run's callback sets it again
    cache = FrozenPrefixCache.of(trainer)  # phase A's cached features, as the run's phase A will use them
    search = pl.Trainer(
        accelerator=trainer.accelerator, devices=1, precision=trainer.precision, max_epochs=-1,
        logger=False, callbacks=[cache] if cache else [], enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=run_dir, reload_dataloaders_every_n_epochs=1,
    )
    # Lightning's search draws its own tqdm bar (tuner/lr_finder.py's _LRCallback, whatever the trainer's
    # bar): it stays where the run shows Rich bars, and is silenced where the run shows none.
    shown = trainer.progress_bar_callback is not None
    quiet = nullcontext() if shown else mock.patch.object(lightning_lr_finder, "tqdm", partial(lightning_lr_finder.tqdm, disable=True))
    with quiet:
        finder = Tuner(search).lr_find(
            module, datamodule=datamodule, min_lr=tune["min_lr"], max_lr=tune["max_lr"],
            num_training=tune["num_training"], update_attr=tune["use_suggestion"], attr_name="learning_rate",
        )
    suggestion = finder.suggestion()
    if suggestion is None:
        raise TlexpError(
            f"tune.lr_find: too few points for a suggestion ({len(finder.results['lr'])} steps); "
            "raise tune.num_training or use more data"
        )
    with closing_figures():
        figure = finder.plot(suggest=True)
        figure.savefig(run_dir / "lr_find.png", dpi=110)
        for writer in tensorboard_writers(trainer):
            writer.add_figure("tune/lr_find", figure, close=False)
            writer.add_scalar("tune/lr_suggestion", suggestion)
    log.info(
        "tune.lr_find: suggested learning rate %.3g (%s); plot in %s",
        suggestion, "used for this run" if tune["use_suggestion"] else "optim.lr kept: pass tune.use_suggestion=true to use it",
        run_dir / "lr_find.png",
    )
    return {"suggestion": suggestion, "used": tune["use_suggestion"], "steps": len(finder.results["lr"])}
