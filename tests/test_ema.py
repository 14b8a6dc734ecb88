"""callbacks=ema: the weight average is what validation picks, the test scores and tlexp-predict serves."""

from __future__ import annotations

import csv

import torch
import torch.nn.functional as F

from tests.conftest import read_metrics, train
from tlexp.data.images import load_rgb
from tlexp.data.transforms import eval_transform
from tlexp.predict import load_model


def _test_loss(run, tree, state: dict) -> float:
    """Mean cross-entropy on the run's test images of ``best.ckpt``'s model with ``state`` loaded."""
    served = load_model(str(run / "checkpoints" / "best.ckpt"))
    served.module.load_state_dict(state)
    names = served.module.hparams.class_names
    with open(run / "split.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["subset"] == "test"]
    images = torch.stack([eval_transform(served.preprocessing)(load_rgb(tree / r["path"])) for r in rows])
    labels = torch.tensor([names.index(r["class"]) for r in rows])
    with torch.inference_mode():
        return F.cross_entropy(served.module(images), labels).item()


def test_ema_is_tested_and_served_and_leaves_frozen_layers_exact(tiny_tree, tmp_path):
    run = tmp_path / "run"
    train(run, tiny_tree, "model=resnet18", "strategy=blocks_2", "callbacks=ema", "callbacks.ema.decay=0.9", "trainer.precision=32")
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)
    average, current = best["state_dict"], best["current_model_state"]
    assert not torch.equal(average["head.1.weight"], current["head.1.weight"])  # the average is not the last step
    # blocks_2 on resnet18 trains layer4 and the head; everything before stayed as initialised, bit for bit
    assert torch.equal(average["backbone.conv1.weight"], current["backbone.conv1.weight"])
    assert torch.equal(average["backbone.layer3.1.conv2.weight"], current["backbone.layer3.1.conv2.weight"])
    ema_loss, current_loss = _test_loss(run, tiny_tree, average), _test_loss(run, tiny_tree, current)
    assert abs(ema_loss - current_loss) > 1e-3  # the two models differ on the test set, so the check below means something
    assert abs(read_metrics(run)["test_loss"] - ema_loss) < 1e-4


def test_ema_decay_out_of_range_is_one_line(tiny_tree, tmp_path):
    result = train(tmp_path / "run", tiny_tree, "callbacks=ema", "callbacks.ema.decay=1.5", check=False)
    assert result.returncode == 2 and "callbacks.ema.decay must be in [0.0, 1.0), got 1.5" in result.stderr
