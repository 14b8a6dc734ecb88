"""How cached values are computed: the frozen prefix run on the model's device, and the datasets around it.

The builder takes the decoded uint8 pixels as the store serves them (on the CPU), moves them to
the model's device, normalizes them there and runs the prefix in the trainer's precision, in eval
mode; the store moves the values to where it keeps them (tlexp/features/store.py).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from pytorch_lightning.plugins.precision import Precision
from torch import nn
from torch.utils.data import Dataset

from tlexp import seeds
from tlexp.record import file_digest
from tlexp.speed.timing import inference_runtime

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
    """Items ``({"inputs": cut values}, label)``, plus ``"mirrored"`` (the mirror images' values) for flip
    TTA; accepts the sampler's ``(index, seed)`` keys.

    Values keep the store's dtype: the module widens whole batches, not every item.
    """

    def __init__(self, tensors: list[torch.Tensor], labels: list[int], mirrored: list[torch.Tensor] | None = None):
        self.tensors = tensors
        self.labels = labels
        self.mirrored = mirrored

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        item = {"inputs": [t[index] for t in self.tensors]}
        if self.mirrored is not None:
            item["mirrored"] = [t[index] for t in self.mirrored]
        return item, self.labels[index]


class ViewDataset(Dataset):
    """One fixed augmented view of every image: image ``i`` of view ``v`` always gets the same seed."""

    def __init__(self, images: Dataset, seed: int, view: int):
        self.images, self.seed, self.view = images, seed, view

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[(index, seeds.mix(seeds.VIEW, self.seed, self.view, index))]


class PrefixRunner:
    """The frozen prefix as the cache builder runs it: on the model's device, in the run's precision.

    It takes the decoded uint8 pixels as the store serves them (on the CPU), moves them to ``device``
    (a quarter of float32's bytes to copy) and normalizes them there. ``precision`` is the trainer's
    plugin, applied as Lightning's loop applies it: its input conversion (``*-true`` runs take inputs
    in their weights' dtype) and its forward context (autocast for ``*-mixed``). Values stay on
    ``device``: the store moves them to where it keeps them.

    On a CPU the prefix can be compiled at its first batch (torch.compile with inductor freezing,
    checked against eager): 20-50 s that make it 1.4-1.7x faster at batch 32 on a 2-core CPU, so
    worth it only for many images. Batches are then padded to one shape: a short last batch would
    otherwise compile again.
    """

    def __init__(
        self, prefix: nn.Module, to_input: Callable, layout: torch.memory_format, batch_size: int,
        compile_it: bool, device: torch.device, precision: Precision | None = None,
    ):
        self.prefix, self.to_input, self.layout, self.batch_size = prefix, to_input, layout, batch_size
        self.device, self.precision = device, precision or Precision()
        self.run = None if compile_it else prefix

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.to_input(pixels.to(self.device, non_blocking=True)).contiguous(memory_format=self.layout)
        x = self.precision.convert_input(x)
        with self.precision.forward_context():
            if self.run is self.prefix:
                return self.prefix(x)
            n = len(x)
            full = torch.cat([x, x.new_zeros(self.batch_size - n, *x.shape[1:])]) if n < self.batch_size else x
            if self.run is None:
                self.run, used = inference_runtime(self.prefix, (full,), "compile", setting="perf.compile_prefix_min_images")
                log.info("frozen prefix: %s", "compiled" if used == "compile" else "eager")
            return tuple(v[:n] for v in self.run(full))


class Pixels(Dataset):
    """Decoded uint8 images as the builder's input (the label is unused), optionally mirrored.

    Mirrored per item, since the store asks for the images only when it builds an entry.
    """

    def __init__(self, pixels: torch.Tensor, mirrored: bool = False):
        self.pixels = pixels
        self.mirrored = mirrored

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int):
        image = self.pixels[index]
        return (image.flip(-1) if self.mirrored else image), 0


def samples_digest(samples) -> str:
    """Paths, labels and each file's content digest: any edit changes the key, even one that keeps
    the size and modification time (as ``exiftool -P`` does)."""
    digest = hashlib.sha256()
    with ThreadPoolExecutor(2) as pool:
        for s, content in zip(samples, pool.map(file_digest, (s.path for s in samples))):
            # surrogateescape: a file name that is not valid UTF-8 (caf\xe9.jpg) is hashed by its bytes
            digest.update(f"{s.path}\0{s.label}\0{content}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()
