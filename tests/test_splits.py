"""Listing and splitting image trees: deterministic, stratified, disjoint; clear errors for bad trees; training batches."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import make_image_tree, train
from tlexp.data.datamodule import ImageDataModule
from tlexp.data.files import list_classes, stratified_split
from tlexp.errors import TlexpError


def _split(root, seed=42, fractions=(0.7, 0.15, 0.15), limit=None):
    return stratified_split(root, list_classes(root), fractions, seed, limit)


def _paths(split):
    return {subset: sorted(s.path.name + s.path.parent.name for s in samples) for subset, samples in split.items()}


def test_split_is_stratified_disjoint_covering_and_deterministic(tmp_path):
    root = make_image_tree(tmp_path, {"a": 20, "b": 40, "c": 7})
    split = _split(root)
    per_class = {s: Counter(x.label for x in v) for s, v in split.items()}
    assert per_class["train"] == {0: 14, 1: 28, 2: 5}
    assert per_class["val"] == {0: 3, 1: 6, 2: 1}
    assert per_class["test"] == {0: 3, 1: 6, 2: 1}
    every = [x.path for v in split.values() for x in v]
    assert len(every) == len(set(every)) == 67
    assert _paths(_split(root)) == _paths(split)
    assert _paths(_split(root, seed=7)) != _paths(split)


def test_limit_per_class_takes_at_most_n(tmp_path):
    root = make_image_tree(tmp_path, {"a": 20, "b": 40})
    split = _split(root, limit=10)
    assert Counter(x.label for v in split.values() for x in v) == {0: 10, 1: 10}


def test_split_ignores_hidden_and_non_image_files(tmp_path):
    root = make_image_tree(tmp_path, {"a": 10, "b": 10})
    before = _paths(_split(root))
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "a" / ".hidden.jpg").write_bytes(b"")
    (root / ".cache").mkdir()
    assert _paths(_split(root)) == before


@pytest.mark.parametrize("fractions", [(0.5, 0.2, 0.2), (0.7, 0.3, 0.1), (0.0, 0.5, 0.5), (1.2, -0.1, -0.1)])
def test_split_that_does_not_add_up(tmp_path, fractions):
    root = make_image_tree(tmp_path, {"a": 5, "b": 5})
    with pytest.raises(TlexpError, match="summing to 1"):
        _split(root, fractions=fractions)


def test_bad_trees(tmp_path):
    with pytest.raises(TlexpError, match="no class sub-folders"):
        list_classes(tmp_path)
    make_image_tree(tmp_path, {"only": 3})
    with pytest.raises(TlexpError, match="single class"):
        list_classes(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TlexpError, match="no images under .*: empty"):
        list_classes(tmp_path)


def _datamodule(root, **overrides):
    cfg = OmegaConf.create(
        {"kind": "imagefolder", "root": root if root is None else str(root), "split": [0.7, 0.15, 0.15], "image_size": None, "batch_size": 4,
         "num_workers": 0, "limit_per_class": None, "augment": {"hflip": True, "crop_scale": [0.8, 1.0], "rotation": 0, "shear": 0},
         "on_bad_image": "skip", "image_checks": None}
    )
    return ImageDataModule(OmegaConf.merge(cfg, overrides), seed=1)


def test_seed_repeats_share_one_split_unless_split_seed_changes(tmp_path):
    """Issue 17: data.split_seed (default 42) apart from the training seed; null falls back to it."""
    root = make_image_tree(tmp_path, {"a": 20, "b": 20})

    def split_of(seed, split_seed):
        dm = _datamodule(root, split_seed=split_seed)
        dm.seed = seed
        dm.setup()
        return _paths(dm.split)

    assert split_of(1, 42) == split_of(2, 42) == _paths(_split(root, seed=42))
    assert split_of(1, 7) != split_of(1, 42)
    assert split_of(7, None) == _paths(_split(root, seed=7))


def test_a_file_name_that_is_not_utf8_is_split_and_recorded(tmp_path):
    """Issue 15: caf\\xe9.jpg (Latin-1 bytes) no longer kills the run while ranking files."""
    root = make_image_tree(tmp_path / "images", {"a": 5, "b": 5})
    os.rename(root / "a" / "img_000.jpg", os.fsencode(root / "a") + b"/caf\xe9.jpg")
    dm = _datamodule(root)
    dm.split_file = tmp_path / "split.csv"
    dm.setup()
    assert "caf\udce9.jpg" in [s.path.name for samples in dm.split.values() for s in samples]
    assert b"a/caf\xe9.jpg" in dm.split_file.read_bytes()


def test_a_class_named_train_is_a_class_not_a_split(tmp_path):
    root = make_image_tree(tmp_path, {"bus": 5, "car": 5, "train": 5})
    dm = _datamodule(root)
    dm.setup()
    assert dm.class_names == ["bus", "car", "train"] and len(dm.split["train"]) == 9


def test_presplit_tree_is_used_as_given(tmp_path):
    for subset, n in (("train", 6), ("val", 2), ("test", 3)):
        make_image_tree(tmp_path / subset, {"x": n, "y": n})
    dm = _datamodule(tmp_path)
    dm.setup()
    assert dm.class_names == ["x", "y"]
    assert {s: len(v) for s, v in dm.split.items()} == {"train": 12, "val": 4, "test": 6}


def test_presplit_with_different_classes_is_refused(tmp_path):
    make_image_tree(tmp_path / "train", {"x": 3, "y": 3})
    make_image_tree(tmp_path / "val", {"x": 3, "y": 3})
    make_image_tree(tmp_path / "test", {"x": 3, "z": 3})
    with pytest.raises(TlexpError, match="different class folders"):
        _datamodule(tmp_path).setup()


def test_missing_and_file_roots(tmp_path):
    with pytest.raises(TlexpError, match="does not exist"):
        _datamodule(tmp_path / "nope").setup()
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(TlexpError, match="is a file"):
        _datamodule(tmp_path / "file.jpg").setup()


@pytest.mark.parametrize("root", [None, ""], ids=["null", "empty"])
def test_a_root_without_a_value_is_refused(root):
    """Was: data.root=null a TypeError traceback, and data.root= the working directory's folders taken for classes."""
    with pytest.raises(TlexpError, match="^data.root has no value: give data.root=<folder of class sub-folders>$"):
        _datamodule(root).setup()


