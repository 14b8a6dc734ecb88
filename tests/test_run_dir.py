"""A run dir holds one run: its record, config, split and checkpoints always describe the same run.

Resuming with another result setting, a new run into a used folder, a second process in the same
folder and a damaged checkpoint are refused with one line (exit 2), and leave the folder's files as
the run that owns it wrote them.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import make_image_tree, read_metrics, run_module, train
from tlexp import runs
from tlexp.callbacks.run_identity import CHECKPOINT_KEY
from tlexp.errors import RunDirBusy
from tlexp.record import file_digest

SCHEDULE = ("model=resnet18", "strategy=blocks_2")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_image_tree(tmp_path_factory.mktemp("rundir") / "images", {"red": 10, "green": 10, "blue": 10})


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tree):
    run = tmp_path_factory.mktemp("finished") / "run"
    train(run, tree, *SCHEDULE)
    return run


def _snapshot_without_metrics(run):
    files = [run / "split.csv", run / ".hydra" / "config.yaml", run / ".hydra" / "overrides.yaml", run / "checkpoints" / "best.ckpt"]
    return {f.name: f.read_bytes() for f in files}


def _snapshot(run):
    return _snapshot_without_metrics(run) | {"metrics.json": (run / "metrics.json").read_bytes()}


def test_record_config_split_and_checkpoint_describe_one_run(finished):
    metrics = read_metrics(finished)
    run = metrics["run"]
    assert (finished / ".hydra" / "config.yaml").read_text() == run["hydra_files"]["config.yaml"]
    assert file_digest(finished / "split.csv") == run["split_digest"]
    for name in ("best.ckpt", "last.ckpt"):
        saved = torch.load(finished / "checkpoints" / name, map_location="cpu", weights_only=False)[CHECKPOINT_KEY]
        assert (saved["config_digest"], saved["split_digest"]) == (run["config_digest"], run["split_digest"])


@pytest.mark.parametrize(
    ("override", "named"),
    [("strategy=full", "strategy: 'blocks_2' -> 'full'"), ("seed=7", "seed: 42 -> 7"), ("optim.lr=0.5", "optim.lr: 0.001 -> 0.5"),
     ("callbacks=early_stopping", "callbacks.early_stopping.patience: None -> 5"),
     ("+trainer.limit_train_batches=2", "trainer.limit_train_batches: None -> 2"),
     ("callbacks.model_checkpoint.monitor=train/acc", "callbacks.model_checkpoint.monitor: 'val/acc' -> 'train/acc'")],
)
def test_a_resume_that_changes_a_result_setting_is_refused(tmp_path, tree, finished, override, named):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "metrics.json").unlink()  # as if it had been killed after its last epoch
    before = _snapshot_without_metrics(run)
    result = train(run, tree, *SCHEDULE, override, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", check=False)
    assert result.returncode == 2 and "resuming would change what the run that wrote" in result.stderr
    assert named in result.stderr
    assert _snapshot_without_metrics(run) == before  # split, Hydra files and checkpoints as the run left them
    assert not (run / "metrics.json").exists()



def test_a_refused_resume_puts_back_the_files_of_the_last_start_that_recorded(tmp_path, tree, finished):
    """A finished run resumed from its last.ckpt is tested and recorded again (its .hydra files now name the
    ckpt_path) without a new checkpoint: a later refused resume restores the record's files, not the checkpoint's."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    last = f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    train(run, tree, *SCHEDULE, last)
    before = _snapshot(run)
    assert "ckpt_path: null" not in before["config.yaml"].decode()
    refused = train(run, tree, *SCHEDULE, "seed=7", last, check=False)
    assert refused.returncode == 2 and "seed: 42 -> 7" in refused.stderr
    assert _snapshot(run) == before
    assert (run / ".hydra" / "config.yaml").read_text() == read_metrics(run)["run"]["hydra_files"]["config.yaml"]


def test_resume_true_on_a_finished_run(tmp_path, tree, finished):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = _snapshot(run)
    changed = train(run, tree, *SCHEDULE, "resume=true", "data.batch_size=4", check=False)
    assert changed.returncode == 2 and "data.batch_size: 8 -> 4" in changed.stderr
    assert _snapshot(run) == before  # .hydra/config.yaml is the finished run's again
    same = train(run, tree, *SCHEDULE, "resume=true", "data.num_workers=0", "callbacks.lr_monitor=null", "trainer.enable_progress_bar=true",
                 "trainer.num_sanity_val_steps=2")  # not result settings
    assert "already completed" in (run / "train.log").read_text() and same.returncode == 0
    assert _snapshot(run) == before


