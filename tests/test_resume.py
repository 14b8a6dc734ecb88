"""A run killed in phase B and resumed from last.ckpt ends exactly where the uninterrupted run does."""

from __future__ import annotations

import signal

import pytest
import torch

from tests.conftest import read_metrics, train

SCHEDULE = ("model=resnet18", "strategy=blocks_2", "finetune.phase_a_epochs=1", "finetune.phase_b_epochs=2", "data.augment.rotation=10")
COMPARED = ("train_acc", "train_loss", "val_acc", "val_loss", "test_acc", "test_loss", "test_f1_macro", "best_epoch", "epochs", "trainable_params")


def _weights(run_dir):
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if v.is_floating_point()}


@pytest.mark.parametrize(("perf", "workers"), [("naive", 0), ("naive", 2), ("fast", 2)])
def test_kill_in_phase_b_then_resume_matches_uninterrupted(tmp_path, tiny_tree, perf, workers):
    """Bit-identical weights: data order, augmentation and dropout do not depend on where the run started.

    perf=naive trains on images (random augmentation per epoch); perf=fast on the frozen-prefix cache.
    """
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    schedule = (*SCHEDULE, f"perf={perf}", f"data.num_workers={workers}")
    train(whole, tiny_tree, *schedule)

    killed = train(broken, tiny_tree, *schedule, "+callbacks.killer._target_=tests.helpers.KillAtEpochStart", "+callbacks.killer.epoch=2", check=False)
    assert killed.returncode == -signal.SIGKILL
    assert not (broken / "metrics.json").exists()
    assert torch.load(broken / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1  # mid phase B

    train(broken, tiny_tree, *schedule, f"ckpt_path={broken / 'checkpoints' / 'last.ckpt'}")
    expected, resumed = read_metrics(whole), read_metrics(broken)
    assert {k: resumed[k] for k in COMPARED} == {k: expected[k] for k in COMPARED}
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # wall time differs
    assert strip(resumed["history"]) == strip(expected["history"])
    a, b = _weights(whole), _weights(broken)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "phase B from epoch 2" in (broken / "train.log").read_text()  # re-applied on resume (Lightning #21901)
