"""A run killed at any point and resumed from last.ckpt ends exactly where the uninterrupted run does."""

from __future__ import annotations

import csv
import os
import shlex
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.callbacks import Timer

from tests.conftest import FAST, REPO, _pythonpath, make_image_tree, read_metrics, run_cli, train
from tlexp.callbacks.reseed import _validation_may_follow

# epochs 0-1 are phase A, 2-3 phase B
SCHEDULE = ("model=resnet18", "strategy=blocks_2", "finetune.phase_a_epochs=2", "finetune.phase_b_epochs=2", "data.augment.rotation=10")
COMPARED = ("train_acc", "train_loss", "val_acc", "val_loss", "test_acc", "test_loss", "test_f1_macro", "best_epoch", "epochs", "trainable_params")
KILL_POINTS = {
    "phase_a": ("+callbacks.killer._target_=tests.helpers.KillAtEpochStart", "+callbacks.killer.epoch=1"),
    "phase_switch": ("+callbacks.killer._target_=tests.helpers.KillAtEpochStart", "+callbacks.killer.epoch=2"),
    "mid_phase_b": ("+callbacks.killer._target_=tests.helpers.KillAtEpochStart", "+callbacks.killer.epoch=3"),
    "during_test": ("+callbacks.killer._target_=tests.helpers.KillAtTestStart",),
}
LAST_EPOCH_SAVED = {"phase_a": 0, "phase_switch": 1, "mid_phase_b": 2, "during_test": 3}


def _weights(run_dir):
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if v.is_floating_point()}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_image_tree(tmp_path_factory.mktemp("resume") / "images", {"red": 10, "green": 10, "blue": 10})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tree):
    """One uninterrupted run per (perf, workers), shared by every kill point."""
    runs = {}

    def get(perf: str, workers: int):
        if (perf, workers) not in runs:
            run = tmp_path_factory.mktemp(f"whole_{perf}_{workers}")
            train(run, tree, *SCHEDULE, f"perf={perf}", f"data.num_workers={workers}")
            runs[perf, workers] = run
        return runs[perf, workers]

    return get


def _signal_at(name: str, epoch: int) -> tuple[str, ...]:
    return ("+callbacks.sig._target_=tests.helpers.SignalAtEpochStart", f"+callbacks.sig.signal={name}", f"+callbacks.sig.epoch={epoch}")


