"""The run folder: atomic checkpoints, where a resume starts, and a record of how every job ended."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import pickle
import signal
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.rank_zero import rank_zero_only
from omegaconf.errors import MissingMandatoryValue
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils._pytree import tree_leaves

from tlexp.callbacks.run_identity import CHECKPOINT_KEY
from tlexp.errors import RunDirBusy, RunDirRefused, TlexpError
from tlexp.record import (
    EXTENDABLE,
    RECORD,
    NotARecord,
    differences,
    file_digest,
    read_record,
    record_failure,
    record_interruption,
    restore_hydra_files,
    result_config,
)
from tlexp.storage import hold_ballast, release_ballast, write_failure

log = logging.getLogger("tlexp")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically next to their final path.

    Lightning's own writer goes through an fsspec transaction whose temporary file lives in the
    system temp folder: where that is another file system the final move is a copy, and a kill
    during it leaves a truncated ``last.ckpt``. Here the bytes go to a temporary file in the same
    folder, are flushed to disk, and replace the old checkpoint in one ``os.replace``.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                hashing = _HashingWriter(f)  # the digest of the bytes as they are written: no second read
                torch.save(checkpoint, hashing)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a checkpoint is an ordinary file
            sidecar = _sidecar(path)
            staged = sidecar.with_name(f".{sidecar.name}.tmp")
            staged.write_text(hashing.digest.hexdigest())
            os.replace(tmp, path)
            os.replace(staged, sidecar)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            unwritable = isinstance(exc, Exception) and write_failure(
                path.parent, f"checkpoint {path.name}", exc, needed=_tensor_bytes(checkpoint),
                elsewhere="run in another folder (hydra.run.dir=...), then resume=true",
            )
            if not unwritable:
                raise
            raise unwritable from exc

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        _sidecar(Path(path)).unlink(missing_ok=True)


def _tensor_bytes(checkpoint) -> int:
    """What a checkpoint's tensors take: about what it needs on disk."""
    return sum(v.nbytes for v in tree_leaves(checkpoint) if isinstance(v, torch.Tensor))


class _HashingWriter:
    def __init__(self, file):
        self.file, self.digest = file, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _sidecar(checkpoint: Path) -> Path:
    """``<name>.sha256``: the checkpoint's digest as written, so a flipped byte is caught before it is loaded."""
    return checkpoint.with_name(checkpoint.name + ".sha256")


def verify_checkpoint(path: Path) -> None:
    """Raise if ``path`` no longer has the digest it was written with (a checkpoint without one passes)."""
    sidecar = _sidecar(Path(path))
    if sidecar.exists() and sidecar.read_text().strip() != file_digest(Path(path)):
        raise TlexpError(f"{path} is damaged: its bytes changed since it was written (digest in {sidecar.name} differs)")


@contextmanager
def recorded(cfg, run_dir: Path, in_sweep: bool, overrides: list[str]):
    """However a job ends, its record says so; in a sweep a failed job is recorded and the sweep goes on.

    ``overrides``: the job's (Hydra's ``overrides.task``), for the command an interrupted run resumes with.
    """
    try:
        yield
    except RunDirRefused as exc:  # the run dir belongs to another run: its record stays as it is
        if in_sweep and not isinstance(exc, RunDirBusy) and not (run_dir / RECORD).exists():
            record_failure(cfg, run_dir, exc)  # the sweep's table says why this job did not run (not "killed")
        _say_once(exc)
        if not in_sweep:
            sys.exit(2)
    except SIGTERMException:  # Lightning stopped after the current batch; last.ckpt holds the last whole epoch
        record_interruption(cfg, run_dir, "SIGTERM", overrides)
        sys.exit(128 + signal.SIGTERM)
    except SystemExit as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):  # Lightning exits 1 after Ctrl+C (SIGINT)
            record_interruption(cfg, run_dir, "SIGINT", overrides)
        elif exc.code not in (0, None):  # a library's sys.exit(1): a failure to look into, not a run to resume
            record_failure(cfg, run_dir, exc)
        raise
    except KeyboardInterrupt:  # Ctrl+C outside Lightning's loops: listing or checking images, the speed timing
        record_interruption(cfg, run_dir, "SIGINT", overrides)
        sys.exit(128 + signal.SIGINT)
    except (TlexpError, MissingMandatoryValue) as exc:
        _fail_clearly(cfg, run_dir, exc, in_sweep)
    except Exception as exc:
        where = Path(os.fsdecode(exc.filename)).parent if isinstance(exc, OSError) and exc.filename else run_dir
        unwritable = write_failure(where, "the run's files", exc, "run in another folder (hydra.run.dir=...)")
        if unwritable is not None:
            _fail_clearly(cfg, run_dir, unwritable, in_sweep)
            return
        record_failure(cfg, run_dir, exc)
        if not in_sweep:
            raise
        log.exception("job failed; the sweep goes on")


