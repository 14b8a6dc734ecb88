"""Checkpoints written atomically next to their final path.

Lightning's own writer goes through an fsspec transaction whose temporary file lives in the system
temp folder: where that is another file system the final move is a copy, and a kill during it
leaves a truncated ``last.ckpt``. Here the bytes go to a temporary file in the same folder, are
flushed to disk, and replace the old checkpoint in one ``os.replace``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a checkpoint is an ordinary file
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
