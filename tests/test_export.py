"""tlexp-export: ONNX and TorchScript files that give the PyTorch model's probabilities."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from tests.conftest import REPO, red_images_and_broken_files, run_module
from tlexp.data.images import load_rgb
from tlexp.data.transforms import eval_transform
from tlexp.predict import load_model

# onnxruntime 1.32 writes no device id at all where one of these is set (names read from its library);
# CI sets CI=true, so the check below clears them to see where the write goes.
ORT_NO_TELEMETRY_VARS = (
    "CI", "ORT_DISABLE_TELEMETRY", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL",
    "CODEBUILD_BUILD_ID", "BUILDKITE", "TEAMCITY_VERSION", "APPVEYOR", "BITBUCKET_BUILD_NUMBER",
)


def test_onnx_and_torchscript_match_pytorch(trained_run, tmp_path, monkeypatch):
    tree, run = trained_run
    ckpt = run / "checkpoints" / "best.ckpt"
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    for name in ("XDG_CACHE_HOME", *ORT_NO_TELEMETRY_VARS):
        monkeypatch.delenv(name, raising=False)
    result = run_module("tlexp.export", f"ckpt={ckpt}", f"out={tmp_path}", "speed.repeats=5")
    assert result.returncode == 0, result.stderr[-2000:]
    # issue 15: onnxruntime's device id goes to tlexp's data dir, not ~/.cache
    assert not (home / ".cache" / "Microsoft").exists()
    assert (Path(os.environ["TLEXP_DATA_DIR"]) / "onnxruntime" / "Microsoft").is_dir()
    assert len((result.stdout + result.stderr).splitlines()) <= 10, result.stdout + result.stderr  # issue 16: the result, not the exporters' chatter
    report = json.loads((tmp_path / "model.json").read_text())
    assert report["verified_on_images"] >= 1 and report["class_names"] == ["blue", "green", "red"]
    assert report["preprocessing"]["crop_size"] == 48 and report["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert all(e["max_abs_prob_diff"] < 1e-4 for e in report["exports"].values())
    assert report["speed_batch1_ms"]["torch"] > 0 and report["speed_batch1_ms"]["onnxruntime"] > 0
    assert report["speed_batch1_ms"]["torch_runtime"] == "compile" and report["speed_batch1_ms"]["torch_eager"] > 0

    # check independently of the tool's own report, on every image of the tree
    module, pre, _ = load_model(str(ckpt), channels_last=False)
    images = torch.stack([eval_transform(pre)(load_rgb(p)) for p in sorted(tree.rglob("*.jpg"))])
    with torch.inference_mode():
        expected = module(images).softmax(dim=1)
    onnx_logits = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"image": images.numpy()})[0]
    script_logits = torch.jit.load(tmp_path / "model.torchscript.pt")(images)
    np.testing.assert_allclose(torch.from_numpy(onnx_logits).softmax(dim=1), expected, atol=1e-4)
    np.testing.assert_allclose(script_logits.softmax(dim=1).detach(), expected, atol=1e-4)


def test_nonsense_numbers_are_refused_before_exporting(tmp_path):
    """Was: a negative tolerance exported both files, then failed with '(> tolerance -1)'."""
    result = run_module("tlexp.export", f"ckpt={tmp_path / 'best.ckpt'}", f"out={tmp_path / 'out'}", "tolerance=-1", "speed.repeats=0")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == ["tlexp-export: error: tolerance must be >= 0.0, got -1; speed.repeats must be >= 1, got 0"]
    assert not (tmp_path / "out").exists()
    # was: formats=[tflite] exported nothing and wrote model.json, speed.runtime=fast compiled (20-50 s)
    result = run_module("tlexp.export", f"ckpt={tmp_path / 'best.ckpt'}", f"out={tmp_path / 'out'}", "formats=[onnx,tflite]", "speed.runtime=fast")
    assert result.stderr.strip().splitlines() == [(
        "tlexp-export: error: speed.runtime must be one of auto, eager, torchscript, compile, cudagraph, got fast; "
        "formats must be a non-empty list of onnx, torchscript, got ['onnx', 'tflite']"
    )]
    assert run_module("tlexp.export", f"ckpt={tmp_path / 'best.ckpt'}", "formats=[]").stderr.strip().splitlines() == [
        "tlexp-export: error: formats must be a non-empty list of onnx, torchscript, got []"
    ]
    # was: taken, and no difference is > nan: every export passed its check
    assert run_module("tlexp.export", f"ckpt={tmp_path / 'best.ckpt'}", "tolerance=nan").stderr.strip().splitlines() == [
        "tlexp-export: error: tolerance must be a finite number, got nan"
    ]


def test_out_that_is_a_file_is_refused_before_exporting(tmp_path):
    """Was: FileExistsError traceback, after the checkpoint was loaded and the images read."""
    (tmp_path / "out").write_text("a file")
    result = run_module("tlexp.export", f"ckpt={tmp_path / 'best.ckpt'}", f"out={tmp_path / 'out'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"tlexp-export: error: out={tmp_path / 'out'} is a file: give a folder for the exported files"]


def test_paths_in_the_home_folder(trained_run, tmp_path, monkeypatch):
    """Was: ckpt=~/... 'no such file', and out=~/exp made a folder named '~' in the working directory."""
    _, run = trained_run
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "run").symlink_to(run)
    result = run_module("tlexp.export", "ckpt='~/run/checkpoints/best.ckpt'", "out='~/exp'", "formats=[torchscript]")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "exp" / "model.json").read_text())["exports"]["torchscript"]["max_abs_prob_diff"] < 1e-4
    assert not (Path(__file__).resolve().parent.parent / "~").exists()


def test_export_without_images_to_check_is_refused(tmp_path, trained_run):
    _, run = trained_run
    lonely = tmp_path / "best.ckpt"
    lonely.write_bytes((run / "checkpoints" / "best.ckpt").read_bytes())  # away from its run dir
    result = run_module("tlexp.export", f"ckpt={lonely}", f"out={tmp_path / 'out'}")
    assert result.returncode == 2 and "images=" in result.stderr


def test_a_run_whose_images_moved_says_so(tmp_path, trained_run):
    """Was: 'the run's split.csv was not found', though it was: its test images were no longer under data.root."""
    _, run = trained_run
    moved = tmp_path / "run"
    (moved / "checkpoints").mkdir(parents=True)
    for name in ("best.ckpt", "best.ckpt.sha256"):
        (moved / "checkpoints" / name).write_bytes((run / "checkpoints" / name).read_bytes())
    (moved / "split.csv").write_bytes((run / "split.csv").read_bytes())
    (moved / ".hydra").mkdir()
    config = OmegaConf.load(run / ".hydra" / "config.yaml")
    config.data.root = str(tmp_path / "gone")
    OmegaConf.save(config, moved / ".hydra" / "config.yaml")
    result = run_module("tlexp.export", f"ckpt={moved / 'checkpoints' / 'best.ckpt'}", "formats=[torchscript]")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [(
        f"tlexp-export: error: none of the 6 test images in {moved / 'split.csv'} is under data.root={tmp_path / 'gone'} now: "
        "pass images=<file|folder|glob>"
    )]
    assert not (moved / "export").exists()


