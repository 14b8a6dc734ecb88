"""Work that every job of a side-by-side sweep (perf.sweep_jobs) would repeat: one job does it, the others wait.

The first job to take the lock does the work and leaves its result where the others look (a feature
cache entry, the image verdicts, a downloaded data set); a job that had to wait finds it there and
has nothing left to do.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


@contextmanager
def one_job_at_a_time(lock_path: Path, waiting: str):
    """Hold ``lock_path`` (an flock) for the block, which gets the seconds spent waiting for it; ``waiting``
    is logged when another job holds it.

    The lock file goes when the block ends, so nothing is left beside the result. A job that was
    waiting on the removed file then holds a lock nobody else can see: it opens the path again
    (the result is there by then, or the one before it failed and it is this job's turn).
    Raises OSError when the lock file cannot be made (a full or read-only folder) or locked.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    waited = 0.0
    while True:
        lock = open(lock_path, "a")  # noqa: SIM115 -- closed below
        try:
            waited += _take(lock, waiting)
            held = _still_there(lock_path, lock)
        except BaseException:  # not locked (ENOLCK on a network file system, Ctrl+C while waiting): no open file left
            lock.close()
            raise
        if held:
            break
        lock.close()
    with lock:
        try:
            yield waited
        finally:
            lock_path.unlink(missing_ok=True)


def _take(lock, waiting: str) -> float:
    """Lock ``lock``; the seconds spent waiting for another job to let it go."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return 0.0
    except BlockingIOError:
        log.info("%s; waiting for it", waiting)
        start = time.perf_counter()
        fcntl.flock(lock, fcntl.LOCK_EX)
        return time.perf_counter() - start


def _still_there(lock_path: Path, lock) -> bool:
    try:
        return os.stat(lock_path).st_ino == os.fstat(lock.fileno()).st_ino
    except FileNotFoundError:
        return False
