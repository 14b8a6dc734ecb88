"""``tlexp-train``: compose the config, fit phase A then B, test the best checkpoint, write metrics.json."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from tlexp.checkpoint_io import AtomicCheckpointIO
from tlexp.config_checks import check_config
from tlexp.dashboard import TestDashboard
from tlexp.data import ImageDataModule
from tlexp.errors import TlexpError
from tlexp.feature_cache import FeatureStore
from tlexp.finetune import PhasedFinetuning, phase_b_params
from tlexp.history import EpochHistory
from tlexp.lr_finder import find_lr
from tlexp.module import TransferModule
from tlexp.perf import resolve_precision, tune_glibc_malloc
from tlexp.prefix_features import PrefixFeatures
from tlexp.profiling import gflops_per_image, inference_speed
from tlexp.reseed import ReseedEachEpoch
from tlexp.strategies import modules_to_unfreeze, parse_strategy
from tlexp.summaries import phase_table, run_summary, show

log = logging.getLogger("tlexp")
# Frozen BatchNorm layers are in eval mode on purpose (Keras semantics); Lightning warns about any.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)


def _check_resume_checkpoint(path: str, model_cfg: dict, class_names: list[str]) -> None:
    """Refuse a checkpoint of another backbone or class set before Lightning fails deep inside."""
    if not os.path.isfile(path):
        raise TlexpError(f"ckpt_path={path}: no such file (resume from <run dir>/checkpoints/last.ckpt)")
    try:
        hparams = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("hyper_parameters", {})
    except Exception as exc:  # any unreadable file gets the same advice
        raise TlexpError(f"ckpt_path={path} is not a readable Lightning checkpoint ({exc})") from exc
    saved_model = hparams.get("model", {})
    theirs = (saved_model.get("source"), saved_model.get("name"))
    ours = (model_cfg["source"], model_cfg["name"])
    if theirs != ours:
        raise TlexpError(f"ckpt_path={path} holds a {theirs[1]} ({theirs[0]}) model, this run builds {ours[1]}: pass the matching model=")
    if hparams.get("class_names") != class_names:
        raise TlexpError(
            f"ckpt_path={path} was trained on classes {hparams.get('class_names')}, this data has {class_names}: "
            "resume with the same data"
        )


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def run(cfg: DictConfig, ckpt_path: str | None) -> dict:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    check_config(cfg)
    strategy = parse_strategy(cfg.strategy)
    phase_b_epochs = cfg.finetune.phase_b_epochs if strategy.trains_backbone else 0
    total_epochs = cfg.finetune.phase_a_epochs + phase_b_epochs
    if total_epochs < 1:
        raise TlexpError("finetune.phase_a_epochs + finetune.phase_b_epochs must be >= 1")
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.perf.tune_malloc and not tune_glibc_malloc():
        log.info("perf.tune_malloc: not a glibc system, allocator left as it is")

    datamodule = ImageDataModule(cfg.data, seed=cfg.seed, split_file=run_dir / "split.csv")
    datamodule.setup()
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if ckpt_path:
        _check_resume_checkpoint(ckpt_path, model_cfg, datamodule.class_names)
    module = TransferModule(
        model=model_cfg,
        class_names=datamodule.class_names,
        class_counts=datamodule.class_counts,
        loss=OmegaConf.to_container(cfg.loss, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        backbone_lr_factor=cfg.finetune.backbone_lr_factor,
        total_epochs=total_epochs,
    )
    module.preprocessing = datamodule.preprocessing = module.backbone_spec.preprocessing.at_size(cfg.data.image_size)
    if cfg.perf.channels_last:
        module.memory_format = torch.channels_last
        module.to(memory_format=torch.channels_last)
    units = modules_to_unfreeze(module.backbone_spec, strategy)
    show(phase_table(module.head, module.backbone, units), save_as=run_dir / "model_summary.txt")

    history = EpochHistory()
    finetuning = PhasedFinetuning(units, cfg.finetune.phase_a_epochs)
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values() if c is not None]
    callbacks += [finetuning, history, ReseedEachEpoch(cfg.seed), TestDashboard(run_dir, cfg.dashboard.misclassified_images)]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(RichProgressBar())
    loggers = [hydra.utils.instantiate(c) for c in cfg.logger.values() if c is not None]
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args["precision"] = resolve_precision(trainer_args["precision"], trainer_args["accelerator"])
    if cfg.perf.feature_cache:
        views = {"A": cfg.data.augment.cached_views.phase_a, "B": cfg.data.augment.cached_views.phase_b}
        store = FeatureStore.shared(cfg.perf.cache_dir, int(cfg.perf.cache_budget_gb * 1e9), cfg.data.batch_size)
        datamodule.feature_source = PrefixFeatures(
            module, datamodule, store, finetuning.trainable_at, views, cfg.seed, cfg.data.num_workers,
            cfg.perf.compile_prefix_min_images,
        )
        trainer_args["reload_dataloaders_every_n_epochs"] = 1  # each epoch asks for its phase's cached view
    trainer = pl.Trainer(
        max_epochs=total_epochs, default_root_dir=run_dir, logger=loggers, callbacks=callbacks,
        plugins=[AtomicCheckpointIO()], **trainer_args,
    )
    if trainer.world_size > 1:
        _check_distributed(cfg, trainer)
    lr_find = None
    if cfg.tune.lr_find and ckpt_path:
        log.info("tune.lr_find: skipped on resume (the checkpoint's optimizer holds the rates)")
    elif cfg.tune.lr_find:
        lr_find = find_lr(trainer, module, datamodule, OmegaConf.to_container(cfg.tune), run_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    # Read the history before testing: restoring the best checkpoint also restores callback state.
    epochs, best, fit_seconds = list(history.epochs), history.best(), history.elapsed()
    after_fit = time.perf_counter()
    best_ckpt = trainer.checkpoint_callback.best_model_path  # the first ModelCheckpoint: best by val/acc
    test = trainer.test(module, datamodule=datamodule, ckpt_path=best_ckpt, verbose=False)[0]
    if not trainer.is_global_zero:  # rank 0 alone measures speed and writes the run's files
        return {"val_acc": best.get("val_acc")}

    speed = {}
    if cfg.profile.enabled:
        size = datamodule.preprocessing.crop_size
        speed = {
            "gflops": gflops_per_image(module, size),
            **inference_speed(module, size, cfg.profile.batch_size, cfg.profile.warmup, cfg.profile.repeats, cfg.profile.runtime),
        }
    phase_a = sum(p.numel() for p in module.head.parameters())
    metrics = {
        "status": "completed",
        "model": cfg.model.name,
        "model_source": cfg.model.source,
        "weights": cfg.model.weights,
        "strategy": strategy.name,
        "seed": cfg.seed,
        "perf": cfg.perf.name,
        "feature_cache": {
            "enabled": cfg.perf.feature_cache, **OmegaConf.to_container(cfg.data.augment.cached_views)
        },
        "precision": trainer_args["precision"],
        "num_classes": len(datamodule.class_names),
        "class_names": datamodule.class_names,
        "images": {s: len(v) for s, v in datamodule.split.items()},
        "skipped_images": len(datamodule.skipped),
        "skipped": datamodule.skipped,
        "epochs": trainer.current_epoch,
        "phase_a_epochs": cfg.finetune.phase_a_epochs,
        "phase_b_epochs": phase_b_epochs,
        "best_epoch": best.get("epoch"),
        "train_acc": best.get("train_acc"),
        "train_loss": best.get("train_loss"),
        "val_acc": best.get("val_acc"),
        "val_loss": best.get("val_loss"),
        "test_acc": test["test/acc"],
        "test_loss": test["test/loss"],
        **module.test_results,
        "trainable_params": phase_b_params(module.head, units),
        "trainable_params_phase_a": phase_a,
        "total_params": sum(p.numel() for p in module.parameters()),
        "unfrozen_modules": [u.name for u in units],
        "lr": module.hparams.optim["lr"],
        "lr_find": lr_find,
        "preprocessing": datamodule.preprocessing.as_dict(),
        **speed,
        "wall_time_s": fit_seconds + time.perf_counter() - after_fit,
        "run_dir": str(run_dir),
        "history": epochs,
    }
    _write_json(run_dir / "metrics.json", metrics)
    final = {f"final/{k}": metrics[k] for k in ("train_acc", "val_acc", "test_acc", "test_f1_macro") if metrics[k] is not None}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(_flat_hparams(cfg, strategy.name, metrics["lr"]), metrics=final)
    log.info(
        "done: test acc %.4f, macro-F1 %.4f, trainable %s params; run dir %s",
        metrics["test_acc"], metrics["test_f1_macro"], f"{metrics['trainable_params']:,}", run_dir,
    )
    show(*run_summary(metrics, list(HydraConfig.get().overrides.task)), save_as=run_dir / "summary.txt")
    return metrics


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


def _flat_hparams(cfg: DictConfig, strategy: str, lr: float) -> dict:
    """``lr`` is the rate trained with (the LR finder's, with ``tune.use_suggestion``)."""
    return {
        "model": cfg.model.name, "strategy": strategy, "seed": cfg.seed, "lr": lr,
        "optimizer": cfg.optim.name, "loss": cfg.loss.name, "batch_size": cfg.data.batch_size,
        "backbone_lr_factor": cfg.finetune.backbone_lr_factor,
        "phase_a_epochs": cfg.finetune.phase_a_epochs, "phase_b_epochs": cfg.finetune.phase_b_epochs,
    }


def _failed(cfg: DictConfig, run_dir: Path, exc: BaseException) -> None:
    """Record a failed job where the table will look for it, so a sweep shows it as a failed row."""
    _write_json(run_dir / "metrics.json", {
        "status": "failed", "error": f"{type(exc).__name__}: {exc}", "model": cfg.model.name,
        "strategy": str(cfg.strategy), "seed": cfg.seed, "run_dir": str(run_dir),
    })


def _readable_checkpoint(path: Path) -> bool:
    """False for a damaged checkpoint, which is renamed ``*.damaged`` (kept, and out of Lightning's way)."""
    try:
        torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # noqa: BLE001 -- any unreadable file is skipped the same way
        aside = path.with_name(path.name + ".damaged")
        os.replace(path, aside)
        log.warning("resume: %s is damaged (%s: %s), kept as %s; trying an older checkpoint", path, type(exc).__name__, exc, aside.name)
        return False
    return True


def _interrupted(cfg: DictConfig, run_dir: Path, how: str) -> None:
    """Say where to resume; a killed job must not look finished (nor like a crash to debug)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    hint = f"resume with ckpt_path={last}" if last.exists() else "no epoch had finished: start it again"
    _write_json(run_dir / "metrics.json", {
        "status": "interrupted", "error": f"stopped by {how}; {hint} (or resume=true)", "model": cfg.model.name,
        "strategy": str(cfg.strategy), "seed": cfg.seed, "run_dir": str(run_dir),
    })
    log.warning("stopped by %s; %s", how, hint)


def _resume_point(cfg: DictConfig, run_dir: Path) -> tuple[dict | None, str | None]:
    """With ``resume=true``: (metrics of a completed run, None) or (None, the newest intact checkpoint).

    ``last.ckpt`` first, then the others newest first: any epoch-end checkpoint resumes to the same
    result (tests/test_resume.py), so a damaged ``last.ckpt`` costs time, not correctness.
    """
    metrics_file = run_dir / "metrics.json"
    if cfg.ckpt_path or not cfg.resume:
        return None, cfg.ckpt_path
    if metrics_file.exists():
        previous = json.loads(metrics_file.read_text())
        if previous.get("status") == "completed":
            return previous, None
    folder = run_dir / "checkpoints"
    others = sorted((p for p in folder.glob("*.ckpt") if p.name != "last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    candidates = [p for p in [folder / "last.ckpt", *others] if p.exists()]
    return None, next((str(p) for p in candidates if _readable_checkpoint(p)), None)


# conf/ sits at the repository top level (DESIGN.md); an absolute path keeps Hydra on the file system.
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """One job. In a sweep a failing job is recorded and the sweep goes on; alone, it exits non-zero.

    Returns the best epoch's validation accuracy, the value a sweeper (Optuna) maximises: the test
    split stays out of model selection.
    """
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        done, ckpt_path = _resume_point(cfg, run_dir)
        if done is not None:
            log.info("resume=true: %s already completed (test acc %.4f); skipped", run_dir, done["test_acc"])
            return done["val_acc"]
        return run(cfg, ckpt_path)["val_acc"]
    except SIGTERMException:  # Lightning stopped after the current batch; last.ckpt holds the last whole epoch
        _interrupted(cfg, run_dir, "SIGTERM")
        sys.exit(128 + signal.SIGTERM)
    except SystemExit as exc:  # Lightning exits 1 after Ctrl+C (SIGINT)
        if exc.code not in (0, None):
            _interrupted(cfg, run_dir, "SIGINT")
        raise
    except (TlexpError, MissingMandatoryValue) as exc:
        _failed(cfg, run_dir, exc)
        log.error("%s", exc)
        print(f"tlexp-train: error: {exc}", file=sys.stderr)
        if not in_sweep:
            sys.exit(2)
    except Exception as exc:
        _failed(cfg, run_dir, exc)
        if not in_sweep:
            raise
        log.exception("job failed; the sweep goes on")
    return None


if __name__ == "__main__":
    main()
