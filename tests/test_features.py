"""Frozen-prefix cache: the split computes what the model computes, entries are keyed and reused."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset

from tests.conftest import read_metrics, train
from tlexp.data.datamodule import ImageDataModule
from tlexp.features.builder import PrefixRunner
from tlexp.features.cut import NoFrozenPrefix, cut_frozen_prefix
from tlexp.features.store import FeatureStore
from tlexp.model.backbones import build_backbone
from tlexp.model.module import TransferModule
from tlexp.model.strategies import modules_to_unfreeze, parse_strategy


@pytest.mark.parametrize(
    ("source", "name", "strategy", "cuts"),
    [
        ("torchvision", "resnet18", "frozen", 1),
        ("torchvision", "resnet18", "blocks_2", 1),
        ("torchvision", "resnet18", "layers_5", 2),  # inside a residual block: main path and identity
        ("torchvision", "mobilenet_v2", "layers_10", 1),
        ("timm", "tf_efficientnet_lite0", "blocks_4", 1),
    ],
)
def test_prefix_then_suffix_equals_the_backbone(source, name, strategy, cuts):
    torch.manual_seed(0)
    backbone = build_backbone(source, name, None)
    trainable = [m for u in modules_to_unfreeze(backbone, parse_strategy(strategy)) for m in u.modules]
    split = cut_frozen_prefix(backbone, [p for m in trainable for p in m.parameters()])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = backbone.body.eval()(x)
        values = split.prefix(x)
        assert len(values) == len(split.boundary) == cuts
        assert torch.allclose(split.suffix(*values), expected, atol=1e-5)
    learning = {id(p) for m in trainable for p in m.parameters()}
    suffix_params = {id(p) for p in split.suffix.parameters()}
    assert learning <= suffix_params  # the suffix trains the backbone's own parameters
    assert suffix_params <= {id(p) for p in backbone.body.parameters()}
    assert not learning & {id(p) for p in split.prefix.parameters()}


def test_full_strategy_has_no_frozen_prefix():
    backbone = build_backbone("torchvision", "resnet18", None)
    with pytest.raises(NoFrozenPrefix, match="nothing is frozen"):
        cut_frozen_prefix(backbone, backbone.body.parameters())


class _Images(Dataset):
    def __init__(self, n: int, scale: float = 1.0):
        self.x = torch.randn(n, 3, 8, 8) * scale

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], 0


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return (x.mean(dim=(2, 3)), x[:, :1])


def test_store_keeps_integer_values_as_they_are(tmp_path):
    store = FeatureStore(tmp_path, budget_bytes=10**9, batch_size=4)
    pixels = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    images = [(p, 0) for p in pixels]
    (stored,) = store.get({"k": "pixels"}, lambda x: (x,), images, "test")
    assert stored.dtype == torch.uint8 and torch.equal(stored, pixels)


def test_store_reuses_an_entry_only_for_the_same_key(tmp_path):
    images, prefix = _Images(10), _Counting()
    store = FeatureStore(tmp_path, budget_bytes=10**9, batch_size=4)
    first = store.get({"k": 1}, prefix, images, "test")
    assert prefix.calls == 3 and [t.dtype for t in first] == [torch.float16, torch.float16]
    assert torch.allclose(first[0].float(), images.x.mean(dim=(2, 3)), atol=1e-3)
    assert store.get({"k": 1}, prefix, images, "test") is first and prefix.calls == 3
    fresh = FeatureStore(tmp_path, budget_bytes=0, batch_size=4)  # from disk, memory-mapped
    assert torch.equal(fresh.get({"k": 1}, prefix, images, "test")[1], first[1]) and prefix.calls == 3
    store.get({"k": 2}, prefix, images, "test")
    assert prefix.calls == 6
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 2


def test_jobs_in_one_process_share_one_store_and_budget(tmp_path):
    first = FeatureStore.shared(tmp_path, budget_bytes=10**9, batch_size=4)
    first.get({"k": 1}, _Counting(), _Images(4), "test")
    second = FeatureStore.shared(tmp_path, budget_bytes=0, batch_size=8)
    assert second is first and second.batch_size == 8 and not second.resident  # the new budget evicts


def test_values_beyond_float16_are_stored_in_float32(tmp_path):
    store = FeatureStore(tmp_path, budget_bytes=10**9, batch_size=4)
    huge = _Images(6, scale=1e6)
    values = store.get({"k": "huge"}, _Counting(), huge, "test")
    assert values[0].dtype == torch.float32 and torch.isfinite(values[0]).all()
    meta = json.loads(next(tmp_path.glob("*/meta.json")).read_text())
    assert meta["dtypes"] == ["float32", "float32"]


def _full_model_val_loss(run_dir):
    """Validation loss of last.ckpt's weights through the whole model on decoded images."""
    module = TransferModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    module.eval()
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    data = ImageDataModule(cfg.data, seed=cfg.seed, preprocessing=module.preprocessing)
    data.setup()
    losses, sizes = [], []
    with torch.no_grad():
        for x, y in data.val_dataloader():
            losses.append(module.criterion(module(x), y) * len(y))
            sizes.append(len(y))
    return float(sum(losses) / sum(sizes))


