"""The Lightning Trainer a run uses: the config's trainer keys, tlexp's callbacks and loggers, and its checks."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, RichProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.plugins import TorchSyncBatchNorm
from pytorch_lightning.profilers import AdvancedProfiler, PyTorchProfiler, SimpleProfiler
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn

from tlexp.callbacks.dashboard import TestDashboard
from tlexp.callbacks.reseed import ReseedEachEpoch
from tlexp.errors import TlexpError
from tlexp.features.cache import FrozenPrefixCache
from tlexp.model.finetune import PhasedFinetuning
from tlexp.model.optim import optimizer_name
from tlexp.runs import AtomicCheckpointIO
from tlexp.speed.defaults import resolve_precision

log = logging.getLogger(__name__)
# trainer.profiler=<name>: Lightning's own profilers, given a file in the run dir for their reports
PROFILERS = {"simple": SimpleProfiler, "advanced": AdvancedProfiler, "pytorch": PyTorchProfiler}


def build_trainer(cfg: DictConfig, run_dir: Path, max_epochs: int, finetuning: PhasedFinetuning, *own: Callback) -> pl.Trainer:
    """The phase callback, the run's ``own`` callbacks, the config's, tlexp's standard ones; the frozen-prefix cache if on."""
    callbacks = [
        *(_instantiate("callbacks", name, c) for name, c in cfg.callbacks.items() if c is not None), finetuning, *own,
        ReseedEachEpoch(cfg.seed), TestDashboard(run_dir, cfg.dashboard.misclassified_images),
    ]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(RichProgressBar())
    args = OmegaConf.to_container(cfg.trainer, resolve=True)
    args["max_epochs"] = max_epochs
    args["precision"] = resolve_precision(args["precision"], args["accelerator"])
    profiler = str(args.get("profiler")).lower()
    if profiler in PROFILERS:  # named, Lightning's profiler prints its report to the terminal alone
        args["profiler"] = PROFILERS[profiler](dirpath=run_dir, filename="profiler")
        log.info("trainer.profiler=%s: its reports go to %s and %s", profiler, run_dir / "fit-profiler.txt", run_dir / "test-profiler.txt")
    if cfg.perf.feature_cache:
        views = {"A": cfg.data.augment.cached_views.phase_a, "B": cfg.data.augment.cached_views.phase_b}
        callbacks.append(FrozenPrefixCache(
            finetuning, views, cfg.seed, cfg.perf.cache_dir, int(cfg.perf.cache_budget_gb * 1e9), cfg.data.batch_size,
            cfg.data.num_workers, cfg.perf.compile_prefix_min_images,
        ))
        args["reload_dataloaders_every_n_epochs"] = 1  # each epoch asks for its phase's cached view
    loggers = [_instantiate("logger", name, c) for name, c in cfg.logger.items() if c is not None]
    plugins = [AtomicCheckpointIO(), *([SyncBatchNormKeepingActivations()] if args.get("sync_batchnorm") else [])]
    try:
        trainer = pl.Trainer(default_root_dir=run_dir, callbacks=callbacks, plugins=plugins, logger=loggers, **args)
    except (MisconfigurationException, ValueError) as exc:  # trainer.devices=0, trainer.strategy=foo, ...
        raise TlexpError(f"Lightning refuses the trainer settings: {exc}") from exc
    if trainer.world_size > 1:
        _check_distributed(cfg, trainer)
    return trainer


class SyncBatchNormKeepingActivations(TorchSyncBatchNorm):
    """``trainer.sync_batchnorm`` (trainer=ddp) through timm's conversion. Torch's, Lightning's default, turns timm's
    BatchNormAct2d (a BatchNorm and its activation, as in every EfficientNet-Lite0 block) into a plain SyncBatchNorm,
    dropping the activation for training, and Lightning's revert after fitting dropped it again for the test.
    (timm is imported when a trainer syncs, as elsewhere: it costs every run's start otherwise.)"""

    def apply(self, model: nn.Module) -> nn.Module:
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        from timm.layers import BatchNormAct2d, SyncBatchNormAct

        if not isinstance(model, SyncBatchNormAct):
            return super().revert(model)  # which comes back here for each child
        plain = BatchNormAct2d(model.num_features, model.eps, model.momentum, model.affine, model.track_running_stats, apply_act=False)
        if model.affine:
            plain.weight, plain.bias = model.weight, model.bias
        plain.running_mean, plain.running_var = model.running_mean, model.running_var
        plain.num_batches_tracked = model.num_batches_tracked
        for name, child in model.named_children():  # its activation and dropout
            plain.add_module(name, self.revert(child))
        return plain


