"""logger=mlflow | wandb: the run's settings and final metrics reach the tracker, beside TensorBoard and CSV."""

from __future__ import annotations

import csv
import sqlite3
from pathlib import Path

from tests.conftest import read_metrics, train
from tlexp.report.csv_logger import RunCSVLogger


def test_mlflow_store_beside_the_run_holds_its_settings_and_test_accuracy(tiny_tree, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "runs" / "one"
    train(run, tiny_tree, "model=resnet18", "strategy=blocks_2", "logger=mlflow")
    db = sqlite3.connect(tmp_path / "runs" / "mlflow.db")
    (run_id, name, status), = db.execute("SELECT run_uuid, name, status FROM runs").fetchall()
    assert name == "resnet18_blocks_2_seed42" and status == "FINISHED"
    params = dict(db.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,)).fetchall())
    assert params["run/strategy"] == "blocks_2" and params["run/perf"] == "fast"
    metrics = dict(db.execute("SELECT key, value FROM latest_metrics WHERE run_uuid = ?", (run_id,)).fetchall())
    assert abs(metrics["final/test_acc"] - read_metrics(run)["test_acc"]) < 1e-6
    assert {"train/loss", "val/acc", "test/f1_macro"} <= metrics.keys()
    assert (run / "tensorboard").is_dir() and (run / "csv" / "metrics.csv").is_file()


def test_wandb_offline_run_lands_in_the_run_dir(tiny_tree, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # W&B's own logs go under ~/.cache/wandb
    run = tmp_path / "run"
    train(run, tiny_tree, "model=resnet18", "strategy=blocks_2", "logger=wandb", "logger.wandb.offline=true")
    (stream,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    content = stream.read_bytes()
    assert b"final/test_acc" in content and b"run/strategy" in content and b"resnet18_blocks_2_seed42" in content


def _csv_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def test_the_csv_of_a_resumed_run_keeps_the_learning_rates_before_it_and_survives_an_early_end(tmp_path):
    """The LR monitor's rows carry a step but no epoch. Was: dropped from csv/metrics.csv at every resume, and a
    resumed run saving (or ending) before its first epoch's rows died in Lightning's writer with
    "ValueError: dict contains fields not in fieldnames: 'epoch', ...", in place of the run's own error."""
    def first_run():
        logger = RunCSVLogger(tmp_path, name="csv", version="")
        for epoch in range(3):  # 10 steps an epoch; the run is killed during epoch 2, after its LR row
            logger.log_metrics({"lr-Adam/head": 1e-3 / (epoch + 1)}, step=10 * epoch)
            if epoch < 2:
                logger.log_metrics({"val/acc": 0.5 + epoch / 10, "epoch": epoch}, step=10 * epoch + 9)
        logger.save()
        return Path(logger.experiment.metrics_file_path)

    path = first_run()
    before = _csv_rows(path)
    ended_early = RunCSVLogger(tmp_path, name="csv", version="")  # resumed at epoch 2, fails at once
    ended_early.log_metrics({"lr-Adam/head": 1e-3 / 3}, step=20)
    ended_early.save()  # a flush between steps: its row waits for an epoch's
    assert _csv_rows(path) == before  # the file as it was
    ended_early.finalize("failed")
    rows = _csv_rows(path)
    assert [r.get("epoch") for r in rows if "val/acc" in r] == ["0", "1"] and len([r for r in rows if "lr-Adam/head" in r]) == 3

    path.unlink()
    first_run()
    resumed = RunCSVLogger(tmp_path, name="csv", version="")  # resumed at epoch 2, runs to the end
    resumed.log_metrics({"lr-Adam/head": 1e-3 / 3}, step=20)
    resumed.log_metrics({"val/acc": 0.7, "epoch": 2}, step=29)
    resumed.finalize("success")
    rows = _csv_rows(path)
    assert [(r["step"], r["lr-Adam/head"]) for r in rows if "lr-Adam/head" in r] == [("0", "0.001"), ("10", "0.0005"), ("20", "0.0003333333333333333")]
    assert [r["epoch"] for r in rows if "val/acc" in r] == ["0", "1", "2"]
