"""The suite's ``python -m <module> <args>`` runs, forked from one process that imported the heavy libraries once
(``multiprocessing``'s fork server, its preload list set).

A fresh interpreter spends ~7 s importing torch, torchvision, Lightning and Hydra before it runs anything: over
the suite's hundreds of CLI runs, most of its time on 2 cores. A fork is a new process in all that a run can
tell: its own pid, environment, working directory, standard streams, signal dispositions and exit status, numpy's
and random's seeds, and tlexp imported anew (only third-party libraries are preloaded). What differs from a fresh
interpreter: Python's hash seed is the server's; those libraries' import-time state (matplotlib's config folder
under the server's HOME; a warning printed while they import is not shown) too, though
``OMP_NUM_THREADS`` and ``TMPDIR`` are applied again; and a run returns when its process ends, as in a shell, not
when every process it left behind (orphaned loader workers) has closed its output, as ``subprocess.run`` waits.
Where a CUDA GPU is visible the runs stay fresh interpreters: CUDA does not survive a fork.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

PRELOAD = ["torch", "torchvision", "pytorch_lightning", "torchmetrics", "hydra", "omegaconf", "numpy", "PIL.Image"]


class Zygote:
    """The pytest side: runs ``python -m`` modules in children of the fork server, one at a time."""

    def __init__(self, pythonpath: str):
        """``pythonpath``: the runs' (their sys.path is the server's, which is this process's)."""
        self.pythonpath = pythonpath
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(PRELOAD)

    def run(self, module: str, args: list[str], env: dict, cwd: Path, timeout: float, folder: Path) -> subprocess.CompletedProcess:
        out, err = folder / "stdout", folder / "stderr"
        child = self._context.Process(target=_child, args=(module, list(args), env, str(cwd), str(out), str(err)))
        child.start()
        try:
            child.join(timeout)
        finally:  # as subprocess.run: past the timeout, or when the test is interrupted, the child is killed
            running = child.exitcode is None
            if running:
                child.kill()
                child.join()
        if running:
            raise subprocess.TimeoutExpired([module, *args], timeout)
        return subprocess.CompletedProcess([sys.executable, "-m", module, *args], child.exitcode, out.read_text(), err.read_text())


def _child(module: str, args: list[str], env: dict, cwd: str, stdout: str, stderr: str) -> None:
    """``python -m module args`` from here on, as a fresh interpreter would run it and exit (not through
    multiprocessing's own ending: atexit functions run, an uncaught KeyboardInterrupt ends by SIGINT)."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, stdout, os.O_WRONLY | os.O_CREAT), (2, stderr, os.O_WRONLY | os.O_CREAT)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    # sys.stdout/stderr are the server's, made as a fresh interpreter makes them (block-buffered stdout, line-buffered
    # stderr) and empty: they now write the child's files
    import numpy as np  # preloaded
    import torch

    tempfile.tempdir = None  # read from TMPDIR again
    np.random.seed()  # fresh from the OS, as in a new interpreter (random reseeds itself after a fork)
    threads = env.get("OMP_NUM_THREADS", "").split(",")[0]
    if threads.isdigit():
        torch.set_num_threads(int(threads))
    sys.argv = [module, *args]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException as exc:  # noqa: BLE001 - the interpreter's own handling of an uncaught exception
        sys.excepthook(type(exc), exc, exc.__traceback__)
        code = 1
        if isinstance(exc, KeyboardInterrupt):  # as the interpreter does: the exit status says SIGINT
            code = -2
    threading._shutdown()  # what the interpreter does at exit: wait for threads, then the atexit functions
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if code == -2:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)

