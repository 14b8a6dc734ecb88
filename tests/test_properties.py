"""Property tests (hypothesis): the split and the strategy selectors hold their promises for any input."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlexp.data.files import _share, stratified_split
from tlexp.model.backbones import build_backbone
from tlexp.model.strategies import blocks, layers, modules_to_unfreeze, parse_strategy

ROOT = Path("/data")
FRACTIONS = st.sampled_from([(0.7, 0.15, 0.15), (0.8, 0.1, 0.1), (0.6, 0.2, 0.2), (0.5, 0.5, 0.0), (1.0, 0.0, 0.0)])
COUNTS = st.dictionaries(st.sampled_from(["daisy", "rose", "tulip", "Sonnen blume", "résumé"]), st.integers(1, 40), min_size=2, max_size=5)
PROFILE = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _tree(counts: dict[str, int], prefix: str = "img") -> dict[str, list[Path]]:
    return {name: [ROOT / name / f"{prefix}_{i}.jpg" for i in range(n)] for name, n in counts.items()}


def _assignment(split) -> dict[Path, str]:
    return {s.path: subset for subset, samples in split.items() for s in samples}


@PROFILE
@given(counts=COUNTS, fractions=FRACTIONS, seed=st.integers(0, 2**31))
def test_split_is_disjoint_covering_stratified_and_deterministic(counts, fractions, seed):
    classes = _tree(counts)
    split = stratified_split(ROOT, classes, fractions, seed, None)
    paths = [s.path for samples in split.values() for s in samples]
    assert len(paths) == len(set(paths)) == sum(counts.values())  # disjoint and covering
    for label, (name, files) in enumerate(classes.items()):
        for subset, fraction in zip(("val", "test"), fractions[1:]):
            assert sum(s.label == label for s in split[subset]) == _share(len(files), fraction)
        assert all(s.path.parent.name == name for samples in split.values() for s in samples if s.label == label)
    shuffled = {name: random.Random(seed).sample(files, len(files)) for name, files in classes.items()}
    assert _assignment(stratified_split(ROOT, shuffled, fractions, seed, None)) == _assignment(split)


@PROFILE
@given(counts=COUNTS, extra=st.integers(1, 30), fractions=FRACTIONS, seed=st.integers(0, 2**31))
def test_files_added_to_another_class_move_nothing(counts, extra, fractions, seed):
    classes = _tree(counts)
    before = _assignment(stratified_split(ROOT, classes, fractions, seed, None))
    first = next(iter(classes))
    grown = {**classes, first: classes[first] + [ROOT / first / f"new_{i}.jpg" for i in range(extra)]}
    after = _assignment(stratified_split(ROOT, grown, fractions, seed, None))
    assert {p: s for p, s in after.items() if p.parent.name != first} == {p: s for p, s in before.items() if p.parent.name != first}


@pytest.fixture(scope="module")
def resnet18():
    return build_backbone("torchvision", "resnet18", None)


def _param_ids(units) -> set[int]:
    return {id(p) for u in units for m in u.modules for p in m.parameters()}


@PROFILE
@given(kind=st.sampled_from(["layers", "blocks"]), data=st.data())
def test_selectors_are_monotone_and_stay_in_the_backbone(resnet18, kind, data):
    available = len(layers(resnet18) if kind == "layers" else blocks(resnet18))
    n = data.draw(st.integers(1, available - 1))
    smaller = _param_ids(modules_to_unfreeze(resnet18, parse_strategy(f"{kind}_{n}")))
    larger = _param_ids(modules_to_unfreeze(resnet18, parse_strategy(f"{kind}_{n + 1}")))
    assert smaller <= larger <= {id(p) for p in resnet18.body.parameters()}  # never the head, never outside


def test_full_is_every_backbone_parameter_and_frozen_none(resnet18):
    assert _param_ids(modules_to_unfreeze(resnet18, parse_strategy("full"))) == {id(p) for p in resnet18.body.parameters()}
    assert modules_to_unfreeze(resnet18, parse_strategy("frozen")) == []
