"""``tlexp-predict ckpt=<run>/checkpoints/best.ckpt images=<file|folder|glob>``: top-k classes per image.

The model is rebuilt from the checkpoint alone (architecture, class names, the preprocessing, memory
layout and precision the run tested with), so predictions match what ``trainer.test`` measured; no
pretrained weights are fetched.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import track
from rich.table import Table
from torch.utils.data import DataLoader

from tlexp.config import check_predict_config
from tlexp.data.datamodule import ImageListDataset
from tlexp.data.files import IMAGE_EXTENSIONS, Sample, is_image_file, listing, not_images
from tlexp.data.images import bad_image_policy
from tlexp.data.transforms import Preprocessing, eval_transform
from tlexp.errors import TlexpError
from tlexp.model.module import TransferModule
from tlexp.runs import verify_checkpoint
from tlexp.speed import timing

log = logging.getLogger("tlexp.predict")


class Served(NamedTuple):
    module: TransferModule
    preprocessing: Preprocessing
    precision: str  # what the run's test ran in ("32-true" for checkpoints that do not say)


def load_model(path: str, channels_last: bool | None = None) -> Served:
    """The trained model in eval mode, from a tlexp checkpoint; ``channels_last=None``: the run's layout."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise TlexpError(f"ckpt={path}: no such file (use <run dir>/checkpoints/best.ckpt)")
    verify_checkpoint(file)
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=False)
        hparams, state = checkpoint["hyper_parameters"], checkpoint["state_dict"]
    except Exception as exc:  # any unreadable file gets the same advice
        raise TlexpError(f"ckpt={path} is not a readable tlexp checkpoint ({type(exc).__name__}: {exc})") from exc
    if "preprocessing" not in checkpoint:
        raise TlexpError(f"ckpt={path} has no saved preprocessing: it was not written by tlexp-train")
    # weights=None: the architecture only; every weight comes from the checkpoint.
    layout = hparams.get("channels_last", False) if channels_last is None else channels_last
    module = TransferModule(**{**hparams, "model": {**hparams["model"], "weights": None}, "channels_last": layout})
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:  # weights of another backbone or class count than its hyper_parameters say (an edited file)
        model = hparams["model"]
        raise TlexpError(
            f"ckpt={path}: its weights do not fit the model it describes ({model.get('source')} {model.get('name')}, "
            f"{len(hparams['class_names'])} classes): {textwrap.shorten(str(exc), 300)} Use the best.ckpt tlexp-train wrote, unedited"
        ) from exc
    pre = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in checkpoint["preprocessing"].items()})
    return Served(module.eval(), pre, checkpoint.get("precision", "32-true"))


def list_images(spec: str) -> list[Path]:
    """A file, a folder (searched recursively, as training lists a class) or a glob pattern -> image files, sorted."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files, others = listing(path)
    else:
        candidates = [Path(p) for p in glob.glob(str(path), recursive=True)]
        files = sorted(p for p in candidates if is_image_file(p))
        others = Counter(p.suffix.lower() or "(no extension)" for p in candidates
                         if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in IMAGE_EXTENSIONS)
    if not files:
        found = f": {not_images(others)}" if others else " (give a file, a folder or a quoted glob like 'photos/*.jpg')"
        raise TlexpError(f"images={spec}: no image files found{found}")
    if others:
        log.warning("images=%s: %s", spec, not_images(others))
    return files


def resolve_device(setting: str) -> torch.device:
    """``auto``: the first CUDA GPU if there is one, else the CPU; a GPU this machine lacks is refused up front."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except (RuntimeError, TypeError) as exc:
        raise TlexpError(f"device={setting}: not a device name (auto, cpu, cuda, cuda:1, ...)") from exc
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise TlexpError(f"device={setting}, but this machine has {torch.cuda.device_count()} CUDA GPU(s): use device=cpu (or auto)")
    return device


# A *-true run tested with its weights, and inputs, in this dtype (Lightning's HalfPrecision): served in it too.
TRUE_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16}


def precision_context(precision: str, device: torch.device):
    """The forward context Lightning's trainer uses for ``precision`` on ``device`` (autocast for the mixed ones):
    on a CPU, 16-mixed runs as bf16-mixed, as Lightning runs it there and the run's CPU speed figures were timed."""
    if precision not in ("32-true", "32", "64-true", "bf16-mixed", "16-mixed", *TRUE_DTYPES):
        raise TlexpError(f"precision={precision}: tlexp-predict serves 32-true, bf16-mixed, 16-mixed, bf16-true or 16-true")
    return timing.precision_context(timing.precision_on(precision, device), device)


