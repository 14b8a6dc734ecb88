"""Parameter counts, FLOPs and inference speed of a trained model, measured the same way every run."""

from __future__ import annotations

import logging
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger(__name__)
RUNTIMES = ("eager", "torchscript", "compile")
# Largest difference from eager, relative to the output's scale (at least 1), that still counts as
# the same model (fp32 reordering only).
VERIFY_TOLERANCE = 1e-3


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


def max_relative_diff(fast, eager) -> float:
    """Largest |fast - eager| over one output or a tuple of them, relative to eager's scale (at least 1)."""
    pairs = zip(fast, eager) if isinstance(eager, tuple | list) else [(fast, eager)]
    return max(((f - e).abs().max() / e.abs().max().clamp(min=1)).item() for f, e in pairs)


def inference_runtime(
    model: nn.Module, examples: tuple[torch.Tensor, ...], runtime: str, setting: str = "profile.runtime"
) -> tuple[Callable, str]:
    """The model as ``runtime`` runs it, if it gives eager's outputs on every example; else eager (and a log line).

    ``compile``: ``torch.compile`` with inductor's freezing (weights become constants, BN folded, oneDNN
    weights pre-packed): the fastest PyTorch path on this CPU (docs/inference_paths.txt), but 20-50 s
    of compiling per input shape, so it is warmed here on each example shape.
    ``torchscript``: traced, frozen and ``optimize_for_inference``: slower than ``compile``, ready in seconds.
    """
    model = model.eval()
    if runtime == "eager":
        return model, "eager"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # TorchScript is deprecated in favour of torch.compile, which costs 20-50 s per shape here.
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*deprecated.*")
            if runtime == "torchscript":
                fast = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, examples[0])))
                diff = max(max_relative_diff(fast(x), model(x)) for x in examples)
            else:
                from torch._inductor import config as inductor_config

                fast = torch.compile(model, dynamic=False)
                # Compiling happens at each shape's first call, so freezing must be on for those calls,
                # under inference_mode as median_seconds times it (compiled under no_grad, dynamo's
                # dispatch-key guard fails there and silently recompiles outside this patch: unfrozen).
                with inductor_config.patch(freezing=True), torch.inference_mode():
                    diff = max(max_relative_diff(fast(x), model(x)) for x in examples)
    except Exception as exc:  # noqa: BLE001 -- any model the runtime cannot take runs eagerly
        log.warning("%s: %s failed for this model (%s: %s); running it eagerly", setting, runtime, type(exc).__name__, exc)
        return model, "eager"
    if diff > VERIFY_TOLERANCE:
        log.warning("%s: %s changes the outputs by %.2e (relative); running it eagerly", setting, runtime, diff)
        return model, "eager"
    return fast, runtime


def inference_speed(model: nn.Module, image_size: int, batch_size: int, warmup: int, repeats: int, runtime: str = "eager") -> dict:
    """ms/image at batch 1 (the reference study's figure) and images/s at ``batch_size``, in eval mode."""
    one_batch = torch.rand(1, 3, image_size, image_size)
    many_batch = torch.rand(batch_size, 3, image_size, image_size)
    run, used = inference_runtime(model, (one_batch, many_batch), runtime)
    one = median_seconds(run, one_batch, warmup, repeats)
    many = median_seconds(run, many_batch, warmup, repeats)
    return {
        "ms_per_image": one * 1e3,
        "images_per_s": batch_size / many,
        "speed_setup": {
            "runtime": used,
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
