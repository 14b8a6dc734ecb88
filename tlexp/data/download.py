"""Checksum-verified, atomic download and extraction of a data-set archive."""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from contextlib import ExitStack
from pathlib import Path, PurePosixPath

from rich.progress import Progress

from tlexp.errors import TlexpError
from tlexp.one_job_at_a_time import one_job_at_a_time
from tlexp.record import file_digest
from tlexp.storage import write_failure

log = logging.getLogger(__name__)
ELSEWHERE = "point TLEXP_DATA_DIR (paths.data_dir) at another folder, and run again"


def _fetch(url: str, dest: Path) -> None:
    """Stream ``url`` into ``dest`` with a progress bar."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out, Progress() as bar:
        task = bar.add_task(f"downloading {Path(url).name}", total=int(response.headers.get("Content-Length") or 0) or None)
        for chunk in iter(lambda: response.read(1 << 20), b""):
            out.write(chunk)
            bar.advance(task, len(chunk))


def download_and_extract(url: str, sha256: str | None, root: Path) -> None:
    """Make ``root`` exist by fetching ``url`` (a .tgz holding a top folder named like ``root``).

    The archive lands beside ``root``; it is renamed into place only once its checksum matches, and
    it is extracted to a temporary folder that is renamed to ``root`` at the end, so an interrupted
    run never leaves a folder that looks complete. Jobs of a sweep started side by side
    (perf.sweep_jobs) download it once: one fetches, the others wait and find ``root``.
    """
    lock = root.parent / f".{root.name}.download.lock"
    with ExitStack() as alone:
        try:
            alone.enter_context(one_job_at_a_time(lock, f"{root.name}: another job is downloading it"))
        except OSError as exc:
            raise TlexpError(
                f"cannot download into {root.parent} ({exc}): point TLEXP_DATA_DIR (paths.data_dir) at a folder "
                "you can write, or data.root at a local copy"
            ) from exc
        if not root.exists():  # else another job made it while this one waited
            _download_and_extract(url, sha256, root)


def _download_and_extract(url: str, sha256: str | None, root: Path) -> None:
    parent = root.parent  # made by the lock beside it
    sha256 = sha256 and sha256.lower()  # a checksum copied in upper case is the same checksum
    archive = parent / Path(url).name
    if not archive.exists() or (sha256 and file_digest(archive) != sha256):
        part = archive.with_name(archive.name + ".part")
        log.info("downloading %s to %s", url, archive)
        try:
            _fetch(url, part)
        except (OSError, ValueError, http.client.HTTPException) as exc:  # ValueError: a URL without a scheme
            part.unlink(missing_ok=True)
            if full := write_failure(parent, f"the download of {archive.name}", exc, ELSEWHERE):
                raise full from exc
            raise TlexpError(
                f"could not download {url} ({exc}). Offline? Copy the extracted data set to {root} "
                "or point data.root at a local copy"
            ) from exc
        if sha256 and (actual := file_digest(part)) != sha256:
            part.unlink()
            raise TlexpError(f"{url} downloaded with sha256 {actual}, expected {sha256}: corrupt or changed; try again")
        os.replace(part, archive)
    for leftover in parent.glob(f".{root.name}.extracting-*"):  # an extraction killed mid-way; under the lock, no other one runs
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.extracting-", dir=parent))
    members: list[tarfile.TarInfo] = []
    try:
        try:
            with tarfile.open(archive) as tar:
                members = _checked_members(tar, archive)
                # filter="data" (Python >= 3.10.12 / 3.11.4) also drops permission bits such as setuid
                tar.extractall(staging, members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        except (tarfile.TarError, EOFError, zlib.error) as exc:  # an error page or a cut download, with data.sha256 unset
            archive.unlink()  # else every later run would find it and fail the same way
            why = " ".join(str(exc).split())  # tarfile lists each compression it tried, a line each
            raise TlexpError(f"{archive} is not a readable .tgz archive ({why}): removed it; run again to download it again") from exc
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)  # first, so the free space told is what the next try has
            needed = sum(m.size for m in members)
            if full := write_failure(parent, f"the extraction of {archive.name}", exc, f"{ELSEWHERE} (the archive is kept)", needed):
                raise full from exc
            raise
        extracted = staging / root.name
        if not extracted.is_dir():
            raise TlexpError(f"{archive} has no top-level folder '{root.name}'; set data.root to match the archive")
        os.replace(extracted, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("extracted %s to %s", archive, root)


def _checked_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """Its members, once none can be written outside the folder it is extracted to: no absolute path and
    no ``..`` in a name or a link's target (links then point down into the tree only), and nothing but
    files, folders and links. ``filter="data"`` checks this only from Python 3.10.12 / 3.11.4 on."""
    members = tar.getmembers()
    for member in members:
        link = member.issym() or member.islnk()
        paths = [PurePosixPath(n) for n in ([member.name, member.linkname] if link else [member.name])]
        if any(p.is_absolute() or ".." in p.parts for p in paths) or not (member.isfile() or member.isdir() or link):
            what = f"a link to {member.linkname!r}" if link else "a file or folder" if member.isfile() or member.isdir() else "a device or pipe"
            raise TlexpError(
                f"{archive} is refused, nothing extracted: its member {member.name!r} ({what}) could write outside "
                "the folder it is extracted to. Check data.url, or extract it yourself and point data.root at the folder"
            )
    return members
