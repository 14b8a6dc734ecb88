"""Cross-entropy and focal loss, with per-class weights for imbalanced data."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tlexp.errors import TlexpError


class FocalLoss(nn.Module):
    """FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t) (Lin et al., 2017), averaged over the batch.

    The mean is over images, as the paper's and ``torchvision.ops.sigmoid_focal_loss``'s, not over the targets'
    alpha as weighted cross-entropy's: with gamma = 0 it is cross-entropy exactly without alpha, and with alpha
    it is the batch's mean alpha_t times ``loss=ce loss.class_weights=<alpha>``.
    """

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


class WeightedCrossEntropy(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` with class weights, whose batch of zero-weight classes only has loss 0.

    torch divides the batch's weighted sum by its targets' weights: 0 / 0 = nan there (a last batch of one image
    of a class left out with weight 0), and its gradient makes every weight nan at the optimizer step.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dim() != 1:  # class probabilities (MixUp / CutMix): torch's mean over the batch
            return super().forward(logits, target)
        total = F.cross_entropy(logits, target, weight=self.weight, label_smoothing=self.label_smoothing, reduction="sum")
        weight = batch_weight(self, target)
        return torch.where(weight > 0, total / torch.where(weight > 0, weight, 1), 0)


def batch_weight(criterion: nn.Module, target: torch.Tensor) -> torch.Tensor | int:
    """What ``criterion``'s batch mean divides by: the targets' class weights for weighted cross-entropy on class
    indices, else the batch size. Each batch weighs that much in an epoch's mean loss, which is then the loss
    of the whole epoch at once, whatever the batch size."""
    if isinstance(criterion, nn.CrossEntropyLoss) and criterion.weight is not None and target.dim() == 1:
        return criterion.weight[target].sum()
    return len(target)


def class_weights(spec, class_counts: Sequence[int], key: str) -> torch.Tensor | None:
    """``null`` → None, ``auto`` → inverse class frequency (mean 1 over the training images), a list → as given.

    With ``auto`` a class without training images (a skewed ``data.split``) gets 0, not 1 / 0: it is in no
    training batch, and an infinite weight made every validation and test loss with one of its images nan.
    """
    if spec is None:
        return None
    if spec == "auto":
        counts = torch.tensor(class_counts, dtype=torch.float32)
        present = counts > 0
        return torch.where(present, counts.sum() / (present.sum() * counts), 0)
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
        loss = nn.CrossEntropyLoss if weight is None else WeightedCrossEntropy
        return loss(weight=weight, label_smoothing=cfg["label_smoothing"])
    if cfg["name"] == "focal":
        if cfg["gamma"] < 0:
            raise TlexpError(f"loss.gamma must be >= 0, got {cfg['gamma']}")
        return FocalLoss(gamma=cfg["gamma"], alpha=class_weights(cfg["alpha"], class_counts, "loss.alpha"))
    raise TlexpError(f"unknown loss '{cfg['name']}': use loss=ce or loss=focal")
