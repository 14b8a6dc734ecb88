"""Hydra multirun → tlexp-table: rows, files, failed jobs, resume=true, --compare."""

from __future__ import annotations

import csv
import json
import shlex

import pytest

from tests.conftest import FAST, run_cli
from tlexp.report.table import main as table_main

QUICK_PROFILE = ("profile.batch_size=4", "profile.warmup=1", "profile.repeats=2")


def _sweep(sweep_dir, data_root, *overrides):
    result = run_cli("-m", *FAST, *QUICK_PROFILE, f"data.root={data_root}", f"hydra.sweep.dir={sweep_dir}", *overrides, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _table_rows(sweep_dir):
    with open(sweep_dir / "table.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_of_two_models_and_two_strategies_makes_the_table(tmp_path, tiny_tree):
    sweep = tmp_path / "sweep"
    _sweep(sweep, tiny_tree, "model=resnet18,mobilenet_v2", "strategy=frozen,blocks_2")
    assert table_main([str(sweep), "--print"]) == 0
    rows = _table_rows(sweep)
    assert [(r["Model"], r["Strategy"], r["Status"]) for r in rows] == [
        ("resnet18", "frozen", "completed"), ("resnet18", "blocks_2", "completed"),
        ("mobilenet_v2", "frozen", "completed"), ("mobilenet_v2", "blocks_2", "completed"),
    ]
    assert all(float(r["Inference Speed (ms/image)"]) > 0 and float(r["GFLOPs"]) > 0 for r in rows)
    assert rows[0]["Trainable Parameters"] == str(512 * 3 + 3)
    markdown = (sweep / "table.md").read_text().splitlines()
    assert markdown[0].startswith("| Model | Strategy | Training Accuracy | Training Loss | Validation Accuracy")
    assert len(markdown) == 2 + 4 and "%" in markdown[2]
    for png in ("accuracy_vs_speed.png", "curves.png"):
        assert (sweep / png).stat().st_size > 10_000
    metrics = json.loads(next(sweep.glob("0_*/metrics.json")).read_text())
    assert metrics["speed_setup"]["batch_sizes"] == [1, 4] and metrics["images_per_s"] > 0
    phases = [e["phase_b"] for e in json.loads(next(sweep.glob("1_*/metrics.json")).read_text())["history"]]
    assert phases == [False, True]  # the whole history, not the best checkpoint's copy of it
    job = next(sweep.glob("1_*"))  # its summary's resume line runs that job alone, in its own folder
    line = next(li.split(None, 1)[1] for li in (job / "summary.txt").read_text().splitlines() if li.startswith("resume "))
    assert "hydra.mode=RUN" in line and f"hydra.run.dir={job}" in line
    again = run_cli(*shlex.split(line)[1:])
    assert again.returncode == 0 and "already completed" in (job / "train.log").read_text(), again.stderr[-2000:]


def test_swept_settings_and_the_best_epoch_are_columns(tmp_path, tiny_tree):
    """Issue 16: a 2 x 2 sweep over optim.lr and strategy gives rows that differ visibly."""
    sweep = tmp_path / "sweep"
    result = _sweep(sweep, tiny_tree, "model=resnet18", "optim.lr=0.001,0.01", "strategy=frozen,blocks_1", "profile.enabled=false")
    assert f"tlexp-table {sweep} --print" in result.stdout
    assert table_main([str(sweep)]) == 0
    header = (sweep / "table.md").read_text().splitlines()[0]
    assert header.startswith("| Model | Strategy | optim.lr | Training Accuracy") and "| Best epoch (phase) |" in header
    rows = _table_rows(sweep)
    assert sorted((r["optim.lr"], r["Strategy"]) for r in rows) == [
        ("0.001", "blocks_1"), ("0.001", "frozen"), ("0.01", "blocks_1"), ("0.01", "frozen"),
    ]
    assert all(r["Best epoch (phase)"] in ("0 (A)", "1 (B)") for r in rows if r["Strategy"] == "blocks_1")
    assert (sweep / "accuracy_vs_cost.png").stat().st_size > 10_000  # one network: accuracy against training cost


def test_a_failing_job_does_not_stop_the_sweep_and_resume_skips_done_jobs(tmp_path, tiny_tree):
    sweep = tmp_path / "sweep"
    args = ("model=resnet18", "strategy=frozen,blocks_2,blocks_99,blocks_1")
    _sweep(sweep, tiny_tree, *args)
    assert table_main([str(sweep)]) == 0
    rows = _table_rows(sweep)
    assert [r["Status"] for r in rows] == ["completed", "completed", "failed", "completed"]
    assert "only 8 blocks" in rows[2]["Error"]
    assert "FAILED" in (sweep / "table.md").read_text()

    done = {p: p.stat().st_mtime_ns for p in sweep.glob("*/metrics.json") if "blocks_99" not in str(p)}
    result = _sweep(sweep, tiny_tree, *args, "resume=true")
    assert (result.stdout + result.stderr).count("already completed") == 3
    assert {p: p.stat().st_mtime_ns for p in done} == done


def test_compare_prints_per_row_differences(tmp_path, tiny_tree, capsys):
    sweep = tmp_path / "sweep"
    _sweep(sweep, tiny_tree, "model=resnet18", "strategy=frozen")
    reference = tmp_path / "ref.csv"
    reference.write_text("Model,Strategy,Test Accuracy,Trainable Parameters\nresnet18,frozen,50.00%,\"1,000\"\n")
    assert table_main([str(sweep), "--compare", str(reference)]) == 0
    out = capsys.readouterr().out
    assert "| resnet18 | frozen |" in out and f"{512 * 3 + 3 - 1000:+,}" in out and " pt" in out


def test_table_of_an_empty_directory_is_a_clear_error(tmp_path, capsys):
    assert table_main([str(tmp_path)]) == 2
    assert "no metrics.json" in capsys.readouterr().err


@pytest.mark.parametrize("experiment,n", [("seed_table", 14), ("seed_table_offline", 7), ("seed_table_offline_repeats", 21)])
def test_experiments_define_the_reference_sweeps(experiment, n):
    from hydra import compose, initialize_config_dir

    from tests.conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    strategies = params.strategy.split(",")
    assert strategies == ["frozen", "layers_5", "layers_10", "layers_40", "blocks_2", "blocks_4", "blocks_10"]
    assert len(strategies) * len(params.get("model", cfg.model.name).split(",")) * len(params.get("seed", "42").split(",")) == n
    assert (cfg.finetune.phase_a_epochs, cfg.finetune.phase_b_epochs) == (5, 15)
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.data.kind == "tf_flowers"


def test_the_chosen_recipe_preset_is_what_the_search_chose(compose_cfg):
    """experiment=tf_flowers_lite0: the settings docs/results/seed_table_offline/README.md's search chose on validation."""
    cfg = compose_cfg("experiment=tf_flowers_lite0")
    assert (cfg.model.name, cfg.data.kind, cfg.strategy, cfg.trainer.precision) == ("tf_efficientnet_lite0", "tf_flowers", "layers_40", "32-true")
    assert cfg.callbacks.ema.decay == 0.99 and cfg.model.tta == "none" and cfg.loss.label_smoothing == 0.0
    assert (cfg.finetune.phase_a_epochs, cfg.finetune.phase_b_epochs, cfg.seed, cfg.data.split_seed) == (5, 15, 42, 42)


def test_reference_study_csv_matches_design_and_compares(tmp_path, capsys):
    """docs/reference_study.csv is the reference study's table; --compare reads it (rows built by hand here)."""
    from tests.conftest import REPO

    sweep = tmp_path / "sweep"
    (sweep / "0_resnet50_blocks_2").mkdir(parents=True)
    (sweep / "0_resnet50_blocks_2" / "metrics.json").write_text(json.dumps(
        {"status": "completed", "model": "resnet50", "strategy": "blocks_2", "train_acc": 0.95, "val_acc": 0.9,
         "test_acc": 0.9283, "trainable_params": 8_935_429, "ms_per_image": 80.0, "seed": 42}))
    assert table_main([str(sweep), "--compare", str(REPO / "docs" / "reference_study.csv")]) == 0
    out = capsys.readouterr().out
    assert "| resnet50 | blocks_2 | -0.60 pt | +0.11 pt | +1.00 pt | -6,144 | -7.03 |" in out


def _hand_made_sweep(sweep, jobs, lr_overridden=True):
    """Job folders with a metrics.json and overrides.yaml each: (strategy, optim.lr, test_acc, ms_per_image).

    The record holds the job's config, as a run's does; ``lr_overridden=False``: optim.lr is in it alone, not an override.
    """
    for i, (strategy, lr, acc, ms) in enumerate(jobs):
        job = sweep / f"{i}_resnet18_{strategy}"
        (job / ".hydra").mkdir(parents=True)
        lr_override = f"- optim.lr={lr}\n" if lr_overridden else ""
        (job / ".hydra" / "overrides.yaml").write_text(f"- model=resnet18\n- strategy={strategy}\n{lr_override}")
        (job / "metrics.json").write_text(json.dumps(
            {"status": "completed", "model": "resnet18", "strategy": strategy, "train_acc": acc + 0.05, "val_acc": acc - 0.01,
             "test_acc": acc, "trainable_params": 1539 * (i + 1), "ms_per_image": ms, "seed": 42, "test_f1_macro": acc - 0.02,
             "total_params": 11_178_051, "lr": float(lr), "run": {"hydra_files": {"config.yaml": f"optim:\n  lr: {lr}\nseed: 42\n"}}}))
    return sweep


LR_X_STRATEGY = [("frozen", "0.001", 0.8123, 3.25), ("frozen", "0.01", 0.7741, 3.5),
                 ("blocks_1", "0.001", 0.9012, 3.75), ("blocks_1", "0.01", 0.8867, 4.0)]


def test_compare_with_the_sweeps_own_table_csv_gives_zeros(tmp_path, capsys):
    """table.csv holds fractions (0.8123), the study's table percentages (92.10%): each read on its own scale."""
    sweep = _hand_made_sweep(tmp_path / "sweep", LR_X_STRATEGY)
    assert table_main([str(sweep)]) == 0
    reference = tmp_path / "own_table.csv"
    reference.write_text((sweep / "table.csv").read_text())
    capsys.readouterr()
    assert table_main([str(sweep), "--compare", str(reference)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| resnet18 |")]
    assert lines == [f"| resnet18 | {s} | {lr} | +0.00 pt | +0.00 pt | +0.00 pt | +0 | +0.00 | +0.00 pt | +0 |" for s, lr, _, _ in LR_X_STRATEGY]


def test_compare_matches_rows_on_the_swept_settings_too(tmp_path, capsys):
    """A sweep over optim.lr x strategy: each row meets the reference row of its lr; one without says so."""
    sweep = _hand_made_sweep(tmp_path / "sweep", LR_X_STRATEGY)
    reference = tmp_path / "ref.csv"
    reference.write_text("Model,Strategy,optim.lr,Test Accuracy\n"
                         "resnet18,frozen,1e-3,80.00%\nresnet18,frozen,0.01,70.00%\nresnet18,blocks_1,0.001,90.00%\n")
    assert table_main([str(sweep), "--compare", str(reference)]) == 0
    out = capsys.readouterr().out
    assert "| Model | Strategy | optim.lr | Δ Test Accuracy |" in out
    assert "| resnet18 | frozen | 0.001 | +1.23 pt |" in out and "| resnet18 | frozen | 0.01 | +7.41 pt |" in out
    assert "| resnet18 | blocks_1 | 0.001 | +0.12 pt |" in out
    assert "| resnet18 | blocks_1 | 0.01 | no reference row with Model=resnet18, Strategy=blocks_1, optim.lr=0.01 |" in out


def test_compare_matches_a_setting_the_reference_sweeps_and_ours_fixes(tmp_path, capsys):
    """The reference tried two learning rates per strategy, this sweep ran at one (its config's): each row meets
    the reference row of that rate, named in its own column, never the first row of the strategy."""
    sweep = _hand_made_sweep(tmp_path / "sweep", [("frozen", "0.01", 0.7741, 3.5), ("blocks_1", "0.01", 0.8867, 4.0)], lr_overridden=False)
    reference = tmp_path / "ref.csv"
    reference.write_text("Model,Strategy,optim.lr,Test Accuracy\n"
                         "resnet18,frozen,1e-3,80.00%\nresnet18,frozen,1e-2,70.00%\n"
                         "resnet18,blocks_1,0.001,90.00%\nresnet18,blocks_1,0.01,85.00%\n")
    assert table_main([str(sweep), "--compare", str(reference)]) == 0
    out = capsys.readouterr().out
    assert "| Model | Strategy | optim.lr (reference) | Δ Test Accuracy |" in out
    assert "| resnet18 | frozen | 1e-2 | +7.41 pt |" in out and "| resnet18 | blocks_1 | 0.01 | +3.67 pt |" in out

    reference.write_text("Model,Strategy,optim.lr,Test Accuracy\nresnet18,frozen,1e-3,80.00%\nresnet18,blocks_1,0.01,85.00%\n")
    assert table_main([str(sweep), "--compare", str(reference)]) == 0
    out = capsys.readouterr().out
    assert "| resnet18 | frozen | — | no reference row with Model=resnet18, Strategy=frozen, optim.lr=0.01 |" in out
    assert "| resnet18 | blocks_1 | 0.01 | +3.67 pt |" in out


@pytest.mark.parametrize("reference,says", [
    ("nofile.csv", "No such file or directory"),
    ("no_model.csv", "has no Model column (its header: Name, Strategy, Test Accuracy)"),
    ("not_a_number.csv", "row 1: Test Accuracy 'n/a' is not a number"),
], ids=["missing_file", "no_model_column", "not_a_number"])
def test_a_bad_reference_is_one_clear_error(tmp_path, capsys, reference, says):
    sweep = _hand_made_sweep(tmp_path / "sweep", LR_X_STRATEGY[:1])
    (tmp_path / "no_model.csv").write_text("Name,Strategy,Test Accuracy\nresnet18,frozen,0.8\n")
    (tmp_path / "not_a_number.csv").write_text("Model,Strategy,Test Accuracy\nresnet18,frozen,n/a\n")
    assert table_main([str(sweep), "--compare", str(tmp_path / reference)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tlexp-table: error: --compare {tmp_path / reference}") and err.count("\n") == 1
    assert says in err and ("such as docs/reference_study.csv" in err or "write numbers" in err)
    assert not (sweep / "table.md").exists()  # read before the sweep: no table, no plots for a typo


def test_readme_lists_every_column_of_the_table():
    from tests.conftest import REPO
    from tlexp.report.table import COLUMNS

    text = " ".join((REPO / "README.md").read_text().split())
    sentence = text[text.index("`tlexp-table` writes the study's columns"):text.index("Every override whose value differs")]
    positions = [sentence.find(header) for header, _, _ in COLUMNS]
    assert -1 not in positions and positions == sorted(positions), [h for (h, _, _), p in zip(COLUMNS, positions) if p < 0]


@pytest.mark.parametrize("epochs", [1, 3], ids=["one_epoch", "three_epochs"])
def test_curves_have_whole_epoch_ticks_and_draw_nan_losses(tmp_path, monkeypatch, epochs):
    """curves.png: the x axis counts epochs (0, 1, 2; was 0.5, 1.5 ticks); a diverged epoch's NaN loss is a gap, not a crash."""
    from matplotlib.figure import Figure

    sweep = _hand_made_sweep(tmp_path / "sweep", LR_X_STRATEGY[:2])
    for job in sweep.iterdir():
        record = json.loads((job / "metrics.json").read_text())
        history = [{"epoch": e, "train_acc": 0.5, "val_acc": 0.6, "train_loss": 0.7, "val_loss": float("nan") if e else 0.6,
                    "phase_b": e > 0} for e in range(epochs)]
        record |= {"history": history, "best_epoch": 0, "phase_a_epochs": 1, "phase_b_epochs": epochs - 1}
        (job / "metrics.json").write_text(json.dumps(record))
    ticks, save = {}, Figure.savefig

    def spy(fig, path, **kwargs):
        ticks[path.name] = [[t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]] for ax in fig.axes]
        save(fig, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    assert table_main([str(sweep)]) == 0
    assert ticks["curves.png"] == [list(range(epochs))] * 2
    assert (sweep / "curves.png").stat().st_size > 10_000


def test_the_best_trial_skips_files_that_are_no_record(tmp_path):
    """A half-written or foreign metrics.json in a search's folder is no trial (was: the callback's traceback)."""
    from tlexp.report.best_trial import best_job

    for i, text in enumerate(['{"status": "completed", "val_acc": 0.5}', "", '{"val_acc": 0.9}']):
        (tmp_path / f"{i}_trial").mkdir()
        (tmp_path / f"{i}_trial" / "metrics.json").write_text(text)
    assert best_job(tmp_path)["job_dir"] == str(tmp_path / "0_trial")


def test_the_sweeps_closing_line_is_a_command_to_paste(capsys):
    from omegaconf import OmegaConf

    from tlexp.report.sweep_hint import PointAtTable

    PointAtTable().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": "/data/my runs/lr sweep"}}}))
    assert capsys.readouterr().out == "sweep done; its table and plots: tlexp-table '/data/my runs/lr sweep' --print\n"


def test_the_best_trial_leaves_out_an_unreadable_record(tmp_path, caplog):
    """An empty metrics.json (a full disk) is a warning, not a traceback at the end of the sweep (best_config.yaml unwritten)."""
    from tlexp.report.best_trial import best_job

    for job, text in (("0_a", json.dumps({"status": "completed", "val_acc": 0.5})), ("1_b", "")):
        (tmp_path / job).mkdir()
        (tmp_path / job / "metrics.json").write_text(text)
    assert best_job(tmp_path)["job_dir"] == str(tmp_path / "0_a")
    assert f"{tmp_path / '1_b' / 'metrics.json'} is not valid JSON" in caplog.text


def test_compare_with_a_reference_of_seed_repeats_meets_the_repeat_of_our_seed(tmp_path, capsys):
    """The reference ran seeds 42 and 43 of each row, this sweep seed 42: each row meets the reference's seed 42
    (was: '2 reference rows ...: not compared', exit 2)."""
    sweep = _hand_made_sweep(tmp_path / "sweep", LR_X_STRATEGY[:2])
    reference = tmp_path / "ref.csv"
    reference.write_text("Model,Strategy,optim.lr,Seed,Test Accuracy\n"
                         "resnet18,frozen,0.001,42,80.00%\nresnet18,frozen,0.001,43,60.00%\nresnet18,frozen,0.01,43,70.00%\n")
    assert table_main([str(sweep), "--compare", str(reference)]) == 0
    out = capsys.readouterr().out
    assert "| Model | Strategy | optim.lr | Seed | Δ Test Accuracy |" in out and "| resnet18 | frozen | 0.001 | 42 | +1.23 pt |" in out
    assert "| resnet18 | frozen | 0.01 | 42 | no reference row with Model=resnet18, Strategy=frozen, optim.lr=0.01, Seed=42 |" in out


def test_the_table_says_interrupted_not_failed(tmp_path, capsys):
    """A pre-empted job resumes with resume=true: its row and the closing line call it interrupted (was: FAILED, '1 failed')."""
    sweep = _hand_made_sweep(tmp_path / "sweep", LR_X_STRATEGY[:2])
    (sweep / "1_resnet18_frozen" / "metrics.json").write_text(json.dumps(
        {"status": "interrupted", "model": "resnet18", "strategy": "frozen", "seed": 42,
         "error": "stopped by SIGTERM; resume with: tlexp-train strategy=frozen resume=true"}))
    assert table_main([str(sweep)]) == 0
    assert "| INTERRUPTED: stopped by SIGTERM; resume with: tlexp-train strategy=frozen resume=true |" in (sweep / "table.md").read_text()
    assert capsys.readouterr().out.startswith("2 rows (1 interrupted) → ")


def test_sort_puts_a_diverged_runs_nan_last(tmp_path):
    """--sort val_loss with a NaN loss: the others in order, the NaN row last (was: [0.5, nan, 0.3, 0.4] left unsorted)."""
    sweep = _hand_made_sweep(tmp_path / "sweep", [*LR_X_STRATEGY, ("full", "0.1", 0.2, 4.5)])
    for job, loss in zip(sorted(sweep.iterdir()), (0.5, float("nan"), 0.3, 0.4, 0.6)):
        record = json.loads((job / "metrics.json").read_text())
        (job / "metrics.json").write_text(json.dumps(record | {"val_loss": loss}))
    assert table_main([str(sweep), "--sort", "val_loss"]) == 0
    assert [r["Validation Loss"] for r in _table_rows(sweep)] == ["0.3", "0.4", "0.5", "0.6", "nan"]


def test_sweeps_side_by_side_keep_their_rows_together(tmp_path):
    """A parent of two sweeps: each sweep's jobs together, by folder then job number, 2 before 10 (was: 0, 0, 1, 1, ...
    interleaved)."""
    jobs = LR_X_STRATEGY * 3  # jobs 0 to 11
    for stamp in ("11-00-00", "10-00-00"):
        _hand_made_sweep(tmp_path / "multirun" / "2026-12-01" / stamp, jobs)
    assert table_main([str(tmp_path / "multirun")]) == 0
    assert [r["Job"] for r in _table_rows(tmp_path / "multirun")] == [
        f"2026-12-01/{stamp}/{i}_resnet18_{strategy}" for stamp in ("10-00-00", "11-00-00") for i, (strategy, *_) in enumerate(jobs)]


def test_descending_without_sort_is_refused(tmp_path, capsys):
    """--descending alone: exit 2 and one line (was: accepted, rows in folder order)."""
    sweep = _hand_made_sweep(tmp_path / "sweep", LR_X_STRATEGY[:2])
    with pytest.raises(SystemExit) as exited:
        table_main([str(sweep), "--descending"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "tlexp-table: error: --descending orders --sort's key: give --sort <key> too"
    assert not (sweep / "table.md").exists()


def test_best_config_is_the_config_the_best_record_was_computed_with(tmp_path):
    """A job folder whose .hydra/config.yaml changed after it recorded (tlexp-table: a mismatch row): best_config.yaml
    is the record's config (was: the changed file, a config that did not give that accuracy)."""
    from omegaconf import OmegaConf

    from tlexp.report.best_trial import WriteBestTrial

    sweep = _hand_made_sweep(tmp_path / "sweep", LR_X_STRATEGY[:2])
    best = sweep / "0_resnet18_frozen"
    (best / ".hydra" / "config.yaml").write_text("optim:\n  lr: 0.5\nseed: 42\n")
    WriteBestTrial().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert (sweep / "best_config.yaml").read_text() == "optim:\n  lr: 0.001\nseed: 42\n"
    assert json.loads((sweep / "best_trial.json").read_text())["job_dir"] == str(best)


def test_a_seed_summary_of_an_earlier_table_is_removed_when_the_repeats_are_gone(tmp_path):
    """Was: table_seeds.md of an earlier tlexp-table stayed beside a table that has no repeats any more."""
    sweep = _hand_made_sweep(tmp_path / "sweep", LR_X_STRATEGY)
    (sweep / "table_seeds.md").write_text("| Strategy | Seeds |\n")
    assert table_main([str(sweep)]) == 0
    assert not (sweep / "table_seeds.md").exists() and (sweep / "table.md").exists()


def test_curves_leave_out_a_job_whose_record_is_of_another_config(tmp_path, monkeypatch):
    """Was: a mismatch row (metrics.json computed with another config than its .hydra/config.yaml) drawn as a run."""
    from matplotlib.figure import Figure

    sweep = _hand_made_sweep(tmp_path / "sweep", LR_X_STRATEGY[:2])
    for job in sweep.iterdir():
        record = json.loads((job / "metrics.json").read_text())
        record["history"] = [{"epoch": 0, "train_acc": 0.5, "val_acc": 0.6, "train_loss": 0.7, "val_loss": 0.6, "phase_b": False}]
        (job / "metrics.json").write_text(json.dumps(record))
        (job / ".hydra" / "config.yaml").write_text(record["run"]["hydra_files"]["config.yaml"])
    (sorted(sweep.iterdir())[1] / ".hydra" / "config.yaml").write_text("optim:\n  lr: 0.5\nseed: 42\n")  # edited after it recorded
    labels, save = {}, Figure.savefig

    def spy(fig, path, **kwargs):
        labels[path.name] = fig.axes[0].get_legend_handles_labels()[1]
        save(fig, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    assert table_main([str(sweep)]) == 0
    assert labels["curves.png"] == ["frozen · optim.lr=0.001"]


def test_a_speed_plot_without_timed_runs_says_why(tmp_path, monkeypatch):
    """Was: an empty accuracy_vs_speed.png for a sweep over models run with profile.enabled=false."""
    from matplotlib.figure import Figure

    sweep = _hand_made_sweep(tmp_path / "sweep", LR_X_STRATEGY[:2])
    for i, job in enumerate(sorted(sweep.iterdir())):
        record = json.loads((job / "metrics.json").read_text())
        record |= {"model": ["resnet18", "mobilenet_v2"][i], "ms_per_image": None}
        (job / "metrics.json").write_text(json.dumps(record))
    texts, save = {}, Figure.savefig

    def spy(fig, path, **kwargs):
        texts[path.name] = [t.get_text() for t in fig.axes[0].texts]
        save(fig, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    assert table_main([str(sweep)]) == 0
    assert texts["accuracy_vs_speed.png"] == ["no completed run recorded ms_per_image (runs with profile.enabled=false are not timed)"]


def test_curves_join_the_validated_epochs(tmp_path, monkeypatch):
    """+trainer.check_val_every_n_epoch=2 leaves epoch 1 without val_acc: the validation line joins epochs 0 and 2
    (was: a None in the line, which matplotlib draws as two loose markers)."""
    from matplotlib.figure import Figure

    sweep = _hand_made_sweep(tmp_path / "sweep", LR_X_STRATEGY[:1])
    job = next(sweep.iterdir())
    record = json.loads((job / "metrics.json").read_text())
    record["history"] = [{"epoch": e, "train_acc": 0.5, "train_loss": 0.7, "phase_b": False} | ({} if e == 1 else {"val_acc": 0.6, "val_loss": 0.6})
                         for e in range(3)]
    (job / "metrics.json").write_text(json.dumps(record))
    lines, save = {}, Figure.savefig

    def spy(fig, path, **kwargs):
        lines[path.name] = [list(line.get_xdata()) for line in fig.axes[0].lines]
        save(fig, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    assert table_main([str(sweep)]) == 0
    assert lines["curves.png"] == [[0, 1, 2], [0, 2]]  # training (dashed), validation (solid)


def test_sort_by_the_best_epoch_orders_epochs_as_numbers(tmp_path):
    """--sort best_at: epochs 2, 3, 10 (was: '10 (B)' first, its text sorted before '2 (B)')."""
    sweep = _hand_made_sweep(tmp_path / "sweep", LR_X_STRATEGY[:3])
    for job, best in zip(sorted(sweep.iterdir()), (10, 2, 3)):
        record = json.loads((job / "metrics.json").read_text())
        record |= {"best_epoch": best, "history": [{"epoch": e, "val_acc": 0.5, "phase_b": e > 1} for e in range(12)]}
        (job / "metrics.json").write_text(json.dumps(record))
    assert table_main([str(sweep), "--sort", "best_at"]) == 0
    assert [r["Best epoch (phase)"] for r in _table_rows(sweep)] == ["2 (B)", "3 (B)", "10 (B)"]


def test_sort_puts_a_row_without_results_last(tmp_path):
    """A mismatch row's cells are blank (its numbers are another config's): --sort places it after the rows with
    results (was: by its hidden numbers, a blank row amid the order)."""
    sweep = _hand_made_sweep(tmp_path / "sweep", LR_X_STRATEGY)
    for job in sweep.iterdir():
        (job / ".hydra" / "config.yaml").write_text(json.loads((job / "metrics.json").read_text())["run"]["hydra_files"]["config.yaml"])
    (sorted(sweep.iterdir())[2] / ".hydra" / "config.yaml").write_text("optim:\n  lr: 0.5\nseed: 42\n")  # blocks_1's best: edited after
    assert table_main([str(sweep), "--sort", "test_acc", "--descending"]) == 0
    assert [(r["Strategy"], r["Status"]) for r in _table_rows(sweep)] == [
        ("blocks_1", "completed"), ("frozen", "completed"), ("frozen", "completed"), ("blocks_1", "mismatch")]


def test_compare_leaves_out_a_reference_row_that_did_not_complete(tmp_path, capsys):
    """A reference table.csv's mismatch row (numbers of another config) and failed row (no numbers) are not compared
    against (was: +31.23 pt against the mismatch's numbers; a failed job run again: '2 reference rows ...: not compared')."""
    sweep = _hand_made_sweep(tmp_path / "sweep", LR_X_STRATEGY[:2])
    assert table_main([str(sweep)]) == 0
    rows = _table_rows(sweep)
    rows[0] |= {"Status": "mismatch", "Test Accuracy": "0.5"}
    rows[1] = {k: v if k in ("Model", "Strategy", "optim.lr", "Seed", "Job") else "" for k, v in rows[1].items()} | {"Status": "failed"}
    reference = tmp_path / "ref.csv"
    with open(reference, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([*rows, _table_rows(sweep)[1]])  # the failed job of lr 0.01 ran again, and completed
    capsys.readouterr()
    assert table_main([str(sweep), "--compare", str(reference)]) == 0
    out = capsys.readouterr().out
    assert "| resnet18 | frozen | 0.001 | the reference row with Model=resnet18, Strategy=frozen, optim.lr=0.001 is mismatch: not compared |" in out
    assert "| resnet18 | frozen | 0.01 | +0.00 pt |" in out


def test_a_job_still_running_is_not_called_killed(tmp_path, capsys):
    """tlexp-table during a sweep: the job that holds its RUNNING lock is RUNNING (was: 'MISSING: ... killed'); one whose
    lock nobody holds any more is still MISSING."""
    import fcntl

    from tlexp import runs
    from tlexp.report import table

    assert table.RUNNING == runs.RUNNING
    sweep = _hand_made_sweep(tmp_path / "sweep", LR_X_STRATEGY[:1])
    for name in ("1_resnet18_blocks_1", "2_resnet18_blocks_2"):
        (sweep / name / ".hydra").mkdir(parents=True)
        (sweep / name / ".hydra" / "config.yaml").write_text(f"model:\n  name: resnet18\nstrategy: {name[-8:]}\nseed: 42\n")
        (sweep / name / runs.RUNNING).write_text("host")
    with open(sweep / "1_resnet18_blocks_1" / runs.RUNNING) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert table_main([str(sweep)]) == 0
    assert [r["Status"] for r in _table_rows(sweep)] == ["completed", "running", "missing"]
    assert "| RUNNING: no metrics.json yet: the job is running" in (sweep / "table.md").read_text()
    assert capsys.readouterr().out.startswith("3 rows (1 running, 1 missing) → ")
    (sweep / "0_resnet18_frozen" / "metrics.json").unlink()  # no job has recorded yet (was: "is it a sweep directory?")
    with open(sweep / "1_resnet18_blocks_1" / runs.RUNNING) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert table_main([str(sweep)]) == 2
    assert capsys.readouterr().err == f"tlexp-table: error: no job under {sweep} has recorded yet (1 running): run tlexp-table again when they have\n"


def test_the_csv_gives_a_mismatch_row_no_numbers_as_the_markdown(tmp_path):
    """A job whose .hydra/config.yaml changed after it recorded: table.csv, as table.md, shows none of its numbers
    (was: the other config's accuracies in table.csv, blank cells in table.md)."""
    sweep = _hand_made_sweep(tmp_path / "sweep", LR_X_STRATEGY[:2])
    for job in sweep.iterdir():
        (job / ".hydra" / "config.yaml").write_text(json.loads((job / "metrics.json").read_text())["run"]["hydra_files"]["config.yaml"])
    (sweep / "1_resnet18_frozen" / ".hydra" / "config.yaml").write_text("optim:\n  lr: 0.5\nseed: 42\n")
    assert table_main([str(sweep)]) == 0
    rows = _table_rows(sweep)
    assert [r["Status"] for r in rows] == ["completed", "mismatch"]
    assert rows[0]["Test Accuracy"] == "0.8123" and rows[1]["Test Accuracy"] == "" and rows[1]["Trainable Parameters"] == ""
    assert (rows[1]["Model"], rows[1]["Strategy"], rows[1]["optim.lr"], rows[1]["Seed"]) == ("resnet18", "frozen", "0.01", "42")