def _kill_and_resume(tmp_path, tree, schedule, kill_point):
    broken = tmp_path / "broken"
    killed = train(broken, tree, *schedule, *KILL_POINTS[kill_point], check=False)
    assert killed.returncode == -signal.SIGKILL
    assert not (broken / "metrics.json").exists()  # nothing that looks like a result
    assert torch.load(broken / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == LAST_EPOCH_SAVED[kill_point]
    train(broken, tree, *schedule, f"ckpt_path={broken / 'checkpoints' / 'last.ckpt'}")
    return broken


def _assert_same_run(resumed_dir, expected_dir):
    expected, resumed = read_metrics(expected_dir), read_metrics(resumed_dir)
    assert {k: resumed[k] for k in COMPARED} == {k: expected[k] for k in COMPARED}
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # wall time differs
    assert strip(resumed["history"]) == strip(expected["history"])
    a, b = _weights(expected_dir), _weights(resumed_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _csv_epochs(resumed_dir) == _csv_epochs(expected_dir)  # csv/metrics.csv keeps the epochs before the resume


def _csv_epochs(run_dir):
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [(r["epoch"], r["val/acc"], r["val/loss"]) for r in csv.DictReader(f) if r.get("val/acc")]


@pytest.mark.parametrize("kill_point", list(KILL_POINTS))
def test_killed_anywhere_then_resumed_matches_uninterrupted(tmp_path, tree, uninterrupted, kill_point):
    """Bit-identical weights and metrics; the default perf=fast trains on the frozen-prefix cache."""
    schedule = (*SCHEDULE, "perf=fast", "data.num_workers=0")
    resumed = _kill_and_resume(tmp_path, tree, schedule, kill_point)
    _assert_same_run(resumed, uninterrupted("fast", 0))
    if kill_point in ("phase_a", "phase_switch"):
        assert "phase B from epoch 2" in (resumed / "train.log").read_text()
    if kill_point == "mid_phase_b":  # re-applied on resume (Lightning #21901), said with the epoch it began at
        resumed_log = (resumed / "train.log").read_text().split("resuming from ")[-1]
        assert resumed_log.startswith(f"{resumed / 'checkpoints' / 'last.ckpt'} at epoch 3 (phase B)")
        assert "phase B from epoch 2" in resumed_log and "phase A" not in resumed_log


def test_a_resume_killed_before_it_logs_keeps_the_csv_of_the_epochs_before(tmp_path, tree, uninterrupted):
    """Pre-empted again before its first epoch ended (a requeued job): csv/metrics.csv still holds epochs 0-2
    (was: deleted as the resumed run started, so the final file began at epoch 3)."""
    schedule = (*SCHEDULE, "perf=fast", "data.num_workers=0")
    broken = tmp_path / "broken"
    resume = f"ckpt_path={broken / 'checkpoints' / 'last.ckpt'}"
    for ckpt in ([], [resume]):  # killed at epoch 3's start, then resumed and killed there again
        assert train(broken, tree, *schedule, *KILL_POINTS["mid_phase_b"], *ckpt, check=False).returncode == -signal.SIGKILL
    assert [e for e, _, _ in _csv_epochs(broken)] == ["0", "1", "2"]
    train(broken, tree, *schedule, resume)
    _assert_same_run(broken, uninterrupted("fast", 0))


@pytest.mark.parametrize("kill_point", ["phase_switch", "mid_phase_b"])
def test_resumed_in_phase_b_the_sanity_check_sees_phase_b(tmp_path, tree, uninterrupted, kill_point):
    """Lightning validates a few batches before the first resumed epoch; the cache serves them for the
    epoch resumed at, so the model must be in its phase already (it was in phase A: a shape error)."""
    schedule = (*SCHEDULE, "perf=fast", "data.num_workers=0", "trainer.num_sanity_val_steps=2")
    _assert_same_run(_kill_and_resume(tmp_path, tree, schedule, kill_point), uninterrupted("fast", 0))


@pytest.mark.parametrize("workers", [0, 2])
def test_image_path_resume_is_exact_with_loader_workers(tmp_path, tree, uninterrupted, workers):
    """perf=naive trains on images with random augmentation in every epoch, in worker processes or not."""
    schedule = (*SCHEDULE, "perf=naive", f"data.num_workers={workers}")
    _assert_same_run(_kill_and_resume(tmp_path, tree, schedule, "mid_phase_b"), uninterrupted("naive", workers))


def test_sigterm_stops_cleanly_and_resumes_exactly(tmp_path, tree, uninterrupted):
    """SIGTERM (a scheduler's pre-emption): Lightning stops after the batch; exit 143, status interrupted."""
    schedule = (*SCHEDULE, "perf=fast", "data.num_workers=0")
    broken = tmp_path / "broken"
    stopped = train(broken, tree, *schedule, *_signal_at("SIGTERM", 3), check=False)
    assert stopped.returncode == 128 + signal.SIGTERM
    status = read_metrics(broken)
    assert status["status"] == "interrupted" and "resume=true" in status["error"] and "test_acc" not in status
    assert torch.load(broken / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 2  # at most one epoch lost
    train(broken, tree, *schedule, "resume=true")
    _assert_same_run(broken, uninterrupted("fast", 0))


def test_sigterm_to_the_process_group_with_loader_workers_is_an_interruption(tmp_path, tree):
    """timeout, scancel and docker stop signal every process of the job: the loader workers die at once and torch
    raises before Lightning stops after the batch. Still exit 143 and status interrupted (was: status failed,
    `RuntimeError: DataLoader worker (pid N) is killed by signal: Terminated.` and a traceback).
    A fresh interpreter: torch's SIGCHLD handler, which raises, does not fire in the fork server's children."""
    run = tmp_path / "run"
    overrides = (*FAST, f"data.root={tree}", f"hydra.run.dir={run}", *SCHEDULE, "perf=naive", "data.num_workers=2",
                 "+callbacks.sig._target_=tests.helpers.SigtermToWorkersAtEpoch", "+callbacks.sig.epoch=2")
    for again in ((), ("resume=true",)):  # and when the resumed run is stopped so (was: torch raised again as it was recorded)
        stopped = subprocess.run([sys.executable, "-m", "tlexp.train", *overrides, *again], capture_output=True, text=True, cwd=REPO,
                                 env={**os.environ, "PYTHONPATH": _pythonpath()}, timeout=600, check=False)
        assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
        assert "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
        status = read_metrics(run)
        assert status["status"] == "interrupted" and "resume=true" in status["error"], status.get("error")


def test_sigterm_records_the_whole_resume_command_and_the_resume_says_where_it_resumed(tmp_path, tree):
    """The record's command is the summary's (overrides and hydra.run.dir); the resumed log names the checkpoint
    and epoch, and phase B's line the epoch phase B began at (was: phase A from epoch 0, then phase B from epoch 2)."""
    run = tmp_path / "run"
    schedule = ("model=resnet18", "strategy=blocks_1", "finetune.phase_a_epochs=1", "finetune.phase_b_epochs=2")
    stopped = train(run, tree, *schedule, *_signal_at("SIGTERM", 2), check=False)
    assert stopped.returncode == 128 + signal.SIGTERM
    overrides = [*FAST, f"data.root={tree}", *schedule, *_signal_at("SIGTERM", 2)]
    command = f"tlexp-train {' '.join(shlex.quote(o) for o in overrides)} hydra.run.dir={run} resume=true"
    assert read_metrics(run)["error"] == f"stopped by SIGTERM; resume with: {command}"
    pasted = shlex.split(command)[1:]
    resumed = run_cli(*(a for a in pasted if not a.startswith("+callbacks.sig")))  # without the test's own SIGTERM
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (run / "train.log").read_text().split("resuming from ")
    assert "phase A from epoch 0" in log[0] and "phase B from epoch 1" in log[0]
    assert log[1].startswith(f"{run / 'checkpoints' / 'last.ckpt'} at epoch 2 (phase B)\n")
    assert "phase B from epoch 1: backbone modules unfrozen: layer4.1" in log[1] and "phase A" not in log[1]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_run_stopped_before_its_first_epoch_ended_says_resume_true_starts_it_again(tmp_path, tree, name):
    """No checkpoint yet: the message says the same command starts it again, resume=true too (was: no word of resume=true,
    which a later interruption's message asks for); the pasted command with resume=true trains it from the start."""
    run = tmp_path / "run"
    schedule = ("model=resnet18", "strategy=blocks_1")
    stopped = train(run, tree, *schedule, *_signal_at(name, 0), check=False)
    assert stopped.returncode == (128 + signal.SIGTERM if name == "SIGTERM" else 1), stopped.stderr[-2000:]
    command = shlex.join(["tlexp-train", *FAST, f"data.root={tree}", *schedule, *_signal_at(name, 0), f"hydra.run.dir={run}"])
    said = f"stopped by {name}; no epoch had finished, so there is no checkpoint: the same command starts it again (with resume=true too): {command}"
    assert read_metrics(run)["error"] == said and said in stopped.stdout + stopped.stderr
    pasted = [a for a in shlex.split(command)[1:] if not a.startswith("+callbacks.sig")]  # without the test's own signal
    resumed = run_cli(*pasted, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_metrics(run)["status"] == "completed" and "resuming from" not in (run / "train.log").read_text()


def test_a_resume_does_not_warn_that_its_checkpoint_folder_is_not_empty(tmp_path, tree):
    """Resuming continues in the run's own checkpoints/, which tlexp keeps to one run: Lightning's
    `Checkpoint directory ... exists and is not empty.` on every resume was a false alarm (was: printed)."""
    run = tmp_path / "run"
    schedule = ("model=resnet18", "strategy=blocks_1")
    assert train(run, tree, *schedule, *_signal_at("SIGTERM", 1), check=False).returncode == 128 + signal.SIGTERM
    resumed = train(run, tree, *schedule, "resume=true")
    assert "exists and is not empty" not in resumed.stderr + resumed.stdout, resumed.stderr[-2000:]


@pytest.mark.parametrize("when", ["start", "end"])
def test_sigterm_during_the_test_or_the_speed_timing_is_an_interruption(tmp_path, tree, when):
    """Issue 15: SIGTERM after fitting (test, then profiling) is exit 143 and status interrupted, never a result."""
    run = tmp_path / "run"
    timing = ("profile.repeats=3000", "profile.warmup=1") if when == "end" else ()
    stopped = train(run, tree, *SCHEDULE, *timing, "+callbacks.sig._target_=tests.helpers.SigtermAtTest",
                    f"+callbacks.sig.when={when}", "+callbacks.sig.delay=0.5", check=False)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert read_metrics(run)["status"] == "interrupted"
    train(run, tree, *SCHEDULE, "resume=true")
    assert read_metrics(run)["status"] == "completed"


def test_ctrl_c_leaves_an_interrupted_run_not_a_result(tmp_path, tree):
    broken = tmp_path / "broken"
    stopped = train(broken, tree, *SCHEDULE, *_signal_at("SIGINT", 1), check=False)
    assert stopped.returncode == 1
    status = read_metrics(broken)
    assert status["status"] == "interrupted" and "SIGINT" in status["error"] and "test_acc" not in status


def test_damaged_last_checkpoint_falls_back_to_an_intact_one(tmp_path, tree, uninterrupted):
    schedule = (*SCHEDULE, "perf=fast", "data.num_workers=0")
    broken = tmp_path / "broken"
    train(broken, tree, *schedule, *KILL_POINTS["mid_phase_b"], check=False)
    last = broken / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated, as a full disk or a bad copy leaves it
    explicit = train(tmp_path / "other", tree, *schedule, f"ckpt_path={last}", check=False)
    assert explicit.returncode == 2 and "not a readable Lightning checkpoint" in explicit.stderr
    train(broken, tree, *schedule, "resume=auto")
    assert "last.ckpt is damaged" in (broken / "train.log").read_text()
    assert (broken / "checkpoints" / "last.ckpt.damaged").stat().st_size == 1000  # kept, not lost
    _assert_same_run(broken, uninterrupted("fast", 0))


def test_ema_killed_at_the_phase_switch_resumes_exactly(tmp_path, tree):
    """callbacks=ema: the average and the training weights both continue from last.ckpt."""
    schedule = (*SCHEDULE, "perf=fast", "data.num_workers=0", "callbacks=ema", "callbacks.ema.decay=0.9")
    whole = tmp_path / "whole"
    train(whole, tree, *schedule)
    resumed = _kill_and_resume(tmp_path, tree, schedule, "phase_switch")
    _assert_same_run(resumed, whole)
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=False)["current_model_state"] for r in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_records_the_lr_finders_result(tmp_path, tree):
    """The range test runs at the first start only; its result and the rate it set survive in the checkpoint
    (was: lr_find null and lr optim.lr's in a resumed run's metrics.json)."""
    run = tmp_path / "run"
    tune = ("model=resnet18", "strategy=blocks_1", "tune.lr_find=true", "tune.num_training=20", "tune.use_suggestion=true")
    killed = train(run, tree, *tune, *KILL_POINTS["phase_a"][:1], "+callbacks.killer.epoch=1", check=False)
    assert killed.returncode == -signal.SIGKILL
    found = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["tlexp_lr_find"]
    assert found["used"] is True and found["steps"] == 20 and found["suggestion"] > 0
    train(run, tree, *tune, "resume=true")
    metrics = read_metrics(run)
    assert metrics["lr_find"] == found and metrics["lr"] == found["suggestion"] != 1e-3
    assert metrics["history"][-1]["lr_head"] == pytest.approx(found["suggestion"])


def test_validation_within_epochs_keeps_checkpoints_at_epoch_ends(tmp_path, tree):
    """+trainer.val_check_interval=0.5 validates mid-epoch too; best.ckpt and last.ckpt are written at epoch ends, after
    the epoch's history row, so best.ckpt is the record's best epoch and a kill mid phase B resumes exactly (was:
    written at each validation, before the row: last.ckpt lacked its own epoch and best.ckpt could be a mid-epoch state)."""
    schedule = (*SCHEDULE, "perf=fast", "data.num_workers=0", "+trainer.val_check_interval=0.5")
    whole = tmp_path / "whole"
    train(whole, tree, *schedule)
    metrics = read_metrics(whole)
    for name in ("best", "last"):
        saved = torch.load(whole / "checkpoints" / f"{name}.ckpt", weights_only=False)
        assert [e["epoch"] for e in saved["callbacks"]["EpochHistory"]["epochs"]] == list(range(saved["epoch"] + 1))
        assert saved["global_step"] == 3 * (saved["epoch"] + 1)  # 3 batches an epoch: saved at its end
    assert torch.load(whole / "checkpoints" / "best.ckpt", weights_only=False)["epoch"] == metrics["best_epoch"]
    _assert_same_run(_kill_and_resume(tmp_path, tree, schedule, "mid_phase_b"), whole)


@pytest.mark.parametrize(
    ("every", "per_epoch", "check_every_n", "stop", "copied_after"),
    [
        (4, 4, 1, False, [3]),  # validation at epoch ends only: only the last batch's streams are copied
        (2, 4, 1, False, [0, 1, 2, 3]),  # val_check_interval=0.5
        (6, 4, None, False, [0, 1, 2, 3]),  # every 6 batches across epochs: mid-epoch in the next one
        (None, 4, 1, False, [0, 1, 2, 3]),  # on a clock
        (4, 4, 1, True, [0, 1, 2, 3]),  # asked to stop: Lightning validates after this batch
        (4, 4, 1, "max_time", [0, 1, 2, 3]),  # Lightning's Timer may ask to stop after this callback
        (float("inf"), float("inf"), 1, False, [0, 1, 2, 3]),  # a loader without a length: any batch may be the last
    ],
)
def test_the_streams_are_copied_only_where_a_validation_may_follow(every, per_epoch, check_every_n, stop, copied_after):
    """The copy costs ~45 us a batch; it is skipped after batches Lightning validates after under no setting."""
    trainer = SimpleNamespace(
        val_check_batch=every, num_training_batches=per_epoch, check_val_every_n_epoch=check_every_n,
        should_stop=stop is True, callbacks=[Timer(duration="00:01:00:00")] if stop == "max_time" else [],
    )
    assert [i for i in range(4) if _validation_may_follow(trainer, i)] == copied_after
