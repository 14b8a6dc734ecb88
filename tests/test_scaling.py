"""Scaling out on the engines people use: Lightning DDP (2 CPU processes), submitit, Optuna."""

from __future__ import annotations

import fcntl
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from tests.conftest import FAST, REPO, make_image_tree, read_metrics, run_cli, train
from tlexp.model.backbones import build_backbone
from tlexp.model.finetune import PhasedFinetuning
from tlexp.one_job_at_a_time import one_job_at_a_time
from tlexp.trainer import build_trainer


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    # 5 validation and 5 test images: two DDP ranks cannot take as many each without repeating one
    return make_image_tree(tmp_path_factory.mktemp("scaling") / "images", {"red": 12, "green": 12, "blue": 9})


def test_ddp_ranks_train_the_same_phase_b_parameters(tree, tmp_path):
    """Lightning #20340: DDP syncs only what required grad when it wrapped; the phase switch re-wraps."""
    weights = tmp_path / "weights"
    train(
        tmp_path / "run", tree, "model=resnet18", "trainer=ddp_cpu", "strategy=blocks_1", "finetune.phase_b_epochs=2",
        "+callbacks.weights._target_=tests.helpers.SaveWeightsPerRank", f"+callbacks.weights.dirpath={weights}",
    )
    start = torch.load(weights / "start_rank0.pt")
    end = [torch.load(weights / f"end_rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(end[0][k], end[1][k]) for k in start), "the ranks hold different weights"
    moved = {k for k in start if not torch.equal(start[k], end[0][k])}
    trainable = {k for k in start if k.startswith(("head.", "backbone.layer4.1."))}
    assert moved == trainable  # frozen BatchNorm statistics stay put too
    metrics = read_metrics(tmp_path / "run")
    assert metrics["status"] == "completed" and metrics["unfrozen_modules"] == ["layer4.1"]
    # issue 15: each test image counted once (Lightning's sampler would pad rank 1 with a repeat)
    assert metrics["images"]["test"] == 5 and sum(map(sum, metrics["confusion_matrix"])) == 5
    assert round(metrics["test_acc"] * 5, 6) == round(metrics["test_acc"] * 5)
    written = {p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")}
    assert written == {  # rank 1 adds only its log
        "checkpoints", "csv", "tensorboard", "metrics.json", "split.csv", "model_summary.txt", "summary.txt",
        "confusion_matrix.png", "misclassified.png", "train.log", "train_ddp_process_1.log",
    }


def test_ddp_resume_equals_the_uninterrupted_run(tree, tmp_path):
    """A DDP run stopped after phase A's last epoch and resumed across the switch ends where the whole run does."""
    common = ("model=resnet18", "trainer=ddp_cpu", "strategy=blocks_1", "profile.enabled=false",
              "+callbacks.weights._target_=tests.helpers.SaveWeightsPerRank")
    train(tmp_path / "whole", tree, *common, "finetune.phase_b_epochs=2", f"+callbacks.weights.dirpath={tmp_path / 'w_whole'}")
    train(  # the same run, stopped after phase A
        tmp_path / "first", tree, *common, "finetune.phase_b_epochs=2", "trainer.max_epochs=1", f"+callbacks.weights.dirpath={tmp_path / 'w_first'}",
    )
    train(
        tmp_path / "resumed", tree, *common, "finetune.phase_b_epochs=2", f"+callbacks.weights.dirpath={tmp_path / 'w_resumed'}",
        f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}",
    )
    for rank in (0, 1):
        whole = torch.load(tmp_path / "w_whole" / f"end_rank{rank}.pt")
        resumed = torch.load(tmp_path / "w_resumed" / f"end_rank{rank}.pt")
        assert all(torch.equal(whole[k], resumed[k]) for k in whole), f"rank {rank} differs"
    history = [e["val_loss"] for e in read_metrics(tmp_path / "resumed")["history"]]
    assert history == [e["val_loss"] for e in read_metrics(tmp_path / "whole")["history"]] and len(history) == 3


def test_ddp_refuses_a_local_multirun_and_the_lr_finder(tree, tmp_path):
    single = train(tmp_path / "run", tree, "trainer=ddp_cpu", "tune.lr_find=true", check=False)
    assert single.returncode == 2 and "tune.lr_find runs on one device" in single.stderr
    sweep = run_cli("-m", *FAST, f"data.root={tree}", "trainer=ddp_cpu", f"hydra.sweep.dir={tmp_path / 'sweep'}", "strategy=frozen")
    job = next((tmp_path / "sweep").glob("0_*"))
    assert json.loads((job / "metrics.json").read_text())["status"] == "failed"
    assert "inside a local multirun" in (job / "metrics.json").read_text() and sweep.returncode == 0


def test_submitit_local_runs_a_two_job_sweep(tree, tmp_path):
    result = run_cli(
        "-m", *FAST, f"data.root={tree}", "model=resnet18", "hydra/launcher=submitit_local",
        f"hydra.sweep.dir={tmp_path}", "strategy=frozen,blocks_1", "profile.enabled=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in tmp_path.glob("[0-9]_*"))
    assert jobs == ["0_resnet18_frozen", "1_resnet18_blocks_1"]
    for job in jobs:
        assert read_metrics(tmp_path / job)["status"] == "completed"
    assert len(list((tmp_path / ".submitit").glob("*/*_result.pkl"))) == 2  # each job ran in its own submitit process


def test_side_by_side_jobs_build_each_cache_entry_once_and_match_one_at_a_time(tree, tmp_path, monkeypatch):
    """perf.sweep_jobs=2 (what perf=fast picks on one GPU): the jobs share the feature cache, one building each
    entry while the other waits, and give the results of the same sweep run one job at a time."""
    sweep = ("-m", *FAST, f"data.root={tree}", "model=resnet18", "strategy=frozen,blocks_1", "profile.enabled=false",
             "data.num_workers=2")  # loader workers started from a joblib worker process
    both = run_cli(*sweep, "perf.sweep_jobs=2", f"hydra.sweep.dir={tmp_path / 'both'}", f"perf.cache_dir={tmp_path / 'cache'}")
    assert both.returncode == 0, both.stderr[-3000:]
    assert "n_jobs=2" in both.stdout + both.stderr
    logs = "".join(p.read_text() for p in (tmp_path / "both").glob("*/train.log"))
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(re.findall(r"feature cache: .* images in", logs)) == len(entries) > 0  # none built twice
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what joblib gives each of 2 jobs on 2 cores: sums in the same order
    alone = run_cli(*sweep, "perf.sweep_jobs=1", f"hydra.sweep.dir={tmp_path / 'alone'}", f"perf.cache_dir={tmp_path / 'cache_alone'}")
    assert alone.returncode == 0, alone.stderr[-3000:]
    for job in ("0_resnet18_frozen", "1_resnet18_blocks_1"):
        side_by_side, one_at_a_time = read_metrics(tmp_path / "both" / job), read_metrics(tmp_path / "alone" / job)
        assert side_by_side["status"] == one_at_a_time["status"] == "completed"
        assert [e["val_loss"] for e in side_by_side["history"]] == [e["val_loss"] for e in one_at_a_time["history"]]
        assert (side_by_side["test_loss"], side_by_side["test_acc"]) == (one_at_a_time["test_loss"], one_at_a_time["test_acc"])


def test_optuna_search_writes_the_best_trial(tree, tmp_path):
    result = run_cli(
        *FAST, f"data.root={tree}", "model=resnet18", "hparams_search=optuna", "hydra.sweeper.n_trials=3",
        f"hydra.sweep.dir={tmp_path}", "profile.enabled=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = {p.name: read_metrics(p) for p in tmp_path.glob("[0-9]_*")}
    assert len(jobs) == 3 and all(m["status"] == "completed" for m in jobs.values())
    optuna = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert set(optuna["best_params"]) == {"optim.lr", "finetune.backbone_lr_factor", "strategy", "loss.gamma"}
    assert optuna["best_value"] == max(m["val_acc"] for m in jobs.values())  # validation, not test, accuracy
    best = json.loads((tmp_path / "best_trial.json").read_text())
    assert best["val_acc"] == optuna["best_value"]
    config = yaml.safe_load((tmp_path / "best_config.yaml").read_text())
    assert config["strategy"] == optuna["best_params"]["strategy"] and config["loss"]["name"] == "focal"
    assert config["optim"]["lr"] == pytest.approx(optuna["best_params"]["optim.lr"])
    assert config["loss"]["gamma"] == pytest.approx(optuna["best_params"]["loss.gamma"])


def test_slurm_launcher_config_composes():
    result = run_cli("hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.partition=gpu", "--cfg", "hydra")
    assert result.returncode == 0, result.stderr[-2000:]
    launcher = yaml.safe_load(result.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert launcher["partition"] == "gpu" and launcher["tasks_per_node"] == launcher["gpus_per_node"] == 1


def test_one_job_at_a_time_holds_even_after_the_lock_file_is_removed(tmp_path):
    """Jobs that waited on a lock file its holder removed, and jobs that came later: never two at once."""
    inside, most, guard = [0], [0], threading.Lock()

    def job(delay: float):
        time.sleep(delay)
        with one_job_at_a_time(tmp_path / ".work.lock", "busy"):
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.05)
            with guard:
                inside[0] -= 1

    with ThreadPoolExecutor(6) as jobs:  # flock: separate opens of one file exclude each other, threads too
        list(jobs.map(job, [0.0, 0.01, 0.02, 0.06, 0.07, 0.12]))
    assert most[0] == 1
    assert list(tmp_path.iterdir()) == []


def test_one_job_at_a_time_closes_its_lock_file_when_locking_fails(tmp_path, monkeypatch):
    """An flock that fails for another reason than a held lock (ENOLCK on NFS) surfaces, and leaves no file open."""
    import errno

    from tlexp import one_job_at_a_time as module

    opened = []

    def recording_open(*args, **kwargs):
        opened.append(open(*args, **kwargs))  # noqa: SIM115 -- the test checks it is closed
        return opened[-1]

    def no_locks(file, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(module, "open", recording_open, raising=False)
    monkeypatch.setattr(module.fcntl, "flock", no_locks)
    with pytest.raises(OSError, match="No locks available"), one_job_at_a_time(tmp_path / ".work.lock", "busy"):
        pass
    assert len(opened) == 1 and opened[0].closed


def test_speed_figures_count_the_jobs_that_ran_beside_them_not_the_launchers_cap(tree, tmp_path):
    """speed_setup.sweep_jobs counts the sweep's jobs on this machine whose .tlexp.running lock is held while
    a job times its speed: a finished job, or one on another node, is not counted; a job that starts while
    another counts waits a moment instead of being refused."""
    from tlexp import runs

    sweep = tmp_path / "sweep"
    with runs.locked(sweep / "0_a"), runs.locked(sweep / "1_b"):
        with runs.locked(sweep / "2_c"):
            assert runs.jobs_running(sweep) == 3
        assert runs.jobs_running(sweep) == 2  # 2_c has finished
        elsewhere = sweep / "3_on_another_node"
        elsewhere.mkdir()
        (elsewhere / runs.RUNNING).write_text("another-node")
        with open(elsewhere / runs.RUNNING) as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            assert runs.jobs_running(sweep) == 2
        # a job of the sweep (launched by the test below) times its speed while 0_a and 1_b run
        result = run_cli("-m", *FAST, f"data.root={tree}", "model=resnet18", "strategy=frozen", f"hydra.sweep.dir={sweep}")
        assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(sweep / "0_resnet18_frozen")["speed_setup"]["sweep_jobs"] == 3
    assert runs.jobs_running(sweep) == 0
    starting = sweep / "4_d"
    starting.mkdir()
    with open(starting / runs.RUNNING, "a") as probe:  # another job's count, caught in the middle
        fcntl.flock(probe, fcntl.LOCK_SH)
        threading.Timer(0.2, probe.close).start()
        with runs.locked(starting):
            assert runs.jobs_running(sweep) == 1


def test_sync_batchnorm_keeps_the_activations_of_timm_models(tmp_path):
    """trainer=ddp sets trainer.sync_batchnorm: Lite0's BatchNormAct2d layers become synchronized ones that still
    apply their activation, for training and after Lightning's revert for the test (was: torch's conversion dropped
    every activation, outputs off by ~1e5). SyncBatchNorm computes as BatchNorm in one process, so the CPU checks it."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", [*FAST, "trainer.sync_batchnorm=true", f"hydra.runtime.output_dir={tmp_path}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # as in a run: the loggers' and checkpoints' folders are the run dir
    try:
        layer_sync = build_trainer(cfg, tmp_path, 2, PhasedFinetuning([], 1))._accelerator_connector._layer_sync
    finally:
        HydraConfig.instance().cfg = None
    body = build_backbone("timm", "tf_efficientnet_lite0", None).body.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = body(x)
        synced = layer_sync.apply(body).eval()
        assert torch.allclose(synced(x), expected, atol=1e-5)
        reverted = layer_sync.revert(synced).eval()
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in reverted.modules())
        assert torch.allclose(reverted(x), expected, atol=1e-5)
