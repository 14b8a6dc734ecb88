"""Writes that cannot happen (a full disk, a read-only folder), told in one line instead of a traceback.

A full disk shows up in many disguises: ``OSError(ENOSPC)`` from a plain write, ``RuntimeError:
unexpected pos`` from ``torch.save``, or SIGBUS from a memory map whose pages cannot be backed. The
writers that matter check free space before they start and name the folder, what was needed and
what is free when they fail; a small ballast file keeps room for the run's own record.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from tlexp.errors import TlexpError

NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
BALLAST = ".tlexp.reserve"
BALLAST_BYTES = 1 << 20  # room for metrics.json (and the failure it records) on a disk that filled up


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the file system that holds ``folder`` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _mb(size: int | None) -> str:
    return "?" if size is None else f"{size / 2**20:,.1f} MB"


def write_failure(folder: Path, what: str, exc: BaseException, elsewhere: str, needed: int | None = None) -> TlexpError | None:
    """A clear error for a write of ``what`` into ``folder`` that failed for room or permission, else None.

    ``elsewhere``: how to write it somewhere else, the fix for both; a full disk also offers freeing space.
    """
    code = getattr(exc, "errno", None)
    free = free_bytes(folder)
    if code in NO_ROOM or (needed is not None and free is not None and free < needed):
        return TlexpError(_no_room(folder, what, free, needed, elsewhere))
    if code in NOT_WRITABLE:
        return TlexpError(f"cannot write {what} in {folder} ({os.strerror(code)}): {elsewhere}")
    return None


def check_room(folder: Path, what: str, needed: int, elsewhere: str, error: type[TlexpError] = TlexpError) -> None:
    """Refuse before writing ``needed`` bytes where they do not fit."""
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise error(_no_room(folder, what, free, needed, elsewhere))


def _no_room(folder: Path, what: str, free: int | None, needed: int | None, elsewhere: str) -> str:
    need = f", {_mb(needed)} needed" if needed else ""
    return f"no space left on the disk of {folder} for {what} ({_mb(free)} free{need}): free space there, or {elsewhere}"


def hold_ballast(run_dir: Path) -> None:
    """Keep ``BALLAST_BYTES`` of the run dir's disk for the run's record (best effort)."""
    try:
        with open(run_dir / BALLAST, "wb") as f:
            f.write(b"\0" * BALLAST_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        release_ballast(run_dir)


def release_ballast(run_dir: Path) -> None:
    (run_dir / BALLAST).unlink(missing_ok=True)


class WritableOutputs(Callback):
    """Refuse a run or sweep folder that cannot be written before Hydra fails inside it with a traceback."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _check_writable(Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _check_writable(Path(config.hydra.sweep.dir), "hydra.sweep.dir")


def _check_writable(folder: Path, key: str) -> None:
    """The folder and its .hydra if they exist (a resume writes into both), else the parent it will be made in."""
    if folder.exists():
        candidates = [folder, *([folder / ".hydra"] if (folder / ".hydra").exists() else [])]
    else:
        candidates = [next(p for p in folder.absolute().parents if p.exists())]
    blocked = next((p for p in candidates if not os.access(p, os.W_OK)), None)
    if blocked is not None:
        print(f"tlexp-train: error: {blocked} is not writable (read-only or no permission): give {key}= a folder you can write",
              file=sys.stderr)
        sys.exit(2)
