"""metrics.json, the record of one run: its schema, its one writer and its reader.

A record always says ``status``: ``completed`` (every result key), ``failed`` (``error``: the
message) or ``interrupted`` (``error``: how to resume). Light on imports: ``tlexp-table`` reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger("tlexp")
RECORD = "metrics.json"
STATUSES = ("completed", "failed", "interrupted")
# The settings that change what a run computes, with RESULT_CALLBACKS. Everything else (progress bars,
# workers, paths, loggers, profiling, other callbacks) may differ between a run and its resume.
RESULT_KEYS = ("model", "data", "loss", "optim", "finetune", "strategy", "seed", "perf.feature_cache", "trainer")
# Every Trainer argument counts (+trainer.limit_train_batches=0.1 trains on other batches) but these, which
# change what is shown or where it runs, not what is computed.
NOT_RESULT_KEYS = (
    "data.num_workers", "data.image_checks", "trainer.accelerator", "trainer.log_every_n_steps", "trainer.enable_progress_bar",
    "trainer.num_sanity_val_steps", "trainer.enable_model_summary", "trainer.profiler",
)
# Callbacks (by class name) that change what a run computes, and their arguments that do (None: all): the
# first checkpoint callback's monitor picks the best.ckpt that is tested, EarlyStopping ends the run,
# WeightEMA is the model validated and tested. Compared as ``callbacks.<name>.<argument>``.
RESULT_CALLBACKS = {
    "RunDirCheckpoint": ("monitor", "mode"), "ModelCheckpoint": ("monitor", "mode"), "EarlyStopping": None, "PhaseBEarlyStopping": None,
    "WeightEMA": None,
}
# What a resume may change: training longer continues the same run (tests/test_scaling.py's DDP resume).
EXTENDABLE = ("finetune.phase_b_epochs", "trainer.max_epochs")


def result_config(cfg) -> dict:
    """The resolved settings that decide a run's results, flattened to ``key: value``."""
    flat = {}
    for key in RESULT_KEYS:
        flat.update(_flatten(key, _plain(OmegaConf.select(cfg, key, throw_on_missing=False))))
    for name, node in (OmegaConf.select(cfg, "callbacks") or {}).items():
        kind = str((node or {}).get("_target_")).rsplit(".", 1)[-1]
        if kind in RESULT_CALLBACKS:
            for argument in [a for a in RESULT_CALLBACKS[kind] or node if a in node]:
                flat.update(_flatten(f"callbacks.{name}.{argument}", _plain(node[argument])))
    return {k: v for k, v in flat.items() if k not in NOT_RESULT_KEYS}


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _flatten(prefix: str, value) -> dict:
    if isinstance(value, dict):
        return {k: v for name, item in value.items() for k, v in _flatten(f"{prefix}.{name}", item).items()}
    return {prefix: value}


def config_digest(settings: dict) -> str:
    """sha256 of ``result_config``'s output: equal digests, same run."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def differences(saved: dict, now: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """``key: saved -> now`` for every result setting that differs (but those in ``ignore``)."""
    keys = sorted((saved.keys() | now.keys()) - set(ignore))
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def run_identity(cfg, run_dir: Path) -> dict:
    """What makes this run this run: its result settings and their digest, its split, its Hydra files."""
    settings = result_config(cfg)
    hydra_dir = run_dir / ".hydra"
    return {
        "settings": settings,
        "config_digest": config_digest(settings),
        "split_digest": file_digest(run_dir / "split.csv"),
        "hydra_files": {f.name: f.read_text() for f in sorted(hydra_dir.glob("*.yaml"))} if hydra_dir.is_dir() else {},
    }


def restore_hydra_files(run_dir: Path, identity: dict | None) -> None:
    """Put back the ``.hydra`` files of the run that owns ``run_dir`` (Hydra rewrites them at every start)."""
    for name, text in (identity or {}).get("hydra_files", {}).items():
        tmp = run_dir / ".hydra" / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, run_dir / ".hydra" / name)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def best_epoch(epochs: list[dict]) -> dict:
    """The epoch with the highest validation accuracy (first one on ties), as ModelCheckpoint picks: tlexp's one definition."""
    scored = [e for e in epochs if "val_acc" in e]
    return max(scored, key=lambda e: e["val_acc"]) if scored else {}


def write_record(run_dir: Path, record: dict) -> None:
    """Replace ``run_dir``'s metrics.json in one step (a reader never sees half a file)."""
    if record.get("status") not in STATUSES:
        raise ValueError(f"a run record's status is one of {STATUSES}, got {record.get('status')!r}")
    path = Path(run_dir) / RECORD
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


class NotARecord(ValueError):
    """A metrics.json that is valid JSON but no run record of tlexp's (another tool's, or one without a ``status``)."""


