"""The optimizer named by ``optim._target_`` and the learning-rate schedule, from the optim config.

Built here rather than by ``hydra.utils.instantiate``: the parameter groups exist only once the
model does, and the schedule needs the run's length.
"""

from __future__ import annotations

import difflib
import importlib

import torch

from tlexp.errors import TlexpError

OWN_KEYS = ("_target_", "lr", "scheduler", "warmup_epochs")
SCHEDULERS = (None, "cosine", "onecycle")


def optimizer_name(cfg: dict) -> str:
    """``torch.optim.AdamW`` -> ``adamw``: how tables and TensorBoard name it."""
    return cfg["_target_"].rsplit(".", 1)[-1].lower()


def _torch_optimizers() -> dict[str, str]:
    """``adamw`` -> ``torch.optim.AdamW``, for each optimizer of torch.optim."""
    classes = (n for n, c in vars(torch.optim).items() if isinstance(c, type) and issubclass(c, torch.optim.Optimizer))
    return {n.lower(): f"torch.optim.{n}" for n in classes if n != "Optimizer"}


def optimizer_class(target) -> type[torch.optim.Optimizer]:
    """The class ``optim._target_`` names, checked with the config: a typo would otherwise surface
    only at ``configure_optimizers``, after the data were listed and the backbone built."""
    module, _, name = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
        return cls
    known = _torch_optimizers()
    close = difflib.get_close_matches(name.lower(), known, n=1)  # case-blind: Adamw -> AdamW
    hint = f"did you mean {known[close[0]]}?" if close else "give one such as torch.optim.AdamW"
    what = "an importable class" if cls is None else "a torch.optim.Optimizer"
    raise TlexpError(f"optim._target_={target} is not {what}: {hint}")


def build_optimizer(cfg: dict, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    cls = optimizer_class(cfg["_target_"])
    extra = {k: v for k, v in cfg.items() if k not in OWN_KEYS}
    try:
        optimizer = cls(groups, lr=lr, **extra)
    except TypeError as exc:
        raise TlexpError(
            f"optim._target_={cfg['_target_']} does not take these settings ({exc}): drop them with ~optim.<key> "
            "or pick another optim="
        ) from exc
    except ValueError as exc:  # torch.optim's own range checks (weight_decay=-1, betas=[0.9,1.5], ...)
        raise TlexpError(f"optim._target_={cfg['_target_']} refuses these settings: {exc}") from exc
    _check_eps_in_float16(optimizer, cfg["_target_"])
    return optimizer


def _check_eps_in_float16(optimizer: torch.optim.Optimizer, target: str) -> None:
    """float16 weights (trainer.precision=16-true) keep the optimizer's state in float16 too, where Adam's eps=1e-8
    is 0: a weight whose gradient is 0 (or tiny) gets 0/0 or x/0 at the first step, and the run goes on in nan."""
    for group in optimizer.param_groups:
        eps = group.get("eps")
        if isinstance(eps, float) and any(p.dtype == torch.float16 for p in group["params"]) and torch.tensor(eps, dtype=torch.float16) == 0:
            raise TlexpError(
                f"optim._target_={target} with eps={eps:g} on float16 weights (trainer.precision=16-true): eps is 0 in float16 "
                "and the first step turns weights into nan; use trainer.precision=16-mixed or bf16-true, or set +optim.eps=1e-4"
            )


def check_optimizer(cfg: dict) -> None:
    """The optimizer and its settings, built over one stand-in parameter when the config is checked."""
    build_optimizer(cfg, [{"params": [torch.zeros(1, requires_grad=True)]}], cfg["lr"])


def build_schedule(cfg: dict, optimizer: torch.optim.Optimizer, epochs: int | None, max_epochs: int | None, total_steps) -> dict | None:
    """Lightning's ``lr_scheduler`` entry, or None; ``epochs``: the cosine's length, ``max_epochs``: the
    trainer's (-1 or None: open-ended); ``total_steps``: called only for a per-step schedule."""
    name = cfg.get("scheduler")
    if name not in SCHEDULERS:
        raise TlexpError(f"optim.scheduler={name}: choose one of null, cosine, onecycle")
    if name == "onecycle":
        peaks = [group["lr"] for group in optimizer.param_groups]  # each group peaks at its own rate
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total_steps())
        return {"scheduler": schedule, "interval": "step"}
    if name == "cosine":
        check_cosine_length(epochs, max_epochs)
        warmup = cfg.get("warmup_epochs", 0)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs - warmup))
        if warmup:
            ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warmup)
            cosine = torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
        return {"scheduler": cosine, "interval": "epoch"}
    return None


def check_cosine_length(epochs: int | None, max_epochs: int | None) -> None:
    """Past its end torch's cosine rises again, and an open-ended trainer gives it no end."""
    if epochs is None or epochs < 1:
        raise TlexpError(
            f"the cosine schedule needs a length and the trainer's max_epochs={max_epochs} gives none "
            "(max_steps or max_time ends it): pass total_epochs, the epochs it will train"
        )
    if max_epochs is not None and max_epochs > epochs:
        raise TlexpError(
            f"the cosine schedule lasts total_epochs={epochs} but the trainer may train max_epochs="
            f"{max_epochs}: pass total_epochs >= max_epochs (or leave it unset)"
        )
