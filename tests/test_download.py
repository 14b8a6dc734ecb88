"""TF Flowers' download path, exercised against a local archive served as a file:// URL."""

from __future__ import annotations

import io
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import make_image_tree, read_metrics, run_cli
from tlexp.data import download
from tlexp.data.download import download_and_extract
from tlexp.errors import TlexpError
from tlexp.record import file_digest


@pytest.fixture
def archive(tmp_path):
    src = make_image_tree(tmp_path / "src" / "flower_photos", {"daisy": 3, "roses": 3})
    path = tmp_path / "flower_photos.tgz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname="flower_photos")
    return path


def test_download_verifies_and_extracts(tmp_path, archive):
    root = tmp_path / "cache" / "flower_photos"
    download_and_extract(archive.as_uri(), file_digest(archive), root)
    assert sorted(p.name for p in root.iterdir()) == ["daisy", "roses"]
    assert len(list((root / "daisy").iterdir())) == 3
    assert (root.parent / "flower_photos.tgz").exists()
    assert [p.name for p in root.parent.iterdir() if p.name.startswith(".")] == []


def test_an_extraction_killed_mid_way_leaves_nothing_after_the_next_download(tmp_path, archive):
    """Was: each SIGKILL during extraction left a hidden staging folder (TF Flowers: 230 MB) for good. Another
    data set's extraction beside it (flower_photos-v2, under its own lock) is left alone."""
    root = tmp_path / "cache" / "flower_photos"
    killed = root.parent / ".flower_photos.extracting-k1ll3d" / "flower_photos" / "daisy"
    killed.mkdir(parents=True)
    (killed / "img_000.jpg").write_bytes(b"half")
    (root.parent / ".flower_photos-v2.extracting-l1v3").mkdir()
    download_and_extract(archive.as_uri(), file_digest(archive), root)
    assert sorted(p.name for p in root.parent.iterdir()) == [".flower_photos-v2.extracting-l1v3", "flower_photos", "flower_photos.tgz"]


def test_a_checksum_in_upper_case_is_the_same_checksum(tmp_path, archive):
    """Was: 'downloaded with sha256 4c54..., expected 4C54...: corrupt or changed' after every download."""
    root = tmp_path / "cache" / "flower_photos"
    download_and_extract(archive.as_uri(), file_digest(archive).upper(), root)
    assert sorted(p.name for p in root.iterdir()) == ["daisy", "roses"]


def test_bad_checksum_leaves_nothing_that_looks_complete(tmp_path, archive):
    root = tmp_path / "cache" / "flower_photos"
    with pytest.raises(TlexpError, match="expected 0000"):
        download_and_extract(archive.as_uri(), "0" * 64, root)
    assert not root.exists()
    assert list(root.parent.iterdir()) == []


def test_unreachable_url_says_how_to_work_offline(tmp_path):
    with pytest.raises(TlexpError, match="point data.root at a local copy"):
        download_and_extract((tmp_path / "missing" / "flower_photos.tgz").as_uri(), None, tmp_path / "cache" / "flower_photos")


def test_datamodule_downloads_only_when_root_is_missing(tmp_path, archive, compose_cfg):
    from tlexp.data.datamodule import ImageDataModule

    cfg = compose_cfg(f"data.root={tmp_path}/cache/flower_photos", f"data.url={archive.as_uri()}", f"data.sha256={file_digest(archive)}")
    dm = ImageDataModule(cfg.data, seed=0)
    dm.setup()
    assert dm.class_names == ["daisy", "roses"]
    archive.unlink()  # a second module finds the extracted copy and never looks at the URL
    dm2 = ImageDataModule(cfg.data, seed=0)
    dm2.setup()
    assert dm2.class_names == ["daisy", "roses"]


def test_jobs_started_side_by_side_download_once(tmp_path, archive, monkeypatch):
    """perf.sweep_jobs on a machine without the data set: one job fetches it, the others wait and use it."""
    fetched, fetch = [], download._fetch

    def slow_fetch(url, dest):  # every job asks while the first is still fetching
        fetched.append(url)
        time.sleep(0.2)
        fetch(url, dest)

    monkeypatch.setattr(download, "_fetch", slow_fetch)
    root = tmp_path / "cache" / "flower_photos"
    with ThreadPoolExecutor(3) as jobs:
        list(jobs.map(lambda _: download_and_extract(archive.as_uri(), file_digest(archive), root), range(3)))
    assert len(fetched) == 1
    assert sorted(p.name for p in root.iterdir()) == ["daisy", "roses"] and len(list((root / "roses").iterdir())) == 3
    assert [p.name for p in root.parent.iterdir() if p.name.startswith(".")] == []


def test_a_root_the_archive_cannot_extract_to_is_refused_before_downloading(tmp_path, archive, monkeypatch, compose_cfg):
    """A typo in data.root (flower_photo): one line naming where a download extracts, nothing fetched or made;
    a mirror's archive of another name (data.url) still extracts to flower_photos."""
    from tlexp.data.datamodule import ImageDataModule

    monkeypatch.setattr(download, "_fetch", lambda url, dest: pytest.fail("fetched"))
    typo = tmp_path / "typo_dir" / "flower_photo"
    cfg = compose_cfg(f"data.root={typo}", f"data.url={archive.as_uri()}")
    with pytest.raises(TlexpError, match=f"extracts to {tmp_path / 'typo_dir' / 'flower_photos'}: point data.root there"):
        ImageDataModule(cfg.data, seed=0).prepare_data()
    assert not typo.parent.exists()
    monkeypatch.undo()
    mirror = archive.rename(archive.with_name("tf_flowers_mirror.tgz"))
    root = tmp_path / "cache" / "flower_photos"
    mirrored = compose_cfg(f"data.root={root}", f"data.url={mirror.as_uri()}", f"data.sha256={file_digest(mirror)}")
    ImageDataModule(mirrored.data, seed=0).prepare_data()
    assert sorted(p.name for p in root.iterdir()) == ["daisy", "roses"]


