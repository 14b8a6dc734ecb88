"""The suite's ``python -m <module> <args>`` runs, forked from one process that imported the heavy libraries once.

A fresh interpreter spends ~7 s importing torch, torchvision, Lightning and Hydra before it runs anything: over
the suite's hundreds of CLI runs, most of its time on 2 cores. A fork is a new process in all that a run can
tell: its own pid, environment, working directory, standard streams, signal dispositions and exit status, numpy's
and random's seeds, and tlexp imported anew (only third-party libraries are preloaded). What differs from a fresh
interpreter: Python's hash seed is the server's; those libraries' import-time state (matplotlib's config folder
under the server's HOME; a warning printed while they import goes to the server's log) too, though
``OMP_NUM_THREADS`` and ``TMPDIR`` are applied again; and a run returns when its process ends, as in a shell, not
when every process it left behind (orphaned loader workers) has closed its output, as ``subprocess.run`` waits.
Where a CUDA GPU is visible the runs stay fresh interpreters: CUDA does not survive a fork.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

PRELOAD = ("torch", "torchvision", "pytorch_lightning", "torchmetrics", "hydra", "omegaconf", "numpy", "PIL.Image")


class Zygote:
    """The pytest side: one server process per session, asked for one run at a time."""

    def __init__(self, repo: Path, pythonpath: str, log: Path):
        """``pythonpath``: the runs' (their sys.path is the server's)."""
        self.pythonpath = pythonpath
        self._lock = threading.Lock()
        self._log = log.open("w")
        self._server = subprocess.Popen(
            [sys.executable, "-m", "tests.zygote"], cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, text=True, env={**os.environ, "PYTHONPATH": pythonpath},
        )

    def run(self, module: str, args: list[str], env: dict, cwd: Path, timeout: float, folder: Path) -> subprocess.CompletedProcess:
        out, err = folder / "stdout", folder / "stderr"
        with self._lock:
            self._send({"module": module, "args": args, "env": env, "cwd": str(cwd), "stdout": str(out), "stderr": str(err)})
            pid = self._receive()["pid"]
            deadline = _Deadline(pid, timeout)  # as subprocess.run's timeout: the child is killed
            try:
                code = self._receive()["returncode"]
            except BaseException:  # as subprocess.run: the child is killed (a test's timeout, Ctrl+C) ...
                _kill(pid)
                self._receive()  # ... and its exit status read, so the next run's replies are its own
                raise
            finally:
                deadline.cancel()
        if deadline.fired.is_set():
            raise subprocess.TimeoutExpired([module, *args], timeout)
        return subprocess.CompletedProcess([sys.executable, "-m", module, *args], code, out.read_text(), err.read_text())

    def close(self) -> None:
        self._server.stdin.close()
        self._server.wait(timeout=60)
        self._log.close()

    def _send(self, request: dict) -> None:
        try:
            self._server.stdin.write(json.dumps(request) + "\n")
            self._server.stdin.flush()
        except BrokenPipeError:
            self._receive()  # says it ended

    def _receive(self) -> dict:
        line = self._server.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote process ended (exit {self._server.poll()}): see {self._log.name}")
        return json.loads(line)


class _Deadline(threading.Timer):
    def __init__(self, pid: int, timeout: float):
        self.fired = threading.Event()
        super().__init__(timeout, self._expire, (pid,))
        self.start()

    def _expire(self, pid: int) -> None:
        self.fired.set()
        _kill(pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:  # it ended meanwhile
        pass


def _serve() -> None:
    """The server side: requests on stdin, a line each; replies (the child's pid, then its exit status) on stdout."""
    import importlib

    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # a library's print goes to the log, not into the replies
    for name in PRELOAD:
        importlib.import_module(name)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                replies.close()
                code = _child(**request)
            except BaseException:  # noqa: BLE001 - before the run starts (a bad cwd): told, and the child still exits here
                traceback.print_exc()
            finally:
                os._exit(code & 0xFF)
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


def _child(module: str, args: list[str], env: dict, cwd: str, stdout: str, stderr: str) -> int:
    """``python -m module args`` from here on, as a fresh interpreter would run it; its exit status."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, stdout, os.O_WRONLY | os.O_CREAT), (2, stderr, os.O_WRONLY | os.O_CREAT)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    # sys.stdin/stdout/stderr are the server's, made as a fresh interpreter makes them (block-buffered stdout to a
    # pipe, line-buffered stderr) and empty: they now read and write the child's files
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
    return code


if __name__ == "__main__":
    _serve()
