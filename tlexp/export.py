"""``tlexp-export ckpt=<run>/checkpoints/best.ckpt``: ONNX and TorchScript files that are checked, not trusted.

Both files map a normalized image batch (N, 3, crop, crop) to logits. ``model.json`` beside them
says how to feed them (crop and resize size, mean, std, interpolation, class names) and what the
check found: each export's largest probability difference from the PyTorch model on real images,
and the batch-1 latency of PyTorch and ONNX Runtime measured side by side.
The files reach the output folder only once the check passes: a failed check leaves it as it was.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tlexp.config import check_export_config
from tlexp.data.files import SUBSETS
from tlexp.data.images import bad_image_policy, load_rgb
from tlexp.data.transforms import eval_transform
from tlexp.errors import TlexpError
from tlexp.model.module import MirrorAveraged
from tlexp.predict import list_images, load_model
from tlexp.speed.timing import inference_runtime, median_seconds

log = logging.getLogger("tlexp.export")
# The exporters' progress chatter (~30 lines per export) would bury the 3-line result; their
# warnings and errors still show. TorchScript's deprecation is torch's: the format is still served.
for _chatty in ("onnxscript", "onnx_ir", "torch.onnx", "torch.utils.cpp_extension"):
    logging.getLogger(_chatty).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)


def _images_of_run(ckpt: Path) -> list[Path]:
    """The test images of the run the checkpoint came from (its split.csv) that are still there."""
    split_file = ckpt.resolve().parent.parent / "split.csv"
    config = ckpt.resolve().parent.parent / ".hydra" / "config.yaml"
    if not split_file.exists() or not config.exists():
        raise TlexpError("no images to verify the export on: pass images=<file|folder|glob> (the run's split.csv was not found)")
    root = Path(str(OmegaConf.load(config).data.root)).expanduser()
    with open(split_file, encoding="utf-8", errors="surrogateescape") as f:
        rows = [r for r in csv.DictReader(f) if r["subset"] == SUBSETS[2]]
    files = [root / r["path"] for r in rows if (root / r["path"]).exists()]
    if not files:  # the data moved, or data.root was relative to another working directory
        raise TlexpError(f"none of the {len(rows)} test images in {split_file} is under data.root={root} now: pass images=<file|folder|glob>")
    return files


def _decoding(files: list[Path], wanted: int) -> tuple[list[Path], dict[Path, str]]:
    """The first ``wanted`` files that decode, and those that did not (left out with a warning, not a
    traceback); decoded a batch at a time, so a folder of thousands costs only what the check uses."""
    good, bad = [], {}
    for start in range(0, len(files), wanted):
        batch = files[start:start + wanted]
        bad |= bad_image_policy(batch, "skip", None, None, torch.get_num_threads())
        good += [f for f in batch if f not in bad]
        if len(good) >= wanted:
            break
    return good[:wanted], bad


def export(cfg: DictConfig) -> dict:
    check_export_config(cfg)
    ckpt = Path(cfg.ckpt).expanduser()
    out = Path(cfg.out).expanduser() if cfg.out else ckpt.resolve().parent.parent / "export"
    if out.exists() and not out.is_dir():
        raise TlexpError(f"out={cfg.out} is a file: give a folder for the exported files")
    # NCHW: torch.export cannot take a dynamic batch in channels_last
    module, pre, _ = load_model(str(ckpt), channels_last=False)
    model = nn.Sequential(module.backbone, module.head).eval()
    if module.tta == "flip":  # the served model is the one tested: with its mirror average
        model = MirrorAveraged(model).eval()
    files, bad = _decoding(list_images(str(cfg.images)) if cfg.images else _images_of_run(ckpt), cfg.verify_images)
    if not files:
        raise TlexpError(f"none of the {len(bad)} image file(s) to verify the export on decodes: pass images=<good images>")
    transform = eval_transform(pre)
    batch = torch.stack([transform(load_rgb(f)) for f in files])
    report: dict = {
        "source_checkpoint": str(ckpt.resolve()),
        "input": {"shape": ["N", 3, pre.crop_size, pre.crop_size], "layout": "NCHW float32, normalized"},
        "preprocessing": pre.as_dict(),
        "class_names": list(module.hparams.class_names),
        "output": "logits (softmax gives class probabilities)",
        "verified_on_images": len(files),
        "exports": {},
    }
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(".exporting-*"):  # an export killed mid-way
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".exporting-", dir=out))  # moved into out once checked
    try:
        report["exports"], speed = _export_into(staging, model, batch, cfg)
        if speed is not None:
            report["speed_batch1_ms"] = speed
        diffs = {name: e["max_abs_prob_diff"] for name, e in report["exports"].items()}
        if failed := [name for name, diff in diffs.items() if diff > cfg.tolerance]:
            raise TlexpError(
                f"export check failed: the probabilities of {', '.join(failed)} differ from PyTorch's by up to {max(diffs.values()):.2e} "
                f"(> tolerance {cfg.tolerance}); nothing was exported to {out}: raise tolerance= to accept the difference"
            )
        (staging / "model.json").write_text(json.dumps(report, indent=2))
        (out / "model.json").unlink(missing_ok=True)  # a previous export's must not vouch for files half replaced
        for name in [*(e["file"] for e in report["exports"].values()), "model.json"]:  # model.json last: it says they are checked
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if made and not any(out.iterdir()):
            out.rmdir()
    return report


def _export_into(folder: Path, model: nn.Module, batch: torch.Tensor, cfg: DictConfig) -> tuple[dict, dict | None]:
    """Each format's file in ``folder`` with its largest probability difference from ``model`` on ``batch``; with
    ONNX, the batch-1 latencies of PyTorch and ONNX Runtime measured side by side."""
    with torch.inference_mode():
        reference = model(batch).softmax(dim=1)
    exports, speed = {}, None
    example = batch[:1]
    # Each step can take minutes on a small CPU, and the exporters' own progress is silenced: say which runs.
    if "torchscript" in cfg.formats:
        log.info("exporting TorchScript and checking it on %d images", len(batch))
        path = folder / "model.torchscript.pt"
        with torch.no_grad():
            torch.jit.save(torch.jit.trace(model, example), path)
        loaded = torch.jit.load(path).eval()
        with torch.inference_mode():
            diff = (loaded(batch).softmax(dim=1) - reference).abs().max().item()
        exports["torchscript"] = {"file": path.name, "max_abs_prob_diff": diff}
    if "onnx" in cfg.formats:
        log.info("exporting ONNX and checking it with ONNX Runtime on %d images", len(batch))
        ort = _import_onnxruntime(Path(cfg.paths.data_dir))
        path = folder / "model.onnx"
        batch_dim = torch.export.Dim("batch", min=1, max=1024)
        torch.onnx.export(  # traced at batch 2: an example of 1 lets torch.export fix the batch size to 1
            model, (example.repeat(2, 1, 1, 1),), path, input_names=["image"], output_names=["logits"],
            dynamic_shapes=({0: batch_dim},), dynamo=True, external_data=False, verbose=False,
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        logits = session.run(None, {"image": batch.numpy()})[0]
        diff = (torch.from_numpy(logits).softmax(dim=1) - reference).abs().max().item()
        one = example.numpy()
        log.info("timing batch 1: PyTorch eager, %s, ONNX Runtime%s", cfg.speed.runtime,
                 " (compiling first takes 20-50 s)" if cfg.speed.runtime == "compile" else "")
        eager_ms = 1e3 * median_seconds(model, example, cfg.speed.warmup, cfg.speed.repeats)
        fast, runtime = inference_runtime(model, (example,), cfg.speed.runtime)
        torch_ms = 1e3 * median_seconds(fast, example, cfg.speed.warmup, cfg.speed.repeats)
        ort_ms = 1e3 * median_seconds(lambda x: session.run(None, {"image": x}), one, cfg.speed.warmup, cfg.speed.repeats)
        exports["onnx"] = {"file": path.name, "max_abs_prob_diff": diff, "opset": _opset(path)}
        speed = {
            "torch": torch_ms, "torch_runtime": runtime, "torch_eager": eager_ms,
            "onnxruntime": ort_ms, "torch_over_onnxruntime": torch_ms / ort_ms,
            "threads": torch.get_num_threads(), "statistic": f"median of {cfg.speed.repeats} after {cfg.speed.warmup} warm-up",
        }
    return exports, speed


def _opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def job(cfg: DictConfig) -> None:
    """``tlexp-export`` (through tlexp/cli.py): the three result lines, or one error line and exit code 2."""
    try:
        report = export(cfg)
    except TlexpError as exc:
        print(f"tlexp-export: error: {exc}", file=sys.stderr)
        sys.exit(2)
    for name, e in report["exports"].items():
        print(f"{name}: {e['file']} (max |Δp| = {e['max_abs_prob_diff']:.2e} on {report['verified_on_images']} images)")
    if "speed_batch1_ms" in report:
        s = report["speed_batch1_ms"]
        print(f"batch 1: torch {s['torch']:.2f} ms, onnxruntime {s['onnxruntime']:.2f} ms ({s['torch_over_onnxruntime']:.2f}x)")


def _import_onnxruntime(data_dir: Path):
    """onnxruntime writes a device id and a small database under $XDG_CACHE_HOME (~/.cache) when it is
    imported: they go to tlexp's data dir instead, with everything else tlexp keeps outside a run."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(data_dir / "onnxruntime")
    try:
        import onnxruntime
    finally:
        if previous is None:
            os.environ.pop("XDG_CACHE_HOME")
        else:
            os.environ["XDG_CACHE_HOME"] = previous
    return onnxruntime


if __name__ == "__main__":
    from tlexp.cli import export

    export()
