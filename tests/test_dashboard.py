"""What a person looks at after a run: TensorBoard's tags, the PNGs, the summaries, the LR finder, the screenshot."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from tests.conftest import REPO, read_metrics, train


@pytest.fixture(scope="module")
def dashboard_run(tmp_path_factory):
    from tests.conftest import make_image_tree

    root = tmp_path_factory.mktemp("dashboard")
    tree = make_image_tree(root / "images", {"red": 12, "green": 12, "blue": 12})
    train(root / "run", tree, "model=resnet18", "tune.lr_find=true", "tune.num_training=30", "dashboard.misclassified_images=3",
          "trainer.log_every_n_steps=1")
    return root / "run"


def _events(run):
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    return events


def test_tensorboard_shows_rates_phases_and_test_images(dashboard_run):
    events = _events(dashboard_run)
    tags = events.Tags()
    assert {"lr-Adam/head", "lr-Adam/backbone", "train/acc", "val/acc", "finetune/phase_b", "tune/lr_suggestion"} <= set(tags["scalars"])
    assert {"test/confusion_matrix", "test/misclassified", "tune/lr_find"} <= set(tags["images"])
    phase_text = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("finetune/phase/text_summary")]
    assert [t.split(" from")[0] for t in phase_text] == ["phase A", "phase B"]
    head = events.Scalars("lr-Adam/head")
    backbone = events.Scalars("lr-Adam/backbone")
    assert backbone[0].value == pytest.approx(head[0].value * 0.1)  # finetune.backbone_lr_factor
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    # issue 16: step-level loss, and HParams with every setting that moves results
    assert "train/loss_step" in tags["scalars"]
    start = plugin_data_pb2.HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert {"weight_decay", "scheduler", "label_smoothing", "dropout", "image_size", "augment", "precision", "perf", "ema_decay", "tta"} <= set(
        start.session_start_info.hparams
    )


def test_run_dir_keeps_pictures_and_summaries(dashboard_run):
    metrics = read_metrics(dashboard_run)
    for name in ("confusion_matrix.png", "misclassified.png", "lr_find.png"):
        assert (dashboard_run / name).stat().st_size > 5_000, name
    table = (dashboard_run / "model_summary.txt").read_text()
    trainable = table.split("trainable")[-1].split()
    assert trainable[1:3] == ["│", f"{metrics['trainable_params_phase_a']:,}"]
    assert f"{metrics['trainable_params']:,}" in table and "layer4.1" in table
    summary = (dashboard_run / "summary.txt").read_text()
    assert f"{100 * metrics['test_acc']:.2f} %" in summary
    assert f"tensorboard --logdir {dashboard_run / 'tensorboard'}\n" in summary
    assert f"hydra.run.dir={dashboard_run} resume=true\n" in summary
    assert metrics["feature_cache"] == {"enabled": True, "phase_a": 0, "phase_b": 4}  # said in words (was: "0/4 fixed views")
    assert "(phase A clean crops, B 4 fixed augmented views)" in summary


def test_lr_finder_suggests_without_overriding_by_default(dashboard_run):
    metrics = read_metrics(dashboard_run)
    assert metrics["lr_find"]["suggestion"] > 0 and metrics["lr_find"]["steps"] == 30
    assert metrics["lr_find"]["used"] is False and metrics["lr"] == 1e-3  # optim/adam.yaml's rate
    assert not list(dashboard_run.glob(".lr_find*"))  # Lightning's temporary checkpoint is gone


def test_lr_finder_suggestion_can_be_used(tiny_tree, tmp_path):
    # cosine: the search's trainer is open-ended (max_epochs=-1), the schedule's length the run's
    result = train(tmp_path / "run", tiny_tree, "tune.lr_find=true", "tune.num_training=20", "tune.use_suggestion=true",
                   "model=resnet18", "optim.scheduler=cosine")
    assert "Finding best initial lr" not in result.stderr  # issue 16: no tqdm bar where the run shows none
    metrics = read_metrics(tmp_path / "run")
    assert metrics["lr_find"]["used"] is True and metrics["lr"] == metrics["lr_find"]["suggestion"]
    split = metrics["time_split"]  # the search is before fitting, counted once: the parts fit in the run's own time
    parts = sum(split[k] for k in ("before_fit_s", "fit_s", "test_s", "speed_s"))
    assert split["started_at"] + parts <= (tmp_path / "run" / "metrics.json").stat().st_mtime + 0.05
    head = _events(tmp_path / "run").Scalars("lr-Adam/head")[0].value
    assert head == pytest.approx(metrics["lr"])


def test_lr_finder_with_too_few_steps_is_one_clear_error(tiny_tree, tmp_path):
    result = train(tmp_path / "run", tiny_tree, "model=resnet18", "tune.lr_find=true", "tune.num_training=5", check=False)
    assert result.returncode == 2 and "too few points for a suggestion" in result.stderr
    assert "Traceback" not in result.stderr and read_metrics(tmp_path / "run")["status"] == "failed"


needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Debian's chromium (`make browser`; .ci/run installs it)"
)


@needs_chromium
def test_screenshot_script_renders_the_dashboard(dashboard_run, tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/tensorboard_screenshot.py", str(dashboard_run / "tensorboard"), str(tmp_path / "tb")],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for page in ("scalars", "images"):
        assert (tmp_path / f"tb_{page}.png").stat().st_size > 20_000


@needs_chromium
def test_screenshot_script_refuses_a_run_without_scalars(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, "scripts/tensorboard_screenshot.py", str(tmp_path / "empty"), str(tmp_path / "tb"), "--timeout", "5"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode != 0 and "did not serve the scalars" in result.stderr + result.stdout
    assert not list(tmp_path.glob("tb_*.png"))


@pytest.mark.parametrize("loggers", [[], ["~logger.tensorboard"]], ids=["tensorboard", "no_tensorboard"])
def test_a_run_leaves_no_figure_open_and_its_event_files_written(tiny_tree, tmp_path, loggers):
    """As its job returns (a sweep's next job may run in the same process) no figure is open (was: lr_find's, without
    TensorBoard) and no event file (was: the one the HParams went to); killed then, the final metrics are on disk."""
    run, still_open = tmp_path / "run", tmp_path / "open.txt"
    result = train(run, tiny_tree, "model=resnet18", "tune.lr_find=true", "tune.num_training=20", *loggers,
                   "+hydra.callbacks.kill._target_=tests.helpers.KillAtJobEnd", f"+hydra.callbacks.kill.path={still_open}", check=False)
    assert result.returncode == -9 and read_metrics(run)["status"] == "completed", result.stderr[-2000:]
    assert still_open.read_text() == "0 0"
    if not loggers:
        assert _events(run).Scalars("final/test_acc")[0].value == pytest.approx(read_metrics(run)["test_acc"])


@pytest.mark.parametrize("classes", [5, 102])
def test_the_confusion_matrix_of_many_classes_is_a_bounded_figure(classes):
    """102 classes (Oxford Flowers) made a 73-inch, 7,300-pixel square with 10,404 count labels; now colour alone
    past 30 classes, at most 20 inches high. Five classes keep a count in every cell."""
    from tlexp.callbacks.dashboard import confusion_figure

    matrix = [[3 if i == j else 1 for j in range(classes)] for i in range(classes)]
    fig = confusion_figure(matrix, [f"class {i}" for i in range(classes)])
    width, height = fig.get_size_inches()
    counts = [t for t in fig.axes[0].texts if t.get_text().isdigit()]
    assert height <= 20 and width <= 21.5
    assert len(counts) == (classes * classes if classes <= 30 else 0)
    fig.clf()
