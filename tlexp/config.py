"""Sanity checks on config values that YAML accepts and no type system catches.

A value of the wrong type (``data.batch_size=abc``) or out of range (``optim.lr=0``) is reported
with every other problem in one message, before anything is built or written.
"""

from __future__ import annotations

import math

import torch
from omegaconf import OmegaConf

from tlexp.data.transforms import POLICIES
from tlexp.errors import TlexpError
from tlexp.model.optim import SCHEDULERS, check_optimizer
from tlexp.speed.timing import RUNTIMES

INT, NUMBER = "an integer", "a number"

# key -> (type, lowest allowed, highest allowed (exclusive), may be null). A key that only some config
# groups have (callbacks=ema, loss=ce / focal) is checked where it is there: absent is not null.
NUMERIC = {
    "seed": (INT, 0, 2**32, False),
    "data.split_seed": (INT, 0, 2**32, True),
    "optim.lr": (NUMBER, 0.0, None, False),
    "optim.warmup_epochs": (INT, 0, None, False),
    "finetune.backbone_lr_factor": (NUMBER, 0.0, None, False),
    "finetune.phase_a_epochs": (INT, 0, None, False),
    "finetune.phase_b_epochs": (INT, 0, None, False),
    "trainer.max_epochs": (INT, 1, None, True),
    "trainer.accumulate_grad_batches": (INT, 1, None, False),
    "trainer.gradient_clip_val": (NUMBER, 0.0, None, True),  # Lightning skips a negative one: no clipping
    "data.batch_size": (INT, 1, None, False),
    "data.num_workers": (INT, 0, None, False),
    "data.image_size": (INT, 16, 4096, True),  # 4096: 200 MB for one image's float tensor
    "data.limit_per_class": (INT, 1, None, True),
    "model.head.dropout": (NUMBER, 0.0, 1.0, False),
    "model.head.hidden_dim": (INT, 0, None, True),
    "data.augment.cached_views.phase_a": (INT, 0, None, False),
    "data.augment.cached_views.phase_b": (INT, 0, None, False),
    "perf.cache_budget_gb": (NUMBER, 0.0, None, False),
    "perf.compile_prefix_min_images": (INT, 0, None, True),
    "tune.min_lr": (NUMBER, 1e-12, None, False),
    "tune.max_lr": (NUMBER, 1e-12, None, False),
    "tune.num_training": (INT, 2, None, False),
    "dashboard.misclassified_images": (INT, 0, None, False),
    "callbacks.ema.decay": (NUMBER, 0.0, 1.0, False),  # callbacks=ema only
    "callbacks.early_stopping.patience": (INT, 0, None, False),  # callbacks=early_stopping only
    "data.augment.rotation": (NUMBER, 0.0, None, False),  # degrees either way
    "data.augment.shear": (NUMBER, 0.0, 90.0, False),
    "data.augment.mixup_alpha": (NUMBER, 0.0, None, False),  # 0: off
    "data.augment.cutmix_alpha": (NUMBER, 0.0, None, False),
    "loss.label_smoothing": (NUMBER, 0.0, 1.0, False),  # loss=ce only
    "loss.gamma": (NUMBER, 0.0, None, False),  # loss=focal only
    "profile.batch_size": (INT, 1, None, False),
    "profile.warmup": (INT, 0, None, False),
    "profile.repeats": (INT, 1, None, False),
}
CHOICES = {
    "resume": (False, True, "auto"), "data.on_bad_image": ("skip", "error"),
    "profile.runtime": RUNTIMES, "perf.channels_last": (True, False, "auto"), "perf.mps": (True, False), "optim.scheduler": SCHEDULERS,
    "data.augment.policy": tuple(POLICIES), "model.tta": ("none", "flip"),
    "data.kind": ("imagefolder", "tf_flowers"), "model.source": ("torchvision", "timm"),  # any other kind: an image folder, silently
    # What tlexp trains in (64-bit: its float32 images would meet float64 weights); accelerators it knows.
    "trainer.precision": ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", 32, 16, "bf16"),
    "trainer.accelerator": ("auto", "cpu", "gpu", "cuda", "mps"),
    # Switches: Hydra reads only true / false as booleans, so `off` or `no` is a word, and a word is true.
    **{key: (True, False) for key in (
        "data.augment.hflip", "tune.lr_find", "tune.use_suggestion", "profile.enabled", "perf.tune_malloc", "perf.feature_cache",
        "trainer.sync_batchnorm", "trainer.enable_progress_bar",
    )},
}


