"""The frozen-prefix cache: train each phase on what its frozen part computes, computed once.

Phase A (and ``frozen``) caches the pooled features; phase B caches the values in front of the first
module it trains (the cut: tlexp/features/cut.py). Random augmentation and caching conflict, so
training uses ``data.augment.cached_views.phase_a|phase_b`` fixed augmented views per image (view
``epoch % views`` in each epoch; 0 means the un-augmented evaluation view). Two levels, both in one
store (tlexp/features/store.py):

- decoded views: each view's cropped uint8 pixels, decoded once and shared by every model with the
  same preprocessing (every row of a sweep);
- prefix outputs: what the frozen part computes from them (in eval mode), per phase.

A Lightning callback: ``ImageDataModule`` serves what the trainer's ``FrozenPrefixCache`` has for an
epoch (else images), and the model runs its own suffix on cached values (``TransferModule.forward``).
The model is unchanged: the suffix a phase trains is the backbone's own modules.
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from torch.utils.data import Dataset

from tlexp.data.transforms import to_model_input
from tlexp.errors import TlexpError
from tlexp.features.builder import (
    CachedPrefixDataset,
    Pixels,
    PrefixRunner,
    ViewDataset,
    eval_mode,
    samples_digest,
    tensor_digest,
)
from tlexp.features.cut import NoFrozenPrefix, PrefixCut, cut_frozen_prefix
from tlexp.features.store import CacheUnwritable, FeatureStore
from tlexp.model.finetune import PhasedFinetuning

log = logging.getLogger(__name__)


class FrozenPrefixCache(Callback):
    """``dataset(subset, epoch, ...)`` for the datamodule: cached values, or None where a phase has no frozen prefix.

    ``views``: phase ("A"/"B") -> number of fixed augmented views; ``compile_min_images``: compile
    the prefix (CPU only) for a phase that caches at least this many images, None: never.
    """

    def __init__(
        self, finetuning: PhasedFinetuning, views: dict[str, int], seed: int, cache_dir: Path, budget_bytes: int,
        batch_size: int, num_workers: int = 0, compile_min_images: int | None = None,
    ):
        self.finetuning = finetuning
        self.views = views
        self.seed = seed
        self.store = FeatureStore.shared(cache_dir, budget_bytes, batch_size)
        self.num_workers = num_workers
        self.compile_min_images = compile_min_images
        self.cuts: dict[str, tuple[PrefixCut, str] | None] = {}
        self.image_digests: dict[str, str] = {}  # subset -> samples_digest, once per run (stats every file)
        self.runners: dict[str, PrefixRunner] = {}
        self.off: str | None = None  # why the cache was turned off during the run, if it was
        # Seconds spent getting entries (loaded, built, or waited for while another job built them)
        # and, of those, waiting: where a run's time goes (metrics.json time_split).
        self.seconds = {"decoded_views_s": 0.0, "prefix_outputs_s": 0.0, "waiting_for_other_jobs_s": 0.0}

    @staticmethod
    def of(trainer: pl.Trainer | None) -> FrozenPrefixCache | None:
        """The trainer's cache callback, if it has one."""
        return next((c for c in trainer.callbacks if isinstance(c, FrozenPrefixCache)), None) if trainer else None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and trainer.reload_dataloaders_every_n_epochs != 1:
            raise TlexpError("FrozenPrefixCache needs pl.Trainer(reload_dataloaders_every_n_epochs=1): each epoch's view and phase differ")

    def dataset(self, subset: str, epoch: int, module, datamodule) -> Dataset | None:
        if self.off is not None:
            return None
        try:
            return self._dataset(subset, epoch, module, datamodule)
        except CacheUnwritable as exc:  # a full or read-only disk costs speed, not the run
            self.off = str(exc)
            log.warning("feature cache turned off for the rest of this run: %s", exc)
            return None

    def _dataset(self, subset: str, epoch: int, module, datamodule) -> Dataset | None:
        phase, trainable = self.finetuning.trainable_at(epoch)
        found = self._cut(phase, trainable, module)
        if found is None:
            return None
        cut, weights = found
        views = self.views[phase]
        view = epoch % views if subset == "train" and views > 0 else None
        pixels, pixels_key = self._pixels(subset, view, views, datamodule)
        runner = self._runner(phase, cut.prefix, module, datamodule)
        key = {
            "prefix": hashlib.sha256(cut.prefix.code.encode()).hexdigest(), "weights": weights, "pixels": pixels_key,
            # the same prefix computes slightly different values on another device or precision
            "device": runner.device.type, "precision": _precision_name(module),
        }
        label = f"phase {phase} {subset}" + ("" if view is None else f" view {view + 1}/{views}")
        mirrored = None
        with eval_mode(cut.prefix), self._timed("prefix_outputs_s"):
            tensors = self.store.get(key, runner, Pixels(pixels), label)
            if subset != "train" and module.tta == "flip":  # the mirrors of the eval crops: flipping commutes with normalizing
                mirrored = self.store.get(key | {"mirrored": True}, runner, Pixels(pixels, mirrored=True), f"{label} mirrored")
        return CachedPrefixDataset(tensors, [s.label for s in datamodule.split[subset]], mirrored)

    def _cut(self, phase: str, trainable, module) -> tuple[PrefixCut, str] | None:
        if phase not in self.cuts:
            try:
                cut = cut_frozen_prefix(module.backbone_spec, trainable)
                self.cuts[phase] = (cut, tensor_digest(cut.prefix))
                log.info("phase %s: frozen prefix cached up to %s", phase, ", ".join(cut.boundary))
            except NoFrozenPrefix as exc:
                self.cuts[phase] = None
                log.info("phase %s trains on images: %s", phase, exc)
        return self.cuts[phase]

    def _pixels(self, subset: str, view: int | None, views: int, datamodule):
        """The decoded, cropped uint8 images of ``subset`` (one augmented view, or the eval view)."""
        images = datamodule.image_dataset(subset, train=view is not None, pixels=True)
        if subset not in self.image_digests:
            self.image_digests[subset] = samples_digest(datamodule.split[subset])
        key = {
            "images": self.image_digests[subset],
            "transform": repr(images.transform),
            "view": None if view is None else [self.seed, view],
        }
        if view is not None:
            images = ViewDataset(images, self.seed, view)
        label = f"{subset} images" + ("" if view is None else f", view {view + 1}/{views}")
        with self._timed("decoded_views_s"):
            (pixels,) = self.store.get(key, lambda x: (x,), images, f"decoded {label}", self.num_workers)
        return pixels, key

    @contextmanager
    def _timed(self, kind: str):
        start, waited = time.perf_counter(), self.store.waited_s
        try:
            yield
        finally:
            self.seconds[kind] += time.perf_counter() - start
            self.seconds["waiting_for_other_jobs_s"] += self.store.waited_s - waited

    def _runner(self, phase: str, prefix, module, datamodule) -> PrefixRunner:
        """One per phase, shared by its views and subsets, on the device the module is on now.

        Lightning has moved the module to its device before it asks for a dataloader, and each DDP
        rank's module is on that rank's device. Compiled (on a CPU) if the phase runs enough images.
        """
        device = module.device
        if phase not in self.runners or self.runners[phase].device != device:
            split = datamodule.split
            images = len(split["train"]) * max(self.views[phase], 1) + len(split["val"]) + len(split["test"])
            worth = self.compile_min_images is not None and images >= self.compile_min_images and device.type == "cpu"
            trainer = module._trainer
            self.runners[phase] = PrefixRunner(
                prefix, to_model_input(datamodule.preprocessing), module.memory_format, self.store.batch_size,
                worth, device, None if trainer is None else trainer.precision_plugin,
            )
        return self.runners[phase]


def _precision_name(module) -> str:
    trainer = module._trainer
    return "32-true" if trainer is None else str(trainer.precision)
