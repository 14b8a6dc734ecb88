"""Frozen-prefix cache: compute what the frozen part of the network outputs once, train on it every epoch.

Entries are keyed by a digest of everything the values depend on (the prefix's code and weights, the
images, the transform and, for augmented views, the seed), so a stale entry is never read and rows
of a sweep that share a prefix (every row's phase A) share its entries. They are written to disk
(atomically, so parallel jobs and killed runs leave no half entry) and kept in RAM up to a budget.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

FP16_MAX = float(torch.finfo(torch.float16).max)


def tensor_digest(module: nn.Module) -> str:
    """sha256 of every parameter and buffer: the weights the cached values were computed with."""
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class eval_mode:
    """Run shared modules in eval mode and give every one its own mode back afterwards."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()

    def __exit__(self, *exc):
        for m, mode in self.modes:
            m.training = mode


class FeatureStore:
    """Prefix outputs on disk under ``root``; the most recently used ones in RAM up to ``budget_bytes``."""

    def __init__(self, root: Path, budget_bytes: int, batch_size: int, num_workers: int):
        self.root = Path(root)
        self.budget = budget_bytes
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.resident: OrderedDict[str, list[torch.Tensor]] = OrderedDict()

    def get(self, key: dict, prefix: nn.Module, images: Dataset, label: str) -> list[torch.Tensor]:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        if digest in self.resident:
            self.resident.move_to_end(digest)
            return self.resident[digest]
        entry = self.root / digest
        if not (entry / "meta.json").exists():
            self._build(entry, key, prefix, images, label)
        meta = json.loads((entry / "meta.json").read_text())
        return self._load(digest, entry, meta)

    def _load(self, digest: str, entry: Path, meta: dict) -> list[torch.Tensor]:
        size = meta["bytes"]
        if size > self.budget:
            log.info("feature cache %s: %.2f GB > perf.cache_budget_gb, memory-mapped from disk", entry.name, size / 1e9)
            return [torch.from_numpy(np.load(entry / f"cut{i}.npy", mmap_mode="c")) for i in range(len(meta["shapes"]))]
        while self.resident and sum(t.nbytes for ts in self.resident.values() for t in ts) + size > self.budget:
            self.resident.popitem(last=False)
        tensors = [torch.from_numpy(np.load(entry / f"cut{i}.npy")) for i in range(len(meta["shapes"]))]
        self.resident[digest] = tensors
        return tensors

    def _build(self, entry: Path, key: dict, prefix: nn.Module, images: Dataset, label: str) -> None:
        start = time.perf_counter()
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=self.root))
        try:
            shapes, dtypes = self._compute(staging, prefix, images, torch.float16)
            if shapes is None:  # a value beyond float16's range: keep float32
                shapes, dtypes = self._compute(staging, prefix, images, torch.float32)
            size = sum((staging / f"cut{i}.npy").stat().st_size for i in range(len(shapes)))
            meta = {"key": key, "shapes": shapes, "dtypes": dtypes, "bytes": size, "images": len(images)}
            (staging / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                os.rename(staging, entry)
            except OSError:  # another job finished the same entry first: theirs is identical
                pass
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        seconds = time.perf_counter() - start
        log.info(
            "feature cache: %s, %d images in %.1f s (%.0f images/s), %s", label, len(images), seconds,
            len(images) / max(seconds, 1e-9), entry,
        )

    def _compute(self, staging: Path, prefix: nn.Module, images: Dataset, dtype: torch.dtype):
        loader = DataLoader(images, batch_size=self.batch_size, num_workers=self.num_workers)
        arrays, offset = None, 0
        with eval_mode(prefix), torch.inference_mode():
            for x, _ in loader:
                cuts = prefix(x)
                if arrays is None:
                    arrays = [
                        np.lib.format.open_memmap(
                            staging / f"cut{i}.npy", mode="w+", dtype=torch.empty(0, dtype=dtype).numpy().dtype,
                            shape=(len(images), *c.shape[1:]),
                        )
                        for i, c in enumerate(cuts)
                    ]
                for array, value in zip(arrays, cuts):
                    if dtype == torch.float16 and value.abs().max() > FP16_MAX:
                        return None, None
                    array[offset : offset + len(x)] = value.to(dtype).contiguous().numpy()
                offset += len(x)
        for array in arrays:
            array.flush()
        return [list(a.shape) for a in arrays], [str(a.dtype) for a in arrays]
