"""Parameter counts, FLOPs and inference speed of a trained model, measured the same way every run."""

from __future__ import annotations

import platform
import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def gflops_per_image(model: nn.Module, image_size: int) -> float:
    """Forward FLOPs of one image at the run's input size (a multiply-add counts as 2)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model.eval()(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


def median_seconds(run, batch, warmup: int, repeats: int) -> float:
    """Median wall time of ``run(batch)`` after ``warmup`` calls (a model, or an ONNX Runtime call)."""
    with torch.inference_mode():
        for _ in range(warmup):
            run(batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def inference_speed(model: nn.Module, image_size: int, batch_size: int, warmup: int, repeats: int) -> dict:
    """ms/image at batch 1 (the reference study's figure) and images/s at ``batch_size``, in eval mode."""
    model = model.eval()
    one = median_seconds(model, torch.zeros(1, 3, image_size, image_size), warmup, repeats)
    many = median_seconds(model, torch.zeros(batch_size, 3, image_size, image_size), warmup, repeats)
    return {
        "ms_per_image": one * 1e3,
        "images_per_s": batch_size / many,
        "speed_setup": {
            "device": "cpu",
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "batch_sizes": [1, batch_size],
            "warmup": warmup,
            "repeats": repeats,
            "statistic": "median",
            "torch": torch.__version__,
        },
    }
