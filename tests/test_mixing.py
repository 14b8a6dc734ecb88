"""data.augment.mixup_alpha / cutmix_alpha: torchvision's MixUp and CutMix on training batches of images."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from tests.conftest import read_metrics, train
from tlexp.data.transforms import batch_mixing


def test_mixing_gives_mixed_images_and_class_probabilities():
    torch.manual_seed(0)
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8) % 3
    for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0), (0.4, 1.0)):
        mix = batch_mixing(OmegaConf.create({"mixup_alpha": mixup, "cutmix_alpha": cutmix}), num_classes=3)
        mixed, soft = mix(images, labels)
        assert soft.shape == (8, 3) and torch.allclose(soft.sum(1), torch.ones(8)) and not torch.equal(mixed, images)
    assert batch_mixing(OmegaConf.create({"mixup_alpha": 0.0}), num_classes=3) is None


def test_a_mixed_run_trains_on_mixed_batches(tiny_tree, tmp_path):
    plain, mixed = tmp_path / "plain", tmp_path / "mixed"
    train(plain, tiny_tree, "model=resnet18", "strategy=blocks_2", "perf=naive")
    train(mixed, tiny_tree, "model=resnet18", "strategy=blocks_2", "perf=naive", "data.augment.mixup_alpha=0.4", "data.augment.cutmix_alpha=1.0")
    first = [read_metrics(run)["history"][0]["train_loss"] for run in (plain, mixed)]
    assert first[0] != first[1]  # same seed, same images: only the mixing differs
    assert read_metrics(mixed)["status"] == "completed"


def test_mixing_needs_images_and_cross_entropy(tiny_tree, tmp_path):
    result = train(tmp_path / "run", tiny_tree, "data.augment.mixup_alpha=0.4", "loss=focal", check=False)
    assert result.returncode == 2
    assert "data.augment.mixup_alpha mix images, and perf.feature_cache trains on cached features: use perf=naive" in result.stderr
    assert "only loss=ce takes (not loss=focal)" in result.stderr
