"""A timm backbone's images are prepared as timm prepares them (issue 16: timm's own resolution, not a copy)."""

from __future__ import annotations

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config

from tlexp.data.transforms import eval_transform
from tlexp.model.backbones import build_imagenet_model


def test_timm_weights_get_timms_eval_transform(tmp_path):
    weights = tmp_path / "resnet18.pt"
    torch.save(timm.create_model("resnet18").state_dict(), weights)
    model, pre = build_imagenet_model("timm", "resnet18", str(weights))
    assert (pre.crop_size, pre.resize_size, pre.interpolation) == (224, 235, "bicubic")  # floor(224 / 0.95), as timm
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 410, 3), dtype=np.uint8))
    ours = eval_transform(pre)(image)
    theirs = create_transform(**resolve_model_data_config(model), is_training=False)(image)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
