"""Listing an image tree and splitting it: seeded, stratified, identical on every machine.

Each file's place in its class's order is the SHA-256 of ``seed:relative/path``, so the split does not
depend on the file system's listing order, the Python version or the platform, and a file keeps
its rank when unrelated files are added.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tlexp.errors import RunDirRefused, TlexpError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SUBSETS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


def is_image_file(path: Path) -> bool:
    """An image's name, not hidden, and a file or a broken symbolic link: the decode check reports a broken link
    (a target moved, a drive not mounted) instead of it being left out silently."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and (path.is_file() or not path.exists())


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder``, hidden ones left out; symlinked sub-folders are followed (each real folder once)."""
    return listing(folder)[0]


def listing(folder: Path) -> tuple[list[Path], Counter[str]]:
    """``image_files(folder)``, and the other files there (not hidden) by extension: they are named, not lost silently."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        dirnames[:] = [] if real in seen else [d for d in dirnames if not d.startswith(".")]
        if real not in seen:
            seen.add(real)
            found += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    images = sorted(p for p in found if is_image_file(p))
    return images, Counter(p.suffix.lower() or "(no extension)" for p in found if p.suffix.lower() not in IMAGE_EXTENSIONS)


def not_images(others: Counter[str]) -> str:
    """'3 file(s) not read (.heic: 2, .txt: 1): tlexp reads .bmp, ...', for messages about ``listing``'s others."""
    kinds = ", ".join(f"{ext}: {n}" for ext, n in others.most_common())
    return f"{sum(others.values())} file(s) not read ({kinds}): tlexp reads {', '.join(sorted(IMAGE_EXTENSIONS))}"


def _class_dirs(root: Path) -> list[Path]:
    entries = [d for d in root.iterdir() if not d.name.startswith(".")]
    if broken := [d for d in entries if d.is_symlink() and not d.exists()]:  # a class left out silently otherwise
        links = ", ".join(f"{d.name} -> {os.readlink(d)}" for d in sorted(broken))
        raise TlexpError(f"broken symbolic link(s) under {root}: {links}. Point them at their folders again, or remove them")
    return sorted(d for d in entries if d.is_dir())


def check_root(root: Path, hint: str) -> None:
    if not root.exists():
        raise TlexpError(f"data root {root} does not exist. {hint}")
    if not root.is_dir():
        raise TlexpError(f"data root {root} is a file, not a folder of class sub-folders. {hint}")


def list_classes(root: Path) -> dict[str, list[Path]]:
    """Class name → its image files; errors for a tree that cannot make a classifier."""
    listed = {d.name: listing(d) for d in _class_dirs(root)}
    classes = {name: images for name, (images, _) in listed.items()}
    if not classes:
        raise TlexpError(f"{root} has no class sub-folders: expected {root}/<class name>/<images>")
    if not_utf8 := [name for name in classes if not _is_utf8(name)]:
        # a class name is logged (TensorBoard tags) and printed as text: was a crash after the first epoch
        raise TlexpError(
            f"class folder name(s) under {root} that are not valid UTF-8: {', '.join(repr(os.fsencode(n)) for n in not_utf8)}. "
            "Rename them, e.g. convmv -f latin1 -t utf8 --notest <folder>"
        )
    others = sum((o for _, o in listed.values()), Counter())
    empty = [name for name, files in classes.items() if not files]
    if empty:
        not_read = sum((listed[name][1] for name in empty), Counter())
        note = f" ({not_images(not_read)})" if not_read else ""
        raise TlexpError(f"class folder(s) with no images under {root}: {', '.join(empty)}{note}. Add images or remove the folder(s)")
    if others:
        log.warning("class folders under %s: %s", root, not_images(others))
    if len(classes) < 2:
        raise TlexpError(f"{root} has a single class ({next(iter(classes))}); a classifier needs at least two")
    _refuse_files_in_two_classes(root, classes)
    return classes