@torch.inference_mode()
def predict(
    module: TransferModule, pre: Preprocessing, files: list[Path], batch_size: int, num_workers: int, precision: str = "32-true",
) -> torch.Tensor:
    """Class probabilities (fp32, on the CPU), one row per file; the model runs on the device, and in the dtype, it is in."""
    device = module.device
    dataset = ImageListDataset([Sample(f, -1) for f in files], eval_transform(pre))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    batches = track(loader, description="predicting", transient=True) if len(loader) > 1 else loader
    with precision_context(precision, device):
        return torch.cat([module(x.to(device, module.dtype, non_blocking=True)).float().softmax(dim=1).cpu() for x, _ in batches])


def write_csv(
    path: Path, files: list[Path], probs: torch.Tensor, class_names: list[str], top_k: int, bad: dict[Path, str],
) -> None:
    """One row per image, in path order; a file that does not decode keeps its row, empty but for ``error``,
    so the CSV accounts for every file that was asked for."""
    top = probs.topk(top_k, dim=1)
    rows = {
        file: [*[x for v, i in zip(values, indices) for x in (class_names[i], f"{v:.6f}")], *[f"{p:.6f}" for p in row], ""]
        for file, values, indices, row in zip(files, top.values.tolist(), top.indices.tolist(), probs.tolist())
    }
    rows |= {file: [""] * (2 * top_k + len(class_names)) + [why] for file, why in bad.items()}
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:  # a non-UTF-8 file name keeps its bytes
        writer = csv.writer(f)
        writer.writerow(["path", *[c for i in range(top_k) for c in (f"top{i + 1}", f"p{i + 1}")], *[f"p_{n}" for n in class_names], "error"])
        writer.writerows([str(file), *rows[file]] for file in sorted(rows))


def print_table(files: list[Path], probs: torch.Tensor, class_names: list[str], top_k: int, limit: int) -> None:
    """Each image by its path below the folder they share, so red/img_000.jpg and green/img_000.jpg stay apart."""
    table = Table(title=f"top-{top_k} predictions")
    table.add_column("image")
    for i in range(top_k):
        table.add_column(f"#{i + 1}")
    top = probs.topk(top_k, dim=1)
    shared = Path(os.path.commonpath([f.parent for f in files]))
    for file, values, indices in list(zip(files, top.values.tolist(), top.indices.tolist()))[:limit]:
        table.add_row(str(file.relative_to(shared)), *[f"{class_names[i]} {v:.1%}" for v, i in zip(values, indices)])
    console = Console()
    console.print(table)
    if len(files) > limit:
        console.print(f"... and {len(files) - limit} more (all of them with csv=<file>)")


def csv_destination(setting: str | None) -> Path | None:
    """The file ``csv=`` names, ``~`` expanded; refused before any image is read, so no prediction is lost."""
    if not setting:
        return None
    path = Path(setting).expanduser()
    if path.is_dir() or setting.endswith("/"):  # csv=results/ would otherwise write a file named results
        raise TlexpError(f"csv={setting} names a folder: give a file name, such as csv={Path(setting) / 'predictions.csv'}")
    if not path.parent.is_dir():
        raise TlexpError(f"csv={setting}: the folder {path.parent} does not exist")
    return path


def run(cfg: DictConfig) -> None:
    check_predict_config(cfg)
    out = csv_destination(cfg.csv)
    device = resolve_device(cfg.device)
    module, pre, run_precision = load_model(cfg.ckpt)
    precision = run_precision if cfg.precision == "auto" else cfg.precision
    module.to(device, TRUE_DTYPES.get(precision))
    class_names = module.hparams.class_names
    top_k = min(cfg.top_k, len(class_names))
    files = list_images(str(cfg.images))
    bad = bad_image_policy(files, cfg.on_bad_image, "on_bad_image", None, cfg.num_workers)
    files = [f for f in files if f not in bad]
    if not files:
        raise TlexpError(f"images={cfg.images}: none of the {len(bad)} file(s) decodes as an image")
    log.info("serving in %s on %s", timing.precision_on(precision, device), module.device)
    probs = predict(module, pre, files, cfg.batch_size, cfg.num_workers, precision)
    print_table(files, probs, class_names, top_k, cfg.print_limit)
    if out:
        write_csv(out, files, probs, class_names, top_k, bad)
        log.info("wrote %d rows to %s: %d predictions, %d file(s) that do not decode (see the error column)",
                 len(files) + len(bad), out, len(files), len(bad))


def job(cfg: DictConfig) -> None:
    """``tlexp-predict`` (through tlexp/cli.py): one line and exit code 2 for bad input."""
    try:
        run(cfg)
    except TlexpError as exc:
        print(f"tlexp-predict: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from tlexp.cli import predict

    predict()
