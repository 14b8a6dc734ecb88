"""``tlexp-train``: data, model, callbacks, trainer -> fit phase A then B -> test the best checkpoint -> record.

The map of the package is docs/architecture.md.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import SIGTERMException

from tlexp import record, runs
from tlexp.callbacks.history import EpochHistory
from tlexp.callbacks.lr_finder import FoundRate
from tlexp.callbacks.run_identity import RunIdentity
from tlexp.config import check_config, check_devices
from tlexp.data.datamodule import ImageDataModule
from tlexp.features.cache import FrozenPrefixCache
from tlexp.model.backbones import check_input_size
from tlexp.model.finetune import PhasedFinetuning, phase_b_params
from tlexp.model.module import TransferModule
from tlexp.model.strategies import parse_strategy
from tlexp.report.summaries import phase_table, run_summary, show
from tlexp.speed.defaults import tune_glibc_malloc
from tlexp.speed.timing import gflops_per_image, speed_on_devices
from tlexp.trainer import build_trainer, log_hparams

log = logging.getLogger("tlexp")
# Frozen BatchNorm layers are in eval mode on purpose (Keras semantics); Lightning warns about any.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
# Lightning-internal deprecation (its own use of torch's pytree API): nothing a user can change.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
# "training batches (3) smaller than the logging interval", at every epoch's loaders: tlexp logs the epoch's metrics
# at each epoch's end, and Lightning counts log_every_n_steps across epochs, so short epochs still get train/loss_step.
warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval")
# A resume continues in the run's own checkpoints/ (tlexp refuses a run dir that holds another run): not a risk to warn of.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
# Lightning's banner (GPU/TPU available, tips, checkpoint restore notices): the run summary says what matters.
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)


def run(cfg: DictConfig, ckpt_path: str | None) -> dict:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    started, started_at = time.perf_counter(), time.time()
    check_config(cfg)
    check_devices(cfg)
    reset_gpu_peak_memory()
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.perf.tune_malloc and not tune_glibc_malloc():
        log.info("perf.tune_malloc: not a glibc system, allocator left as it is")

    parse_strategy(cfg.strategy)  # a bad strategy name fails before any image is listed or backbone built
    data = ImageDataModule.from_config(cfg, split_file=run_dir / "split.csv")
    identity = record.run_identity(cfg, run_dir)
    if ckpt_path:
        runs.check_resume_checkpoint(ckpt_path, OmegaConf.to_container(cfg.model, resolve=True), data.class_names)
    module = TransferModule.from_config(cfg, data)
    if cfg.data.image_size is not None:  # null: the weights' own size, which the backbone takes
        check_input_size(module.backbone_spec, module.preprocessing.crop_size)
    finetuning = PhasedFinetuning.from_config(cfg, module)
    units = finetuning.units
    show(phase_table(module.head, module.backbone, units), save_as=run_dir / "model_summary.txt")

    history = EpochHistory(finetuning.phase_at)
    epochs = cfg.trainer.max_epochs or finetuning.epochs
    module.hparams.total_epochs = epochs  # the cosine's length, also while the LR finder's open-ended search runs
    rate = FoundRate()
    trainer = build_trainer(cfg, run_dir, epochs, finetuning, history, RunIdentity(identity), rate)
    if cfg.tune.lr_find and ckpt_path:
        log.info("tune.lr_find: skipped on resume (the checkpoint holds its result and the optimizer's rates)")
    elif cfg.tune.lr_find:
        rate.search(trainer, module, data, OmegaConf.to_container(cfg.tune), run_dir)

    fit_started = time.perf_counter()  # before: listing and checking images, the model, the LR finder
    with runs.sigterm_reached_workers(trainer):
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    # Read the history before testing: restoring the best checkpoint also restores callback state.
    fitted, fit_seconds, after_fit = list(history.epochs), history.elapsed(), time.perf_counter()
    device = trainer.strategy.root_device
    extra = {"peak_gpu_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20} if device.type == "cuda" else {}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not best:
        log.warning("no checkpoint was saved (trainer.fast_dev_run?): testing the weights as fitting left them")
    with runs.sigterm_reached_workers(trainer):
        test = trainer.test(module, datamodule=data, ckpt_path=best or None, verbose=False)[0]
    tested = time.perf_counter()
    if trainer.received_sigterm:  # Lightning finishes a test's last batch before it looks: no result then
        raise SIGTERMException
    if not trainer.is_global_zero:  # rank 0 alone measures speed and writes the run's files
        return {"val_acc": record.best_epoch(fitted).get("val_acc")}

    if cfg.profile.enabled:  # Lightning has moved the model back to the CPU: time it where it trained
        size = module.preprocessing.crop_size
        jobs = _jobs_running()
        with runs.sigterm_stops():
            extra |= {"gflops": gflops_per_image(module, size), **speed_on_devices(module, device, size, cfg.profile, str(trainer.precision))}
        jobs = max(jobs, _jobs_running())
        if jobs > 1:  # other jobs of the sweep shared the machine: its figures are a busy device's
            extra["speed_setup"]["sweep_jobs"] = jobs
    extra |= {"lr_find": rate.result, "wall_time_s": fit_seconds + time.perf_counter() - after_fit}
    cache = FrozenPrefixCache.of(trainer)
    if cache is not None and cache.off is not None:
        extra["feature_cache_off"] = cache.off
    # Where this process's time went (a sweep's jobs start at their own times: started_at, Unix
    # seconds). The cache's seconds are part of fit_s, and of before_fit_s where tune.lr_find used it.
    extra["time_split"] = {
        "started_at": started_at, "before_fit_s": fit_started - started, "fit_s": after_fit - fit_started, "test_s": tested - after_fit,
        "speed_s": time.perf_counter() - tested, **(cache.seconds if cache else {}),
    }
    if "cpu" in extra:  # after a GPU run: how much of the speed timing the CPU's figures took
        extra["time_split"]["speed_cpu_s"] = extra["cpu"]["speed_setup"]["seconds"]
    trained = units if any(e["phase_b"] for e in fitted) else []  # trainer.max_epochs (or early stopping) may end it in phase A
    results = record.completed_record(
        cfg, run_dir, identity=identity, data=data, module=module, units=trained, trainable_params=phase_b_params(module.head, trained), epochs=fitted,
        test=test, precision=trainer.precision, extra=extra,
    )
    record.write_record(run_dir, results)
    log_hparams(trainer, cfg, results)
    log.info("done: test acc %.4f, macro-F1 %.4f, trainable %s params; run dir %s",
             results["test_acc"], results["test_f1_macro"], f"{results['trainable_params']:,}", run_dir)
    show(*run_summary(results, _alone(HydraConfig.get())), save_as=run_dir / "summary.txt")
    return results


def reset_gpu_peak_memory() -> None:
    """Start the run's peak_gpu_memory_mib afresh: a sweep's jobs one after another in one process (joblib at
    perf.sweep_jobs=1, perf=naive's) would otherwise each report the largest peak of every job before it."""
    if torch.cuda.is_initialized():  # else nothing has used a GPU here yet, and a CPU run creates no CUDA context
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)


