"""Class imbalance (20:1): focal loss with alpha=auto finds more of the rare class than cross-entropy."""

from __future__ import annotations

import numpy as np
from PIL import Image

from tests.conftest import read_metrics, train


def _overlapping_classes(root, counts: dict[str, int], brightness: dict[str, float], seed: int = 0):
    """Grey images whose brightness differs by class but overlaps: the prior decides the borderline ones."""
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            level = rng.normal(brightness[name], 18.0)
            pixels = np.clip(level + rng.normal(0, 4, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:04d}.png")
    return root


def test_focal_alpha_auto_raises_minority_recall(tmp_path):
    tree = _overlapping_classes(tmp_path / "images", {"common": 600, "rare": 30}, {"common": 110.0, "rare": 140.0})
    # the last epoch is tested: picking the best epoch by accuracy would favour "always common"
    budget = (
        "model=resnet18", "strategy=frozen", "finetune.phase_a_epochs=8", "data.split=[0.5,0.1,0.4]", "optim.lr=0.01",
        "callbacks.model_checkpoint.monitor=null",
    )
    train(tmp_path / "ce", tree, *budget, "loss=ce")
    train(tmp_path / "focal", tree, *budget, "loss=focal", "loss.alpha=auto")
    ce, focal = read_metrics(tmp_path / "ce"), read_metrics(tmp_path / "focal")
    rare_ce, rare_focal = ce["test_recall_per_class"]["rare"], focal["test_recall_per_class"]["rare"]
    assert rare_focal > rare_ce, (rare_ce, rare_focal)
    assert set(focal["test_recall_per_class"]) == {"common", "rare"}  # the run reports recall per class
