"""Serve each phase's training and validation data as cached frozen-prefix outputs.

Phase A (and ``frozen``) caches the pooled features; phase B caches the values in front of the first
module it trains. Random augmentation and caching conflict, so training uses
``data.augment.cached_views.phase_a|phase_b`` fixed augmented views per image (view ``epoch % views``
in each epoch; 0 means the un-augmented evaluation view). Two levels, both in the same store:

- decoded views: each view's cropped uint8 pixels, decoded once and shared by every model with the
  same preprocessing (every row of a sweep);
- prefix outputs: what the frozen part computes from them (in eval mode), per phase.

The model is unchanged: the suffix a phase trains is the backbone's own modules.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from tlexp.feature_cache import FeatureStore
from tlexp.prefix_split import NotSplittable, PrefixSplit, split_frozen_prefix
from tlexp.preprocessing import to_model_input
from tlexp.profiling import inference_runtime

log = logging.getLogger(__name__)


def tensor_digest(module: nn.Module) -> str:
    """sha256 of every parameter and buffer: the weights the cached values were computed with."""
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class eval_mode:
    """Run modules shared with the model in eval mode, then give every one its own mode back."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()

    def __exit__(self, *exc):
        for m, mode in self.modes:
            m.training = mode


class CachedPrefixDataset(Dataset):
    """Items ``({"phase": p, "inputs": cut values}, label)``; accepts the sampler's ``(index, seed)`` keys.

    Values keep the store's dtype: the module widens whole batches, not every item.
    """

    def __init__(self, phase: str, tensors: list[torch.Tensor], labels: list[int]):
        self.phase = phase
        self.tensors = tensors
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        return {"phase": self.phase, "inputs": [t[index] for t in self.tensors]}, self.labels[index]


class ViewDataset(Dataset):
    """One fixed augmented view of every image: image ``i`` always gets seed ``(seed, view, i)``."""

    def __init__(self, images: Dataset, seed: int, view: int):
        self.images = images
        self.base = (seed * 1_000_003 + view) * 1_000_033

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[(index, (self.base + index) % (2**63))]


class PrefixRunner:
    """The frozen prefix as the cache builder runs it: eager, or compiled at its first batch.

    Compiling (torch.compile with inductor freezing, checked against eager) costs 20-50 s and makes
    the prefix 1.4-1.7x faster at batch 32 on a 2-core CPU, so it is worth it only for many images.
    Batches are padded to one shape: a short last batch would otherwise compile again.
    """

    def __init__(self, prefix: nn.Module, layout: torch.memory_format, batch_size: int, compile_it: bool):
        self.prefix, self.layout, self.batch_size = prefix, layout, batch_size
        self.run = None if compile_it else prefix

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = x.contiguous(memory_format=self.layout)
        if self.run is self.prefix:
            return self.prefix(x)
        n = len(x)
        full = torch.cat([x, x.new_zeros(self.batch_size - n, *x.shape[1:])]) if n < self.batch_size else x
        if self.run is None:
            self.run, used = inference_runtime(self.prefix, (full,), "compile", setting="perf.compile_prefix_min_images")
            log.info("frozen prefix: %s", "compiled" if used == "compile" else "eager")
        return tuple(v[:n] for v in self.run(full))


class _Pixels(Dataset):
    def __init__(self, pixels: torch.Tensor, transform):
        self.pixels = pixels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int):
        return self.transform(self.pixels[index]), 0


class PrefixFeatures:
    """``(subset, epoch) -> dataset`` for the datamodule; None where a phase has no frozen prefix.

    ``trainable_at(epoch)`` names the phase and the backbone modules it trains; the module receives
    each phase's suffix in ``cached_suffixes`` so that its forward can start where the cache ends.
    """

    def __init__(
        self, module, datamodule, store: FeatureStore, trainable_at: Callable, views: dict[str, int], seed: int,
        num_workers: int, compile_min_images: int | None = None,
    ):
        self.module = module
        self.datamodule = datamodule
        self.store = store
        self.trainable_at = trainable_at
        self.views = views  # phase ("A"/"B") -> number of augmented views
        self.seed = seed
        self.num_workers = num_workers
        self.splits: dict[str, tuple[PrefixSplit, str] | None] = {}
        self.image_digests: dict[str, str] = {}  # subset -> _samples_digest, once per run (stats every file)
        self.compile_min_images = compile_min_images  # None: never compile the prefix
        self.runners: dict[str, PrefixRunner] = {}

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

    def _pixels(self, subset: str, view: int | None, views: int) -> tuple[torch.Tensor, dict]:
        """The decoded, cropped uint8 images of ``subset`` (one augmented view, or the eval view)."""
        images = self.datamodule.image_dataset(subset, train=view is not None, pixels=True)
        if subset not in self.image_digests:
            self.image_digests[subset] = _samples_digest(self.datamodule.split[subset])
        key = {
            "images": self.image_digests[subset],
            "transform": repr(images.transform),
            "view": None if view is None else [self.seed, view],
        }
        if view is not None:
            images = ViewDataset(images, self.seed, view)
        label = f"{subset} images" + ("" if view is None else f", view {view + 1}/{views}")
        (pixels,) = self.store.get(key, lambda x: (x,), images, f"decoded {label}", self.num_workers)
        return pixels, key

    def __call__(self, subset: str, epoch: int) -> Dataset | None:
        phase, trainable = self.trainable_at(epoch)
        found = self._split(phase, trainable)
        if found is None:
            return None
        split, weights = found
        views = self.views[phase]
        view = epoch % views if subset == "train" and views > 0 else None
        pixels, pixels_key = self._pixels(subset, view, views)
        key = {"prefix": hashlib.sha256(split.prefix.code.encode()).hexdigest(), "weights": weights, "pixels": pixels_key}
        inputs = _Pixels(pixels, to_model_input(self.datamodule.preprocessing))
        label = f"phase {phase} {subset}" + ("" if view is None else f" view {view + 1}/{views}")
        with eval_mode(split.prefix):
            tensors = self.store.get(key, self._runner(phase, split.prefix), inputs, label)
        return CachedPrefixDataset(phase, tensors, [s.label for s in self.datamodule.split[subset]])

    def _runner(self, phase: str, prefix: nn.Module) -> PrefixRunner:
        """One per phase, shared by its views and subsets; compiled if the phase runs enough images through it."""
        if phase not in self.runners:
            split = self.datamodule.split
            images = len(split["train"]) * max(self.views[phase], 1) + len(split["val"]) + len(split["test"])
            worth = self.compile_min_images is not None and images >= self.compile_min_images
            self.runners[phase] = PrefixRunner(prefix, self.module.memory_format, self.store.batch_size, worth)
        return self.runners[phase]


def _samples_digest(samples) -> str:
    """Paths, labels, sizes and modification times: an edited or replaced image changes the key."""
    digest = hashlib.sha256()
    for s in samples:
        stat = s.path.stat()
        digest.update(f"{s.path}\0{s.label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
