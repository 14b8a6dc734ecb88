"""Sanity checks on config values that YAML accepts and no type system catches.

A value of the wrong type (``data.batch_size=abc``) or out of range (``optim.lr=0``) is reported
with every other problem in one message, before anything is built or written.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from tlexp.data.transforms import POLICIES
from tlexp.errors import TlexpError
from tlexp.model.optim import SCHEDULERS
from tlexp.speed.timing import RUNTIMES

INT, NUMBER = "an integer", "a number"

# key -> (type, lowest allowed, highest allowed (exclusive for dropout), may be null)
NUMERIC = {
    "seed": (INT, 0, 2**32, False),
    "data.split_seed": (INT, 0, 2**32, True),
    "optim.lr": (NUMBER, 0.0, None, False),
    "optim.warmup_epochs": (INT, 0, None, False),
    "finetune.backbone_lr_factor": (NUMBER, 0.0, None, False),
    "finetune.phase_a_epochs": (INT, 0, None, False),
    "finetune.phase_b_epochs": (INT, 0, None, False),
    "trainer.max_epochs": (INT, 1, None, True),
    "data.batch_size": (INT, 1, None, False),
    "data.num_workers": (INT, 0, None, False),
    "data.image_size": (INT, 16, None, True),
    "data.limit_per_class": (INT, 1, None, True),
    "model.head.dropout": (NUMBER, 0.0, 1.0, False),
    "data.augment.cached_views.phase_a": (INT, 0, None, False),
    "data.augment.cached_views.phase_b": (INT, 0, None, False),
    "perf.cache_budget_gb": (NUMBER, 0.0, None, False),
    "perf.compile_prefix_min_images": (INT, 0, None, True),
    "tune.min_lr": (NUMBER, 1e-12, None, False),
    "tune.max_lr": (NUMBER, 1e-12, None, False),
    "tune.num_training": (INT, 2, None, False),
    "dashboard.misclassified_images": (INT, 0, None, False),
    "callbacks.ema.decay": (NUMBER, 0.0, 1.0, True),  # callbacks=ema only
    "data.augment.mixup_alpha": (NUMBER, 0.0, None, True),
    "data.augment.cutmix_alpha": (NUMBER, 0.0, None, True),
}
CHOICES = {
    "resume": (False, True, "auto"), "data.on_bad_image": ("skip", "error"),
    "profile.runtime": RUNTIMES, "perf.channels_last": (True, False, "auto"), "perf.mps": (True, False), "optim.scheduler": SCHEDULERS,
    "data.augment.policy": tuple(POLICIES), "model.tta": ("none", "flip"),
}


def _numeric_problem(key: str, value, kind: str, low, high, nullable: bool) -> str | None:
    if value is None:
        return None if nullable else f"{key} must be {kind}, got null"
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int and not (kind == NUMBER and isinstance(value, float)):
        return f"{key} must be {kind}{' or null' if nullable else ''}, got {value!r}"
    if key == "optim.lr" and value <= 0:
        return f"optim.lr must be > 0, got {value}"
    if value < low or (high is not None and value >= high):
        return f"{key} must be {'in [' + str(low) + ', ' + str(high) + ')' if high is not None else '>= ' + str(low)}, got {value}"
    return None


def check_config(cfg) -> None:
    problems = [
        p for key, rule in NUMERIC.items()
        if (p := _numeric_problem(key, OmegaConf.select(cfg, key), *rule)) is not None
    ]
    problems += [
        f"{key} must be one of {', '.join(str(c).lower() for c in choices)}, got {OmegaConf.select(cfg, key)}"
        for key, choices in CHOICES.items()
        if OmegaConf.select(cfg, key) not in choices
    ]
    problems += _mixing_problems(cfg) if not problems else []
    if problems:
        raise TlexpError("; ".join(problems))


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