def test_a_corrupt_file_among_the_images_is_left_out(trained_run, tmp_path):
    """Issue 15: tlexp-export images=<folder with a corrupt file> verifies on the others, with a warning."""
    tree, run = trained_run
    folder = red_images_and_broken_files(tree, tmp_path / "images", 3, {"broken.jpg": b"\xff\xd8 not really a jpeg"})
    ckpt = run / "checkpoints" / "best.ckpt"
    result = run_module("tlexp.export", f"ckpt={ckpt}", f"images={folder}", f"out={tmp_path / 'out'}", "formats=[torchscript]")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "broken.jpg" in result.stdout + result.stderr
    assert json.loads((tmp_path / "out" / "model.json").read_text())["verified_on_images"] == 3


class _Uniform(nn.Module):
    """An export gone wrong: the same logits for every image."""

    def forward(self, x):
        return torch.zeros(len(x), 3)


def test_an_export_that_fails_its_check_leaves_out_as_it_was(trained_run, tmp_path, monkeypatch, capsys):
    """Was: the unchecked model.torchscript.pt left in out without a model.json, or beside the model.json of the export
    before it, and 'see <out>'. Now out keeps what it held (a new out is not made) and the line says which export failed."""
    from tlexp.export import job

    _, run = trained_run

    def export(out: Path) -> None:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            job(compose("export", [f"ckpt={run / 'checkpoints' / 'best.ckpt'}", f"out={out}", "formats=[torchscript]"]))

    (tmp_path / "out" / ".exporting-killed").mkdir(parents=True)  # left by an export killed mid-way
    export(tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert sorted(before) == ["model.json", "model.torchscript.pt"]  # no staging left, its own or a killed one's
    monkeypatch.setattr(torch.jit, "load", lambda path: _Uniform())
    for out in (tmp_path / "out", tmp_path / "new"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as refused:
            export(out)
        assert refused.value.code == 2
        assert re.fullmatch(
            r"tlexp-export: error: export check failed: the probabilities of torchscript differ from PyTorch's by up to "
            rf"\d\.\d\de-0\d \(> tolerance 0\.0001\); nothing was exported to {re.escape(str(out))}: raise tolerance= to accept the difference\n",
            capsys.readouterr().err,
        )
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert not (tmp_path / "new").exists()


def test_only_as_many_images_as_the_check_uses_are_decoded(tmp_path, monkeypatch, caplog):
    """Was: every file of images= decoded before the first verify_images were taken (slow on a folder of thousands)."""
    from PIL import Image

    from tlexp.data import images
    from tlexp.export import _decoding

    files = []
    for i in range(20):
        files.append(tmp_path / f"{i:02d}.png")
        if i in (1, 2):
            files[-1].write_bytes(b"not an image")
        else:
            Image.new("RGB", (8, 8)).save(files[-1])
    checked, find = [], images.find_unreadable
    monkeypatch.setattr(images, "find_unreadable", lambda paths, *a: checked.extend(paths) or find(paths, *a))
    good, bad = _decoding(files, 4)
    assert good == [files[0], *files[3:6]] and sorted(bad) == files[1:3]
    assert checked == files[:8]  # two batches of 4: the second makes up for the two bad files
    assert "skipping 2 file(s) that do not decode as images (left out)" in caplog.text  # was: (images=skip), no such setting


def test_each_slow_step_is_announced_before_it_runs(trained_run, tmp_path):
    """The ONNX export and torch.compile's timing take minutes on a small CPU: a line says which step runs
    (was: nothing between the decoding line and the three result lines, 2 min on the 2-core machine)."""
    _, run = trained_run
    result = run_module("tlexp.export", f"ckpt={run / 'checkpoints' / 'best.ckpt'}", f"out={tmp_path}", "speed.repeats=2", "speed.runtime=eager")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    steps = [next(i for i, line in enumerate(lines) if line.startswith(start)) for start in ("exporting TorchScript", "exporting ONNX", "timing batch 1")]
    assert steps == sorted(steps) and steps[-1] < next(i for i, line in enumerate(lines) if line.startswith("torchscript: ")), lines
