"""Serve each phase's training and validation data as cached frozen-prefix outputs.

Phase A (and ``frozen``) caches the pooled features; phase B caches the values in front of the first
module it trains. Random augmentation and caching conflict, so training uses
``data.augment.cached_views`` fixed augmented views per image (view ``epoch % views`` in each
epoch; 0 means the un-augmented evaluation view). The model itself is unchanged: the cached values
are exactly what its frozen part computes (in eval mode), stored in float16 unless that would overflow.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from tlexp.feature_cache import FeatureStore, tensor_digest
from tlexp.prefix_split import NotSplittable, PrefixSplit, split_frozen_prefix

log = logging.getLogger(__name__)


class CachedPrefixDataset(Dataset):
    """Items ``({"phase": p, "inputs": cut values}, label)``; accepts the sampler's ``(index, seed)`` keys."""

    def __init__(self, phase: str, tensors: list[torch.Tensor], labels: list[int]):
        self.phase = phase
        self.tensors = tensors
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        return {"phase": self.phase, "inputs": [t[index].float() for t in self.tensors]}, self.labels[index]


class ViewDataset(Dataset):
    """One fixed augmented view of every image: image ``i`` always gets seed ``(seed, view, i)``."""

    def __init__(self, images: Dataset, seed: int, view: int):
        self.images = images
        self.base = (seed * 1_000_003 + view) * 1_000_033

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[(index, (self.base + index) % (2**63))]


class PrefixFeatures:
    """``(subset, epoch) -> dataset`` for the datamodule; None where a phase has no frozen prefix.

    ``trainable_at(epoch)`` names the phase and the backbone modules it trains; the module receives
    each phase's suffix in ``cached_suffixes`` so that its forward can start where the cache ends.
    """

    def __init__(self, module, datamodule, store: FeatureStore, trainable_at: Callable, views: int, seed: int):
        self.module = module
        self.datamodule = datamodule
        self.store = store
        self.trainable_at = trainable_at
        self.views = views
        self.seed = seed
        self.splits: dict[str, tuple[PrefixSplit, str] | None] = {}

    def _split(self, phase: str, trainable) -> tuple[PrefixSplit, str] | None:
        if phase not in self.splits:
            try:
                split = split_frozen_prefix(self.module.backbone_spec, trainable)
                self.splits[phase] = (split, tensor_digest(split.prefix))
                self.module.cached_suffixes[phase] = split.suffix
                log.info("phase %s: frozen prefix cached up to %s", phase, ", ".join(split.cut))
            except NotSplittable as exc:
                self.splits[phase] = None
                log.info("phase %s trains on images: %s", phase, exc)
        return self.splits[phase]

    def __call__(self, subset: str, epoch: int) -> Dataset | None:
        phase, trainable = self.trainable_at(epoch)
        found = self._split(phase, trainable)
        if found is None:
            return None
        split, weights = found
        augmented = subset == "train" and self.views > 0
        view = epoch % self.views if augmented else None
        images = self.datamodule.image_dataset(subset, train=augmented)
        if augmented:
            images = ViewDataset(images, self.seed, view)
        samples = self.datamodule.split[subset]
        key = {
            "prefix": hashlib.sha256(split.prefix.code.encode()).hexdigest(),
            "weights": weights,
            "images": _samples_digest(samples),
            "transform": repr(images.images.transform if augmented else images.transform),
            "view": [self.seed, view] if augmented else None,
            "torch": torch.__version__,
        }
        label = f"phase {phase} {subset}" + (f" view {view + 1}/{self.views}" if augmented else "")
        tensors = self.store.get(key, split.prefix, images, label)
        return CachedPrefixDataset(phase, tensors, [s.label for s in samples])


def _samples_digest(samples) -> str:
    """Paths, labels, sizes and modification times: an edited or replaced image changes the key."""
    digest = hashlib.sha256()
    for s in samples:
        stat = s.path.stat()
        digest.update(f"{s.path}\0{s.label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
