"""Parameter counts, FLOPs and inference speed of a trained model, measured the same way every run."""

from __future__ import annotations

import logging
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext

import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger(__name__)
# auto: cudagraph on a GPU, torchscript on a CPU.
RUNTIMES = ("auto", "eager", "torchscript", "compile", "cudagraph")
# Largest difference from eager, relative to the output's scale (at least 1), that still counts as
# the same model (fp32 reordering only; in bf16 or fp16, see verify_tolerance).
VERIFY_TOLERANCE = 1e-3


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return platform.processor() or platform.machine()
    return device.type


def gflops_per_image(model: nn.Module, image_size: int) -> float:
    """Forward FLOPs of one image at the run's input size (a multiply-add counts as 2)."""
    counter = FlopCounterMode(display=False)
    dtype = next(model.parameters()).dtype  # a *-true run's weights are in its dtype
    with counter, torch.inference_mode():
        model.eval()(torch.zeros(1, 3, image_size, image_size, device=device_of(model), dtype=dtype))
    return counter.get_total_flops() / 1e9


def median_seconds(run, batch, warmup: int, repeats: int) -> float:
    """Median wall time of ``run(batch)`` after ``warmup`` calls (a model, or an ONNX Runtime call).

    On a GPU each call is timed to the end of its kernels (synchronized), not to their launch.
    """
    on_gpu = isinstance(batch, torch.Tensor) and batch.is_cuda
    sync = (lambda: torch.cuda.synchronize(batch.device)) if on_gpu else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            run(batch)
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            run(batch)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def max_relative_diff(fast, eager) -> float:
    """Largest |fast - eager| over one output or a tuple of them, relative to eager's scale (at least 1)."""
    pairs = zip(fast, eager) if isinstance(eager, tuple | list) else [(fast, eager)]
    return max(((f - e).abs().max() / e.abs().max().clamp(min=1)).item() for f, e in pairs)


class CudaGraphed:
    """One captured CUDA graph per input shape, replayed: a small batch on a GPU is launch-bound.

    Capturing takes milliseconds (torch.compile's ``reduce-overhead`` takes tens of seconds per
    shape). The output tensor is the graph's own and is overwritten by the next call.
    """

    def __init__(self, model: nn.Module, examples: tuple[torch.Tensor, ...]):
        if not examples[0].is_cuda:
            raise RuntimeError("CUDA graphs need the model on a CUDA device")
        self.graphs = {tuple(x.shape): self._capture(model, x) for x in examples}

    @staticmethod
    def _capture(model: nn.Module, example: torch.Tensor):
        static_in = example.clone()
        side = torch.cuda.Stream(example.device)
        side.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):  # cuDNN picks its kernels outside the capture
                model(static_in)
        torch.cuda.current_stream(example.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            static_out = model(static_in)
        return static_in, graph, static_out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        static_in, graph, static_out = self.graphs[tuple(x.shape)]
        static_in.copy_(x)
        graph.replay()
        return static_out


def verify_tolerance(model: nn.Module, device: torch.device) -> float:
    """VERIFY_TOLERANCE, or four units of bf16's or fp16's precision where the model runs in one (autocast,
    or ``*-true`` weights): reordered ops differ by that much there (ResNet-18 traced in bf16: 3e-3)."""
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    else:
        dtype = next(model.parameters(), torch.empty(0)).dtype
    return max(VERIFY_TOLERANCE, 4 * torch.finfo(dtype).eps)


def resolve_runtime(runtime: str, device: torch.device) -> str:
    """``auto`` per device; a GPU-only runtime asked of a CPU becomes the CPU's choice."""
    if runtime == "auto" or (runtime == "cudagraph" and device.type != "cuda"):
        return "cudagraph" if device.type == "cuda" else "torchscript"
    return runtime


def inference_runtime(
    model: nn.Module, examples: tuple[torch.Tensor, ...], runtime: str, setting: str = "profile.runtime"
) -> tuple[Callable, str]:
    """The model as ``runtime`` runs it, if it gives eager's outputs on every example; else eager (and a log line).

    ``compile``: ``torch.compile`` with inductor's freezing (weights become constants, BN folded, oneDNN
    weights pre-packed): the fastest PyTorch path on this CPU (docs/inference_paths.txt), but 20-50 s
    of compiling per input shape, so it is warmed here on each example shape.
    ``torchscript``: traced, frozen and ``optimize_for_inference``: slower than ``compile``, ready in seconds.
    ``cudagraph``: the eager model captured once per shape and replayed (CUDA only).
    """
    model = model.eval()
    # A fallback is part of what ``auto`` means (the fastest runtime that verifies): said, not warned of.
    fall_back = log.info if runtime == "auto" else log.warning
    setting = f"{setting}={runtime}" if runtime == "auto" else setting
    runtime = resolve_runtime(runtime, examples[0].device)
    if runtime == "eager":
        return model, "eager"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # TorchScript is deprecated in favour of torch.compile, which costs 20-50 s per shape here.
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*deprecated.*")
            if runtime == "torchscript":
                fast = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, examples[0])))
                diff = max(max_relative_diff(fast(x), model(x)) for x in examples)
            elif runtime == "cudagraph":
                fast = CudaGraphed(model, examples)
                with torch.inference_mode():
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
        fall_back("%s: %s failed for this model (%s: %s); running it eagerly", setting, runtime, type(exc).__name__, exc)
        return model, "eager"
    if diff > verify_tolerance(model, examples[0].device):
        fall_back("%s: %s changes the outputs by %.2e (relative); running it eagerly", setting, runtime, diff)
        return model, "eager"
    return fast, runtime