@pytest.mark.parametrize(
    ("strategy", "compile_from", "tta"), [("blocks_2", "null", "none"), ("layers_5", "null", "none"), ("blocks_2", "0", "none"), ("blocks_2", "null", "flip")]
)
def test_cached_training_reports_what_the_model_computes(tmp_path, tiny_tree, data_cache_dir, strategy, compile_from, tta):
    """The last epoch's val loss, computed on cached prefix values, is the full model's on images (with flip TTA too)."""
    run = tmp_path / "run"
    train(
        run, tiny_tree, "model=resnet18", f"strategy={strategy}", "finetune.phase_b_epochs=2", f"model.tta={tta}",
        f"perf.compile_prefix_min_images={compile_from}", "data.batch_size=16",  # 21 train images: a short last batch
        # fp32 on any CPU: under bf16-mixed (precision=auto on AVX-512 BF16 CPUs) compiled and eager
        # outputs differ by ~7e-3, beyond the 1e-3 check, so the prefix rightly stays eager there
        "trainer.precision=32-true",
    )
    log = (run / "train.log").read_text()
    assert "phase A: frozen prefix cached up to" in log and "phase B: frozen prefix cached up to" in log
    assert log.count("frozen prefix: compiled") == (2 if compile_from == "0" else 0)
    assert ("phase B val mirrored" in log) == (tta == "flip")
    last = read_metrics(run)["history"][-1]
    assert last["val_loss"] == pytest.approx(_full_model_val_loss(run), rel=2e-3)


def test_a_half_precision_run_trains_on_cached_values(tmp_path, tiny_tree):
    """trainer.precision=bf16-true (16-true on a GPU): the builder runs the bf16 prefix on bf16 inputs as Lightning's
    loop would, and the suffix gets the cached values in its weights' dtype (both were fp32: a dtype error)."""
    run = tmp_path / "run"
    train(run, tiny_tree, "model=resnet18", "strategy=blocks_2", "trainer.precision=bf16-true")
    log = (run / "train.log").read_text()
    assert "phase A: frozen prefix cached up to" in log and "phase B: frozen prefix cached up to" in log
    assert read_metrics(run)["status"] == "completed"


