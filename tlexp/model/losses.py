"""Cross-entropy and focal loss, with per-class weights for imbalanced data."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tlexp.errors import TlexpError


class FocalLoss(nn.Module):
    """FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t) (Lin et al., 2017), averaged over the batch."""

    def __init__(self, gamma: float = 2.0, alpha: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("alpha", alpha)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p_t = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        # 1 - p_t kept above 0: for 0 < gamma < 1 its power has an infinite slope where a confident
        # example's p_t rounds to 1, and that slope times log(1) = 0 made every gradient nan
        loss = -((1 - log_p_t.exp()).clamp(min=torch.finfo(torch.float32).tiny) ** self.gamma) * log_p_t
        if self.alpha is not None:
            loss = loss * self.alpha[target]
        return loss.mean()


def class_weights(spec, class_counts: Sequence[int], key: str) -> torch.Tensor | None:
    """``null`` → None, ``auto`` → inverse class frequency (mean 1), a list → as given."""
    if spec is None:
        return None
    if spec == "auto":
        counts = torch.tensor(class_counts, dtype=torch.float32)
        return counts.sum() / (len(counts) * counts)
    try:
        weights = torch.tensor(list(spec), dtype=torch.float32)
    except (TypeError, ValueError):  # a word (Auto, balanced) or a list with one
        weights = None
    # nan fails >= 0; all zero weights make the weighted mean 0 / 0
    if weights is None or weights.dim() != 1 or len(weights) != len(class_counts) or not (weights >= 0).all() or not weights.any():
        raise TlexpError(
            f"{key}={spec}: give auto, null or {len(class_counts)} non-negative numbers (one per class, not all 0)"
        )
    return weights


def build_loss(cfg, class_counts: Sequence[int]) -> nn.Module:
    if cfg["name"] == "ce":
        weight = class_weights(cfg["class_weights"], class_counts, "loss.class_weights")
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg["label_smoothing"])
    if cfg["name"] == "focal":
        if cfg["gamma"] < 0:
            raise TlexpError(f"loss.gamma must be >= 0, got {cfg['gamma']}")
        return FocalLoss(gamma=cfg["gamma"], alpha=class_weights(cfg["alpha"], class_counts, "loss.alpha"))
    raise TlexpError(f"unknown loss '{cfg['name']}': use loss=ce or loss=focal")
