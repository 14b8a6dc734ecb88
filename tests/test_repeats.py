"""Issue 17: tlexp-table turns seed repeats into mean ± std (n) and says which differences exceed the spread."""

from __future__ import annotations

import json

import pytest

from tlexp.report.repeats import repeat_groups, separations
from tlexp.report.table import _label, load_rows, swept
from tlexp.report.table import main as table_main

# (strategy, seed, test_acc): frozen and blocks_2 far apart, blocks_2 and blocks_4 within their spread
JOBS = [("frozen", 1, 0.80), ("frozen", 2, 0.82), ("blocks_2", 1, 0.90), ("blocks_2", 2, 0.94), ("blocks_4", 1, 0.91), ("blocks_4", 2, 0.92)]


@pytest.fixture
def sweep(tmp_path):
    for i, (strategy, seed, acc) in enumerate(JOBS):
        job = tmp_path / f"{i}_lite0_{strategy}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- strategy={strategy}\n- seed={seed}\n- data.root=/data\n")
        history = [{"epoch": 0, "train_acc": acc, "val_acc": acc, "train_loss": 0.5, "val_loss": 0.4, "phase_b": False}]
        record = {
            "status": "completed", "model": "lite0", "strategy": strategy, "seed": seed, "test_acc": acc, "test_loss": 0.3,
            "train_acc": acc, "val_acc": acc, "val_loss": 0.4, "test_f1_macro": acc, "wall_time_s": 100.0 + i,
            "trainable_params": 1000 * (i + 1), "best_epoch": 0, "history": history, "phase_a_epochs": 1, "phase_b_epochs": 0,
        }
        (job / "metrics.json").write_text(json.dumps(record))
    return tmp_path


def test_repeats_are_averaged_with_their_spread(sweep):
    groups = repeat_groups(load_rows(sweep), swept=[])
    assert [(g["strategy"], g["n"], g["seeds"]) for g in groups] == [("frozen", 2, [1, 2]), ("blocks_2", 2, [1, 2]), ("blocks_4", 2, [1, 2])]
    mean, std, runs = groups[1]["test_acc"]
    assert runs == 2 and mean == pytest.approx(0.92) and std == pytest.approx(0.02 * 2**0.5)  # sample std of 0.90 and 0.94


def test_the_table_writes_the_seed_summary_and_error_bars(sweep, capsys):
    assert table_main([str(sweep), "--print"]) == 0
    summary = (sweep / "table_seeds.md").read_text()
    assert "| lite0 | blocks_2 | 92.00 ± 2.83% |" in summary and "| 2 (1, 2) |" in summary
    assert "lite0 · blocks_2 vs lite0 · blocks_4: +0.50 pt" in summary and "within the spread" in summary
    assert "lite0 · blocks_2 vs lite0 · frozen: +11.00 pt" in summary and "beyond the spread" in summary
    assert (sweep / "accuracy_vs_cost.png").stat().st_size > 10_000
    assert "table_seeds.md" in capsys.readouterr().out


def test_sweeps_of_one_seed_each_combine_under_one_parent(sweep, tmp_path_factory):
    """Repeats run in separate sweeps (seed 1 one day, seed 2 the next) group as if swept together."""
    parent = tmp_path_factory.mktemp("study")
    for job in sorted(sweep.iterdir()):
        target = parent / f"seed{json.loads((job / 'metrics.json').read_text())['seed']}"
        target.mkdir(exist_ok=True)
        job.rename(target / job.name)
    rows = load_rows(parent)
    groups = repeat_groups(rows, swept(rows))
    assert [(g["strategy"], g["n"]) for g in groups] == [("frozen", 2), ("blocks_2", 2), ("blocks_4", 2)]


def test_a_single_run_is_never_told_apart(sweep):
    """n = 1 has no spread: its std is shown as 0, but no difference to it counts as beyond the spread."""
    (sweep / "5_lite0_blocks_4" / "metrics.json").unlink()
    (sweep / "5_lite0_blocks_4").rename(sweep.parent / "gone")
    rows = load_rows(sweep)
    lines = separations(repeat_groups(rows, swept(rows)))
    assert any("vs lite0 · blocks_4" in line and "a single run has no spread" in line for line in lines)


def test_a_model_setting_is_a_swept_setting(sweep):
    """``model.tta=flip`` is a setting (only ``model=`` is the Model column): its runs are not averaged with the others."""
    overrides = sweep / "5_lite0_blocks_4" / ".hydra" / "overrides.yaml"
    overrides.write_text(overrides.read_text() + "- model.tta=flip\n")
    rows = load_rows(sweep)
    assert swept(rows) == ["model.tta"]
    groups = repeat_groups(rows, swept(rows))
    assert [(g["strategy"], g["n"]) for g in groups if g["strategy"] == "blocks_4"] == [("blocks_4", 1), ("blocks_4", 1)]


def test_a_label_names_only_the_settings_its_run_overrides(sweep):
    """Plot labels and legends: ``blocks_4 · model.tta=flip``, not every swept setting spelt ``=default``."""
    overrides = sweep / "5_lite0_blocks_4" / ".hydra" / "overrides.yaml"
    overrides.write_text(overrides.read_text() + "- model.tta=flip\n")
    rows = load_rows(sweep)
    labels = {_label(r, swept(rows), with_model=False) for r in rows if r["strategy"] == "blocks_4"}
    assert labels == {"blocks_4", "blocks_4 · model.tta=flip"}


def test_a_seed_run_twice_is_said_not_passed_off_as_a_repeat(sweep, tmp_path_factory):
    """The same sweep twice under one parent: each group's seed summary says its seeds ran twice (was: n=4 and a spread
    over copies, presented as four repeats)."""
    import shutil

    parent = tmp_path_factory.mktemp("study")
    shutil.copytree(sweep, parent / "monday")
    shutil.copytree(sweep, parent / "tuesday")
    rows = load_rows(parent)
    lines = separations(repeat_groups(rows, swept(rows)))
    assert "lite0 · frozen: seed 1, 2 ran more than once: its n and spread count the same seed again" in lines
    assert sum("ran more than once" in line for line in lines) == 3


def test_a_mean_over_fewer_runs_than_n_says_so(sweep):
    """A repeat that did not record a metric (a record before it was kept) is left out of that mean, and the cell says
    over how many runs (was: the mean of one run shown beside n=2, as if of both)."""
    job = next(sweep.glob("3_*"))  # blocks_2, seed 2
    record = json.loads((job / "metrics.json").read_text())
    del record["wall_time_s"]
    (job / "metrics.json").write_text(json.dumps(record))
    assert table_main([str(sweep)]) == 0
    row = next(line for line in (sweep / "table_seeds.md").read_text().splitlines() if "| blocks_2 |" in line)
    assert "| 102 ± 0 (1 of 2) |" in row and "| 92.00 ± 2.83% |" in row and row.endswith("| 2 (1, 2) |")