def test_a_prefix_that_does_not_compile_runs_eagerly(monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", no_compiler)
    caplog.set_level("INFO")
    prefix = _Counting()
    runner = PrefixRunner(prefix, lambda x: x, torch.contiguous_format, batch_size=4, compile_it=True, device=torch.device("cpu"))
    x = torch.randn(3, 3, 8, 8)
    with torch.inference_mode():
        values = runner(x)
    assert [v.shape[0] for v in values] == [3, 3] and torch.equal(values[1], x[:, :1])
    assert "perf.compile_prefix_min_images: compile failed" in caplog.text and "frozen prefix: eager" in caplog.text


def test_rows_that_share_a_prefix_share_its_entries(tmp_path, tiny_tree, data_cache_dir):
    """Phase A of a second strategy finds every entry the first computed: no image is decoded again."""
    views = ("data.augment.cached_views.phase_a=4", "finetune.phase_a_epochs=2")
    train(tmp_path / "a", tiny_tree, "model=resnet18", "strategy=frozen", *views)
    train(tmp_path / "b", tiny_tree, "model=resnet18", "strategy=blocks_2", *views)
    second = (tmp_path / "b" / "train.log").read_text()
    assert "feature cache: phase A" not in second and "feature cache: decoded" not in second.split("phase B")[0]
    assert "feature cache: decoded train images, view 3/4" in second
    assert "feature cache: phase B train view 3/4" in second
    strip = lambda m: [{k: v for k, v in e.items() if k != "seconds"} for e in m["history"][:2]]
    assert strip(read_metrics(tmp_path / "b")) == strip(read_metrics(tmp_path / "a"))  # phase A as if run alone
    first, then = read_metrics(tmp_path / "a")["time_split"], read_metrics(tmp_path / "b")["time_split"]
    assert first["started_at"] < then["started_at"] and first["before_fit_s"] > 0
    assert first["decoded_views_s"] > 0 and first["prefix_outputs_s"] > 0 and first["waiting_for_other_jobs_s"] == 0.0
    assert first["fit_s"] > first["decoded_views_s"] + first["prefix_outputs_s"]  # the cache's time is part of fitting


def test_naive_perf_trains_on_images(tmp_path, tiny_tree):
    run = tmp_path / "run"
    train(run, tiny_tree, "model=resnet18", "perf=naive")
    assert "frozen prefix cached" not in (run / "train.log").read_text()
    metrics = read_metrics(run)
    assert metrics["feature_cache"] == {"enabled": False, "phase_a": 0, "phase_b": 4}
    assert set(metrics["time_split"]) == {"started_at", "before_fit_s", "fit_s", "test_s", "speed_s"}  # no cache: nothing of its own


def test_an_image_edited_in_place_is_a_new_cache_entry(tmp_path, tiny_tree):
    """Size and mtime kept (as ``exiftool -P`` does): the key follows the content, so the old values are not read."""
    import os

    from tlexp.data.files import Sample
    from tlexp.features.builder import samples_digest

    image = tiny_tree / "red" / "img_000.jpg"
    before = samples_digest([Sample(image, 0)])
    stat = image.stat()
    data = bytearray(image.read_bytes())
    data[-10] ^= 0x01  # a changed pixel, same size
    image.write_bytes(bytes(data))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert image.stat().st_size == stat.st_size and samples_digest([Sample(image, 0)]) != before


def test_a_file_name_that_is_not_utf8_has_a_cache_key(tiny_tree):
    """caf\\xe9.jpg (Latin-1 bytes): was a UnicodeEncodeError traceback at the first epoch of a cached (perf=fast) run."""
    import os

    from tlexp.data.files import Sample
    from tlexp.features.builder import samples_digest

    keys = set()
    for name in (b"caf\xe9.jpg", b"caf\xe8.jpg"):
        path = os.fsencode(tiny_tree / "red") + b"/" + name
        os.rename(tiny_tree / "red" / "img_000.jpg", path)
        keys.add(samples_digest([Sample(tiny_tree / "red" / os.fsdecode(name), 0)]))
        os.rename(path, tiny_tree / "red" / "img_000.jpg")
    assert len(keys) == 2  # hashed by its bytes: two names, two keys


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
def test_an_augmentation_policy_reaches_cached_views_and_image_epochs(tmp_path, tiny_tree, policy):
    """Issue 17: data.augment.policy, a config key for both training paths; each policy its own cached views."""
    from tlexp.data.transforms import POLICIES, Preprocessing, train_geometry

    augment = OmegaConf.create({"crop_scale": [0.8, 1.0], "hflip": True, "rotation": 0, "shear": 0, "policy": policy})
    geometry = train_geometry(Preprocessing(crop_size=32, resize_size=36), augment)
    assert isinstance(geometry.transforms[-2], POLICIES[policy])
    cached, naive = tmp_path / "cached", tmp_path / "naive"
    train(cached, tiny_tree, "model=resnet18", "strategy=blocks_2", f"data.augment.policy={policy}")
    train(naive, tiny_tree, "model=resnet18", "strategy=blocks_2", f"data.augment.policy={policy}", "perf=naive")
    assert "feature cache: decoded train images, view" in (cached / "train.log").read_text()  # a new key: views made with the policy
    assert all(read_metrics(run)["status"] == "completed" for run in (cached, naive))