def _is_utf8(name: str) -> bool:
    """False for a name read from bytes that are not UTF-8 (os.fsdecode keeps them as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _refuse_files_in_two_classes(root: Path, classes: dict[str, list[Path]]) -> None:
    """A class folder linked to (or into) another class would give its files two labels, in train and test alike."""
    owner: dict[str, tuple[str, Path]] = {}  # real path -> the class and the path it was first listed under
    shared = []
    real_dirs: dict[str, str] = {}  # a realpath per folder, not per file: 36 us a file here, so ~46 s (estimated) for ImageNet's 1.28M
    for name, files in classes.items():
        for path in files:
            folder, base = os.path.split(path)
            if folder not in real_dirs:
                real_dirs[folder] = os.path.realpath(folder)
            real = os.path.realpath(path) if os.path.islink(path) else os.path.join(real_dirs[folder], base)
            first_class, first = owner.setdefault(real, (name, path))
            if first_class != name:
                shared.append((first, path))
    if shared:
        pairs = ", ".join(f"{a.relative_to(root)} = {b.relative_to(root)}" for a, b in shared[:5])
        raise TlexpError(
            f"{len(shared)} image file(s) under {root} are in two class folders through symbolic links ({pairs}"
            f"{', ...' if len(shared) > 5 else ''}): each would be trained with two labels. Remove the links that put a file in a second class"
        )


def _rank_key(seed: int, root: Path, path: Path) -> str:
    # surrogateescape: a file name that is not valid UTF-8 (caf\xe9.jpg from a Latin-1 system) ranks by its bytes
    return hashlib.sha256(f"{seed}:{path.relative_to(root).as_posix()}".encode("utf-8", "surrogateescape")).hexdigest()


def _share(n: int, fraction: float) -> int:
    """Images of a class for a val/test subset: at least one when the class has three to spare."""
    share = round(n * fraction)
    return max(share, 1) if fraction > 0 and n >= 3 else share


def stratified_split(
    root: Path, classes: dict[str, list[Path]], fractions: tuple[float, float, float], seed: int, limit_per_class: int | None
) -> dict[str, list[Sample]]:
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6 or fractions[0] == 0:
        raise TlexpError(f"data.split must be three non-negative fractions (train, val, test) summing to 1, got {list(fractions)}")
    out: dict[str, list[Sample]] = {s: [] for s in SUBSETS}
    for label, (name, files) in enumerate(classes.items()):
        ranked = sorted(files, key=lambda p: _rank_key(seed, root, p))[:limit_per_class]
        n_val, n_test = (_share(len(ranked), f) for f in fractions[1:])
        n_train = len(ranked) - n_val - n_test
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(ranked))}
        for subset, (lo, hi) in bounds.items():
            out[subset] += [Sample(p, label) for p in ranked[lo:hi]]
        empty = [subset for subset, n, share in (("validation", n_val, fractions[1]), ("test", n_test, fractions[2])) if n == 0 < share]
        if empty:
            log.warning(
                "class %s has %d image(s): none goes to %s%s (add images)", name, len(ranked), " or ".join(empty),
                "; its test recall is not measured" if "test" in empty else "",
            )
    return out


def presplit_classes(root: Path) -> dict[str, dict[str, list[Path]]] | None:
    """Class files of ``root/{train,val,test}`` when the tree comes already split, else None.

    A ``train`` folder beside neither ``val`` nor ``test`` is a class (``bus car train``), not a split.
    """
    if not (root / "train").is_dir() or not any((root / s).is_dir() for s in SUBSETS[1:]):
        return None
    split = {s: list_classes(root / s) for s in SUBSETS if (root / s).is_dir()}
    if set(split) != set(SUBSETS):
        raise TlexpError(f"{root} has {sorted(split)}: a pre-split tree needs train/, val/ and test/")
    names = {s: list(c) for s, c in split.items()}
    if any(n != names["train"] for n in names.values()):
        raise TlexpError(f"train/val/test under {root} have different class folders: {names}")
    return split


def write_split(path: Path, root: Path, split: dict[str, list[Sample]], class_names: list[str]) -> None:
    """split.csv, one row per image; an existing one that records another split is never replaced."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["subset", "class", "label", "path"])
    for subset, samples in split.items():
        for s in samples:
            writer.writerow([subset, class_names[s.label], s.label, s.path.relative_to(root).as_posix()])
    data = text.getvalue().encode("utf-8", "surrogateescape")  # non-UTF-8 file names keep their bytes
    if path.exists() and path.read_bytes() != data:
        raise RunDirRefused(
            f"{path} records another split (other images, classes or seed): it belongs to another run. "
            "Resume it with its own data, or start a new run in another folder (hydra.run.dir=...)"
        )
    path.write_bytes(data)
