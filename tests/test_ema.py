"""callbacks=ema: the weight average is what validation picks, the test scores and tlexp-predict serves."""

from __future__ import annotations

import csv

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import read_metrics, train
from tlexp.callbacks.ema import WeightEMA
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


def test_ema_of_bf16_weights_is_kept_in_float32(tiny_tree, tmp_path):
    """trainer.precision=bf16-true: the average stays float32 (Lightning builds it before the weights are cast), and
    each step's bf16 weights are cast to it (was: RuntimeError 'expected dtype float for `end` but got dtype
    c10::BFloat16' at the first step). A bf16 average would not move at all: decay 0.999 moves it by a thousandth
    of its distance to the weights, below bf16's half step of 1/256."""
    run = tmp_path / "run"
    train(run, tiny_tree, "model=resnet18", "strategy=blocks_2", "callbacks=ema", "callbacks.ema.decay=0.9", "trainer.precision=bf16-true")
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)
    average, current = best["state_dict"], best["current_model_state"]
    assert average["head.1.weight"].dtype == torch.float32 and current["head.1.weight"].dtype == torch.bfloat16
    assert not torch.equal(average["head.1.weight"], current["head.1.weight"].float())
    assert torch.equal(average["backbone.conv1.weight"], current["backbone.conv1.weight"].float())  # frozen: bit for bit


class _Drifting(pl.LightningModule):
    """One weight stepping towards 2 in bf16, validated after every step: the average must be the float32 EMA of the
    bf16 weights it saw, however often validation swaps it in and out."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        return (self.w.float() - 2).pow(2).sum()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.seen.append(self.w.detach().float().clone())

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_validation_leaves_a_float32_average_of_bf16_weights_exact():
    """A swap through the bf16 model would round the average to bf16 at every validation (was: a crash first)."""
    module, ema = _Drifting(), WeightEMA(decay=0.9)
    loader = DataLoader(TensorDataset(torch.zeros(20, 1)), batch_size=1)
    pl.Trainer(
        max_epochs=1, precision="bf16-true", callbacks=[ema], val_check_interval=1, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    ).fit(module, loader, loader)
    expected = module.seen[0]
    for w in module.seen[1:]:
        expected = expected.lerp(w, 0.1)
    assert ema._average_model.module.w.dtype == torch.float32 and len(set(map(float, module.seen))) > 5
    assert torch.equal(ema._average_model.module.w.detach(), expected)
