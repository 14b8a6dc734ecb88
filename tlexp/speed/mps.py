"""``perf.mps``: the side-by-side jobs of a sweep on one GPU as clients of one CUDA MPS daemon.

Without MPS a GPU runs one process's kernels at a time and takes the jobs' CUDA contexts in turn;
with it, the small kernels of several batch-32 jobs can run at once. A Hydra callback: the daemon
starts before the launcher starts any job (the jobs find it through the environment they inherit)
and is told to quit when the sweep ends or is terminated. A user-level process: the GPU's settings
(compute mode, MIG) stay as they are. Whether it pays is measured by ``make bench-gpu`` (variant fast_mps).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

CONTROL = "nvidia-cuda-mps-control"
PIPE, LOG = "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"
DEFAULT_PIPE = Path("/tmp/nvidia-mps")  # where clients look when PIPE is not set: a daemon someone else runs


class MpsForSideBySideJobs(Callback):
    def __init__(self):
        self.started: tuple[str, dict[str, str], Path] | None = None  # the daemon this sweep started
        self.replaced: dict[str, str | None] = {}  # the environment's values before it
        self.on_sigterm = None  # SIGTERM's handler before the daemon started

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if config.perf.get("mps") is not True or side_by_side(config) < 2:
            return  # one job at a time, or jobs on other machines (SLURM): nothing shares this GPU
        from tlexp.speed.defaults import uses_cuda

        if not uses_cuda(config.trainer.accelerator):
            return
        if PIPE in os.environ or (DEFAULT_PIPE / "control").exists():
            _say("perf.mps: an MPS daemon is already running here; the jobs use it")
            return
        control = shutil.which(CONTROL)
        if control is None:
            _say(f"perf.mps: {CONTROL} is not on PATH (it comes with the NVIDIA driver); the jobs share the GPU without MPS")
            return
        try:
            self._start(control, Path(config.hydra.sweep.dir) / ".mps_log")
        except OSError as exc:  # Hydra would turn it into a warning with a traceback
            _say(f"perf.mps: could not start {CONTROL} ({exc}); the jobs share the GPU without MPS")

    def _start(self, control: str, log: Path) -> None:
        # The control socket's path has a length limit, so the pipe folder is a short one; the log stays with the sweep.
        pipe = Path(tempfile.mkdtemp(prefix="tlexp-mps-"))
        log.mkdir(parents=True, exist_ok=True)
        env = {PIPE: str(pipe), LOG: str(log)}
        if subprocess.run([control, "-d"], env=os.environ | env, stdin=subprocess.DEVNULL, check=False).returncode != 0:
            shutil.rmtree(pipe, ignore_errors=True)
            _say(f"perf.mps: `{CONTROL} -d` failed (its log: {log}); the jobs share the GPU without MPS")
            return
        self.replaced = {key: os.environ.get(key) for key in env}
        os.environ.update(env)  # the launcher's worker processes start after this and inherit it
        self.started = (control, env, pipe)
        atexit.register(self.stop)  # a sweep that ends in an exception skips on_multirun_end
        self.on_sigterm = signal.signal(signal.SIGTERM, self._stop_then_terminate)  # which skips atexit
        # The daemon starts a server when the first job connects: a server that cannot start shows in the jobs' logs.
        _say(f"perf.mps: the jobs run as clients of an MPS daemon (log: {log})")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self.stop()

    def stop(self) -> None:
        """Tell the daemon to quit, without waiting: ``quit`` returns once every client has ended, and the
        launcher's worker processes (clients) end only after this process. The environment gets its values back."""
        if self.started is None:
            return
        control, env, pipe = self.started
        self.started = None
        subprocess.Popen(
            ["sh", "-c", 'echo quit | "$0"; rm -rf "$1"', control, str(pipe)], env=os.environ | env,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        for key, value in self.replaced.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        signal.signal(signal.SIGTERM, signal.SIG_DFL if self.on_sigterm is None else self.on_sigterm)

    def _stop_then_terminate(self, signum, frame) -> None:
        self.stop()  # puts SIGTERM's own handler back, which the signal raised again then meets
        signal.raise_signal(signum)


def side_by_side(config: DictConfig) -> int:
    """Jobs the sweep runs at once on this machine: the local (joblib) launcher's, in batches the sweeper may cap."""
    launcher = config.hydra.launcher
    if "joblib" not in str(launcher.get("_target_", "")):
        return 1
    jobs = int(launcher.n_jobs)
    # Optuna asks for n_jobs trials at a time; the basic sweeper's batches may be capped too
    batch = config.hydra.sweeper.get("n_jobs") or config.hydra.sweeper.get("max_batch_size")
    return min(jobs, int(batch)) if batch else jobs


def _say(message: str) -> None:
    print(f"tlexp-train: {message}", file=sys.stderr)