def test_tlexp_train_refuses_a_mistyped_tf_flowers_root_in_one_line(tmp_path, archive):
    typo = tmp_path / "typo_dir" / "flower_photo"
    result = run_cli("model.weights=null", f"data.root={typo}", f"data.url={archive.as_uri()}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"tlexp-train: error: data.root={typo} does not exist; a download extracts to {typo.parent}/flower_photos: point "
        "data.root there (or, for a folder of class sub-folders you already have, data=imagefolder data.root=<it>)"
    )
    assert not typo.parent.exists() and read_metrics(tmp_path / "run")["status"] == "failed"


def _add(tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = 0 if kind != tarfile.REGTYPE else 4
    tar.addfile(info, io.BytesIO(b"evil") if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize(
    ("name", "kind", "link", "what"),
    [
        ("flower_photos/../../evil.txt", tarfile.REGTYPE, "", "a file or folder"),
        ("/tmp/tlexp_evil.txt", tarfile.REGTYPE, "", "a file or folder"),
        ("flower_photos/daisy/out", tarfile.SYMTYPE, "/tmp", "a link to '/tmp'"),
        ("flower_photos/daisy/up", tarfile.SYMTYPE, "../..", "a link to '../..'"),
        ("flower_photos/daisy/hard", tarfile.LNKTYPE, "../evil.txt", "a link to '../evil.txt'"),
        ("flower_photos/daisy/null", tarfile.CHRTYPE, "", "a device or pipe"),
    ],
    ids=["dotdot_path", "absolute_path", "symlink_out", "symlink_up", "hardlink_out", "device"],
)
@pytest.mark.parametrize("python_has_filter", [True, False], ids=["filter", "no_filter"])
def test_an_archive_that_writes_outside_its_folder_is_refused(tmp_path, archive, monkeypatch, name, kind, link, what, python_has_filter):
    """filter="data" is Python >= 3.10.12 / 3.11.4 only (requires-python is >= 3.10: was a TypeError on
    older ones); members are checked on every Python, and a good archive extracts without the keyword."""
    if not python_has_filter:  # as on Python 3.10.11: no data_filter, and extractall takes no filter=
        monkeypatch.delattr(tarfile, "data_filter")
        extractall = tarfile.TarFile.extractall
        monkeypatch.setattr(tarfile.TarFile, "extractall", lambda self, path=".", members=None, *, numeric_owner=False:
                            extractall(self, path, members, numeric_owner=numeric_owner))
        good = tmp_path / "good" / "flower_photos"
        download_and_extract(archive.as_uri(), file_digest(archive), good)
        assert sorted(p.name for p in good.iterdir()) == ["daisy", "roses"] and len(list((good / "roses").iterdir())) == 3
    evil = tmp_path / "evil.tgz"
    with tarfile.open(archive) as source, tarfile.open(evil, "w:gz") as tar:
        for member in source.getmembers():
            tar.addfile(member, source.extractfile(member) if member.isfile() else None)
        _add(tar, name, kind, link)
    root = tmp_path / "cache" / "flower_photos"
    with pytest.raises(TlexpError) as refused:
        download_and_extract(evil.as_uri(), file_digest(evil), root)
    assert str(refused.value) == (
        f"{root.parent / 'evil.tgz'} is refused, nothing extracted: its member {name!r} ({what}) could write outside the folder "
        "it is extracted to. Check data.url, or extract it yourself and point data.root at the folder"
    )
    assert not root.exists() and sorted(p.name for p in root.parent.iterdir()) == ["evil.tgz"]
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "cache" / "evil.txt").exists() and not Path("/tmp/tlexp_evil.txt").exists()


@pytest.mark.parametrize("content", ["error_page", "cut_download"])
def test_an_archive_that_does_not_read_is_one_line_and_removed(tmp_path, archive, content):
    """With data.sha256 unset, a mirror's error page or a cut download: was a tarfile.ReadError traceback,
    and the file stayed, so every later run failed the same way without downloading again."""
    bad = tmp_path / "served" / "flower_photos.tgz"
    bad.parent.mkdir()
    bad.write_bytes(b"<html>404 Not Found</html>" if content == "error_page" else archive.read_bytes()[: archive.stat().st_size // 2])
    root = tmp_path / "cache" / "flower_photos"
    with pytest.raises(TlexpError, match=f"^{root.parent / 'flower_photos.tgz'} is not a readable .tgz archive .*: removed it; run again to download it again$"):
        download_and_extract(bad.as_uri(), None, root)
    assert list(root.parent.iterdir()) == []
    bad.write_bytes(archive.read_bytes())  # the mirror is mended: the next run downloads and extracts
    download_and_extract(bad.as_uri(), None, root)
    assert sorted(p.name for p in root.iterdir()) == ["daisy", "roses"]


def test_a_url_without_a_scheme_is_one_line(tmp_path):
    """Was: ValueError: unknown url type: 'flower_photos.tgz' (a traceback)."""
    with pytest.raises(TlexpError, match=r"^could not download flower_photos.tgz \(unknown url type: 'flower_photos.tgz'\)"):
        download_and_extract("flower_photos.tgz", None, tmp_path / "cache" / "flower_photos")
