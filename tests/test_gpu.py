"""End to end on a CUDA GPU (``make test-gpu``); skipped where there is none, as in CI.

Without a GPU, tests/test_devices.py catches the same class of bug on the ``meta`` device.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import accuracy_on_test_split, read_metrics, run_module, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GPU = ("trainer.accelerator=gpu",)


@pytest.mark.parametrize("perf", ["fast", "naive"])
@pytest.mark.parametrize("strategy", ["frozen", "blocks_2", "full"])
def test_a_run_trains_and_times_on_the_gpu(tmp_path, tiny_tree, perf, strategy):
    run = tmp_path / "run"
    train(run, tiny_tree, *GPU, "model=resnet18", f"strategy={strategy}", f"perf={perf}")
    metrics = read_metrics(run)
    assert metrics["status"] == "completed" and metrics["speed_setup"]["device"] == "cuda"
    assert metrics["cpu"]["speed_setup"]["device"] == "cpu" and metrics["cpu"]["ms_per_image"] > 0
    assert 0 < metrics["time_split"]["speed_cpu_s"] < metrics["time_split"]["speed_s"]
    assert metrics["peak_gpu_memory_mib"] > 0
    if perf == "fast":  # fp32 and NCHW on a GPU (tlexp/perf.py); the timed path is CUDA graphs
        assert metrics["precision"] == "32-true" and metrics["speed_setup"]["runtime"] == "cudagraph"
    if perf == "fast" and strategy != "full":
        assert "frozen prefix cached up to" in (run / "train.log").read_text()


@pytest.mark.parametrize(
    "levers", [("callbacks=ema", "model.tta=flip"), ("perf=naive", "data.augment.mixup_alpha=0.4", "data.augment.cutmix_alpha=1.0")]
)
def test_the_recipe_levers_run_on_the_gpu(tmp_path, tiny_tree, levers):
    """EMA (its average on the model's device), flip TTA through the GPU cache, MixUp/CutMix after transfer."""
    run = tmp_path / "run"
    train(run, tiny_tree, *GPU, "model=resnet18", "strategy=blocks_2", *levers)
    assert read_metrics(run)["status"] == "completed"


def test_lr_finder_runs_through_the_gpu_cache(tmp_path, tiny_tree):
    run = tmp_path / "run"
    train(run, tiny_tree, *GPU, "model=resnet18", "tune.lr_find=true", "tune.num_training=20")
    assert read_metrics(run)["lr_find"]["suggestion"] > 0


def test_cudagraph_runtime_gives_eager_outputs():
    import torchvision

    from tlexp.speed.timing import VERIFY_TOLERANCE, inference_runtime

    model = torchvision.models.resnet18(num_classes=5).cuda().eval()
    x = torch.rand(1, 3, 64, 64, device="cuda")
    fast, used = inference_runtime(model, (x, x.expand(4, -1, -1, -1).contiguous()), "auto")
    assert used == "cudagraph"
    with torch.inference_mode():
        assert (fast(x) - model(x)).abs().max() < VERIFY_TOLERANCE


def test_predict_on_the_gpu_matches_the_test(tmp_path, tiny_tree):
    run = tmp_path / "run"
    train(run, tiny_tree, *GPU, "model=resnet18", "strategy=blocks_2")
    out = tmp_path / "p.csv"
    result = run_module("tlexp.predict", f"ckpt={run / 'checkpoints' / 'best.ckpt'}", f"images={tiny_tree}",
                        f"csv={out}", "num_workers=0", "device=cuda")
    assert result.returncode == 0, result.stderr[-2000:]
    assert accuracy_on_test_split(run, tiny_tree, out) == pytest.approx(read_metrics(run)["test_acc"], abs=1e-6)


@pytest.mark.parametrize("precision", ["bf16-true", "16-mixed"])
def test_half_precision_runs_train_time_and_serve_on_the_gpu(tmp_path, tiny_tree, precision):
    """bf16-true through the GPU-built cache (inputs in bf16) and served by tlexp-predict as tested; 16-mixed captured
    in CUDA graphs under autocast (checked against eager) and timed on the CPU in bf16, as Lightning runs it there."""
    run = tmp_path / "run"
    train(run, tiny_tree, *GPU, "model=resnet18", "strategy=blocks_2", f"trainer.precision={precision}")
    metrics = read_metrics(run)
    assert metrics["precision"] == precision and "frozen prefix cached up to" in (run / "train.log").read_text()
    assert metrics["speed_setup"]["runtime"] == "cudagraph" and metrics["speed_setup"]["precision"] == precision
    assert metrics["cpu"]["speed_setup"]["precision"] == ("bf16-mixed" if precision == "16-mixed" else precision)
    out = tmp_path / "p.csv"
    result = run_module("tlexp.predict", f"ckpt={run / 'checkpoints' / 'best.ckpt'}", f"images={tiny_tree}",
                        f"csv={out}", "num_workers=0", "batch_size=8", "device=cuda")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"serving in {precision} on cuda" in result.stdout + result.stderr