def read_record(path: Path) -> dict:
    """A metrics.json (the file, or the run folder holding it); ValueError if it is not JSON, NotARecord if not a record."""
    path = Path(path)
    file = path / RECORD if path.is_dir() else path
    record = json.loads(file.read_text())
    if not isinstance(record, dict) or record.get("status") not in STATUSES:
        raise NotARecord(f"{file} is not a tlexp run record (no status {' or '.join(STATUSES)}): another tool's or an older format")
    return record


def _brief(cfg, run_dir: Path, status: str, error: str) -> dict:
    """A record without results; a setting left without a value (the failure, perhaps) is null in it."""
    said = {key: OmegaConf.select(cfg, key, throw_on_missing=False) for key in ("model.name", "strategy", "seed")}
    return {"status": status, "error": error, "model": said["model.name"], "strategy": None if said["strategy"] is None else str(said["strategy"]),
            "seed": said["seed"], "run_dir": str(run_dir)}


def record_failure(cfg, run_dir: Path, exc: BaseException) -> None:
    """A failed job's record, where the table looks for it, so a sweep shows it as a failed row."""
    write_record(run_dir, _brief(cfg, run_dir, "failed", f"{type(exc).__name__}: {exc}"))


def resume_command(run_dir: Path, overrides: list[str]) -> str:
    """The line that continues the run in ``run_dir`` (Hydra's ``overrides.task``, which leaves out ``hydra.run.dir``)."""
    again = [o for o in overrides if not o.startswith(("ckpt_path=", "resume="))]
    return shlex.join(["tlexp-train", *again, f"hydra.run.dir={run_dir}", "resume=true"])


def record_interruption(cfg, run_dir: Path, how: str, overrides: list[str]) -> None:
    """Say how to resume, as a command to paste; a killed job must not look finished (nor like a crash to debug).

    resume=true continues from any checkpoint in the folder (``runs.resume_point``; a ``best.ckpt`` where
    ``last_checkpoint`` is off), and a run without it is refused there (``runs.claim``). With none yet, resume=true
    has nothing to resume: the command it was started with starts it again as it first started (from epoch 0, or
    from its ckpt_path= of another run), with resume=true or without, and the message says so.
    """
    if any((run_dir / "checkpoints").glob("*.ckpt")):
        hint = f"resume with: {resume_command(run_dir, overrides)}"
    else:
        again = shlex.join(["tlexp-train", *overrides, f"hydra.run.dir={run_dir}"])
        hint = f"no epoch had finished, so there is no checkpoint: the same command starts it again (with resume=true too): {again}"
    write_record(run_dir, _brief(cfg, run_dir, "interrupted", f"stopped by {how}; {hint}"))
    log.warning("stopped by %s; %s", how, hint)


def completed_record(
    cfg, run_dir: Path, *, identity: dict, data, module, units, trainable_params: int, epochs: list[dict], test: dict,
    precision: str, extra: dict,
) -> dict:
    """Every result of a finished run: the study's columns, how it was run, and the per-epoch history.

    ``identity``: ``run_identity``'s, as its checkpoints hold it; ``units``: those that trained (none
    if the run ended in phase A); ``epochs``: ``EpochHistory.epochs`` as fitting left them; ``extra``:
    what only some runs measure (speed, peak GPU memory, the LR finder's result, wall time).
    """
    best = best_epoch(epochs)
    return {
        "status": "completed",
        "model": cfg.model.name,
        "model_source": cfg.model.source,
        "weights": cfg.model.weights,
        "strategy": str(cfg.strategy),
        "seed": cfg.seed,
        "perf": cfg.perf.name,
        "feature_cache": {"enabled": cfg.perf.feature_cache, **OmegaConf.to_container(cfg.data.augment.cached_views)},
        "precision": precision,
        "channels_last": module.hparams.channels_last,
        "num_classes": len(data.class_names),
        "class_names": data.class_names,
        "images": {s: len(v) for s, v in data.split.items()},
        "skipped_images": len(data.skipped),
        "skipped": data.skipped,
        "epochs": len(epochs),
        "phase_a_epochs": sum(not e["phase_b"] for e in epochs),  # as trained: trainer.max_epochs or early stopping may end either
        "phase_b_epochs": sum(e["phase_b"] for e in epochs),
        "best_epoch": best.get("epoch"),
        **{k: best.get(k) for k in ("train_acc", "train_loss", "val_acc", "val_loss")},
        "test_acc": test["test/acc"],
        "test_loss": test["test/loss"],
        **module.test_results,
        "trainable_params": trainable_params,
        "trainable_params_phase_a": sum(p.numel() for p in module.head.parameters()),
        "total_params": sum(p.numel() for p in module.parameters()),
        "unfrozen_modules": [u.name for u in units],
        "lr": module.learning_rate,
        "preprocessing": module.preprocessing.as_dict(),
        "tta": module.tta,  # flip: val and test figures (and predict, export) average each image with its mirror
        **extra,
        "run_dir": str(run_dir),
        "run": identity,
        "history": epochs,
    }
