"""logger=mlflow | wandb: the run's settings and final metrics reach the tracker, beside TensorBoard and CSV."""

from __future__ import annotations

import sqlite3

from tests.conftest import read_metrics, train


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
