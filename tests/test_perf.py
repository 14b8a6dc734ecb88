"""perf=fast vs perf=naive: what each switches, and that the switches hold on this machine."""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics, train
from tlexp.speed import defaults as perf


def test_fast_is_default_and_naive_turns_everything_off(compose_cfg):
    fast, naive = compose_cfg(), compose_cfg("perf=naive")
    assert (fast.perf.name, fast.perf.tune_malloc, fast.perf.channels_last, fast.perf.feature_cache, fast.trainer.precision) == (
        "fast", True, "auto", True, "auto"
    )
    assert (naive.perf.tune_malloc, naive.perf.channels_last, naive.perf.feature_cache, naive.trainer.precision) == (
        False, False, False, "32-true"
    )
    assert compose_cfg("trainer.precision=bf16-mixed").trainer.precision == "bf16-mixed"
    assert (fast.profile.runtime, naive.profile.runtime) == ("auto", "eager")


def test_inference_runtime_is_verified_against_eager(monkeypatch, caplog):
    import torch
    import torchvision

    from tlexp.speed import timing as profiling

    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.rand(2, 3, 64, 64)
    fast, used = profiling.inference_runtime(model, (x,), "torchscript")
    assert used == "torchscript" and isinstance(fast, torch.jit.ScriptModule)
    with torch.no_grad():
        assert (fast(x) - model(x)).abs().max() < profiling.VERIFY_TOLERANCE
    monkeypatch.setattr(torch.jit, "trace", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("untraceable")))
    with caplog.at_level("INFO", logger=profiling.log.name):
        assert profiling.inference_runtime(model, (x,), "torchscript") == (model, "eager")
        assert [r.levelname for r in caplog.records] == ["WARNING"]  # the runtime the user asked for
        caplog.clear()
        # auto's fallback is no warning: every default Lite0 run on a bf16 CPU warned (TorchScript changes its outputs 6.8e-2)
        assert profiling.inference_runtime(model, (x,), "auto") == (model, "eager")
        assert [(r.levelname, r.getMessage()[:38]) for r in caplog.records] == [("INFO", "profile.runtime=auto: torchscript fail")]


def test_speed_is_timed_in_the_precision_the_run_tested_in():
    """bf16-mixed runs (precision=auto on a CPU with native bf16) were timed in fp32, and speed_setup did not say which."""
    import torch
    import torchvision
    from torch import nn

    from tlexp.speed.timing import inference_speed

    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            seen.append(self.conv(x).dtype)
            return self.conv(x).mean((2, 3))

    for precision, ran, dtype in [("32-true", "32-true", torch.float32), ("bf16-mixed", "bf16-mixed", torch.bfloat16),
                                  ("16-mixed", "bf16-mixed", torch.bfloat16)]:  # a CPU runs 16-mixed as bf16 (Lightning too)
        seen.clear()
        speed = inference_speed(Probe(), 16, batch_size=2, warmup=0, repeats=1, precision=precision)
        assert speed["speed_setup"]["precision"] == ran and set(seen) == {dtype}
    seen.clear()  # a *-true run's weights are in its dtype: so are the timed images
    speed = inference_speed(Probe().to(torch.bfloat16), 16, batch_size=2, warmup=0, repeats=1, precision="bf16-true")
    assert speed["speed_setup"]["precision"] == "bf16-true" and set(seen) == {torch.bfloat16}
    # TorchScript in bf16 differs from eager bf16 by reordering alone (3e-3 here): still the model, timed traced
    resnet = torchvision.models.resnet18(num_classes=5)
    assert inference_speed(resnet, 32, batch_size=2, warmup=0, repeats=1, runtime="torchscript", precision="bf16-mixed")["speed_setup"]["runtime"] == "torchscript"


def test_malloc_tuning_applies_on_glibc():
    assert perf.tune_glibc_malloc() is True