def _instantiate(group: str, name: str, node):
    """A callback or logger Lightning refuses (callbacks.lr_monitor.logging_interval=hour): one line naming it."""
    try:
        return hydra.utils.instantiate(node)
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        raise TlexpError(f"{group}.{name}: {type(cause).__name__}: {cause}") from exc


def _check_distributed(cfg: DictConfig, trainer: pl.Trainer) -> None:
    """Refuse the DDP set-ups that would silently write to the wrong place or search the wrong thing."""
    if cfg.tune.lr_find:
        raise TlexpError("tune.lr_find runs on one device: find the rate with trainer=default, then pass optim.lr=")
    if HydraConfig.get().mode == RunMode.MULTIRUN and not trainer.strategy.cluster_environment.creates_processes_externally:
        raise TlexpError(
            "trainer.strategy=ddp inside a local multirun: Lightning would re-launch this script per rank outside the "
            "sweep's job folder. Run jobs one at a time, or let the cluster start the ranks "
            "(hydra/launcher=slurm with tasks_per_node = GPUs, see docs/scaling.md)"
        )


def log_hparams(trainer: pl.Trainer, cfg: DictConfig, record: dict) -> None:
    """TensorBoard's HParams tab: the run's settings (``lr`` as trained with) against its final metrics.

    Trackers (logger=mlflow | wandb) get the same, the settings under ``run/``: MLflow refuses a
    param logged twice with another value, and Lightning has already logged the module's (e.g.
    ``image_size`` as configured, null, where this has the size trained at).
    """
    augment, ema_decay = cfg.data.augment, OmegaConf.select(cfg, "callbacks.ema.decay")
    hparams = {
        "model": cfg.model.name, "strategy": record["strategy"], "seed": cfg.seed, "lr": record["lr"],
        "optimizer": optimizer_name(cfg.optim), "weight_decay": cfg.optim.get("weight_decay", 0.0),
        "scheduler": str(cfg.optim.scheduler), "warmup_epochs": cfg.optim.warmup_epochs,
        "loss": cfg.loss.name, "label_smoothing": cfg.loss.get("label_smoothing", 0.0), "batch_size": cfg.data.batch_size,
        "backbone_lr_factor": cfg.finetune.backbone_lr_factor, "dropout": cfg.model.head.dropout,
        "image_size": record.get("preprocessing", {}).get("crop_size") or str(cfg.data.image_size),
        "augment": f"hflip={augment.hflip} crop_scale={list(augment.crop_scale)} rotation={augment.rotation} shear={augment.shear} policy={augment.policy}",
        "cached_views": f"{augment.cached_views.phase_a}/{augment.cached_views.phase_b}" if cfg.perf.feature_cache else "off",
        "precision": record["precision"], "perf": cfg.perf.name, "ema_decay": "off" if ema_decay is None else ema_decay, "tta": record["tta"],
        "phase_a_epochs": cfg.finetune.phase_a_epochs, "phase_b_epochs": cfg.finetune.phase_b_epochs,
    }
    final = {f"final/{k}": record[k] for k in ("train_acc", "val_acc", "test_acc", "test_f1_macro") if record[k] is not None}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(hparams, metrics=final)
            # Lightning closed the writer after the test and this opened it again: close it now, not when the
            # process exits (a sweep's jobs can share one process: each left its writer and its thread open).
            logger.finalize("success")
        elif not isinstance(logger, CSVLogger):  # csv/ holds the epochs; metrics.json the rest
            logger.log_hyperparams({f"run/{k}": v for k, v in hparams.items()})
            logger.log_metrics(final)
