"""`tlexp-train` end to end on tiny synthetic data, and its one-line errors for bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import FAST, REPO, make_image_tree, read_metrics, run_cli, run_module, train

REQUIRED_KEYS = {
    "model", "strategy", "status", "seed", "num_classes", "class_names", "epochs", "train_acc", "train_loss",
    "val_acc", "val_loss", "test_acc", "test_loss", "test_f1_macro", "trainable_params",
    "trainable_params_phase_a", "total_params", "wall_time_s",
}


def test_resnet50_blocks_2_run_writes_metrics(tmp_path, tiny_tree):
    run_dir = tmp_path / "run"
    result = train(run_dir, tiny_tree, "model=resnet50", "strategy=blocks_2", "data.image_size=64")
    assert "logging interval" not in result.stderr  # 3 batches an epoch, log_every_n_steps=10: a warning per epoch was
    metrics = read_metrics(run_dir)
    assert REQUIRED_KEYS <= metrics.keys()
    assert metrics["status"] == "completed"
    assert metrics["trainable_params"] == 8_935_429 - 10_245 + (2048 * 3 + 3)  # 3 classes here
    assert metrics["trainable_params_phase_a"] == 2048 * 3 + 3
    assert metrics["epochs"] == 2 and [e["phase_b"] for e in metrics["history"]] == [False, True]
    assert metrics["unfrozen_modules"] == ["layer4.1", "layer4.2"]
    assert 0.0 <= metrics["test_acc"] <= 1.0 and metrics["num_classes"] == 3
    for name in ("train.log", "split.csv", ".hydra/config.yaml", "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    log = (run_dir / "train.log").read_text()
    assert "phase B from epoch 1: backbone modules unfrozen: layer4.1, layer4.2; trainable parameters: 8,931,331" in log


def test_five_class_resnet50_reports_design_count(tmp_path):
    root = make_image_tree(tmp_path / "five", {c: 4 for c in "abcde"}, size=(24, 24))
    train(tmp_path / "run", root, "model=resnet50", "strategy=blocks_2", "data.image_size=32")
    assert read_metrics(tmp_path / "run")["trainable_params"] == 8_935_429


def test_a_run_stopped_before_phase_b_reports_what_trained(tmp_path, tiny_tree):
    """trainer.max_epochs=1 ends a blocks_1 run in its first of two phase A epochs: the head alone trained, one
    epoch of each phase recorded as trained (was: phase B's count and modules, phase A's configured 2 epochs);
    resumed for longer, it reports phase B's."""
    run, schedule = tmp_path / "run", ("model=resnet18", "strategy=blocks_1", "finetune.phase_a_epochs=2")
    train(run, tiny_tree, *schedule, "trainer.max_epochs=1")
    metrics = read_metrics(run)
    assert metrics["trainable_params"] == metrics["trainable_params_phase_a"] == 512 * 3 + 3
    assert (metrics["unfrozen_modules"], metrics["phase_a_epochs"], metrics["phase_b_epochs"], metrics["epochs"]) == ([], 1, 0, 1)
    (run / "metrics.json").unlink()  # its checkpoint goes on: a longer run from where it stopped
    train(run, tiny_tree, *schedule, "trainer.max_epochs=3", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    metrics = read_metrics(run)
    assert metrics["trainable_params"] == 512 * 3 + 3 + 2 * (512 * 512 * 9 + 2 * 512)  # + layer4.1: two convs, two BatchNorms
    assert (metrics["unfrozen_modules"], metrics["phase_a_epochs"], metrics["phase_b_epochs"], metrics["epochs"]) == (["layer4.1"], 2, 1, 3)


def test_frozen_strategy_stops_after_phase_a(tmp_path, tiny_tree):
    train(tmp_path / "run", tiny_tree, "model=resnet18", "strategy=frozen", "finetune.phase_b_epochs=3")
    metrics = read_metrics(tmp_path / "run")
    assert metrics["epochs"] == 1 and metrics["trainable_params"] == metrics["trainable_params_phase_a"] == 512 * 3 + 3


def test_epochs_without_validation_record_no_validation_figures(tmp_path, tiny_tree):
    """+trainer.check_val_every_n_epoch=2: an epoch that was not validated has no val_acc in the history (was: the
    previous validation's figures again, a phase A number in a phase B row)."""
    train(tmp_path / "run", tiny_tree, "model=resnet18", "strategy=blocks_1", "finetune.phase_a_epochs=2", "+trainer.check_val_every_n_epoch=2")
    metrics = read_metrics(tmp_path / "run")
    assert [("val_acc" in e, e["phase_b"]) for e in metrics["history"]] == [(False, False), (True, False), (False, True)]
    assert metrics["best_epoch"] == 1 and metrics["val_acc"] == metrics["history"][1]["val_acc"]
    assert torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=False)["epoch"] == 1


