"""Device bugs without a GPU: the ``meta`` device stands in for CUDA.

A model on ``meta`` raises on any CPU tensor that reaches it, as a CUDA model does, so every path
that runs the model outside Lightning's loop (the frozen-prefix cache builder, which the LR finder
goes through too; FLOPs and speed profiling) must move its inputs to the model's device itself.
The end-to-end runs on a real GPU are in tests/test_gpu.py (``make test-gpu``).
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import FAST
from tlexp.data.datamodule import ImageDataModule
from tlexp.features import cache as cache_module
from tlexp.features.cache import FrozenPrefixCache
from tlexp.features.store import FeatureStore
from tlexp.model.finetune import PhasedFinetuning
from tlexp.model.module import TransferModule
from tlexp.model.strategies import modules_to_unfreeze, parse_strategy
from tlexp.speed.timing import gflops_per_image, inference_speed


class StoreOnMeta(FeatureStore):
    """Records where computed values are when they reach the store; meta values have no data to save."""

    def __init__(self, *args):
        super().__init__(*args)
        self.devices: list[str] = []

    def to_storage(self, raw, float_dtype):
        self.devices += [v.device.type for v in raw]
        return [v if v.device.type == "cpu" else torch.zeros(v.shape, dtype=float_dtype) for v in raw]


def _model_and_data(compose_cfg, tree, *overrides):
    cfg = compose_cfg(*FAST, f"data.root={tree}", "model=resnet18", *overrides)
    data = ImageDataModule(cfg.data, seed=cfg.seed)
    data.setup()
    module = TransferModule(
        model=OmegaConf.to_container(cfg.model, resolve=True), class_names=data.class_names, class_counts=data.class_counts,
        loss=OmegaConf.to_container(cfg.loss, resolve=True), optim=OmegaConf.to_container(cfg.optim, resolve=True),
        backbone_lr_factor=0.1, total_epochs=2, image_size=cfg.data.image_size,
    )
    return module, ImageDataModule(cfg.data, seed=cfg.seed, preprocessing=module.preprocessing)


@pytest.mark.parametrize(("strategy", "tta"), [("frozen", "none"), ("blocks_2", "none"), ("blocks_2", "flip")])
def test_cache_builder_runs_the_prefix_on_the_models_device(compose_cfg, tiny_tree, tmp_path, monkeypatch, strategy, tta):
    module, data = _model_and_data(compose_cfg, tiny_tree, f"model.tta={tta}")
    units = modules_to_unfreeze(module.backbone_spec, parse_strategy(strategy))
    module.to("meta")
    monkeypatch.setattr(cache_module, "tensor_digest", lambda m: "meta weights")  # no data to hash
    cache = FrozenPrefixCache(PhasedFinetuning(units, 1), {"A": 0, "B": 2}, 0, tmp_path / "cache", 10**9, 8)
    cache.store = store = StoreOnMeta(tmp_path / "cache", 10**9, 8)
    data.setup()
    for subset, epoch in [("train", 0), ("val", 0), ("train", 1), ("val", 1)]:
        cached = cache.dataset(subset, epoch, module, data)
        assert cached is not None and len(cached) == len(data.split[subset])
        assert ("mirrored" in cached[0][0]) == (tta == "flip" and subset == "val")
    # decoded pixels are kept on the CPU; every prefix output was computed where the model is
    assert set(store.devices) == {"cpu", "meta"}


def test_flops_and_speed_run_on_the_models_device(compose_cfg, tiny_tree):
    module, _ = _model_and_data(compose_cfg, tiny_tree)
    module.to("meta")
    assert gflops_per_image(module, 32) > 0
    speed = inference_speed(module, 32, batch_size=4, warmup=1, repeats=2, runtime="eager")
    assert speed["speed_setup"]["device"] == "meta" and speed["speed_setup"]["runtime"] == "eager"
    assert speed["speed_setup"]["seconds"] > 0  # what timing cost the run (time_split.speed_cpu_s after a GPU run)


def test_a_layers_strategy_is_found_on_the_models_device(compose_cfg, tiny_tree):
    """layers_N measures the traced graph with a probe image: made where the backbone is (library use may build
    PhasedFinetuning after moving the model to a GPU), not on the CPU."""
    module, _ = _model_and_data(compose_cfg, tiny_tree)
    module.to("meta")
    units = modules_to_unfreeze(module.backbone_spec, parse_strategy("layers_5"))
    assert len(units) == 5 and all(p.device.type == "meta" for u in units for p in u.parameters())
