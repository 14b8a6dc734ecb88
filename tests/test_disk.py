"""A full disk and read-only folders, on small tmpfs mounts: one clear line and a record, never a traceback or SIGBUS.

Mounting needs root (CAP_SYS_ADMIN), as on the development and CI machines; elsewhere these tests skip.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.conftest import read_metrics, train
from tlexp.data.download import download_and_extract
from tlexp.errors import TlexpError

RESNET18 = ("model=resnet18",)  # its checkpoint (~45 MB) does not fit a 20 MB disk


def _mount(folder: Path, size: str, *options: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(folder)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}): needs root")


@pytest.fixture
def mounts():
    """``mount(folder, size, *options)``; everything mounted is unmounted after the test."""
    mounted: list[Path] = []

    def mount(folder: Path, size: str, *options: str) -> Path:
        _mount(folder, size, *options)
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` up to ``leave`` free bytes with a real (not sparse) file."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def _one_clear_line(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_a_checkpoint_that_does_not_fit_ends_with_a_clear_line_and_a_record(tmp_path, tiny_tree, mounts):
    disk = mounts(tmp_path / "disk", "20m")
    result = train(disk / "run", tiny_tree, *RESNET18, check=False)
    line = _one_clear_line(result)
    assert line.startswith("tlexp-train: error: no space left on the disk of") and "best.ckpt" in line and "MB needed" in line
    metrics = read_metrics(disk / "run")
    assert metrics["status"] == "failed" and "no space left" in metrics["error"]
    assert not list((disk / "run" / "checkpoints").iterdir())  # no half checkpoint left to fill the disk


def test_a_disk_already_full_still_gets_the_record(tmp_path, tiny_tree, mounts):
    """The run keeps 1 MiB of ballast from its start, released for the record whatever filled the disk."""
    disk = mounts(tmp_path / "disk", "20m")
    _fill(disk, leave=1300 << 10)
    result = train(disk / "run", tiny_tree, *RESNET18, check=False)
    assert "no space left" in _one_clear_line(result)
    assert read_metrics(disk / "run")["status"] == "failed"
    assert not (disk / "run" / ".tlexp.reserve").exists()


def test_a_full_cache_disk_turns_the_cache_off_and_the_run_goes_on(tmp_path, tiny_tree, mounts):
    """Before: the cache's memory map died of SIGBUS on a full tmpfs (no message, no metrics.json)."""
    cache = mounts(tmp_path / "cache", "1m")
    _fill(cache, leave=16 << 10)
    run = tmp_path / "run"
    result = train(run, tiny_tree, *RESNET18, f"perf.cache_dir={cache / 'feature_cache'}", check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = read_metrics(run)
    assert metrics["status"] == "completed"
    assert "no space left on the disk of" in metrics["feature_cache_off"]
    assert "feature cache turned off for the rest of this run" in (run / "train.log").read_text()
    assert not [p for p in (cache / "feature_cache").iterdir() if p.name.startswith(".")]  # no staging left


def test_a_read_only_cache_dir_trains_without_the_cache(tmp_path, tiny_tree, mounts):
    cache = mounts(tmp_path / "cache", "1m", "ro")
    run = tmp_path / "run"
    result = train(run, tiny_tree, *RESNET18, f"perf.cache_dir={cache / 'feature_cache'}", check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_metrics(run)["feature_cache_off"] == (  # was: "free space there" advice for a disk with room
        f"cannot write the feature cache in {cache / 'feature_cache'} (Read-only file system): "
        "point perf.cache_dir at another folder, or set perf.feature_cache=false"
    )


def test_a_read_only_run_dir_is_refused_in_one_line(tmp_path, tiny_tree, mounts):
    disk = mounts(tmp_path / "disk", "1m", "ro")
    line = _one_clear_line(train(disk / "run", tiny_tree, *RESNET18, check=False))
    assert line == f"tlexp-train: error: {disk} is not writable (read-only or no permission): give hydra.run.dir= a folder you can write"


def test_resuming_a_run_on_a_disk_made_read_only_is_refused_in_one_line(tmp_path, tiny_tree, mounts):
    disk = mounts(tmp_path / "disk", "200m")
    train(disk / "run", tiny_tree, *RESNET18, "strategy=frozen")
    (disk / "run" / "metrics.json").unlink()  # as if it had been killed: resume=true continues it
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    line = _one_clear_line(train(disk / "run", tiny_tree, *RESNET18, "strategy=frozen", "resume=true", check=False))
    assert line.startswith(f"tlexp-train: error: {disk / 'run'} is not writable")


def test_the_table_of_a_sweep_on_a_read_only_disk_is_one_line(tmp_path, mounts, capsys):
    """Was: an OSError traceback from writing table.md; the table is still shown with --print, and the
    comparison with --compare (was: lost, as it was printed after the files)."""
    from tests.test_sweep import LR_X_STRATEGY, _hand_made_sweep
    from tlexp.report.table import main as table_main

    disk = mounts(tmp_path / "disk", "5m")
    _hand_made_sweep(disk / "sweep", LR_X_STRATEGY)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    assert table_main([str(disk / "sweep"), "--print"]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("|") and out.count("blocks_1") == 2  # the table, shown though not saved
    assert err == (f"tlexp-table: error: cannot write the table's files in {disk / 'sweep'} (Read-only file system): "
                   "copy the sweep to a folder you can write\n")
    reference = tmp_path / "ref.csv"  # off the read-only disk
    reference.write_text("Model,Strategy,optim.lr,Test Accuracy\nresnet18,frozen,1e-3,80.00%\n")
    assert table_main([str(disk / "sweep"), "--compare", str(reference)]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("| Model | Strategy | optim.lr | Δ Test Accuracy |") and "| resnet18 | frozen | 0.001 | +1.23 pt |" in out
    assert err.startswith("tlexp-table: error: cannot write the table's files") and err.count("\n") == 1


def _tgz(path: Path, photo: bytes) -> Path:
    """A data-set archive (flower_photos/daisy/) holding one file of ``photo``."""
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("flower_photos/daisy/img_000.jpg")
        info.size = len(photo)
        tar.addfile(info, io.BytesIO(photo))
    return path


def test_a_download_that_fills_the_disk_says_so(tmp_path, mounts):
    """Was: 'could not download ... (No space left on device). Offline? Copy the extracted data set ...'."""
    archive = _tgz(tmp_path / "flower_photos.tgz", os.urandom(2 << 20))  # does not compress: 2 MB on a 1 MB disk
    disk = mounts(tmp_path / "disk", "1m")
    with pytest.raises(TlexpError, match=(
        f"^no space left on the disk of {disk} for the download of flower_photos.tgz \\(1.0 MB free\\): free space there, "
        "or point TLEXP_DATA_DIR \\(paths.data_dir\\) at another folder, and run again$"
    )):
        download_and_extract(archive.as_uri(), None, disk / "flower_photos")
    assert list(disk.iterdir()) == []  # no .part left to fill the disk


def test_an_extraction_that_fills_the_disk_says_so_and_keeps_the_archive(tmp_path, mounts):
    """Was: an OSError traceback. The staging folder goes; the archive stays, so the next run does not download again."""
    archive = _tgz(tmp_path / "flower_photos.tgz", bytes(3 << 20))  # compresses to a few KB, extracts to 3 MB
    disk = mounts(tmp_path / "disk", "1m")
    with pytest.raises(TlexpError, match=(
        f"^no space left on the disk of {disk} for the extraction of flower_photos.tgz \\(1.0 MB free, 3.0 MB needed\\): "
        "free space there, or point TLEXP_DATA_DIR \\(paths.data_dir\\) at another folder, and run again \\(the archive is kept\\)$"
    )):
        download_and_extract(archive.as_uri(), None, disk / "flower_photos")
    assert [p.name for p in disk.iterdir()] == ["flower_photos.tgz"]