def _alone(hydra) -> list[str]:
    """This job's overrides as a command that runs it alone: a sweep's job (an experiment or a search sets
    hydra.mode=MULTIRUN) would otherwise start the sweep again, in a new folder, instead of resuming."""
    return [*hydra.overrides.task, *(["hydra.mode=RUN"] if hydra.mode == RunMode.MULTIRUN else [])]


def _jobs_running() -> int:
    """Jobs of this sweep running now on this machine, this one included; 1 outside a sweep."""
    hydra = HydraConfig.get()
    return runs.jobs_running(Path(hydra.sweep.dir)) if hydra.mode == RunMode.MULTIRUN else 1


def job(cfg: DictConfig) -> float | None:
    """One job (``tlexp-train``, through tlexp/cli.py). In a sweep a failing job is recorded and the sweep goes on; alone, it exits non-zero.

    Returns the best epoch's validation accuracy, the value a sweeper (Optuna) maximises: the test
    split stays out of model selection.
    """
    if multiprocessing.get_start_method(allow_none=True) == "loky":
        # A side-by-side job (hydra/launcher=local) runs in a joblib worker, whose default start method
        # is loky's: DataLoader workers cannot start with it. Back to the platform's own.
        multiprocessing.set_start_method(None, force=True)
    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)
    with runs.recorded(cfg, run_dir, hydra.mode == RunMode.MULTIRUN, _alone(hydra)), runs.locked(run_dir):
        done, ckpt_path = runs.resume_point(cfg, run_dir)
        runs.claim(cfg, run_dir, done, ckpt_path)  # a run dir holds one run, with one set of settings
        if done is not None:
            log.info("resume=true: %s already completed (test acc %.4f); skipped", run_dir, done["test_acc"])
            return done["val_acc"]
        return run(cfg, ckpt_path)["val_acc"]
    return None


if __name__ == "__main__":
    from tlexp.cli import train

    train()
