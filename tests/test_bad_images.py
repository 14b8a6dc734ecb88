"""Odd images are converted and used; files that do not decode are skipped (listed, counted) or refused."""

from __future__ import annotations

import csv
import errno
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_image_tree, read_metrics, train
from tlexp.data import images as image_files
from tlexp.data.images import find_unreadable, load_rgb

BAD = {"empty.jpg": "zero bytes", "notes.jpg": "a text file", "cut.jpg": "truncated JPEG", "fake.PNG": "not an image"}


def _jpeg_bytes(size=(40, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((*size, 3), 200, np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _add_bad_files(folder) -> None:
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not a photo\n")
    (folder / "cut.jpg").write_bytes(_jpeg_bytes()[:400])
    (folder / "fake.PNG").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)


def _odd_images(folder) -> dict[str, tuple[int, int]]:
    """Valid but unusual files -> the (width, height) they must load with."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(0).integers(0, 255, (30, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(folder / "grey.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display: width and height swap
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    Image.fromarray(rgb[:8, :8]).save(folder / "tiny.jpg")
    Image.fromarray(rgb).save(folder / "UPPER.JPG")
    (folder / "link.jpg").symlink_to(folder / "UPPER.JPG")
    return {
        "grey.png": (20, 30), "rgba.png": (20, 30), "palette.png": (20, 30), "cmyk.jpg": (20, 30), "sixteen.png": (20, 30),
        "rotated.jpg": (30, 20), "tiny.jpg": (8, 8), "UPPER.JPG": (20, 30), "link.jpg": (20, 30),
    }


def test_odd_but_valid_images_load_as_rgb(tmp_path):
    expected = _odd_images(tmp_path)
    for name, size in expected.items():
        image = load_rgb(tmp_path / name)
        assert (image.mode, image.size) == ("RGB", size), name
    sixteen, eight = np.asarray(load_rgb(tmp_path / "sixteen.png")), np.asarray(load_rgb(tmp_path / "grey.png"))
    assert np.abs(sixteen.astype(int) - eight.astype(int)).max() <= 1  # scaled, not clipped to white


GRADIENTS = {  # mode, first and last value of a 64 x 64 gradient (row by row) -> 0 ... 255
    "int32_8bit_range": ("I", 0, 255),
    "int32_16bit_range": ("I", 0, 65535),
    "int32_wide_range": ("I", 0, 2_000_000_000),
    "int32_negative": ("I", -70_000, 70_000),
    "float_0_to_1": ("F", 0.0, 1.0),
    "float_0_to_1000": ("F", 0.0, 1000.0),
    "float_negative": ("F", -1.5, 2.5),
    "uint16": ("I;16", 0, 65535),
}


@pytest.mark.parametrize("case", GRADIENTS)
def test_32_bit_and_float_images_are_scaled_to_a_gradient_not_white_or_black(tmp_path, case):
    """A 32-bit integer TIFF was scaled as 16-bit (white, or black at 0-255); a 0-1 float one came out black."""
    mode, first, last = GRADIENTS[case]
    dtype = {"I": np.int32, "F": np.float32, "I;16": np.uint16}[mode]
    values = np.linspace(first, last, 64 * 64).astype(dtype).reshape(64, 64)
    Image.fromarray(values, None if mode == "I;16" else mode).save(tmp_path / "gradient.tif")
    grey = np.asarray(load_rgb(tmp_path / "gradient.tif"))[..., 0].ravel()
    assert (grey.min(), grey.max()) == (0, 255)
    assert (np.diff(grey.astype(int)) >= 0).all()  # monotonic
    assert len(np.unique(grey)) == 256  # every level, not a few steps
    assert abs(np.median(grey) - 127.5) <= 2  # linear: mid-grey in the middle, not clipped to white
    if case == "int32_8bit_range":
        assert (grey == values.ravel()).all()  # 0-255 kept as it is


def test_a_dark_16_bit_image_stays_dark_and_nan_is_black(tmp_path):
    Image.fromarray(np.full((8, 8), 2570, np.uint16)).save(tmp_path / "dark.png")  # 2570 = 10 * 257
    assert np.asarray(load_rgb(tmp_path / "dark.png")).max() == 10
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    values[0, 0] = np.nan
    Image.fromarray(values, "F").save(tmp_path / "nan.tif")
    grey = np.asarray(load_rgb(tmp_path / "nan.tif"))[..., 0]
    assert (grey[0, 0], grey.max()) == (0, 255)


def test_huge_image_loads(tmp_path):
    """Issue 15: 14000 x 14000 (196 megapixels) is past PIL's decompression-bomb limit, not tlexp's."""
    Image.new("RGB", (14000, 14000), (10, 200, 30)).save(tmp_path / "huge.jpg", quality=50)
    assert load_rgb(tmp_path / "huge.jpg").size == (14000, 14000)


def test_unreadable_files_are_found_once_and_remembered(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    _odd_images(folder)
    _add_bad_files(folder)
    paths = sorted(p for p in folder.iterdir())
    verdicts = tmp_path / "verdicts.json"
    bad = find_unreadable(paths, verdicts, threads=2)
    assert sorted(p.name for p in bad) == sorted(BAD)
    assert all(bad.values())
    calls = []
    monkeypatch.setattr(image_files, "decode_error", lambda p: calls.append(p))
    assert find_unreadable(paths, verdicts, threads=2) == bad and calls == []  # nothing decoded again
    (folder / "empty.jpg").write_bytes(_jpeg_bytes())  # repaired: re-checked, and only it
    assert find_unreadable(paths, verdicts, threads=1).keys() == bad.keys() - {folder / "empty.jpg"}
    assert calls == [folder / "empty.jpg"]


def test_a_repair_that_keeps_size_and_mtime_is_checked_again(tmp_path):
    """Verdicts follow the content: a file rewritten with its old size and mtime (``exiftool -P``) is decoded again."""
    good = tmp_path / "a.jpg"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(good)
    original, stat = good.read_bytes(), good.stat()
    good.write_bytes(b"\0" * len(original))  # broken, same size
    os.utime(good, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    verdicts = tmp_path / "verdicts.json"
    assert good in find_unreadable([good], verdicts, threads=1)
    good.write_bytes(original)  # repaired, same size and mtime again
    os.utime(good, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert find_unreadable([good], verdicts, threads=1) == {}


def _split_rows(run_dir) -> dict[str, str]:
    with open(run_dir / "split.csv") as f:
        return {row["path"]: row["subset"] for row in csv.DictReader(f)}


def test_bad_files_are_skipped_counted_and_do_not_move_good_ones(tmp_path):
    tree = make_image_tree(tmp_path / "images", {"red": 12, "green": 12, "blue": 12})
    _odd_images(tree / "red")
    clean = tmp_path / "clean"
    train(clean, tree, "model=resnet18", "strategy=frozen", "perf=naive")
    _add_bad_files(tree / "red")
    run = tmp_path / "run"
    train(run, tree, "model=resnet18", "strategy=frozen", "perf=naive")
    metrics = read_metrics(run)
    assert metrics["status"] == "completed" and metrics["skipped_images"] == len(BAD)
    assert sorted(metrics["skipped"]) == sorted(f"red/{name}" for name in BAD)
    assert _split_rows(run) == _split_rows(clean)  # bad files left out, good ones where they were without them
    assert sum(metrics["images"].values()) == 36 + 9  # every odd-but-valid image is used
    log = (run / "train.log").read_text()
    assert log.count("skipping 4 file(s)") == 1 and "red/cut.jpg" in log


def test_on_bad_image_error_refuses_with_the_list(tmp_path):
    tree = make_image_tree(tmp_path / "images", {"red": 6, "green": 6})
    _add_bad_files(tree / "green")
    result = train(tmp_path / "run", tree, "data.on_bad_image=error", check=False)
    assert result.returncode == 2
    assert "4 file(s)" in result.stderr and "green/notes.jpg" in result.stderr and "data.on_bad_image=skip" in result.stderr
    assert read_metrics(tmp_path / "run")["status"] == "failed"


@pytest.mark.parametrize("value", ["ignore", "Skip"])
def test_on_bad_image_takes_skip_or_error_only(tmp_path, tiny_tree, value):
    result = train(tmp_path / "run", tiny_tree, f"data.on_bad_image={value}", check=False)
    assert result.returncode == 2 and "data.on_bad_image must be one of skip, error" in result.stderr


def test_unicode_class_names_and_nested_folders(tmp_path):
    """Class names are folder names as they are; images in sub-folders belong to the top-level class."""
    tree = make_image_tree(tmp_path / "images", {"wild rosé": 8, "red": 4})
    make_image_tree(tree / "red" / "more", {"nested": 4}, seed=1)
    run = tmp_path / "run"
    train(run, tree, "model=resnet18", "strategy=frozen")
    metrics = read_metrics(run)
    assert metrics["class_names"] == ["red", "wild rosé"]
    assert sum(metrics["images"].values()) == 16
    assert any(p.startswith("red/more/nested/") for p in _split_rows(run))


def test_jobs_started_side_by_side_decode_each_file_once(tmp_path, monkeypatch):
    """perf.sweep_jobs: jobs that start together share one check; the others wait and read its verdicts."""
    folder = tmp_path / "images"
    _odd_images(folder)
    paths = sorted(folder.iterdir())
    decoded = []

    def slow_decode(path):  # long enough that every job asks while the first is still decoding
        time.sleep(0.05)
        decoded.append(path)

    monkeypatch.setattr(image_files, "decode_error", slow_decode)
    with ThreadPoolExecutor(4) as jobs:  # flock: separate opens of the lock file exclude each other, threads too
        found = list(jobs.map(lambda _: find_unreadable(paths, tmp_path / "verdicts.json", threads=1), range(4)))
    assert found == [{}] * 4
    assert sorted(decoded) == paths  # each file decoded once, not once per job
    assert list(tmp_path.glob(".*lock")) == []  # the lock file goes with the work


def test_verdicts_in_a_folder_that_takes_no_lock_file_are_still_read(tmp_path, monkeypatch):
    """A read-only data dir holding earlier verdicts: no lock file can be made there, and none is needed to read them."""
    folder = tmp_path / "images"
    _odd_images(folder)
    paths, verdicts = sorted(folder.iterdir()), tmp_path / "verdicts.json"
    assert find_unreadable(paths, verdicts, threads=1) == {}

    def read_only(*_):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(image_files, "one_job_at_a_time", read_only)
    monkeypatch.setattr(image_files, "decode_error", lambda p: pytest.fail(f"{p} decoded again"))
    assert find_unreadable(paths, verdicts, threads=1) == {}


def test_verdicts_that_cannot_be_saved_are_a_warning_not_a_crash(tmp_path, caplog):
    """A read-only (or full) data dir: this run still skips the bad files; the message says the next run checks again."""
    folder = tmp_path / "images"
    _odd_images(folder)
    _add_bad_files(folder)
    (tmp_path / "not_a_folder").write_text("")
    verdicts = tmp_path / "not_a_folder" / "verdicts.json"  # no folder can be made here, not even by root
    bad = find_unreadable(sorted(folder.iterdir()), verdicts, threads=1)
    assert sorted(p.name for p in bad) == sorted(BAD)
    assert "could not save the image checks" in caplog.text and "data.image_checks" in caplog.text


def test_broken_symbolic_links_are_reported_not_left_out(tmp_path):
    """A link whose target moved (a drive not mounted): was left out silently, an image or a whole class fewer."""
    from tlexp.data.files import image_files, list_classes
    from tlexp.errors import TlexpError

    tree = make_image_tree(tmp_path / "images", {"red": 2, "green": 2})
    (tree / "red" / "gone.jpg").symlink_to(tmp_path / "elsewhere" / "gone.jpg")
    listed = image_files(tree / "red")
    assert tree / "red" / "gone.jpg" in listed
    assert find_unreadable(listed, None, threads=1) == {tree / "red" / "gone.jpg": f"broken symbolic link to {tmp_path / 'elsewhere' / 'gone.jpg'}"}
    (tree / "blue").symlink_to(tmp_path / "unmounted" / "blue")
    with pytest.raises(TlexpError, match=r"broken symbolic link\(s\) under .*: blue -> .*unmounted/blue\. Point them"):
        list_classes(tree)


def test_a_class_folder_linked_to_another_class_is_refused(tmp_path):
    """Was: its files trained with two labels, and one copy could land in train and the other in test."""
    from tlexp.data.files import list_classes
    from tlexp.errors import TlexpError

    tree = make_image_tree(tmp_path / "images", {"red": 2, "green": 2})
    (tree / "also_red").symlink_to(tree / "red")
    with pytest.raises(TlexpError, match=r"2 image file\(s\) under .* are in two class folders through symbolic links \(also_red/img_000.jpg = red/img_000.jpg"):
        list_classes(tree)
    (tree / "also_red").unlink()
    (tree / "green" / "red_too").symlink_to(tree / "red")  # a link into another class, one level down
    with pytest.raises(TlexpError, match=r"green/red_too/img_000.jpg = red/img_000.jpg"):
        list_classes(tree)
    (tree / "green" / "red_too").unlink()
    (tree / "red" / "again.jpg").symlink_to(tree / "red" / "img_000.jpg")  # within one class: one label, still used
    assert len(list_classes(tree)["red"]) == 3


def test_files_that_are_not_images_by_their_extension_are_named(tmp_path, caplog):
    """.jfif, .heic, ...: were left out silently, and a class of only those was 'no images' without saying why."""
    from tlexp.data.files import list_classes
    from tlexp.errors import TlexpError

    tree = make_image_tree(tmp_path / "images", {"red": 2, "green": 2})
    (tree / "red" / "photo.jfif").write_bytes(_jpeg_bytes())
    assert [p.name for p in list_classes(tree)["red"]] == ["img_000.jpg", "img_001.jpg"]
    assert "1 file(s) not read (.jfif: 1): tlexp reads .bmp, .gif, .jpeg, .jpg" in caplog.text
    (tree / "blue").mkdir()
    (tree / "blue" / "IMG_1.HEIC").write_bytes(b"")
    (tree / "blue" / "IMG_2.heic").write_bytes(b"")
    with pytest.raises(TlexpError, match=r"no images under .*: blue \(2 file\(s\) not read \(\.heic: 2\): tlexp reads"):
        list_classes(tree)