def test_split_file_is_written(tmp_path):
    root = make_image_tree(tmp_path / "img", {"a": 10, "b": 10})
    dm = ImageDataModule(_datamodule(root).cfg, seed=1, split_file=tmp_path / "split.csv")
    dm.setup()
    lines = (tmp_path / "split.csv").read_text().splitlines()
    assert lines[0] == "subset,class,label,path" and len(lines) == 21


def test_symlinked_sub_folders_inside_a_class_are_followed(tmp_path):
    root = make_image_tree(tmp_path / "tree", {"a": 3, "b": 3})
    extra = make_image_tree(tmp_path / "elsewhere", {"more": 2})
    (root / "a" / "linked").symlink_to(extra / "more", target_is_directory=True)
    (root / "b" / "loop").symlink_to(root / "b", target_is_directory=True)  # a cycle is walked once
    classes = list_classes(root)
    assert len(classes["a"]) == 5 and len(classes["b"]) == 3


def test_a_class_too_small_for_val_and_test_is_named_and_not_scored(tmp_path, caplog):
    from tests.conftest import read_metrics, train

    root = make_image_tree(tmp_path / "tree", {"big": 12, "tiny": 2})
    caplog.set_level("WARNING")
    split = _split(root)
    assert "class tiny has 2 image(s): none goes to validation or test; its test recall is not measured" in caplog.text
    assert not [s for s in split["test"] if s.label == 1]
    run = tmp_path / "run"
    train(run, root, "model=resnet18", "strategy=frozen")
    assert read_metrics(run)["test_recall_per_class"]["tiny"] is None


def test_a_presplit_class_left_without_readable_images_is_named_with_its_subset(tmp_path):
    """Was: 'bad files: b', with train/b, val/b and test/b to search, and no word on what to do."""
    for subset in ("train", "val", "test"):
        make_image_tree(tmp_path / subset, {"a": 3, "b": 3})
    for image in (tmp_path / "val" / "b").iterdir():
        image.write_text("not an image")
    with pytest.raises(TlexpError, match=r"under .* with no readable image left after skipping bad files: val/b\. Add images that decode"):
        _datamodule(tmp_path).setup()


def test_a_class_folder_name_that_is_not_utf8_is_refused_up_front(tmp_path):
    """ros\\xe9 (Latin-1 bytes): was a UnicodeEncodeError from TensorBoard after the first epoch had been trained."""
    root = make_image_tree(tmp_path / "images", {"a": 3, "b": 3})
    os.rename(root / "b", os.fsencode(root) + b"/ros\xe9")
    with pytest.raises(TlexpError, match=r"not valid UTF-8: b'ros\\xe9'\. Rename them"):
        list_classes(root)


# tiny_tree's 18 training images at 32 px: ResNet-18's last BatchNorm layers see 1x1 maps, so one image is one value.
BATCHNORM_ON_1X1 = ("model=resnet18", "profile.enabled=false")
DROPPED = "the last training batch would hold 1 image"


def _steps_and_log(run_dir):
    steps = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    return steps, (run_dir / "train.log").read_text()


@pytest.mark.parametrize(
    "path", [("strategy=full", "perf.feature_cache=false"), ("strategy=blocks_2",)], ids=["images", "cached_prefix_outputs"]
)
def test_a_last_training_batch_of_one_image_is_dropped_not_a_batchnorm_crash(tmp_path, tiny_tree, path):
    """18 = 17 + 1: was "ValueError: Expected more than 1 value per channel when training" in phase B."""
    train(tmp_path / "run", tiny_tree, *BATCHNORM_ON_1X1, *path, "data.batch_size=17")
    steps, text = _steps_and_log(tmp_path / "run")
    assert steps == 2 and text.count(DROPPED) == 1  # one batch of 17 in each of the 2 epochs, said once


def test_a_last_training_batch_of_two_images_is_kept(tmp_path, tiny_tree):
    """18 = 2 * 8 + 2, on cached features (phase A) and on images (phase B): every image trains."""
    train(tmp_path / "run", tiny_tree, *BATCHNORM_ON_1X1, "strategy=full")
    steps, text = _steps_and_log(tmp_path / "run")
    assert steps == 2 * 3 and DROPPED not in text


def test_under_ddp_a_ranks_last_batch_of_one_image_is_dropped(tmp_path, tiny_tree):
    """Each of 2 ranks trains on 9 = 8 + 1 of the 18 images (18 = 2 * 8 + 2 would keep all): the rank's share decides."""
    train(tmp_path / "run", tiny_tree, *BATCHNORM_ON_1X1, "trainer=ddp_cpu", "strategy=full", "perf.feature_cache=false")
    steps, text = _steps_and_log(tmp_path / "run")
    assert steps == 2 and DROPPED in text