def precision_on(precision: str, device: torch.device) -> str:
    """``precision`` as Lightning runs it on ``device``: a CPU runs 16-mixed as bf16-mixed."""
    return "bf16-mixed" if precision == "16-mixed" and device.type == "cpu" else precision


def precision_context(precision: str, device: torch.device):
    """Lightning's forward context for ``precision``: autocast for the mixed ones. A ``*-true`` run's
    weights are in their dtype already (Lightning converted them), so its inputs are made in it."""
    return MixedPrecision(precision, device.type).forward_context() if precision.endswith("-mixed") else nullcontext()


def inference_speed(
    model: nn.Module, image_size: int, batch_size: int, warmup: int, repeats: int, runtime: str = "eager", precision: str = "32-true"
) -> dict:
    """ms/image at batch 1 (the reference study's figure) and images/s at ``batch_size``, in eval mode, on the
    model's device, in the run's ``precision`` (``trainer.precision``): the figures of the model that was tested."""
    device, started = device_of(model), time.perf_counter()
    precision = precision_on(precision, device)
    dtype = next(model.parameters()).dtype
    one_batch = torch.rand(1, 3, image_size, image_size, device=device, dtype=dtype)
    many_batch = torch.rand(batch_size, 3, image_size, image_size, device=device, dtype=dtype)
    with precision_context(precision, device):
        run, used = inference_runtime(model, (one_batch, many_batch), runtime)
        one = median_seconds(run, one_batch, warmup, repeats)
        many = median_seconds(run, many_batch, warmup, repeats)
    return {
        "ms_per_image": one * 1e3,
        "images_per_s": batch_size / many,
        "speed_setup": {
            "runtime": used,
            "precision": precision,
            "device": device.type,
            "device_name": device_name(device),
            "threads": torch.get_num_threads(),
            "batch_sizes": [1, batch_size],
            "warmup": warmup,
            "repeats": repeats,
            "statistic": "median" + (" (CUDA-synchronized)" if device.type == "cuda" else ""),
            "torch": torch.__version__,
            "seconds": time.perf_counter() - started,  # the runtime's preparation included: what timing costs a run
        },
    }


def speed_on_devices(model: nn.Module, device: torch.device, image_size: int, profile, precision: str = "32-true") -> dict:
    """Speed on the training device; after a GPU run, the CPU's figures too (``cpu``), for serving without one."""
    args = (image_size, profile.batch_size, profile.warmup, profile.repeats, profile.runtime, precision)
    figures = inference_speed(model.to(device), *args)
    if device.type != "cpu":
        figures["cpu"] = inference_speed(model.cpu(), *args)
    return figures
