"""A store of per-image tensors computed once: decoded image views, and frozen-prefix outputs.

Entries are keyed by a digest of everything the values depend on (for prefix outputs: the prefix's
code and weights, the images, the transform and, for augmented views, the seed), so a stale entry is
never read, and rows of a sweep that share a prefix (every row's phase A) or a view share its entry.
They are written to disk (atomically, so parallel jobs and killed runs leave no half entry) and kept
in RAM up to a budget. Float values are stored as float16 unless one would overflow it.
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
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tlexp.errors import TlexpError
from tlexp.one_job_at_a_time import one_job_at_a_time
from tlexp.storage import check_room, write_failure

log = logging.getLogger(__name__)

CACHE_ELSEWHERE = "point perf.cache_dir at another folder, or set perf.feature_cache=false"


class CacheUnwritable(TlexpError):
    """The cache's folder is full or read-only: the run trains without the cache instead."""


Compute = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
_SHARED: dict[Path, FeatureStore] = {}


class FeatureStore:
    """Per-image tensors on disk under ``root``; the most recently used entries in RAM up to ``budget_bytes``."""

    def __init__(self, root: Path, budget_bytes: int, batch_size: int):
        self.root = Path(root)
        self.budget = budget_bytes
        self.batch_size = batch_size
        self.resident: OrderedDict[str, list[torch.Tensor]] = OrderedDict()
        self.waited_s = 0.0  # for entries other jobs were building (perf.sweep_jobs): where a sweep's time goes

    def get(self, key: dict, compute: Compute, images: Dataset, label: str, num_workers: int = 0) -> list[torch.Tensor]:
        """The entry for ``key``; built from ``compute`` over ``images`` (batches of ``(x, label)``) if missing."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        if digest in self.resident:
            self.resident.move_to_end(digest)
            return self.resident[digest]
        entry = self.root / digest
        if not (entry / "meta.json").exists():
            with self._one_builder(digest, label):
                if not (entry / "meta.json").exists():  # built by another job while this one waited
                    loader = DataLoader(images, batch_size=self.batch_size, num_workers=num_workers)
                    self._build(entry, key, compute, loader, label)
        meta = json.loads((entry / "meta.json").read_text())
        return self._load(digest, entry, meta)

    @classmethod
    def shared(cls, root: Path, budget_bytes: int, batch_size: int) -> FeatureStore:
        """The process's store for ``root``: jobs of an in-process sweep share its entries and one RAM budget."""
        store = _SHARED.setdefault(Path(root).resolve(), cls(root, budget_bytes, batch_size))
        store.budget, store.batch_size = budget_bytes, batch_size
        store._evict(0)
        return store

    def _evict(self, incoming: int) -> None:
        """Drop least recently used entries from RAM (they stay on disk) until ``incoming`` bytes fit."""
        while self.resident and sum(t.nbytes for ts in self.resident.values() for t in ts) + incoming > self.budget:
            self.resident.popitem(last=False)

    def _load(self, digest: str, entry: Path, meta: dict) -> list[torch.Tensor]:
        size = meta["bytes"]
        if size > self.budget:
            log.info("feature cache %s: %.2f GB > perf.cache_budget_gb, memory-mapped from disk", entry.name, size / 1e9)
            return [torch.from_numpy(np.load(entry / f"cut{i}.npy", mmap_mode="c")) for i in range(len(meta["shapes"]))]
        self._evict(size)
        tensors = [torch.from_numpy(np.load(entry / f"cut{i}.npy")) for i in range(len(meta["shapes"]))]
        self.resident[digest] = tensors
        return tensors

    @contextmanager
    def _one_builder(self, digest: str, label: str):
        """Jobs side by side that miss the same entry: one builds it, the others wait and read it."""
        with ExitStack() as held:
            try:
                self.waited_s += held.enter_context(
                    one_job_at_a_time(self.root / f".{digest}.lock", f"feature cache: {label} is being built by another job")
                )
            except OSError as exc:  # the lock file cannot be made; an OSError of the build itself is not this
                raise CacheUnwritable(write_failure(self.root, "the feature cache", exc, CACHE_ELSEWHERE) or exc) from exc
            yield

    def _build(self, entry: Path, key: dict, compute: Compute, images: DataLoader, label: str) -> None:
        start = time.perf_counter()
        try:
            _remove_orphaned_staging(self.root)
            staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-{os.getpid()}-", dir=self.root))
        except OSError as exc:
            raise CacheUnwritable(write_failure(self.root, "the feature cache", exc, CACHE_ELSEWHERE) or exc) from exc
        try:
            shapes, dtypes = self._compute(staging, compute, images, torch.float16)
            if shapes is None:
                shapes, dtypes = self._compute(staging, compute, images, torch.float32)
            size = sum((staging / f"cut{i}.npy").stat().st_size for i in range(len(shapes)))
            meta = {"key": key, "shapes": shapes, "dtypes": dtypes, "bytes": size, "images": len(images.dataset)}
            (staging / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                os.rename(staging, entry)
            except OSError:  # another job finished the same entry first: theirs is identical
                pass
        except OSError as exc:
            clear = write_failure(self.root, "the feature cache", exc, CACHE_ELSEWHERE)
            if clear is None:
                raise
            raise CacheUnwritable(clear) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        seconds = time.perf_counter() - start
        log.info(
            "feature cache: %s, %d images in %.1f s (%.0f images/s), %s", label, len(images.dataset), seconds,
            len(images.dataset) / max(seconds, 1e-9), entry,
        )

    def _compute(self, staging: Path, compute: Compute, images: DataLoader, float_dtype: torch.dtype):
        """Write each value's .npy batch by batch, after checking the disk has room for all of it.

        Plain writes, not a memory map: on a full disk a write fails with ENOSPC, where a memory
        map's page would kill the process with SIGBUS.
        """
        files, shapes, dtypes = [], None, None
        try:
            with torch.inference_mode():
                for x, _ in images:
                    values = self.to_storage(compute(x), float_dtype)
                    if values is None:
                        return None, None  # beyond float16's range
                    if shapes is None:
                        n = len(images.dataset)
                        shapes = [[n, *v.shape[1:]] for v in values]
                        dtypes = [v.numpy().dtype for v in values]
                        needed = sum(n * v[0].numel() * v.element_size() for v in values)
                        check_room(staging, "the feature cache", needed, CACHE_ELSEWHERE, CacheUnwritable)
                        for i, (shape, dtype) in enumerate(zip(shapes, dtypes)):
                            files.append(open(staging / f"cut{i}.npy", "wb"))  # noqa: SIM115 -- closed below
                            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
                            np.lib.format.write_array_header_2_0(files[-1], header)
                    for f, value in zip(files, values):
                        f.write(value.contiguous().numpy().tobytes())
        finally:
            for f in files:
                f.close()
        return shapes, [str(d) for d in dtypes]

    def to_storage(self, raw: tuple[torch.Tensor, ...], float_dtype: torch.dtype) -> list[torch.Tensor] | None:
        """Computed values (on the model's device) -> CPU tensors of the stored dtype; None if one overflows it."""
        values = [v.to(float_dtype) if v.is_floating_point() else v for v in raw]
        if any((v.isinf() & ~r.isinf()).any() for v, r in zip(values, raw) if v.is_floating_point()):
            return None
        return [v.cpu() for v in values]


def _remove_orphaned_staging(root: Path) -> None:
    """Staging folders of killed builds (``.<entry>-<pid>-*``, their process gone) would fill the disk over time."""
    for staging in root.glob(".*-*-*"):
        pid = staging.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)
            log.info("feature cache: removed %s, left by a build that was killed", staging.name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
