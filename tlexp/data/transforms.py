"""Eval-time preprocessing a backbone expects, and the train/eval transforms built from it.

The numbers come from the weights (torchvision's ``transforms()``, timm's ``resolve_model_data_config``) so a
fine-tuned model sees images the way it saw them in pre-training.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    crop_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def at_size(self, image_size: int | None) -> Preprocessing:
        """Same preprocessing at another crop size, keeping the resize/crop ratio."""
        if image_size is None or image_size == self.crop_size:
            return self
        ratio = self.resize_size / self.crop_size
        return replace(self, crop_size=image_size, resize_size=round(image_size * ratio))

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def from_torchvision_weights(weights) -> Preprocessing:
    preset = weights.transforms()
    return Preprocessing(
        crop_size=int(preset.crop_size[0]),
        resize_size=int(preset.resize_size[0]),
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        interpolation=preset.interpolation.value,
    )


def from_timm_model(model) -> Preprocessing:
    """timm's own resolution (``resolve_model_data_config``) and eval resize, ``floor(crop / crop_pct)`` as
    in its ``transforms_imagenet_eval``. Its crop modes other than centre (a few models) are not reproduced."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    if cfg.get("crop_mode", "center") != "center":
        log.warning("timm's crop_mode=%s for this model: tlexp resizes and centre-crops instead", cfg["crop_mode"])
    crop = int(cfg["input_size"][-1])
    return Preprocessing(
        crop_size=crop, resize_size=math.floor(crop / cfg["crop_pct"]),
        mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), interpolation=cfg["interpolation"],
    )


def to_model_input(pre: Preprocessing) -> T.Compose:
    """uint8 image tensor -> normalized float tensor (cheap; the decoded-view cache stores its input)."""
    return T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std)])


class CutLongSide(T.Transform):
    """Centre-cut a long side past ``MAX_ASPECT`` short sides (plus ``MARGIN`` pixels each end) before the eval resize.

    The resize scales the short side to ``resize_size`` whatever the long one, so a valid 1 x 30000 image would
    become 256 x 7,680,000 (8.7 GB, ~30 s) for a 224 x 224 centre crop. That crop spans at most a short side of
    the long one: the cut leaves over 1.5 short sides and ``MARGIN`` pixels either side of it, beyond the resize
    filter's reach (a few pixels, scaled when shrinking), and is even, so the centre stays put. Only the resize's
    rounding of the long side changes: the crop may move by up to half a pixel. Images within ``MAX_ASPECT``
    (all normal photos; TF Flowers' are about 4:3) are not touched, so their tensors are the same bit for bit.
    """

    MAX_ASPECT = 4
    MARGIN = 8

    def transform(self, inpt, params):
        height, width = F.get_size(inpt)
        short, long = sorted((height, width))
        keep = self.MAX_ASPECT * short + 2 * self.MARGIN
        keep += (long - keep) % 2  # the same number of pixels off each end
        if long <= keep:
            return inpt
        return self._call_kernel(F.center_crop, inpt, output_size=[height, keep] if long == width else [keep, width])


def eval_geometry(pre: Preprocessing) -> T.Compose:
    """Resize the short side and centre-crop: the one eval geometry of val/test, feature caches, predict and export."""
    interp = InterpolationMode(pre.interpolation)
    return T.Compose([
        CutLongSide(), T.Resize(pre.resize_size, interpolation=interp, antialias=True), T.CenterCrop(pre.crop_size),
        T.ToImage(),
    ])


# data.augment.policy: torchvision's automatic augmentation policies, applied after the crop and flip.
POLICIES = {"none": None, "trivialaugment": T.TrivialAugmentWide, "randaugment": T.RandAugment, "autoaugment": T.AutoAugment}


def train_geometry(pre: Preprocessing, augment) -> T.Compose:
    """Random-resized crop, flip, rotation, shear and a policy as ``data.augment`` asks, to a uint8 tensor."""
    interp = InterpolationMode(pre.interpolation)
    steps: list = [
        T.RandomResizedCrop(pre.crop_size, scale=tuple(augment.crop_scale), interpolation=interp, antialias=True)
    ]
    if augment.hflip:
        steps.append(T.RandomHorizontalFlip())
    if augment.rotation or augment.shear:
        steps.append(T.RandomAffine(degrees=augment.rotation, shear=augment.shear or None, interpolation=interp))
    policy = POLICIES[augment.get("policy", "none")]
    if policy is not None:
        steps.append(policy(interpolation=interp))
    return T.Compose([*steps, T.ToImage()])


def eval_transform(pre: Preprocessing) -> T.Compose:
    return T.Compose([eval_geometry(pre), to_model_input(pre)])


def train_transform(pre: Preprocessing, augment) -> T.Compose:
    return T.Compose([train_geometry(pre, augment), to_model_input(pre)])


def batch_mixing(augment, num_classes: int) -> T.Transform | None:
    """torchvision's MixUp and/or CutMix on a training batch (one of the two per batch when both are
    on; labels become class probabilities), or None when ``data.augment`` asks for neither."""
    mixes = [
        mix(alpha=alpha, num_classes=num_classes)
        for mix, alpha in ((T.MixUp, augment.get("mixup_alpha", 0.0)), (T.CutMix, augment.get("cutmix_alpha", 0.0)))
        if alpha > 0
    ]
    return None if not mixes else mixes[0] if len(mixes) == 1 else T.RandomChoice(mixes)
