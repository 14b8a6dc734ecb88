"""Phase A / phase B unfreezing, built on Lightning's ``BaseFinetuning`` helpers.

Design choice (why not ``unfreeze_and_add_param_group``): the optimizer holds both named groups,
``head`` and ``backbone``, from the first step; freezing is ``requires_grad`` alone (frozen params get
no gradient, so optimizers skip them). The phase is derived from the epoch number on every epoch
start (and before a resumed run's sanity check), so a resumed run re-applies it: this sidesteps
Lightning #21901, where a resumed ``BaseFinetuning`` leaves unfrozen modules frozen.

Under DDP (Lightning #20340): DistributedDataParallel registers only the parameters that require
gradients when it wraps the model, so parameters unfrozen later would never be all-reduced and the
ranks would drift apart. The switch therefore re-wraps the model, which also broadcasts rank 0's
weights and buffers: every rank starts phase B from the same state with the same trainable set.
"""

from __future__ import annotations

import logging

from pytorch_lightning.callbacks import BaseFinetuning
from pytorch_lightning.strategies import DDPStrategy
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from tlexp.callbacks.dashboard import tensorboard_writers
from tlexp.model.strategies import Unit, modules_to_unfreeze, parse_strategy

log = logging.getLogger(__name__)


def upcoming_epoch(trainer) -> int:
    """The epoch the next loaders serve: Lightning's own ``set_epoch`` value (epochs processed).

    Not ``trainer.current_epoch``: a run resumed from an end-of-epoch checkpoint builds the next
    epoch's loaders (and runs its sanity check) while ``current_epoch`` still names the finished one.
    """
    return trainer.fit_loop.epoch_progress.current.processed if trainer is not None else 0


def trainable_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def phase_b_params(head: nn.Module, units: list[Unit]) -> int:
    """Trainable parameters of phase B: the head plus every unit's parameters, each counted once."""
    unique = {id(p): p for u in units for p in u.parameters()}
    return sum(p.numel() for p in head.parameters()) + sum(p.numel() for p in unique.values())


class PhasedFinetuning(BaseFinetuning):
    """Backbone frozen for ``phase_a_epochs``, then ``units`` trainable (at the backbone group's LR).

    ``epochs``: how long the two phases run (phase B only where there are units to unfreeze).
    """

    def __init__(self, units: list[Unit], phase_a_epochs: int, phase_b_epochs: int = 0):
        super().__init__()
        self.units = units
        self.phase_a_epochs = phase_a_epochs
        self.epochs = phase_a_epochs + (phase_b_epochs if units else 0)
        self._phase: str | None = None  # the phase the model is in
        self._said: str | None = None  # the phase the log last announced
        self._resumed_from = None  # the checkpoint a fit resumes from, until its epoch is known

    @classmethod
    def from_config(cls, cfg, module) -> PhasedFinetuning:
        """``cfg.strategy`` applied to ``module``'s backbone, phases as ``cfg.finetune`` says."""
        units = modules_to_unfreeze(module.backbone_spec, parse_strategy(cfg.strategy))
        return cls(units, cfg.finetune.phase_a_epochs, cfg.finetune.phase_b_epochs)

    def phase_at(self, epoch: int) -> str:
        return "B" if self.units and epoch >= self.phase_a_epochs else "A"

    def trainable_at(self, epoch: int) -> tuple[str, list[nn.Parameter]]:
        """The phase of ``epoch`` and the backbone parameters it trains."""
        phase = self.phase_at(epoch)
        return phase, [p for unit in self.units for p in unit.parameters()] if phase == "B" else []

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":  # testing a checkpoint needs no freezing (and no phase log line)
            super().setup(trainer, pl_module, stage)

    def freeze_before_training(self, pl_module) -> None:
        """Phase A, said at the first epoch (``_enter``): a checkpoint restored after this may put the run in B."""
        self._said = None
        self._apply(pl_module, epoch=0)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.state.fn == "fit":  # a resume (testing the best checkpoint restores one too)
            self._resumed_from = trainer.ckpt_path

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        """A resumed run validates before its first epoch starts, on what the frozen-prefix cache serves
        for the epoch it resumes at: the model must be in that epoch's phase already."""
        self._enter(pl_module, upcoming_epoch(trainer))

    def finetune_function(self, pl_module, current_epoch: int, optimizer) -> None:
        phase = self._enter(pl_module, current_epoch)
        pl_module.log("finetune/phase_b", float(phase == "B"), on_epoch=True, on_step=False)
        pl_module.log("finetune/trainable_params", float(trainable_params(pl_module)), on_epoch=True, on_step=False)

    def _enter(self, pl_module, epoch: int) -> str:
        """Put the model in ``epoch``'s phase and say so; a resumed run says first where it resumed."""
        phase = self.phase_at(epoch)
        if self._resumed_from:
            log.info("resuming from %s at epoch %d (phase %s)", self._resumed_from, epoch, phase)
            self._resumed_from = None
        if phase != self._phase:
            self._apply(pl_module, epoch)
        if phase != self._said:
            self._say(phase, pl_module)
        return phase

    def _apply(self, pl_module, epoch: int) -> None:
        phase, trainable = self.trainable_at(epoch)
        self.freeze(pl_module.backbone, train_bn=False)
        if phase == "B":  # the units' BatchNorm layers track their statistics again
            self.make_trainable([m for unit in self.units for m in unit.modules])
            _track_in_model(pl_module.backbone, self.units)
        for p in trainable:  # and the weights that traced functions read themselves
            p.requires_grad = True
        pl_module.train(pl_module.training)  # puts frozen BatchNorm back in eval mode
        _rewrap_ddp(pl_module.trainer)
        self._phase = phase

    def _say(self, phase: str, pl_module) -> None:
        """The phase's own first epoch (not the epoch a resumed run re-applies it at) and what it trains."""
        first = self.phase_a_epochs if phase == "B" else 0
        names = ", ".join(u.name for u in self.units) if phase == "B" else "none (head only)"
        message = f"phase {phase} from epoch {first}: backbone modules unfrozen: {names}; trainable parameters: {trainable_params(pl_module):,}"
        log.info("%s", message)
        for writer in tensorboard_writers(pl_module.trainer):
            writer.add_text("finetune/phase", message, global_step=pl_module.trainer.global_step)
        self._said = phase


def _track_in_model(backbone: nn.Module, units: list[Unit]) -> None:
    """The model's own BatchNorm layers among the units track their statistics, found by their parameters:
    ``trainer.sync_batchnorm`` (trainer=ddp) swaps each BatchNorm for a SyncBatchNorm that shares them, so a
    unit that is one BatchNorm op (layers_N) holds a layer no longer in the model, which make_trainable reaches."""
    in_units = {id(p) for unit in units for m in unit.modules for p in m.parameters()}
    for m in backbone.modules():
        if isinstance(m, _BatchNorm) and any(id(p) in in_units for p in m.parameters(recurse=False)):
            m.track_running_stats = True


def _rewrap_ddp(trainer) -> None:
    """Wrap the model in a new DDP, which registers the parameters trainable now (module docstring)."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
        strategy.model = strategy.model.module
        strategy.configure_ddp()