_ABSENT = object()


def _numeric_problem(key: str, value, kind: str, low, high, nullable: bool) -> str | None:
    if value is _ABSENT:
        return None
    if value is None:
        return None if nullable else f"{key} must be {kind}, got null"
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int and not (kind == NUMBER and isinstance(value, float)):
        return f"{key} must be {kind}{' or null' if nullable else ''}, got {value!r}"
    if not math.isfinite(value):  # nan passes every range check below
        return f"{key} must be a finite number, got {value}"
    if key == "optim.lr" and value <= 0:
        return f"optim.lr must be > 0, got {value}"
    if value < low or (high is not None and value >= high):
        return f"{key} must be {'in [' + str(low) + ', ' + str(high) + ')' if high is not None else '>= ' + str(low)}, got {value}"
    return None


def check_config(cfg) -> None:
    problems = [
        p for key, rule in NUMERIC.items()
        if (p := _numeric_problem(key, OmegaConf.select(cfg, key, default=_ABSENT), *rule)) is not None
    ]
    problems += [
        f"{key} must be one of {', '.join(str(c).lower() for c in choices)}, got {OmegaConf.select(cfg, key)}"
        for key, choices in CHOICES.items()
        if OmegaConf.select(cfg, key) not in choices
    ]
    problems += _list_problems(cfg)
    if not problems:  # the checks across keys read values the checks above have vouched for
        problems = [p for check in CROSS_CHECKS for p in check(cfg)]
    if problems:
        raise TlexpError("; ".join(problems))


def _numbers(value) -> list | None:
    """A list of finite numbers (booleans are not), else None."""
    if not OmegaConf.is_list(value):
        return None
    value = list(value)
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    return value if ok else None


def _list_problems(cfg) -> list[str]:
    """Lists read only once the images are listed (data.split) or the first batch is drawn (crop_scale),
    where a wrong one ended in a traceback from torchvision or Python."""
    problems = []
    value = OmegaConf.select(cfg, "data.split")
    split = _numbers(value)
    if split is None or len(split) != 3 or min(split) < 0 or split[0] == 0 or abs(sum(split) - 1) > 1e-6:
        problems.append(f"data.split must be three non-negative fractions (train, val, test; train > 0) summing to 1, got {_shown(value)}")
    value = OmegaConf.select(cfg, "data.augment.crop_scale")
    scale = _numbers(value)
    if scale is None or len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        problems.append(f"data.augment.crop_scale must be [low, high], fractions of the image's area with 0 < low <= high <= 1, got {_shown(value)}")
    return problems


def _shown(value) -> str:
    return "null" if value is None else str(OmegaConf.to_container(value)) if OmegaConf.is_config(value) else str(value)


def _optimizer_problems(cfg) -> list[str]:
    """A mistyped class or a setting it refuses, said now rather than when fitting starts."""
    try:
        check_optimizer(OmegaConf.to_container(cfg.optim, resolve=True))
    except TlexpError as exc:
        return [str(exc)]
    return []


def _mixing_problems(cfg) -> list[str]:
    """MixUp / CutMix mix images and give class probabilities as labels."""
    mixing = [k for k in ("mixup_alpha", "cutmix_alpha") if (OmegaConf.select(cfg, f"data.augment.{k}") or 0) > 0]
    if not mixing:
        return []
    keys = " and ".join(f"data.augment.{k}" for k in mixing)
    problems = []
    if OmegaConf.select(cfg, "perf.feature_cache"):
        problems.append(f"{keys} mix images, and perf.feature_cache trains on cached features: use perf=naive (or perf.feature_cache=false)")
    if OmegaConf.select(cfg, "loss.name") != "ce":
        problems.append(f"{keys} give soft labels, which only loss=ce takes (not loss={OmegaConf.select(cfg, 'loss.name')})")
    return problems