def test_lr_groups_are_named_and_scaled(tmp_path, tiny_tree):
    train(tmp_path / "run", tiny_tree, "model=resnet18", "strategy=full", "optim=sgd", "optim.lr=0.02", "finetune.backbone_lr_factor=0.5")
    history = read_metrics(tmp_path / "run")["history"]
    assert history[-1]["lr_head"] == pytest.approx(0.02) and history[-1]["lr_backbone"] == pytest.approx(0.01)


def _assert_clean_failure(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize(
    "overrides,fragments",
    [
        (["model.name=resnet5O"], ["unknown torchvision classification model 'resnet5O'", "resnet50"]),
        (["strategy=blocks_two"], ["unknown strategy 'blocks_two'"]),
        (["model=resnet18", "strategy=blocks_9"], ["resnet18 has only 8 blocks"]),
        (["model=resnet18", "data.split=[0.5,0.2,0.2]"], ["summing to 1"]),
        (["model=resnet18", "optim.lr=0"], ["optim.lr must be > 0"]),
        (["model=resnet18", "model.weights=IMAGENET9K"], ["not a weights name of resnet18: choose one of ['DEFAULT', 'IMAGENET1K_V1'], a file"]),
        (["model=resnet18", "data.batch_size=abc"], ["data.batch_size must be an integer, got 'abc'"]),
        (["model=resnet18", "data.batch_size=0", "finetune.phase_b_epochs=-1"], ["data.batch_size must be >= 1", "finetune.phase_b_epochs must be >= 0"]),
        (["model=resnet18", "model.head.dropout=1.5"], ["model.head.dropout must be in [0.0, 1.0)"]),
        (["model=resnet18", "optim.lr=fast"], ["optim.lr must be a number, got 'fast'"]),
        (["model=resnet18", "resume=maybe"], ["resume must be one of false, true, auto"]),
        (["model=resnet18", "profile.runtime=jit"], ["profile.runtime must be one of auto, eager, torchscript, compile, cudagraph"]),
        (["model=resnet18", "tune.lr_find=true", "tune.num_training=1"], ["tune.num_training must be >= 2"]),
        (["model=resnet18", "seed=-1"], ["seed must be in [0, 4294967296), got -1"]),
        (["model=resnet18", "data.augment.policy=augmix"], ["data.augment.policy must be one of none, trivialaugment, randaugment, autoaugment"]),
        (["model=resnet18", "optim._target_=torch.optim.Adamw"], ["optim._target_=torch.optim.Adamw is not an importable class: did you mean torch.optim.AdamW?"]),
        (["model=resnet18", "optim._target_=torch.nn.Linear"], ["optim._target_=torch.nn.Linear is not a torch.optim.Optimizer"]),
        (["model=resnet18", "loss.label_smoothing=1.5"], ["loss.label_smoothing must be in [0.0, 1.0), got 1.5"]),
        (["model=resnet18", "profile.repeats=0"], ["profile.repeats must be >= 1, got 0"]),
        (["model=resnet18", "optim=adamw", "optim.weight_decay=-1"], ["optim._target_=torch.optim.AdamW refuses these settings: Invalid weight_decay value: -1"]),
        (["model=resnet18", "model.head.hidden_dim=-5"], ["model.head.hidden_dim must be >= 0, got -5"]),
        (["model=resnet18", "data.split=0.7"], ["data.split must be three non-negative fractions (train, val, test; train > 0) summing to 1, got 0.7"]),
        (["model=resnet18", "data.augment.crop_scale=[1.2,0.5]"],
         ["data.augment.crop_scale must be [low, high], fractions of the image's area with 0 < low <= high <= 1, got [1.2, 0.5]"]),
        (["model=resnet18", "data.augment.rotation=-10", "data.augment.shear=abc"],
         ["data.augment.rotation must be >= 0.0, got -10", "data.augment.shear must be a number, got 'abc'"]),
        (["model=resnet18", "callbacks=ema", "callbacks.ema.decay=null", "loss.label_smoothing=null", "data.augment.mixup_alpha=null"],
         ["callbacks.ema.decay must be a number, got null", "loss.label_smoothing must be a number, got null",
          "data.augment.mixup_alpha must be a number, got null"]),
        (["model=resnet18", "loss=focal", "loss.gamma=null"], ["loss.gamma must be a number, got null"]),
        (["model=resnet18", "tune.use_suggestion=true"],
         ["tune.use_suggestion=true trains at the LR finder's suggestion, but tune.lr_find=false runs no finder"]),
        (["model=resnet18", "tune.lr_find=true", "tune.min_lr=1", "tune.max_lr=1e-3"], ["tune.min_lr=1 must be below tune.max_lr=0.001"]),
        (["model=resnet18", "optim.warmup_epochs=1"], ["optim.warmup_epochs=1 ramps up into the cosine schedule, but optim.scheduler=null"]),
        (["model=resnet18", "optim.scheduler=cosine", "optim.warmup_epochs=2"], ["optim.warmup_epochs=2 is the whole run (2 epochs)"]),
        (["model=resnet18", "callbacks=early_stopping", "callbacks.early_stopping.monitor=val/accuracy", "callbacks.model_checkpoint.mode=min"],
         ["callbacks.early_stopping.monitor=val/accuracy: tlexp logs no such metric; monitor one of val/acc, val/loss, train/acc, train/loss",
          "callbacks.model_checkpoint.mode=min: val/acc is better higher, so give callbacks.model_checkpoint.mode=max"]),
        (["model=resnet18", "callbacks=early_stopping", "callbacks.early_stopping.patience=abc"],
         ["callbacks.early_stopping.patience must be an integer, got 'abc'"]),
        (["model=resnet18", "perf.feature_cache=off", "data.augment.hflip=no"],
         ["data.augment.hflip must be one of true, false, got no", "perf.feature_cache must be one of true, false, got off"]),
        (["model=resnet18", "trainer.precision=64", "trainer.accumulate_grad_batches=0", "trainer.gradient_clip_val=-1"],
         ["trainer.accumulate_grad_batches must be >= 1, got 0", "trainer.gradient_clip_val must be >= 0.0, got -1",
          "trainer.precision must be one of auto, 32-true, bf16-mixed, 16-mixed, bf16-true, 16-true, 32, 16, bf16, got 64"]),
        (["model=resnet18", "data.image_size=100000"], ["data.image_size must be in [16, 4096), got 100000"]),
        (["model=timm", "model.name=vit_tiny_patch16_224", "strategy=frozen"],  # FAST's data.image_size=32
         ["vit_tiny_patch16_224 cannot take 32x32 images (Input height (32) doesn't match model (224).): give data.image_size=224"]),
        (["model=resnet18", "trainer.accelerator=cpu", "trainer.devices=0"],
         ["Lightning refuses the trainer settings: `Trainer(devices=0)` value is not a valid input using cpu accelerator"]),
        (["model=resnet18", "callbacks.lr_monitor.logging_interval=hour"],
         ["callbacks.lr_monitor: MisconfigurationException: logging_interval should be `step` or `epoch` or `None`."]),
        (["model=resnet18", "data.kind=tf_flower", "model.source=torchvison"],
         ["data.kind must be one of imagefolder, tf_flowers, got tf_flower", "model.source must be one of torchvision, timm, got torchvison"]),
        (["model=resnet18", "loss.class_weights=Auto"], ["loss.class_weights=Auto: give auto, null or 3 non-negative numbers"]),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path, tiny_tree, overrides, fragments):
    result = train(tmp_path / "run", tiny_tree, *overrides, check=False)
    _assert_clean_failure(result, *fragments)
    failed = read_metrics(tmp_path / "run")  # recorded for sweeps, never mistaken for a result
    assert failed["status"] == "failed" and fragments[0] in failed["error"] and "test_acc" not in failed
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert fragments[0] in (tmp_path / "run" / "train.log").read_text() and fragments[0] not in result.stdout  # said once on the terminal


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["finetune.phase_a_epochs=0", "finetune.phase_b_epochs=0"],
         "no epoch to train: finetune.phase_a_epochs=0 and finetune.phase_b_epochs=0: set either to >= 1 (or trainer.max_epochs)"),
        (["strategy=frozen", "finetune.phase_a_epochs=0"],
         "no epoch to train: strategy=frozen trains in phase A only and finetune.phase_a_epochs=0: set finetune.phase_a_epochs >= 1"),
        (["strategy=blocks_2", "finetune.phase_b_epochs=0"],
         ("strategy=blocks_2 unfreezes backbone modules in phase B, but finetune.phase_b_epochs=0: "
          "use strategy=frozen for a head-only run, or give finetune.phase_b_epochs >= 1")),
        (["strategy=blocks_2", "finetune.backbone_lr_factor=0"],
         ("strategy=blocks_2 unfreezes backbone modules in phase B, but finetune.backbone_lr_factor=0 gives them "
          "learning rate 0: use strategy=frozen for a head-only run, or give finetune.backbone_lr_factor > 0")),
        (["trainer=ddp"],
         "trainer.accelerator=gpu, but this machine has no GPU (torch.cuda.is_available() is false): use trainer=ddp_cpu (DDP over 2 CPU processes)"),
    ],
)
def test_a_run_that_would_train_nothing_or_on_a_missing_gpu_is_refused(tmp_path, tiny_tree, monkeypatch, overrides, message):
    """Was: 'completed' with no checkpoint, or with blocks_2's modules recorded though phase B never ran;
    trainer=ddp without a GPU ended in Lightning's traceback (exit 1)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, on a GPU machine too
    result = train(tmp_path / "run", tiny_tree, "model=resnet18", *overrides, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == f"tlexp-train: error: {message}"
    failed = read_metrics(tmp_path / "run")
    assert failed["status"] == "failed" and failed["error"].endswith(message)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_nonsense_sweep_jobs_is_one_clear_error_before_any_job(tmp_path):
    """perf.sweep_jobs is read by the launcher, before any job (and its config check) runs."""
    result = run_cli("-m", "strategy=frozen,blocks_2", "perf.sweep_jobs=0", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("tlexp-train: error: perf.sweep_jobs=0: give auto")
    assert not list((tmp_path / "sweep").glob("*/metrics.json"))


def test_missing_and_empty_data_roots(tmp_path):
    _assert_clean_failure(train(tmp_path / "r1", tmp_path / "nowhere", "model=resnet18", check=False), "does not exist")
    (tmp_path / "empty").mkdir()
    _assert_clean_failure(train(tmp_path / "r2", tmp_path / "empty", "model=resnet18", check=False), "no class sub-folders")
    make_image_tree(tmp_path / "holey", {"a": 3, "b": 3})
    (tmp_path / "holey" / "c").mkdir()
    _assert_clean_failure(train(tmp_path / "r3", tmp_path / "holey", "model=resnet18", check=False), "no images", ": c")


def test_imagefolder_without_root_says_so(tmp_path):
    result = run_cli(*[o for o in FAST], "model=resnet18", f"hydra.run.dir={tmp_path / 'run'}")
    _assert_clean_failure(result, "data.root")


def test_unknown_key_is_one_line(tmp_path, tiny_tree):
    result = train(tmp_path / "run", tiny_tree, "model=resnet18", "optim.learning_rate=0.1", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("tlexp-train: error: optim.learning_rate is not a setting")
    assert not (tmp_path / "run").exists()  # refused before Hydra makes the run dir


def test_checkpoint_from_another_model_or_classes_is_refused(tmp_path, tiny_tree):
    train(tmp_path / "src", tiny_tree, "model=resnet18", "strategy=frozen")
    ckpt = tmp_path / "src" / "checkpoints" / "last.ckpt"
    other_model = train(tmp_path / "r1", tiny_tree, "model=mobilenet_v2", f"ckpt_path={ckpt}", check=False)
    _assert_clean_failure(other_model, "holds a resnet18", "model=")
    four = make_image_tree(tmp_path / "four", {"a": 4, "b": 4, "c": 4, "d": 4})
    other_classes = train(tmp_path / "r2", four, "model=resnet18", f"ckpt_path={ckpt}", check=False)
    _assert_clean_failure(other_classes, "resuming would change what the run that wrote", f"data.root: '{tiny_tree}' -> '{four}'")


def test_a_weights_file_that_is_not_one_or_does_not_fit(tmp_path, tiny_tree):
    import torchvision

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x04 not a pickle")
    _assert_clean_failure(train(tmp_path / "r1", tiny_tree, "model=resnet18", f"model.weights={garbage}", check=False),
                          "is not a PyTorch weights file")
    other = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), other)
    _assert_clean_failure(train(tmp_path / "r2", tiny_tree, "model=resnet18", f"model.weights={other}", check=False),
                          "does not fit ResNet: 96 in the file not its (layer1.2.bn1.bias, ")


def test_local_weights_file(tmp_path, tiny_tree):
    import torchvision

    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    train(tmp_path / "run", tiny_tree, "model=resnet18", f"model.weights={weights}", "strategy=frozen")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["weights"] == str(weights)
    torch.save(torchvision.models.resnet34().state_dict(), weights)
    _assert_clean_failure(train(tmp_path / "r2", tiny_tree, "model=resnet18", f"model.weights={weights}", check=False), "does not fit ResNet")


def test_cosine_schedule_decays_both_groups_from_their_own_rates(tmp_path, tiny_tree):
    train(tmp_path / "run", tiny_tree, "model=resnet18", "strategy=full", "optim.scheduler=cosine", "finetune.phase_b_epochs=3")
    history = read_metrics(tmp_path / "run")["history"]
    heads = [e["lr_head"] for e in history]
    assert heads[0] == pytest.approx(1e-3) and heads == sorted(heads, reverse=True) and heads[-1] < 1e-3
    assert all(e["lr_backbone"] == pytest.approx(0.1 * e["lr_head"]) for e in history)


def test_early_stopping_config_adds_the_callback(compose_cfg):
    cfg = compose_cfg("callbacks=early_stopping")
    assert cfg.callbacks.early_stopping.monitor == "val/acc" and cfg.callbacks.model_checkpoint.filename == "best"


@pytest.mark.parametrize(("strategy", "phase_a", "phase_b"), [("blocks_1", 2, 1), ("frozen", 1, 0)])
def test_early_stopping_waits_for_phase_b(tmp_path, tiny_tree, strategy, phase_a, phase_b):
    """A threshold met at once stops at the first check: phase A's head plateaus early, and a stop there ended
    runs before their strategy unfroze anything (was: a blocks_1 run stopped after epoch 0, phase_b_epochs 0,
    recorded as completed). Without a phase B, early stopping counts from the start, as Lightning's does."""
    train(tmp_path / "run", tiny_tree, "model=resnet18", f"strategy={strategy}", "callbacks=early_stopping",
          "+callbacks.early_stopping.stopping_threshold=0.0", "finetune.phase_a_epochs=2", "finetune.phase_b_epochs=3")
    metrics = read_metrics(tmp_path / "run")
    assert (metrics["phase_a_epochs"], metrics["phase_b_epochs"]) == (phase_a, phase_b)


