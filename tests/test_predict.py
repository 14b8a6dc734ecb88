"""tlexp-predict: the checkpoint alone reproduces trainer.test's accuracy; bad input is one clear error."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    REPO,
    accuracy_on_test_split,
    make_image_tree,
    read_metrics,
    red_images_and_broken_files,
    run_module,
    train,
)
from tlexp.errors import TlexpError
from tlexp.predict import list_images, load_model, precision_context, print_table


def predict_cli(*args: str) -> subprocess.CompletedProcess:
    return run_module("tlexp.predict", *args)


def test_predictions_match_trainer_test(trained_run, tmp_path):
    tree, run = trained_run
    out = tmp_path / "predictions.csv"
    result = predict_cli(f"ckpt={run / 'checkpoints' / 'best.ckpt'}", f"images={tree}", f"csv={out}", "num_workers=0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "top-3 predictions" in result.stdout
    with open(run / "split.csv") as f:
        test_rows = {str(tree / r["path"]): r["class"] for r in csv.DictReader(f) if r["subset"] == "test"}
    with open(out) as f:
        predicted = {r["path"]: r for r in csv.DictReader(f)}
    assert len(predicted) == 30 and test_rows.keys() <= predicted.keys()
    correct = sum(predicted[p]["top1"] == label for p, label in test_rows.items())
    assert correct / len(test_rows) == pytest.approx(read_metrics(run)["test_acc"], abs=1e-6)
    row = next(iter(predicted.values()))
    assert sum(float(row[f"p_{c}"]) for c in ("blue", "green", "red")) == pytest.approx(1.0, abs=1e-4)
    # served as tested: the precision and memory layout the run's test figures were computed in
    served = load_model(str(run / "checkpoints" / "best.ckpt"))
    assert served.precision == read_metrics(run)["precision"]
    assert served.module.memory_format == (torch.channels_last if read_metrics(run)["channels_last"] else torch.contiguous_format)
    assert f"serving in {served.precision}" in result.stdout + result.stderr


def test_a_16_mixed_run_is_served_on_a_cpu_in_bf16():
    """A GPU run's 16-mixed checkpoint served without a GPU runs as Lightning runs 16-mixed on a CPU, and as its
    metrics.json "cpu" figures were timed: bf16 autocast (was: fp16 autocast, which Lightning does not use on CPUs)."""
    conv = torch.nn.Conv2d(3, 4, 3)
    with torch.inference_mode(), precision_context("16-mixed", torch.device("cpu")):
        assert conv(torch.rand(1, 3, 8, 8)).dtype == torch.bfloat16


def test_a_bf16_true_run_is_served_as_tested(tmp_path, tiny_tree):
    """A *-true run (16-true on a GPU) tested with bf16 weights and inputs: tlexp-predict precision=auto serves it so
    (was: 'precision=bf16-true: tlexp-predict serves 32-true, bf16-mixed or 16-mixed', after decoding every image)."""
    run = tmp_path / "run"
    train(run, tiny_tree, "model=resnet18", "strategy=blocks_2", "trainer.precision=bf16-true")
    out = tmp_path / "p.csv"
    result = predict_cli(f"ckpt={run / 'checkpoints' / 'best.ckpt'}", f"images={tiny_tree}", f"csv={out}", "num_workers=0", "batch_size=8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "serving in bf16-true" in result.stdout + result.stderr
    assert accuracy_on_test_split(run, tiny_tree, out) == pytest.approx(read_metrics(run)["test_acc"], abs=1e-6)


def test_one_file_and_a_glob(trained_run):
    tree, run = trained_run
    ckpt = f"ckpt={run / 'checkpoints' / 'best.ckpt'}"
    one = predict_cli(ckpt, f"images={tree / 'red' / 'img_000.jpg'}", "top_k=1")
    assert one.returncode == 0 and "img_000.jpg" in one.stdout and "#2" not in one.stdout
    pattern = predict_cli(ckpt, f"images={tree}/green/img_00*.jpg", "num_workers=0")
    assert pattern.returncode == 0 and pattern.stdout.count("img_00") == 10


def test_a_folder_is_listed_as_training_lists_a_class(tmp_path):
    """Was: images in hidden folders (.ipynb_checkpoints copies) predicted too, and symlinked sub-folders left out."""
    tree = make_image_tree(tmp_path / "photos", {"a": 1, ".ipynb_checkpoints": 1, "sub/deeper": 1})
    (tree / "a" / "notes.txt").write_text("not an image")
    (tree / "linked").symlink_to(make_image_tree(tmp_path / "elsewhere", {"b": 1}) / "b")
    assert [p.relative_to(tree).as_posix() for p in list_images(str(tree))] == ["a/img_000.jpg", "linked/img_000.jpg", "sub/deeper/img_000.jpg"]


def test_a_broken_link_is_listed_for_its_row_in_the_csv(tmp_path):
    """Was: left out of a folder's or a glob's list silently, so the CSV did not account for it."""
    tree = make_image_tree(tmp_path / "photos", {"a": 1})
    (tree / "a" / "gone.jpg").symlink_to(tmp_path / "moved.jpg")
    expected = [tree / "a" / "gone.jpg", tree / "a" / "img_000.jpg"]
    assert list_images(str(tree)) == list_images(f"{tree}/a/*.jpg") == expected
    assert list_images(str(tree / "a" / "gone.jpg")) == expected[:1]


def test_a_folder_of_files_tlexp_does_not_read_says_which(tmp_path):
    """Was: 'no image files found' for a folder of .heic photos, without saying what was found instead."""
    (tmp_path / "IMG_1.HEIC").write_bytes(b"")
    for spec in (str(tmp_path), f"{tmp_path}/*"):
        with pytest.raises(TlexpError, match=r"no image files found: 1 file\(s\) not read \(\.heic: 1\): tlexp reads \.bmp"):
            list_images(spec)


def test_the_table_tells_images_of_one_name_apart(tmp_path, capsys):
    """Was: both rows named img_000.jpg, so which prediction was whose could not be told."""
    files = [tmp_path / "green" / "img_000.jpg", tmp_path / "red" / "img_000.jpg"]
    print_table(files, torch.tensor([[0.9, 0.1], [0.2, 0.8]]), ["green", "red"], 1, 50)
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "img_000" in line]
    assert rows == [["│", "green/img_000.jpg", "│", "green", "90.0%", "│"], ["│", "red/img_000.jpg", "│", "red", "80.0%", "│"]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("ckpt=/nonexistent/best.ckpt", "images=."), "no such file"),
        (("images=/nonexistent/*.jpg",), "no image files found"),
        (("images=.", "csv=/nonexistent/folder/p.csv"), "csv=/nonexistent/folder/p.csv: the folder /nonexistent/folder does not exist"),
        # refused before the checkpoint or any image is read (was: IsADirectoryError after predicting every image)
        (("ckpt=/nonexistent/best.ckpt", "images=/nonexistent/*.jpg", "csv=tests"), "csv=tests names a folder: give a file name, such as csv=tests/predictions.csv"),
        (("images=.", "csv=results/"), "csv=results/ names a folder: give a file name, such as csv=results/predictions.csv"),
    ],
)
def test_bad_input_is_one_clear_error(trained_run, args, message):
    _, run = trained_run
    full = list(args)
    if not any(a.startswith("ckpt=") for a in full):
        full.insert(0, f"ckpt={run / 'checkpoints' / 'best.ckpt'}")
    result = predict_cli(*full)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (("top_k=0",), "top_k must be >= 1, got 0"),
        (("top_k=abc",), "top_k must be an integer, got 'abc'"),
        (("device=gpu0",), "device=gpu0: not a device name (auto, cpu, cuda, cuda:1, ...)"),
        (("device=null",), "device=None: not a device name (auto, cpu, cuda, cuda:1, ...)"),
        (("device=cuda:7",), f"device=cuda:7, but this machine has {torch.cuda.device_count()} CUDA GPU(s): use device=cpu (or auto)"),
        (("top_k=2.5", "batch_size=0", "precision=fp16"),
         "top_k must be an integer, got 2.5; batch_size must be >= 1, got 0; precision must be one of auto, 32-true, bf16-mixed, 16-mixed, bf16-true, 16-true, got fp16"),
    ],
)
def test_nonsense_settings_are_refused_before_any_work(tmp_path, args, line):
    """Was: top_k checked after the model was loaded; top_k=abc, device=null and a GPU the machine lacks, tracebacks."""
    result = predict_cli(f"ckpt={tmp_path / 'best.ckpt'}", f"images={tmp_path}", *args)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"tlexp-predict: error: {line}"]


def test_paths_in_the_home_folder(trained_run, tmp_path, monkeypatch):
    """~ in ckpt=, a glob and csv= (quoted: Hydra's grammar reads a bare ~ as its delete operator). Was: ckpt=~/...
    'no such file', a glob 'no image files found', and csv=~/p.csv written to a folder named '~' that did not exist."""
    tree, run = trained_run
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "run").symlink_to(run)
    (tmp_path / "images").symlink_to(tree)
    result = predict_cli("ckpt='~/run/checkpoints/best.ckpt'", "images='~/images/red/img_00*.jpg'", "csv='~/p.csv'", "num_workers=0")
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / "p.csv") as f:
        assert [r["path"] for r in csv.DictReader(f)] == [str(tmp_path / "images" / "red" / f"img_00{i}.jpg") for i in range(10)]


def test_a_file_that_is_not_a_checkpoint(tmp_path):
    fake = tmp_path / "best.ckpt"
    fake.write_text("not a checkpoint")
    result = predict_cli(f"ckpt={fake}", "images=.")
    assert result.returncode == 2 and "not a readable tlexp checkpoint" in result.stderr


def test_a_checkpoint_whose_weights_do_not_fit_its_model(trained_run, tmp_path):
    """Hyper-parameters naming another class count than the weights have (an edited file): was a load_state_dict traceback."""
    _, run = trained_run
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"]["class_names"] = ["a", "b"]
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    result = predict_cli(f"ckpt={tmp_path / 'edited.ckpt'}", f"images={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"ckpt={tmp_path / 'edited.ckpt'}: its weights do not fit the model it describes (" in result.stderr and ", 2 classes): " in result.stderr


def test_a_folder_whose_only_image_is_bad(trained_run, tmp_path):
    _, run = trained_run
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    result = predict_cli(f"ckpt={run / 'checkpoints' / 'best.ckpt'}", f"images={tmp_path}")
    assert result.returncode == 2 and "none of the 1 file(s) decodes as an image" in result.stderr and "Traceback" not in result.stderr


def test_files_that_do_not_decode_keep_their_row_in_the_csv(trained_run, tmp_path):
    """Was: left out of the CSV silently, so its rows no longer accounted for every file asked for."""
    tree, run = trained_run
    folder = red_images_and_broken_files(tree, tmp_path / "images", 2, {"broken.jpg": b"not a jpeg", "empty.png": b""})
    out = tmp_path / "p.csv"
    result = predict_cli(f"ckpt={run / 'checkpoints' / 'best.ckpt'}", f"images={folder}", f"csv={out}", "num_workers=0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"wrote 4 rows to {out}: 2 predictions, 2 file(s) that do not decode (see the error column)" in result.stdout + result.stderr
    with open(out) as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["broken.jpg", "empty.png", "img_000.jpg", "img_001.jpg"]
    for name in ("broken.jpg", "empty.png"):
        assert rows[name]["error"].startswith("UnidentifiedImageError: cannot identify image file")
        assert {k: v for k, v in rows[name].items() if k not in ("path", "error")} == dict.fromkeys(["top1", "p1", "top2", "p2", "top3", "p3", "p_blue", "p_green", "p_red"], "")
    assert rows["img_000.jpg"]["error"] == "" and rows["img_000.jpg"]["top1"] in ("blue", "green", "red")
    assert float(rows["img_000.jpg"]["p1"]) > 0


def test_a_file_name_that_is_not_utf8_is_written_to_the_csv_byte_for_byte(trained_run, tmp_path):
    """caf\xe9.jpg (Latin-1 bytes): was a UnicodeEncodeError traceback after every image was predicted, and a CSV of one header line."""
    tree, run = trained_run
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / os.fsdecode(b"caf\xe9.jpg")).write_bytes((tree / "red" / "img_000.jpg").read_bytes())
    out = tmp_path / "p.csv"
    args = [f"ckpt={run / 'checkpoints' / 'best.ckpt'}", f"images={folder}", f"csv={out}", "num_workers=0"]
    # bytes: the table prints the name's own bytes, which do not decode as text
    result = subprocess.run([sys.executable, "-m", "tlexp.predict", *args], capture_output=True, cwd=REPO, timeout=600, check=False,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = out.read_bytes().splitlines()
    assert len(lines) == 2 and lines[1].startswith(bytes(folder) + b"/caf\xe9.jpg,")


@pytest.mark.parametrize("tool", ["predict", "export"])
def test_help_shows_the_tools_own_settings_not_training_groups(tool):
    """`tlexp-predict --help` / `tlexp-export --help` (was: "cli is powered by Hydra." and tlexp-train's config groups,
    model=, data=, experiment=, ..., which these tools do not take)."""
    result = run_module(f"tlexp.{tool}", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"tlexp-{tool}: "), result.stdout[:200]
    assert "Configuration groups" not in result.stdout and "experiment:" not in result.stdout
    assert "ckpt: ???" in result.stdout