def _epoch_problems(cfg) -> list[str]:
    """Phases that train nothing would still end as completed, with no checkpoint (no epoch at all) or
    with the strategy's unfrozen modules and parameter count recorded though phase B never ran.

    A set ``trainer.max_epochs`` is the run's length (phase B from ``phase_a_epochs`` to there), so it
    is left alone: it also stops a run early on purpose, e.g. after phase A to resume later.
    """
    if OmegaConf.select(cfg, "trainer.max_epochs") is not None:
        return []
    strategy, a, b = cfg.strategy, cfg.finetune.phase_a_epochs, cfg.finetune.phase_b_epochs
    if strategy == "frozen" and a == 0:
        return ["no epoch to train: strategy=frozen trains in phase A only and finetune.phase_a_epochs=0: set finetune.phase_a_epochs >= 1"]
    if a + b == 0:
        return ["no epoch to train: finetune.phase_a_epochs=0 and finetune.phase_b_epochs=0: set either to >= 1 (or trainer.max_epochs)"]
    if b == 0 and strategy != "frozen":
        return [(f"strategy={strategy} unfreezes backbone modules in phase B, but finetune.phase_b_epochs=0: "
                 "use strategy=frozen for a head-only run, or give finetune.phase_b_epochs >= 1")]
    return []


def _still_phase_b_problems(cfg) -> list[str]:
    """A phase B at learning rate 0 moves no backbone weight (BatchNorm statistics only), yet its record
    would list the unfrozen modules and count their parameters as trained."""
    if cfg.strategy == "frozen" or cfg.finetune.backbone_lr_factor != 0:
        return []
    return [(f"strategy={cfg.strategy} unfreezes backbone modules in phase B, but finetune.backbone_lr_factor=0 gives them "
             "learning rate 0: use strategy=frozen for a head-only run, or give finetune.backbone_lr_factor > 0")]


# What a callback may monitor (the epoch metrics tlexp logs) and the mode that makes higher or lower better.
MONITORED = {"val/acc": "max", "val/loss": "min", "train/acc": "max", "train/loss": "min"}


def _monitor_problems(cfg) -> list[str]:
    """Early stopping or the best checkpoint on a metric never logged fails after the first epoch; on the wrong
    mode it keeps the worst epoch as best.ckpt, or stops a run that improves."""
    problems = []
    for name, callback in (cfg.callbacks or {}).items():
        monitor = callback.get("monitor") if OmegaConf.is_dict(callback) else None
        if monitor is None:
            continue
        mode = callback.get("mode", "min")  # Lightning's default
        if monitor not in MONITORED:
            problems.append(f"callbacks.{name}.monitor={monitor}: tlexp logs no such metric; monitor one of {', '.join(MONITORED)}")
        elif mode != MONITORED[monitor]:
            problems.append(f"callbacks.{name}.mode={mode}: {monitor} is better {'higher' if MONITORED[monitor] == 'max' else 'lower'}, "
                            f"so give callbacks.{name}.mode={MONITORED[monitor]}")
    return problems


def _warmup_problems(cfg) -> list[str]:
    """The warm-up is the cosine schedule's first part: alone it is not built, and as long as the run it
    leaves the rate below optim.lr throughout, never decayed."""
    warmup, scheduler = OmegaConf.select(cfg, "optim.warmup_epochs", default=0), OmegaConf.select(cfg, "optim.scheduler", default=None)
    if not warmup:
        return []
    if scheduler != "cosine":
        return [(f"optim.warmup_epochs={warmup} ramps up into the cosine schedule, but optim.scheduler={scheduler if scheduler else 'null'}: "
                "set optim.scheduler=cosine, or optim.warmup_epochs=0")]
    a, b = cfg.finetune.phase_a_epochs, cfg.finetune.phase_b_epochs
    epochs = cfg.trainer.max_epochs or a + (0 if cfg.strategy == "frozen" else b)
    if warmup >= epochs:
        return [(f"optim.warmup_epochs={warmup} is the whole run ({epochs} epochs): the rate would never reach optim.lr nor decay; "
                f"give optim.warmup_epochs < {epochs}")]
    return []