def test_outputs_stay_in_the_run_dir_and_the_data_dir(tmp_path, tiny_tree):
    """Nothing lands in the working directory: Hydra's run dir and $TLEXP_DATA_DIR hold everything."""
    cwd, data_dir = tmp_path / "cwd", tmp_path / "data"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TLEXP_DATA_DIR": str(data_dir)}
    result = subprocess.run(
        [sys.executable, "-m", "tlexp.train", *FAST, f"data.root={tiny_tree}", f"hydra.run.dir={tmp_path / 'run'}", "model=resnet18"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(cwd.iterdir()) == []
    assert {p.name for p in data_dir.iterdir()} == {"feature_cache", "image_checks.json"}
    assert read_metrics(tmp_path / "run")["status"] == "completed"


def test_trainer_keys_pass_through(tmp_path, tiny_tree):
    """Issue 16: any pl.Trainer argument; trainer.max_epochs overrides the phases' sum."""
    train(tmp_path / "short", tiny_tree, "model=resnet18", "strategy=blocks_1", "trainer.max_epochs=1")
    assert read_metrics(tmp_path / "short")["epochs"] == 1
    train(tmp_path / "limited", tiny_tree, "model=resnet18", "+trainer.limit_train_batches=1")
    assert read_metrics(tmp_path / "limited")["status"] == "completed"


@pytest.mark.parametrize("preset", ["fdr", "limit", "overfit", "profiler"])
def test_debug_presets_run(tmp_path, tiny_tree, preset):
    """lightning-hydra-template's debug presets: each ends in a completed record."""
    extra = ["finetune.phase_a_epochs=2", "finetune.phase_b_epochs=1"] if preset == "overfit" else []
    result = train(tmp_path / "run", tiny_tree, "model=resnet18", f"debug={preset}", *extra)
    metrics = read_metrics(tmp_path / "run")
    assert metrics["status"] == "completed" and 0.0 <= metrics["test_acc"] <= 1.0
    if preset == "fdr":
        assert "no checkpoint was saved" in result.stdout + result.stderr
    if preset == "profiler":  # the reports are files in the run dir, and the log says where
        for stage in ("fit", "test"):
            assert f"{stage.upper()} Profiler Report" in (tmp_path / "run" / f"{stage}-profiler.txt").read_text()
            assert str(tmp_path / "run" / f"{stage}-profiler.txt") in (tmp_path / "run" / "train.log").read_text()


def test_any_torch_optimizer_and_the_onecycle_schedule(tmp_path, tiny_tree):
    """Issue 16: optim._target_ names any torch.optim class; onecycle steps per batch, each group peaking at its rate."""
    train(tmp_path / "sgd", tiny_tree, "model=resnet18", "strategy=full", "optim=sgd", "optim.scheduler=onecycle", "finetune.phase_b_epochs=2")
    history = read_metrics(tmp_path / "sgd")["history"]
    heads = [e["lr_head"] for e in history]
    assert max(heads) <= 0.01 * (1 + 1e-6) and heads[-1] < heads[1]
    assert all(e["lr_backbone"] == pytest.approx(0.1 * e["lr_head"]) for e in history)
    train(tmp_path / "rms", tiny_tree, "model=resnet18", "optim._target_=torch.optim.RMSprop", "+optim.alpha=0.95")
    assert read_metrics(tmp_path / "rms")["status"] == "completed"
    _assert_clean_failure(
        train(tmp_path / "bad", tiny_tree, "model=resnet18", "optim=sgd", "optim._target_=torch.optim.RMSprop", check=False),
        "torch.optim.RMSprop does not take these settings", "nesterov",
    )


def test_cosine_warmup_ramps_then_decays(tmp_path, tiny_tree):
    train(tmp_path / "run", tiny_tree, "model=resnet18", "strategy=full", "optim.scheduler=cosine", "optim.warmup_epochs=2",
          "finetune.phase_b_epochs=3")
    heads = [e["lr_head"] for e in read_metrics(tmp_path / "run")["history"]]
    assert heads[0] == pytest.approx(1e-4) and heads[1] > heads[0] and heads[2] == pytest.approx(1e-3) and heads[3] < heads[2]


def test_help_offers_only_options_that_can_be_chosen():
    """Issue 16: no internal fragment (model=_head, data=_common) in --help or tab completion."""
    result = run_cli("--help")
    groups = dict(line.split(": ", 1) for line in result.stdout.split("== Config ==")[0].splitlines() if ": " in line)
    options = [o.strip() for listed in groups.values() for o in listed.split(",")]
    assert "mobilenet_v1" in groups["model"] and "imagefolder" in groups["data"]
    assert not [o for o in options if o.startswith("_")]


# pyproject.toml's [project.scripts], name -> module:function (tomllib is Python 3.11's)
SCRIPTS = dict(re.findall(r'^(tlexp-\S+) = "(\S+)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE))


@pytest.mark.parametrize("unbuffered", ["", "1"])  # the write fails at once (PYTHONUNBUFFERED=1), or in the exit's flush
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_reader_that_closes_the_pipe_early_ends_the_command_quietly(script, unbuffered):
    """`tlexp-train --help | head -3`: a reader gone before the output is written (head's race, made certain: the read
    end closed before the command starts) ends it with no word on stderr (was: a BrokenPipeError traceback, or
    "Exception ignored ... BrokenPipeError" and exit 120)."""
    module, function = SCRIPTS[script].split(":")
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run(
            [sys.executable, "-c", f"import sys; from {module} import {function}; sys.argv[0] = {script!r}; sys.exit({function}())", "--help"],
            stdout=writer, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=120, check=False,
            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": unbuffered},
        )
    finally:
        os.close(writer)
    assert result.stderr == "" and result.returncode in (0, 1), (result.returncode, result.stderr[-2000:])  # 0: argparse drops it itself


@pytest.mark.parametrize(
    "overrides,error",
    [
        (["strategy=blocks_x"], "tlexp-train: error: unknown strategy 'blocks_x'"),
        (["optim.lr=-1"], "tlexp-train: error: optim.lr must be > 0, got -1"),
    ],
)
def test_cfg_job_refuses_what_the_run_would_refuse(overrides, error):
    """Issue 16: `--cfg job` showed configs that fail at run time; it now runs the same checks first."""
    result = run_cli("--cfg", "job", "model=resnet18", *overrides)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(error), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    shown = run_cli("--cfg", "job", "model=resnet18", "strategy=blocks_2", "optim.lr=0.01")
    assert shown.returncode == 0 and "strategy: blocks_2" in shown.stdout and "lr: 0.01" in shown.stdout


@pytest.mark.parametrize(
    "module,args,error",
    [
        ("tlexp.train", ["model=resnet5O"], "tlexp-train: error: model=resnet5O: no such option (did you mean resnet50?); the options are "),
        ("tlexp.train", ["-m", "strategy=frozen", "optim=adam,adamm"], "tlexp-train: error: optim=adamm: no such option (did you mean adam?)"),
        ("tlexp.train", ["data.batchsize=8"], "tlexp-train: error: data.batchsize is not a setting (did you mean data.batch_size?)"),
        ("tlexp.train", ["lr=0.1"], "tlexp-train: error: lr is not a setting (did you mean optim.lr?)"),
        ("tlexp.train", ["model=timm"], "tlexp-train: error: model.name has no value: give model.name=..."),
        ("tlexp.train", ["callbacks=[early_stopping,emma]"], "tlexp-train: error: callbacks=emma: no such option (did you mean ema?)"),
        ("tlexp.train", ["lr=0.1", "data.batchsize=3"], "tlexp-train: error: lr is not a setting (did you mean optim.lr?)"),
        ("tlexp.predict", ["ckpt=best.ckpt"], "tlexp-predict: error: images has no value: give images=..."),
        ("tlexp.export", [], "tlexp-export: error: ckpt has no value: give ckpt=..."),
        ("tlexp.predict", ["ckpt=best.ckpt", "images=x", "csv=~/p.csv"],
         "tlexp-predict: error: csv=~/p.csv: Hydra reads a ~ after = as its delete operator: quote the value for Hydra, \"csv='~/p.csv'\""),
    ],
)
def test_what_hydra_would_refuse_in_twenty_lines_is_one(module, args, error):
    """A typo in a config group's option or a setting's name, or a required value left out: one line, exit 2,
    where Hydra printed its search path or a traceback (exit 1)."""
    result = run_module(module, *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(error), result.stderr


def test_the_preflight_passes_what_hydra_takes():
    """A list of a group's options, and --cfg job of a config with a required value still to give (shown as ???)."""
    result = run_module("tlexp.train", "--cfg", "job", "model=timm", "callbacks=[early_stopping,ema]")
    assert result.returncode == 0 and "name: ???" in result.stdout and "ema:" in result.stdout, result.stderr[-2000:]


def test_a_new_setting_named_like_an_existing_one_is_warned_about():
    """`+data.batchsize=8` (the usual next try after "not a setting") is taken, and nothing reads it."""
    result = run_module("tlexp.train", "--cfg", "job", "model=resnet18", "+data.batchsize=8", "+trainer.max_time=00:00:10:00")
    assert result.returncode == 0 and "batchsize: 8" in result.stdout
    assert result.stderr.strip().splitlines() == ["tlexp-train: warning: +data.batchsize adds a new setting (did you mean data.batch_size?)"]


def test_a_default_run_prints_no_warning(tmp_path, tiny_tree):
    """Issue 16: nothing a user cannot act on (Lightning's tips, library warnings) in a run with default settings."""
    result = run_cli("model.weights=null", "data=imagefolder", f"data.root={tiny_tree}", "data.image_size=32", "data.num_workers=0",
                     "finetune.phase_a_epochs=1", "finetune.phase_b_epochs=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    noisy = [line for line in (result.stdout + result.stderr).splitlines() if "warn" in line.lower() or "tip" in line.lower()]
    assert noisy == []