def _fail_clearly(cfg, run_dir: Path, exc: BaseException, in_sweep: bool) -> None:
    """A failure with a message that says what to do: recorded, one line, exit 2 (a sweep goes on)."""
    record_failure(cfg, run_dir, exc)
    _say_once(exc)
    if not in_sweep:
        sys.exit(2)


def _say_once(exc: BaseException) -> None:
    """The error in the run's log file, and once on the terminal: as the `tlexp-train: error:` line, not also as a log line."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (exc,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    print(f"tlexp-train: error: {exc}", file=sys.stderr)


@contextmanager
def sigterm_reached_workers(trainer):
    """A SIGTERM to the whole process group (``timeout``, ``scancel``, ``docker stop``) also ends the loader
    workers, and torch raises "DataLoader worker ... killed by signal" before Lightning stops after the batch:
    once the trainer has received SIGTERM, whatever ends fitting or testing is that stop, not a failure."""
    try:
        yield
    except Exception as exc:
        if trainer.received_sigterm and not isinstance(exc, SIGTERMException):
            # torch's SIGCHLD handler raises again as each other worker dies, wherever the run then is (writing its record)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            raise SIGTERMException from exc
        raise


@contextmanager
def sigterm_stops():
    """Outside Lightning's loops (the speed timing after the test), SIGTERM stops the run as inside them.

    The handler's exception is lost where Python ignores exceptions (a weakref callback, ``__del__``:
    "Exception ignored in ..."), so a SIGTERM received is also raised again when the block ends.
    """
    received = []

    def stop(signum, frame):
        received.append(signum)
        raise SIGTERMException

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
    if received:
        raise SIGTERMException


def check_resume_checkpoint(path: str, model_cfg: dict, class_names: list[str]) -> None:
    """Refuse a checkpoint of another backbone or class set before Lightning fails deep inside."""
    if not os.path.isfile(path):
        raise TlexpError(f"ckpt_path={path}: no such file (resume from <run dir>/checkpoints/last.ckpt)")
    try:
        hparams = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("hyper_parameters", {})
    except Exception as exc:  # any unreadable file gets the same advice
        raise TlexpError(f"ckpt_path={path} is not a readable Lightning checkpoint ({exc})") from exc
    saved_model = hparams.get("model", {})
    _same_model(path, (saved_model.get("source"), saved_model.get("name")), (model_cfg["source"], model_cfg["name"]))
    if hparams.get("class_names") != class_names:
        raise TlexpError(
            f"ckpt_path={path} was trained on classes {hparams.get('class_names')}, this data has {class_names}: "
            "resume with the same data"
        )


def _same_model(path, theirs: tuple, ours: tuple) -> None:
    if theirs != ours:
        raise RunDirRefused(f"ckpt_path={path} holds a {theirs[1]} ({theirs[0]}) model, this run builds {ours[1]}: pass the matching model=")


# What torch.load raises for bytes that are not a whole checkpoint (truncated: OSError EINVAL from its
# memory map; overwritten, empty), and verify_checkpoint's TlexpError for changed bytes. Anything else
# (no permission, no memory) is not damage.
DAMAGED = (RuntimeError, pickle.UnpicklingError, EOFError, OSError, TlexpError)


def _readable_checkpoint(path: Path) -> bool:
    """False for a damaged checkpoint, which is renamed ``*.damaged`` (kept, and out of Lightning's way)."""
    try:
        verify_checkpoint(path)
        torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except PermissionError:
        raise
    except DAMAGED as exc:
        aside = path.with_name(path.name + ".damaged")
        os.replace(path, aside)
        _sidecar(path).unlink(missing_ok=True)
        log.warning("resume: %s is damaged (%s: %s), kept as %s; trying an older checkpoint", path, type(exc).__name__, exc, aside.name)
        return False
    return True


def resume_point(cfg, run_dir: Path) -> tuple[dict | None, str | None]:
    """With ``resume=true``: (record of a completed run, None) or (None, the newest intact checkpoint).

    ``last.ckpt`` first, then the others newest first: any epoch-end checkpoint resumes to the same
    result (tests/test_resume.py), so a damaged ``last.ckpt`` costs time, not correctness.
    """
    if cfg.ckpt_path or not cfg.resume:
        return None, cfg.ckpt_path
    if (run_dir / RECORD).exists():
        previous = _own_record(run_dir)
        if previous.get("status") == "completed":
            return previous, None
    folder = run_dir / "checkpoints"
    others = sorted((p for p in folder.glob("*.ckpt") if p.name != "last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    candidates = [p for p in [folder / "last.ckpt", *others] if p.exists()]
    found = next((str(p) for p in candidates if _readable_checkpoint(p)), None)
    if candidates and found is None:
        log.warning("resume: every checkpoint in %s is damaged (kept as *.damaged): training starts again from epoch 0", folder)
    return None, found


# Held by a job for as long as it runs, with the machine's name in it; the other jobs of its sweep count
# the held ones on their machine (jobs_running). Not .tlexp.lock: a job that finds that one held refuses
# to start, and a count would hold it for a moment.
RUNNING = ".tlexp.running"
ORPHANS_WAIT_S = 30


@contextmanager
def locked(run_dir: Path):
    """One tlexp-train per run dir at a time (rank 0 holds the lock; other DDP ranks join its run)."""
    if rank_zero_only.rank != 0:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".tlexp.lock", "a+") as lock, open(run_dir / RUNNING, "a") as running:
        _take(lock, run_dir)
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        running.truncate(0)  # written before it is locked: a count never reads it half-written
        running.write(socket.gethostname())
        running.flush()
        fcntl.flock(running, fcntl.LOCK_EX)  # waits only while another job's count looks at it
        for leftover in (run_dir / "checkpoints").glob(".*.tmp"):  # a checkpoint write that was killed: ours now
            leftover.unlink()
            log.info("removed %s, left by a checkpoint write that was killed", leftover.name)
        for leftover in run_dir.glob(".lr_find_*.ckpt"):  # Lightning's copy of the weights, kept while it searches
            leftover.unlink()
            log.info("removed %s, left by an LR search that was killed", leftover.name)
        hold_ballast(run_dir)  # released before the run's record is written, however the run ends
        try:
            yield
        finally:
            release_ballast(run_dir)


def _take(lock, run_dir: Path) -> None:
    """The run dir's lock, or RunDirBusy. A run killed (SIGKILL) with data-loader workers leaves them holding the
    lock they were forked with until they notice (torch looks every 5 s): a run started again at once waits for
    them rather than being refused for a process that has ended."""
    deadline, waiting = time.monotonic() + ORPHANS_WAIT_S, False
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            lock.seek(0)
            pid = lock.read().strip()
        if not _ended_here(pid, run_dir):
            raise RunDirBusy(
                f"another tlexp-train (pid {pid or '?'}) is running in {run_dir}: wait for it, or give this run another hydra.run.dir"
            )
        if time.monotonic() > deadline:
            raise RunDirBusy(
                f"tlexp-train pid {pid} has ended, but processes it started still hold {lock.name} after {ORPHANS_WAIT_S} s: "
                f"end them (fuser -k {lock.name}), or give this run another hydra.run.dir"
            )
        if not waiting:
            log.info("tlexp-train pid %s has ended: waiting for the processes it started to let go of %s", pid, lock.name)
            waiting = True
        time.sleep(0.2)


def _ended_here(pid: str, run_dir: Path) -> bool:
    """The lock's holder ran on this machine (its RUNNING file says so) and is no longer a process."""
    if not pid.isdigit() or (run_dir / RUNNING).read_text() != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    try:  # killed but not yet reaped by its parent: a zombie (Linux says so)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def jobs_running(sweep_dir: Path) -> int:
    """Jobs of ``sweep_dir`` running now on this machine, the caller's included: their ``RUNNING`` lock is held.

    What the launcher's cap (perf.sweep_jobs) cannot say: an Optuna search with ``n_jobs: 1`` runs
    its trials one by one, and a sweep's last rows run with fewer beside them. Jobs of a SLURM
    array on other nodes share no device with this one, and a killed job whose loader workers still
    hold its lock has ended: neither is counted.
    """
    here, count = socket.gethostname(), 0
    for mark in sweep_dir.rglob(RUNNING):
        try:
            with open(mark) as probe:  # closing it lets a shared lock go at once
                try:
                    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    count += probe.read() == here and not _ended_here(mark.with_name(".tlexp.lock").read_text().strip(), mark.parent)
        except OSError:  # a run dir being removed, another user's file: not a job this one can see
            continue
    return count


def claim(cfg, run_dir: Path, done: dict | None, ckpt_path: str | None) -> None:
    """Refuse, before anything in ``run_dir`` changes, a run that would mix its results with the run already there.

    A completed run or a checkpoint keeps its result settings (a resume may only train longer): a
    resume that changes one is refused with the list of differences, and a new run in a folder
    holding a run is refused. A refused run, and a completed one that is skipped, put the folder's
    ``.hydra`` files (which Hydra has just rewritten) back as that run wrote them.
    """
    if rank_zero_only.rank != 0:
        return
    if done is not None or ckpt_path:
        identity = done.get("run") if done is not None else _checkpoint_identity(ckpt_path)
        owned = done is not None or Path(ckpt_path).resolve().parent.parent == run_dir.resolve()
        saved, now = (identity or {}).get("settings", {}), result_config(cfg)
        if not any(k.startswith("callbacks.") for k in saved):  # an older tlexp's: no callbacks, eight trainer keys compared
            now = {k: v for k, v in now.items() if not k.startswith("callbacks.") and (not k.startswith("trainer.") or k in saved)}
        if identity and ckpt_path:  # the most common mistake first, in the words of the checkpoint check
            _same_model(ckpt_path, *((s.get("model.source"), s.get("model.name")) for s in (saved, now)))
        changed = differences(saved, now, ignore=EXTENDABLE) if identity else []
        if owned and (changed or done is not None):
            restore_hydra_files(run_dir, _recorded_identity(run_dir) or identity)
        if changed:
            what = f"the completed run in {run_dir}" if done is not None else f"the run that wrote {ckpt_path}"
            raise RunDirRefused(
                f"resuming would change what {what} computed: {'; '.join(changed)}. Resume with its settings, or start a "
                "new run in another folder (hydra.run.dir=...)"
            )
        return
    checkpointed = any((run_dir / "checkpoints").glob("*.ckpt"))
    previous = _own_record(run_dir) if (run_dir / RECORD).exists() else {}
    if checkpointed or previous.get("status") == "completed":
        restore_hydra_files(run_dir, previous.get("run") or _newest_checkpoint_identity(run_dir))  # the record, read once
        raise RunDirRefused(
            f"{run_dir} already holds a run: resume=true continues it; a new run needs its own folder (hydra.run.dir=...)"
        )


def _own_record(run_dir: Path) -> dict:
    """The folder's metrics.json, which a run may skip (completed) or replace. A completed record without its run's
    settings (``run``: an older tlexp's) cannot be compared with this run's, and a file that is no record is not
    ours to overwrite: both refused, the file left as it is and the ``.hydra`` files put back from the newest
    checkpoint (the record cannot say what they were)."""
    try:
        record = read_record(run_dir)
    except ValueError as exc:
        problem = str(exc) if isinstance(exc, NotARecord) else f"{run_dir / RECORD} is not valid JSON ({exc})"
    else:
        if record["status"] != "completed" or "run" in record:
            return record
        problem = f"{run_dir / RECORD} is a completed record without the settings it was run with ('run': an older tlexp's)"
    restore_hydra_files(run_dir, _newest_checkpoint_identity(run_dir))
    raise RunDirRefused(f"{problem}: move it out of {run_dir} to train there, or give this run its own folder (hydra.run.dir=...)")


def _recorded_identity(run_dir: Path) -> dict | None:
    """The identity in the folder's metrics.json: the last start that wrote the folder, where a checkpoint
    may be older (a completed run resumed from its last.ckpt is tested and recorded again, not saved)."""
    try:
        return read_record(run_dir).get("run") if (run_dir / RECORD).exists() else None
    except (OSError, ValueError):  # a damaged record: the checkpoint's identity is the next best
        return None


def _newest_checkpoint_identity(run_dir: Path) -> dict | None:
    """The identity of the folder's newest checkpoint that holds one: its run's, where the record has none."""
    newest_first = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    return next(filter(None, map(_checkpoint_identity, newest_first)), None)


def _checkpoint_identity(path) -> dict | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True).get(CHECKPOINT_KEY)
    except Exception:  # noqa: BLE001 -- an unreadable checkpoint is refused later with its own message
        return None