def _tune_problems(cfg) -> list[str]:
    """LR-finder settings that would be ignored, or end minutes later in "too few points for a suggestion"."""
    tune = cfg.tune
    if tune.use_suggestion and not tune.lr_find:
        return [("tune.use_suggestion=true trains at the LR finder's suggestion, but tune.lr_find=false runs no finder: "
                 "set tune.lr_find=true too, or drop tune.use_suggestion")]
    if tune.lr_find and tune.min_lr >= tune.max_lr:
        return [f"tune.min_lr={tune.min_lr} must be below tune.max_lr={tune.max_lr}: the LR finder searches upwards from one to the other"]
    return []


CROSS_CHECKS = (
    _optimizer_problems, _mixing_problems, _epoch_problems, _still_phase_b_problems, _tune_problems, _warmup_problems, _monitor_problems,
)


def check_devices(cfg) -> None:
    """A GPU asked for where there is none: one line saying what to run instead, not Lightning's traceback.

    Checked when a job starts, not by ``--cfg``: a config for GPU nodes is composed on machines without one.
    """
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator"))
    mps = accelerator == "gpu" and torch.backends.mps.is_available()  # Lightning's "gpu" is Apple's GPU too
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available() and not mps:
        ddp = OmegaConf.select(cfg, "trainer.strategy") == "ddp"
        instead = "trainer=ddp_cpu (DDP over 2 CPU processes)" if ddp else "trainer.accelerator=cpu (or auto)"
        raise TlexpError(f"trainer.accelerator={accelerator}, but this machine has no GPU (torch.cuda.is_available() is false): use {instead}")


EXPORT_NUMERIC = {
    "tolerance": (NUMBER, 0.0, None, False),
    "verify_images": (INT, 1, None, False),
    "speed.warmup": (INT, 0, None, False),
    "speed.repeats": (INT, 1, None, False),
}
EXPORT_FORMATS = ("onnx", "torchscript")


PREDICT_NUMERIC = {
    "top_k": (INT, 1, None, False),
    "batch_size": (INT, 1, None, False),
    "num_workers": (INT, 0, None, False),
    "print_limit": (INT, 0, None, False),
}
PREDICT_CHOICES = {"on_bad_image": ("skip", "error"), "precision": ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")}


def _tool_problems(cfg, numeric: dict, choices: dict) -> list[str]:
    problems = [
        p for key, rule in numeric.items()
        if (p := _numeric_problem(key, OmegaConf.select(cfg, key, default=_ABSENT), *rule)) is not None
    ]
    return problems + [
        f"{key} must be one of {', '.join(allowed)}, got {OmegaConf.select(cfg, key)}"
        for key, allowed in choices.items()
        if OmegaConf.select(cfg, key) not in allowed
    ]


def check_export_config(cfg) -> None:
    """``tlexp-export``'s numbers and names, before minutes of exporting end in a check no value could pass
    (or, for a misspelt format or runtime, in no file at all or a runtime not asked for)."""
    formats = OmegaConf.select(cfg, "formats")
    formats = list(formats) if OmegaConf.is_list(formats) else [formats]
    problems = _tool_problems(cfg, EXPORT_NUMERIC, {"speed.runtime": RUNTIMES})
    if not formats or any(f not in EXPORT_FORMATS for f in formats):
        problems.append(f"formats must be a non-empty list of {', '.join(EXPORT_FORMATS)}, got {formats}")
    if problems:
        raise TlexpError("; ".join(problems))


def check_predict_config(cfg) -> None:
    """``tlexp-predict``'s numbers and choices, before the checkpoint or any image is read."""
    if problems := _tool_problems(cfg, PREDICT_NUMERIC, PREDICT_CHOICES):
        raise TlexpError("; ".join(problems))
