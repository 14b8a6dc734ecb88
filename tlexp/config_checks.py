"""Sanity checks on config values that no type system catches (a zero learning rate, ...)."""

from __future__ import annotations

from tlexp.errors import TlexpError


def check_config(cfg) -> None:
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}")
    need(cfg.finetune.backbone_lr_factor >= 0, f"finetune.backbone_lr_factor must be >= 0, got {cfg.finetune.backbone_lr_factor}")
    need(cfg.finetune.phase_a_epochs >= 0, f"finetune.phase_a_epochs must be >= 0, got {cfg.finetune.phase_a_epochs}")
    need(cfg.finetune.phase_b_epochs >= 0, f"finetune.phase_b_epochs must be >= 0, got {cfg.finetune.phase_b_epochs}")
    need(cfg.data.batch_size >= 1, f"data.batch_size must be >= 1, got {cfg.data.batch_size}")
    need(cfg.data.num_workers >= 0, f"data.num_workers must be >= 0, got {cfg.data.num_workers}")
    need(cfg.data.image_size is None or cfg.data.image_size >= 16, f"data.image_size must be null or >= 16, got {cfg.data.image_size}")
    need(cfg.data.limit_per_class is None or cfg.data.limit_per_class >= 1, f"data.limit_per_class must be null or >= 1, got {cfg.data.limit_per_class}")
    need(0 <= cfg.model.head.dropout < 1, f"model.head.dropout must be in [0, 1), got {cfg.model.head.dropout}")
    for phase, views in cfg.data.augment.cached_views.items():
        need(views >= 0, f"data.augment.cached_views.{phase} must be >= 0, got {views}")
    need(cfg.perf.cache_budget_gb >= 0, f"perf.cache_budget_gb must be >= 0, got {cfg.perf.cache_budget_gb}")
    if problems:
        raise TlexpError("; ".join(problems))