@pytest.mark.parametrize("native,expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_precision_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(perf, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(perf.torch.cuda, "is_available", lambda: False)
    assert perf.resolve_precision("auto", "auto") == expected
    assert perf.resolve_precision("16-mixed", "auto") == "16-mixed"


def test_naive_and_fast_runs_agree(tmp_path, tiny_tree):
    """Same seed, same data: the fast kernels change memory layout and allocation, not the numbers.

    (The feature cache changes which augmented views are seen: tests/test_features.py.)
    """
    args = ("model=resnet18", "strategy=blocks_2", "trainer.precision=32-true")
    train(tmp_path / "fast", tiny_tree, *args, "perf=fast", "perf.feature_cache=false")
    train(tmp_path / "naive", tiny_tree, *args, "perf=naive")
    fast, naive = read_metrics(tmp_path / "fast"), read_metrics(tmp_path / "naive")
    assert fast["perf"] == "fast" and naive["perf"] == "naive"
    for key in ("train_loss", "val_loss", "test_loss"):
        assert fast[key] == pytest.approx(naive[key], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("cuda", [True, False])
def test_fast_defaults_are_chosen_per_device(monkeypatch, cuda):
    """On a GPU fp32 NCHW (measured faster there, tlexp/speed/defaults.py); an explicit setting always wins."""
    import torch

    from tlexp.speed.timing import resolve_runtime

    monkeypatch.setattr(perf.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(perf, "cpu_has_native_bf16", lambda: True)
    assert perf.resolve_precision("auto", "auto") == ("32-true" if cuda else "bf16-mixed")
    assert perf.resolve_precision("auto", "cpu") == "bf16-mixed"
    assert perf.resolve_channels_last("auto", "auto") is (not cuda)
    assert perf.resolve_channels_last(True, "auto") is True
    device = torch.device("cuda" if cuda else "cpu")
    assert resolve_runtime("auto", device) == ("cudagraph" if cuda else "torchscript")
    assert resolve_runtime("cudagraph", torch.device("cpu")) == "torchscript"
    assert resolve_runtime("eager", device) == "eager"


@pytest.mark.parametrize(
    ("gpus", "gib", "cores", "host_gib", "expected"),
    [(0, 0, 16, 128, 1), (1, 141, 16, 128, 8), (1, 24, 16, 128, 3), (1, 80, 4, 128, 2), (2, 80, 32, 128, 1), (1, 141, 16, 32, 3), (1, 141, 16, None, 8)],
)
def test_sweep_jobs_run_side_by_side_only_on_one_gpu(monkeypatch, compose_cfg, gpus, gib, cores, host_gib, expected):
    """perf.sweep_jobs=auto: up to 8 on one GPU, bounded by half the cores, 8 GiB of GPU memory each and
    host memory for each job's feature store (8 GiB) + 2 GiB; one on a CPU or several GPUs."""
    from types import SimpleNamespace

    from tlexp.hydra_config import sweep_jobs

    monkeypatch.setattr(perf.torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(perf.torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(perf.torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=gib * 2**30))
    monkeypatch.setattr(perf.os, "sched_getaffinity", lambda pid: set(range(cores)))  # taskset / SLURM: not the node's count
    monkeypatch.setattr(perf, "host_memory_gib", lambda: host_gib)
    assert sweep_jobs("auto", "auto", 8) == expected
    assert sweep_jobs("auto", "auto", "lots") == sweep_jobs("auto", "auto", 0)  # the job's config check names it
    assert sweep_jobs("auto", "cpu") == 1 and sweep_jobs(3, "auto") == 3 and sweep_jobs("3", "auto") == 3
    for nonsense in (0, -1, "two", None, 2.5, True):
        with pytest.raises(SystemExit):
            sweep_jobs(nonsense, "auto")
    assert (compose_cfg().perf.sweep_jobs, compose_cfg("perf=naive").perf.sweep_jobs) == ("auto", 1)


def test_host_memory_is_the_cgroups_limit_where_that_is_lower(tmp_path, monkeypatch):
    """A container's --memory or a SLURM job's --mem bounds perf.sweep_jobs=auto, not the node's RAM."""
    machine = perf.host_memory_gib()
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    monkeypatch.setattr(perf, "_CGROUP_LIMITS", (v2, v1))
    assert perf.host_memory_gib() == machine  # no cgroup files
    v2.write_text("max\n")
    assert perf.host_memory_gib() == machine
    v1.write_text(f"{4 * 2**30}\n")
    assert perf.host_memory_gib() == 4.0


def test_the_table_says_when_a_speed_was_timed_beside_other_jobs():
    from tlexp.report.table import _speed_on

    setup = {"device": "cuda", "device_name": "NVIDIA H200", "runtime": "cudagraph"}
    assert _speed_on(setup) == "cuda: NVIDIA H200 (cudagraph)"
    assert _speed_on(setup | {"sweep_jobs": 8}) == "cuda: NVIDIA H200 (cudagraph, 8 jobs at once)"
    assert _speed_on(setup | {"precision": "32-true"}) == "cuda: NVIDIA H200 (cudagraph)"
    assert _speed_on(setup | {"precision": "bf16-mixed", "sweep_jobs": 8}) == "cuda: NVIDIA H200 (cudagraph, bf16-mixed, 8 jobs at once)"


def test_the_record_names_the_precision_that_ran(tmp_path, tiny_tree):
    """fp16 autocast does not exist on a CPU: Lightning runs bf16-mixed, and metrics.json says so."""
    run = tmp_path / "run"
    train(run, tiny_tree, "model=resnet18", "strategy=frozen", "trainer.accelerator=cpu", "trainer.precision=16-mixed")
    metrics = read_metrics(run)
    assert metrics["precision"] == metrics["speed_setup"]["precision"] == "bf16-mixed"


def test_perf_mps_starts_one_daemon_for_side_by_side_jobs_and_tells_it_to_quit(tmp_path, monkeypatch):
    """perf.mps=true: the daemon starts before any job (which inherit its pipe folder) and is told to quit
    at the sweep's end; nothing starts for one job at a time (launcher or sweeper), on a CPU, under
    perf.mps=false, without the daemon's binary, or where a daemon already runs; a failed start is one line."""
    import os
    import time

    from omegaconf import OmegaConf

    from tlexp.speed import mps

    calls = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / mps.CONTROL
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\n{{ if [ "$1" = -d ]; then echo "-d $CUDA_MPS_PIPE_DIRECTORY"; else echo "$(cat) $CUDA_MPS_PIPE_DIRECTORY"; fi; }} >> {calls}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    monkeypatch.delenv(mps.PIPE, raising=False)
    monkeypatch.setenv(mps.LOG, "/var/log/mine")  # the user's own value comes back after the sweep
    monkeypatch.setattr(mps, "DEFAULT_PIPE", tmp_path / "no_daemon_here")
    monkeypatch.setattr(perf.torch.cuda, "is_available", lambda: True)
    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    cfg = OmegaConf.create({
        "perf": {"mps": True}, "trainer": {"accelerator": "auto"},
        "hydra": {"sweep": {"dir": str(tmp_path / "sweep")}, "launcher": {"_target_": joblib, "n_jobs": 7}, "sweeper": {"max_batch_size": None}},
    })
    callback = mps.MpsForSideBySideJobs()
    try:
        callback.on_multirun_start(cfg)
        pipe = os.environ[mps.PIPE]
        assert calls.read_text().splitlines() == [f"-d {pipe}"] and os.environ[mps.LOG] == str(tmp_path / "sweep" / ".mps_log")
    finally:
        callback.on_multirun_end(cfg)
    assert mps.PIPE not in os.environ and os.environ[mps.LOG] == "/var/log/mine"
    for _ in range(50):  # quit is sent without waiting for it
        if len(calls.read_text().splitlines()) == 2 and not os.path.exists(pipe):
            break
        time.sleep(0.1)
    assert calls.read_text().splitlines() == [f"-d {pipe}", f"quit {pipe}"] and not os.path.exists(pipe)
    calls.unlink()
    quiet = [
        {"hydra": {"launcher": {"n_jobs": 1}}}, {"hydra": {"sweeper": {"n_jobs": 1}}},  # Optuna, one trial at a time
        {"hydra": {"launcher": {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}}},
        {"trainer": {"accelerator": "cpu"}}, {"perf": {"mps": False}},
    ]
    for change in quiet:
        callback.on_multirun_start(OmegaConf.merge(cfg, change))
    (tmp_path / "no_daemon_here").mkdir()
    (tmp_path / "no_daemon_here" / "control").touch()  # a daemon already serves the default pipe folder
    callback.on_multirun_start(cfg)
    assert not calls.exists() and mps.PIPE not in os.environ and callback.started is None
    monkeypatch.setattr(mps, "DEFAULT_PIPE", tmp_path / "no_daemon_here_either")
    fake.write_text("#!/bin/sh\nexit 1\n")
    callback.on_multirun_start(cfg)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    callback.on_multirun_start(cfg)
    assert mps.PIPE not in os.environ and callback.started is None


def test_perf_mps_daemon_is_told_to_quit_when_the_sweep_is_terminated(tmp_path):
    """SIGTERM (a scheduler's kill, `timeout`) skips atexit: the daemon would outlive the sweep."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tlexp.speed import mps

    calls = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / mps.CONTROL
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\n{{ if [ "$1" = -d ]; then echo "-d"; else echo "$(cat)"; fi; }} >> {calls}\n')
    fake.chmod(0o755)
    sweep = f"""
import time
from omegaconf import OmegaConf
from tlexp.speed import defaults, mps
defaults.torch.cuda.is_available = lambda: True
mps.DEFAULT_PIPE = mps.Path({str(tmp_path / "no_daemon_here")!r})
launcher = {{"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 2}}
mps.MpsForSideBySideJobs().on_multirun_start(OmegaConf.create({{
    "perf": {{"mps": True}}, "trainer": {{"accelerator": "auto"}},
    "hydra": {{"sweep": {{"dir": {str(tmp_path / "sweep")!r}}}, "launcher": launcher, "sweeper": {{}}}},
}}))
print("started", flush=True)
time.sleep(60)
"""
    pipes = tmp_path / "tmp"  # where the daemon's pipe folder is made
    pipes.mkdir()
    env = os.environ | {"PATH": f"{fake.parent}:/usr/bin:/bin", "TMPDIR": str(pipes)}
    env.pop(mps.PIPE, None)
    proc = subprocess.Popen([sys.executable, "-c", sweep], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started" and len(list(pipes.iterdir())) == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM  # still ends as terminated
    for _ in range(50):
        if calls.read_text().splitlines() == ["-d", "quit"] and not any(pipes.iterdir()):
            break
        time.sleep(0.1)
    assert calls.read_text().splitlines() == ["-d", "quit"]
    assert not any(pipes.iterdir())  # the daemon's pipe folder went with it


def test_each_run_of_a_one_process_sweep_has_its_own_peak_gpu_memory(monkeypatch):
    """perf=naive's sweep runs its jobs one after another in one process (joblib, n_jobs=1): each run starts the
    CUDA peak afresh (was: peak_gpu_memory_mib the largest of every job before it too). Mocked: no GPU here."""
    import torch

    from tlexp import train as train_module

    reset: list[int] = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    train_module.reset_gpu_peak_memory()
    assert reset == []  # the first job, or a CPU run: no CUDA context is made for it
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    train_module.reset_gpu_peak_memory()
    assert reset == [0, 1]


def test_float16_weights_with_adams_eps_are_refused(tmp_path, tiny_tree):
    """trainer.precision=16-true keeps weights and Adam's state in float16, where its eps=1e-8 is 0: was 'completed'
    with nan losses from the first step and chance accuracy; now one line saying what to use instead."""
    run = tmp_path / "run"
    result = train(run, tiny_tree, "model=resnet18", "strategy=frozen", "trainer.precision=16-true", check=False)
    assert result.returncode == 2
    assert ("tlexp-train: error: optim._target_=torch.optim.Adam with eps=1e-08 on float16 weights (trainer.precision=16-true): "
            "eps is 0 in float16") in result.stderr
    assert read_metrics(run)["status"] == "failed"
