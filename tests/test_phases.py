"""Phase A/B on a real Trainer: what trains, what stays put, BatchNorm modes, and resume re-applying B."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from tests.conftest import make_image_tree
from tlexp.data.datamodule import ImageDataModule
from tlexp.errors import TlexpError
from tlexp.model.finetune import PhasedFinetuning, phase_b_params, trainable_params
from tlexp.model.module import TransferModule
from tlexp.model.strategies import modules_to_unfreeze, parse_strategy


def _fit(tmp_path, cfg_data, strategy: str, phase_a: int, phase_b: int, name: str = "resnet18", callbacks=()):
    dm = ImageDataModule(cfg_data, seed=0)
    dm.setup()
    module = TransferModule(
        model={"source": "torchvision", "name": name, "weights": None, "head": {"hidden_dim": None, "dropout": 0.0}},
        class_names=dm.class_names, class_counts=dm.class_counts,
        loss={"name": "ce", "label_smoothing": 0.0, "class_weights": None},
        optim={"_target_": "torch.optim.Adam", "lr": 1e-2, "weight_decay": 0.0, "scheduler": None},
        backbone_lr_factor=0.1, total_epochs=phase_a + phase_b, image_size=32,
    )  # the datamodule takes the model's preprocessing from the trainer
    units = modules_to_unfreeze(module.backbone_spec, parse_strategy(strategy))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(
        max_epochs=phase_a + phase_b, callbacks=[PhasedFinetuning(units, phase_a), *callbacks], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    return module, changed


def _data_cfg(root):
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {"kind": "imagefolder", "root": str(root), "split": [0.7, 0.15, 0.15], "image_size": 32, "batch_size": 8,
         "num_workers": 0, "limit_per_class": None, "augment": {"hflip": True, "crop_scale": [0.8, 1.0], "rotation": 0, "shear": 0},
         "on_bad_image": "skip", "image_checks": None}
    )


def test_phase_b_trains_only_the_strategy_modules(tmp_path):
    root = make_image_tree(tmp_path / "img", {"a": 8, "b": 8})
    module, changed = _fit(tmp_path, _data_cfg(root), "blocks_1", phase_a=1, phase_b=1)
    backbone_changed = {k for k in changed if k.startswith("backbone.")}
    assert backbone_changed and all(k.startswith("backbone.layer4.1.") for k in backbone_changed)
    assert {"head.1.weight", "head.1.bias"} <= changed
    # running statistics of frozen BatchNorm never moved; the unfrozen block's did
    assert "backbone.bn1.running_mean" not in changed and "backbone.layer4.0.bn1.running_var" not in changed
    assert "backbone.layer4.1.bn1.running_mean" in changed
    modes = {name: m.training for name, m in module.backbone.named_modules() if isinstance(m, _BatchNorm)}
    assert modes["layer4.1.bn1"] and not modes["layer4.0.bn1"] and not modes["bn1"]


class _SyncBatchNormAsDdpDoes(pl.Callback):
    """trainer.sync_batchnorm under DDP (trainer=ddp): each BatchNorm swapped for a SyncBatchNorm sharing its
    parameters, after the callbacks' setup (it computes as plain BatchNorm in one process)."""

    def setup(self, trainer, pl_module, stage):
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(pl_module)


def test_a_batchnorm_layer_unfrozen_by_layers_n_tracks_statistics_under_sync_batchnorm(tmp_path):
    """layers_5's units hold layer4.1.bn2 itself: with sync_batchnorm (trainer=ddp's default) its SyncBatchNorm trained
    on batch statistics while its running statistics stayed the pretrained ones, which evaluation used."""
    root = make_image_tree(tmp_path / "img", {"a": 8, "b": 8})
    module, changed = _fit(tmp_path, _data_cfg(root), "layers_5", phase_a=1, phase_b=1, callbacks=[_SyncBatchNormAsDdpDoes()])
    bn2 = module.backbone.layer4[1].bn2
    assert isinstance(bn2, torch.nn.SyncBatchNorm) and bn2.track_running_stats and bn2.weight.requires_grad
    assert {"backbone.layer4.1.bn2.running_mean", "backbone.layer4.1.bn2.weight"} <= changed
    assert "backbone.layer4.1.bn1.running_mean" not in changed  # frozen: not a unit of layers_5


def test_frozen_strategy_changes_no_backbone_tensor(tmp_path):
    root = make_image_tree(tmp_path / "img", {"a": 8, "b": 8})
    _, changed = _fit(tmp_path, _data_cfg(root), "frozen", phase_a=2, phase_b=0)
    assert changed == {"head.1.weight", "head.1.bias"}


def test_layers_n_trains_the_weights_a_function_reads_and_counts_what_trains(tmp_path):
    """ConvNeXt reads its layer scale and LayerNorm2d's weights in functions, not module calls: layers_N left them
    frozen; and the ops after its global pooling (a permute, the classifier's LayerNorm) were its last 3 layers,
    so layers_5 trained no backbone weight at all."""
    root = make_image_tree(tmp_path / "img", {"a": 8, "b": 8})
    module, changed = _fit(tmp_path, _data_cfg(root), "layers_5", phase_a=1, phase_b=1, name="convnext_tiny")
    last = "backbone.features.7.2."
    assert {k for k in changed if k.startswith("backbone.")} == {last + "block.5.weight", last + "block.5.bias", last + "layer_scale"}
    units = modules_to_unfreeze(module.backbone_spec, parse_strategy("layers_5"))
    assert [u.name for u in units] == ["features.7.2.block.5", "permute_43", "mul_17", "features.7.2.stochastic_depth", "add_17"]
    assert trainable_params(module) == phase_b_params(module.head, units) == 768 * 3072 + 768 + 768 + 768 * 2 + 2


def test_a_cosine_schedule_shorter_than_the_training_is_refused():
    """Past T_max torch's cosine rises again: a library user's total_epochs < max_epochs trained at a climbing rate."""
    module = TransferModule(
        model={"source": "torchvision", "name": "resnet18", "weights": None, "head": {"hidden_dim": None, "dropout": 0.0}},
        class_names=["a", "b"], class_counts=[1, 1], loss={"name": "ce", "label_smoothing": 0.0, "class_weights": None},
        optim={"_target_": "torch.optim.Adam", "lr": 1e-2, "weight_decay": 0.0, "scheduler": "cosine"},
        backbone_lr_factor=0.1, total_epochs=2,
    )
    module.trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False)
    with pytest.raises(TlexpError, match=r"total_epochs=2 but the trainer may train max_epochs=3: pass total_epochs >= max_epochs"):
        module.configure_optimizers()
    module.trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False)
    assert module.configure_optimizers()["lr_scheduler"]["scheduler"].T_max == 2
    module.hparams.total_epochs = None  # a trainer ended by max_steps or max_time gives the cosine no length
    for open_ended in ({"max_steps": 100}, {"max_epochs": -1, "max_time": "00:00:01:00"}):
        module.trainer = pl.Trainer(**open_ended, logger=False, enable_checkpointing=False)
        with pytest.raises(TlexpError, match=r"needs a length and the trainer's max_epochs=(None|-1) gives none .*: pass total_epochs"):
            module.configure_optimizers()
