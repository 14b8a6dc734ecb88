"""The suite's ``python -m <module> <args>`` runs, forked from one process that imported the heavy libraries once.

A fresh interpreter spends ~7 s importing torch, torchvision, Lightning and Hydra before it runs anything: over
the suite's hundreds of CLI runs, most of its time on 2 cores. A fork is a new process in all that a run can
tell: its own pid, environment, working directory, standard streams, signal dispositions and exit status, and
tlexp imported anew (only third-party libraries are preloaded). What it shares with its siblings: those
libraries' import-time state and Python's hash seed. ``OMP_NUM_THREADS`` is read by OpenMP when torch loads,
so a run given its own is set to it. Where a CUDA GPU is visible the runs stay fresh interpreters: CUDA does not
survive a fork.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import subprocess
import sys
import threading
from pathlib import Path

PRELOAD = ("torch", "torchvision", "pytorch_lightning", "torchmetrics", "hydra", "omegaconf", "numpy", "PIL.Image")


class Zygote:
    """The pytest side: one server process per session, asked for one run at a time."""

    def __init__(self, repo: Path, log: Path):
        self._lock = threading.Lock()
        self._log = log.open("w")
        self._server = subprocess.Popen(
            [sys.executable, "-m", "tests.zygote"], cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, text=True, env={**os.environ, "PYTHONPATH": str(repo)},
        )

    def run(self, module: str, args: list[str], env: dict, cwd: Path, timeout: float, folder: Path) -> subprocess.CompletedProcess:
        out, err = folder / "stdout", folder / "stderr"
        with self._lock:
            self._send({"module": module, "args": args, "env": env, "cwd": str(cwd), "stdout": str(out), "stderr": str(err)})
            expired = _Deadline(self._receive()["pid"], timeout)  # as subprocess.run's timeout: the child is killed
            try:
                code = self._receive()["returncode"]
            finally:
                expired.cancel()
        if expired.fired.is_set():
            raise subprocess.TimeoutExpired([module, *args], timeout)
        return subprocess.CompletedProcess([sys.executable, "-m", module, *args], code, out.read_text(), err.read_text())

    def close(self) -> None:
        self._server.stdin.close()
        self._server.wait(timeout=60)
        self._log.close()

    def _send(self, request: dict) -> None:
        self._server.stdin.write(json.dumps(request) + "\n")
        self._server.stdin.flush()

    def _receive(self) -> dict:
        line = self._server.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote process ended (exit {self._server.poll()}): see {self._log.name}")
        return json.loads(line)


class _Deadline(threading.Timer):
    def __init__(self, pid: int, timeout: float):
        self.fired = threading.Event()
        super().__init__(timeout, self._kill, (pid,))
        self.start()

    def _kill(self, pid: int) -> None:
        self.fired.set()
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
            replies.close()
            _child(**request)
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


def _child(module: str, args: list[str], env: dict, cwd: str, stdout: str, stderr: str) -> None:
    """``python -m module args`` from here on, as a fresh interpreter would run it and exit."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, stdout, os.O_WRONLY | os.O_CREAT), (2, stderr, os.O_WRONLY | os.O_CREAT)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    # sys.stdin/stdout/stderr are the server's, made as a fresh interpreter makes them (block-buffered stdout to a
    # pipe, line-buffered stderr) and empty: they now read and write the child's files
    if "OMP_NUM_THREADS" in env:
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
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
        import signal

        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


if __name__ == "__main__":
    _serve()
