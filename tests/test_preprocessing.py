"""A timm backbone's images are prepared as timm prepares them (issue 16: timm's own resolution, not a copy);
an image of extreme aspect is cut before the eval resize, so it costs what a normal one does."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from tlexp.data.transforms import Preprocessing, eval_geometry, eval_transform, train_geometry
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


PRESETS = {"torchvision": Preprocessing(), "timm": Preprocessing(resize_size=235, interpolation="bicubic"),
           "image_size=32": Preprocessing().at_size(32)}


def uncut_geometry(pre: Preprocessing) -> T.Compose:
    """The eval geometry as it was: resize the short side, whatever the long one, then centre-crop."""
    interp = InterpolationMode(pre.interpolation)
    return T.Compose(
        [T.Resize(pre.resize_size, interpolation=interp, antialias=True), T.CenterCrop(pre.crop_size), T.ToImage()]
    )


def noise(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("preset", PRESETS)
def test_eval_geometry_of_images_up_to_4_to_1_is_unchanged_bit_for_bit(preset):
    pre = PRESETS[preset]
    for size in [(300, 410), (640, 480), (97, 388), (251, 1003), (33, 131), (3, 12), (1, 4), (1, 1)]:
        for width, height in (size, size[::-1]):
            image = noise(width, height)
            assert torch.equal(eval_geometry(pre)(image), uncut_geometry(pre)(image)), (width, height)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("width, height", [(20, 2000), (2000, 20), (7, 101), (600, 3001)])
def test_eval_geometry_of_an_extreme_aspect_is_within_a_pixel_of_the_uncut_one(preset, width, height):
    """Only the resize's rounding of the shortened long side moves the crop, by under a pixel: the difference
    is less than a one-pixel shift makes."""
    pre, image = PRESETS[preset], noise(width, height)
    cut, uncut = eval_geometry(pre)(image).float(), uncut_geometry(pre)(image).float()
    along = -1 if width > height else -2
    pixel_shift = (uncut.narrow(along, 1, pre.crop_size - 1) - uncut.narrow(along, 0, pre.crop_size - 1)).abs().mean()
    assert (cut - uncut).abs().mean() < pixel_shift


@pytest.mark.parametrize("geometry", ["eval", "train"])
@pytest.mark.parametrize("width, height", [(1, 30000), (30000, 1), (10, 10000), (10000, 10)])
def test_an_extreme_aspect_resizes_no_more_pixels_than_a_normal_image(monkeypatch, geometry, width, height):
    """A 1 x 30000 image was resized to 256 x 7,680,000 (8.7 GB, ~30 s) before the eval centre crop."""
    pre, resized, resize = Preprocessing(), [], Image.Image.resize

    def bounded_resize(image, size, *args, **kwargs):
        resized.append(size)
        assert size[0] * size[1] <= 32 * pre.resize_size**2, f"{image.size} resized to {size}"
        return resize(image, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", bounded_resize)
    augment = OmegaConf.create({"crop_scale": [0.08, 1.0], "hflip": True, "rotation": 0, "shear": 0})
    transform = eval_geometry(pre) if geometry == "eval" else train_geometry(pre, augment)
    pixels = transform(Image.new("RGB", (width, height), (200, 40, 90)))
    assert resized and pixels.shape == (3, 224, 224)
    assert pixels.flatten(1).unique(dim=1).tolist() == [[200], [40], [90]]