def test_a_new_run_into_a_used_folder_is_refused(tmp_path, tree, finished):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = _snapshot(run)
    result = train(run, tree, *SCHEDULE, "strategy=frozen", check=False)
    assert result.returncode == 2 and "already holds a run: resume=true continues it" in result.stderr
    assert _snapshot(run) == before
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]


def test_a_moved_run_resumes_into_its_own_best_checkpoint(tmp_path, tree):
    first = tmp_path / "first"
    killed = train(first, tree, *SCHEDULE, "+callbacks.killer._target_=tests.helpers.KillAtEpochStart", "+callbacks.killer.epoch=1", check=False)
    assert killed.returncode < 0
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    train(moved, tree, *SCHEDULE, "resume=true")
    assert sorted(p.name for p in (moved / "checkpoints").glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]  # no best-v1.ckpt
    best = torch.load(moved / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert best["epoch"] == read_metrics(moved)["best_epoch"]


def test_a_second_process_in_the_same_run_dir_is_refused(tmp_path, tree):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".tlexp.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running tlexp-train holds it
        result = train(run, tree, *SCHEDULE, check=False)
    assert result.returncode == 2 and "another tlexp-train" in result.stderr and "is running in" in result.stderr
    assert not (run / "metrics.json").exists()


# A run SIGKILLed while a data-loader worker it forked (holding the run dir's lock) lives on for 2 s.
KILLED_WITH_A_WORKER = """
import fcntl, os, signal, socket, sys, time
run = sys.argv[1]
os.makedirs(run)
lock = open(f"{run}/.tlexp.lock", "a+")
fcntl.flock(lock, fcntl.LOCK_EX)
lock.write(str(os.getpid()))
lock.flush()
running = open(f"{run}/.tlexp.running", "w")
running.write(socket.gethostname())
running.flush()
fcntl.flock(running, fcntl.LOCK_EX)
if os.fork() == 0:
    time.sleep(2)
    os._exit(0)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize(("wait", "refused"), [(30, False), (0.5, True)])
def test_a_run_killed_with_loader_workers_alive_can_start_again_at_once(tmp_path, monkeypatch, wait, refused):
    """Its workers hold the lock until they notice (torch looks every 5 s): a run started meanwhile waits for them
    (was: refused, `another tlexp-train (pid N) is running`, N a process that had ended); refused if they outlive the wait."""
    monkeypatch.setattr(runs, "ORPHANS_WAIT_S", wait)
    run = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILLED_WITH_A_WORKER, str(run)], check=False)
    assert killed.returncode == -signal.SIGKILL
    pid = (run / ".tlexp.lock").read_text()
    started = time.monotonic()
    with open(run / runs.RUNNING) as probe, pytest.raises(BlockingIOError):
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # the worker holds the job's mark too
    assert runs.jobs_running(tmp_path) == 0  # a job that has ended is not counted (was: 1 while its workers lived)
    if refused:
        with pytest.raises(RunDirBusy, match=f"^tlexp-train pid {pid} has ended, but processes it started still hold .* after 0.5 s"), runs.locked(run):
            pass
        return
    with runs.locked(run):
        assert 1 < time.monotonic() - started < 10 and (run / ".tlexp.lock").read_text() == str(os.getpid())


def test_a_flipped_byte_in_a_checkpoint_is_caught(tmp_path, tree, finished):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "metrics.json").unlink()
    last = run / "checkpoints" / "last.ckpt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF
    last.write_bytes(bytes(data))
    train(run, tree, *SCHEDULE, "resume=true")
    log = (run / "train.log").read_text()
    assert "last.ckpt is damaged" in log and "digest in last.ckpt.sha256 differs" in log
    assert (run / "checkpoints" / "last.ckpt.damaged").exists() and read_metrics(run)["status"] == "completed"
    best = run / "checkpoints" / "best.ckpt"
    data = bytearray(best.read_bytes())
    data[len(data) // 2] ^= 0xFF
    best.write_bytes(bytes(data))
    predicted = run_module("tlexp.predict", f"ckpt={best}", f"images={tree}")
    assert predicted.returncode == 2 and "is damaged" in predicted.stderr


def test_leftovers_of_a_kill_are_removed_and_an_all_damaged_resume_says_so(tmp_path, tree, finished):
    """Issue 15: a killed checkpoint write's .tmp (and a killed LR search's weights) go at the next start; no intact
    checkpoint: said, then epoch 0."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "metrics.json").unlink()
    (run / "checkpoints" / ".last.ckpt.x1y2.tmp").write_bytes(b"half a checkpoint")
    (run / ".lr_find_0c1d.ckpt").write_bytes(b"Lightning's copy of the weights during an LR search")
    for ckpt in (run / "checkpoints").glob("*.ckpt"):
        ckpt.write_bytes(b"not a checkpoint any more")
    train(run, tree, *SCHEDULE, "resume=true")
    log = (run / "train.log").read_text()
    assert "removed .last.ckpt.x1y2.tmp" in log and not list((run / "checkpoints").glob(".*.tmp"))
    assert "removed .lr_find_0c1d.ckpt, left by an LR search that was killed" in log and not list(run.glob(".lr_find_*"))
    assert "every checkpoint in" in log and "training starts again from epoch 0" in log
    assert read_metrics(run)["status"] == "completed" and len(read_metrics(run)["history"]) == 2


