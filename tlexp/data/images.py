"""Reading image files the way every part of tlexp does, and finding those that cannot be read.

Every file is decoded in full once before a run (a truncated JPEG only fails when its pixels are
read), so a bad file is skipped or reported up front instead of stopping a run mid-epoch; the
verdicts are remembered by path and content digest, so later runs decode only what changed (an
edit that keeps the size and modification time, as ``exiftool -P`` does, is a change too).
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from tlexp.errors import TlexpError
from tlexp.one_job_at_a_time import one_job_at_a_time
from tlexp.record import file_digest

log = logging.getLogger(__name__)
# PIL refuses images over 2 x 89.5 megapixels as possible decompression bombs, which skipped real
# photos (a 14000 x 14000 scan). Up to 1 gigapixel (3 GB decoded, transient) is read; beyond, refused.
Image.MAX_IMAGE_PIXELS = 500_000_000


def load_rgb(path: Path) -> Image.Image:
    """8-bit RGB, upright: EXIF rotation applied; grey, palette, RGBA, CMYK converted; 16-bit, 32-bit, float scaled.

    PIL's own ``convert("RGB")`` clips 16-bit, 32-bit and float values at 255 or 0 (a white or black
    image): see ``_to_8_bit`` for how they are scaled first.
    """
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I") or image.mode == "F":
            image = Image.fromarray(_to_8_bit(np.asarray(image), sixteen_bit=image.mode.startswith("I;16")))
        return image.convert("RGB")


def _to_8_bit(values: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """One grey channel of a 16-bit (I;16), 32-bit integer (I) or float (F) image, as 0-255 uint8.

    A 16-bit file declares its depth: its high byte (65535 -> 255), so a dark image stays dark. An I
    image (a 32-bit TIFF, or an array) declares none, so the values tell: 0-255 kept as they are,
    0-65535 its high byte too. A float image's convention is 0-1: times 255. Any other range (wider
    integers, floats past 1, depth maps) has no convention: divided by its maximum, so 0 stays black,
    or stretched from its minimum to its maximum when it has negative values. NaN is black.
    """
    if sixteen_bit:
        return (values.astype(np.uint32) >> 8).astype(np.uint8)
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if values.dtype.kind != "f" and low >= 0 and high <= 65535:
        return (values if high <= 255 else values.astype(np.int64) >> 8).astype(np.uint8)
    if values.dtype.kind == "f" and low >= 0 and high <= 1:
        high = 1.0
    low = min(low, 0.0)
    scaled = np.nan_to_num(values.astype(np.float32), nan=low, posinf=high, neginf=low)
    scaled -= low
    scaled *= 255 / (high - low) if high > low else 0
    return np.rint(scaled, out=scaled).clip(0, 255).astype(np.uint8)


def decode_error(path: Path) -> str | None:
    """Why ``path`` is not a usable image, or None when it decodes."""
    if path.is_symlink() and not path.exists():
        return f"broken symbolic link to {os.readlink(path)}"
    try:
        load_rgb(path)
    except Exception as exc:  # noqa: BLE001 -- PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"{type(exc).__name__}: {exc}"
    return None


def find_unreadable(paths: list[Path], verdicts_file: Path | None, threads: int) -> dict[Path, str]:
    """Path -> reason for every file in ``paths`` that does not decode (PIL releases the GIL: threads).

    Jobs of a sweep started side by side (perf.sweep_jobs) would each decode every file: one
    does, under a lock next to ``verdicts_file``, and the others read its verdicts.
    """
    with ThreadPoolExecutor(max(1, threads)) as pool:  # hashlib releases the GIL on large buffers too
        stamps = dict(zip(paths, pool.map(_stamp, paths)))
    with ExitStack() as alone:
        if verdicts_file is not None:
            try:
                alone.enter_context(one_job_at_a_time(
                    verdicts_file.with_name(f".{verdicts_file.name}.lock"), "image checks: another job is decoding these images"
                ))
            except OSError:  # no lock in a read-only folder: every job checks for itself, as verdicts there allow
                pass
        known = _load(verdicts_file)
        todo = [p for p in paths if stamps[p] is None or known.get(str(p), {}).get("stamp") != stamps[p]]
        if todo:
            start = time.perf_counter()
            with ThreadPoolExecutor(max(1, threads)) as pool:
                for path, error in zip(todo, pool.map(decode_error, todo)):
                    known[str(path)] = {"stamp": stamps[path], "error": error}
            log.info("decoded %d new or changed images in %.1f s to check them", len(todo), time.perf_counter() - start)
            _save(verdicts_file, known)
    return {p: known[str(p)]["error"] for p in paths if known[str(p)]["error"] is not None}


def _stamp(path: Path) -> str | None:
    """The file's content digest; None when it cannot be read (a broken link): decoding says why."""
    try:
        return file_digest(path)
    except OSError:
        return None


def bad_image_policy(
    paths: list[Path], policy: str, option: str | None, verdicts_file: Path | None, threads: int, root: Path | None = None
) -> dict[Path, str]:
    """The files that do not decode, handled as ``policy`` says: ``error`` raises, ``skip`` logs them once.

    Returns them (empty when all decode) for the caller to leave out; ``option`` names the config
    key in the messages (None where no setting chooses: tlexp-export), ``root`` shortens the listed paths.
    """
    bad = find_unreadable(paths, verdicts_file, threads)
    if not bad:
        return bad
    listing = "\n".join(f"  {p.relative_to(root) if root else p}: {why}" for p, why in sorted(bad.items()))
    where = f" under {root}" if root else ""
    if policy == "error":
        raise TlexpError(f"{len(bad)} file(s){where} do not decode as images:\n{listing}\nFix or remove them, or set {option}=skip")
    log.warning("skipping %d file(s) that do not decode as images (%s):\n%s", len(bad), f"{option}=skip" if option else "left out", listing)
    return bad


def _load(verdicts_file: Path | None) -> dict:
    if verdicts_file is None or not verdicts_file.exists():
        return {}
    try:
        return json.loads(verdicts_file.read_text())
    except (OSError, ValueError):  # a damaged verdict file only costs a re-check
        return {}


def _save(verdicts_file: Path | None, known: dict) -> None:
    if verdicts_file is None:
        return
    tmp = verdicts_file.with_name(f".{verdicts_file.name}.{os.getpid()}.tmp")
    try:
        verdicts_file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(known))
        os.replace(tmp, verdicts_file)  # a write killed half-way leaves the old version whole
    except OSError as exc:  # a read-only or full data dir: this run has its verdicts; the next decodes again
        with suppress(OSError):
            tmp.unlink()
        log.warning("could not save the image checks to %s (%s): the next run decodes every new image again; "
                    "point data.image_checks at a writable file to keep them", verdicts_file, exc)