def test_a_killed_cache_build_leaves_no_staging_folder(tmp_path):
    """Issue 15: staging folders of builds whose process is gone are removed by the next build."""
    from tlexp.features.store import FeatureStore

    store = FeatureStore(tmp_path, budget_bytes=10**6, batch_size=2)
    orphan = tmp_path / ".abc123-999999999-q1w2"  # no such pid
    orphan.mkdir()
    (orphan / "cut0.npy").write_bytes(b"0" * 1000)
    live = tmp_path / f".def456-{os.getpid()}-e3r4"  # a build in progress in a live process
    live.mkdir()
    store.get({"k": 1}, lambda x: (x.float(),), [(torch.zeros(3), 0), (torch.ones(3), 0)], "test")
    assert not orphan.exists() and live.exists()


def test_the_table_names_killed_jobs_and_foreign_records(tmp_path, tree, finished):
    from tlexp.report.table import load_rows

    sweep = tmp_path / "sweep"
    shutil.copytree(finished, sweep / "0_resnet18_blocks_2")
    killed = sweep / "1_resnet18_frozen"
    (killed / ".hydra").mkdir(parents=True)
    shutil.copy(finished / ".hydra" / "config.yaml", killed / ".hydra" / "config.yaml")
    edited = sweep / "2_resnet18_blocks_2"
    shutil.copytree(finished, edited)
    config = edited / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("seed: 42", "seed: 7"))
    empty = sweep / "3_resnet18_frozen"
    empty.mkdir()
    (empty / "metrics.json").write_text("")  # a disk that filled up mid-write, say
    foreign = sweep / "4_resnet18_frozen"
    foreign.mkdir()
    (foreign / "metrics.json").write_text('[{"acc": 0.9}]')  # another tool's metrics.json
    rows = load_rows(sweep)
    assert [r["status"] for r in rows] == ["completed", "missing", "mismatch", "unreadable", "foreign"]
    assert "killed" in rows[1]["error"] and "another config" in rows[2]["error"]
    assert "3_resnet18_frozen/metrics.json is not valid JSON" in rows[3]["error"]
    assert rows[4]["error"].endswith("4_resnet18_frozen/metrics.json is not a tlexp run record (no status completed or failed "
                                     "or interrupted): another tool's or an older format")


def test_a_record_of_an_older_format_is_refused_not_overwritten(tmp_path, tree, finished):
    """A completed metrics.json without its run's settings (``run``) cannot be compared: resume=true and a new run
    are refused in one line, the file kept (was: a new run crashed with IndexError, resume=true skipped it unchecked),
    and the .hydra files are the newest checkpoint's again (was: left as Hydra rewrote them, with the refused seed=7)."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    old = {k: v for k, v in read_metrics(run).items() if k != "run"}
    (run / "metrics.json").write_text(json.dumps(old))
    before = _snapshot(run)

    def refused(resume):
        result = train(run, tree, *SCHEDULE, resume, "seed=7", check=False)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
        assert "metrics.json is a completed record without the settings it was run with" in result.stderr
        assert "give this run its own folder (hydra.run.dir=...)" in result.stderr

    refused("resume=true")
    assert _snapshot(run) == before
    shutil.rmtree(run / "checkpoints")  # nothing to put the .hydra files back from: still refused, the record kept
    refused("resume=false")
    assert read_metrics(run) == old
