"""A Hydra callback: after a multirun, write the best job's whole config beside the sweep.

Optuna's ``optimization_results.yaml`` holds only the searched values; re-running the winner needs
everything else the job was composed with too. Works with any sweeper (basic, Optuna).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tlexp.record import RECORD, NotARecord, read_record

log = logging.getLogger(__name__)


def best_job(sweep_dir: Path) -> dict | None:
    """The completed job with the highest validation accuracy (the value a search maximises)."""
    best = None
    jobs = sorted(sweep_dir.glob(f"*/{RECORD}"), key=lambda f: (len(f.parent.name.split("_")[0]), f.parent.name))
    for metrics_file in jobs:  # in job order, so a tie goes to the earliest trial, as Optuna's best_trial does
        try:
            metrics = read_record(metrics_file)
        except NotARecord as exc:  # another tool's file: no trial of this search
            log.warning("%s: left out of the best trial", exc)
            continue
        except ValueError as exc:  # empty or half-written (tlexp-table names it): the best is among the others
            log.warning("%s is not valid JSON (%s): left out of the best trial", metrics_file, exc)
            continue
        scored = metrics.get("status") == "completed" and metrics.get("val_acc") is not None
        if scored and (best is None or metrics["val_acc"] > best["val_acc"]):
            best = {**metrics, "job_dir": str(metrics_file.parent)}
    return best


class WriteBestTrial(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        best = best_job(sweep_dir)
        if best is None:
            log.warning("no completed job in %s: no best trial to write", sweep_dir)
            return
        job_dir = Path(best["job_dir"])
        # the config the record was computed with, which the record holds: the job folder's may have changed since
        saved = best.get("run", {}).get("hydra_files", {}).get("config.yaml")
        if saved is None:
            shutil.copyfile(job_dir / ".hydra" / "config.yaml", sweep_dir / "best_config.yaml")
        else:
            (sweep_dir / "best_config.yaml").write_text(saved)
        overrides = OmegaConf.to_container(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml"))
        summary = {k: best[k] for k in ("job_dir", "val_acc", "test_acc", "strategy", "lr")}
        (sweep_dir / "best_trial.json").write_text(json.dumps({**summary, "overrides": overrides}, indent=2))
        log.info("best trial: %s (val acc %.4f); its config: %s", job_dir.name, best["val_acc"], sweep_dir / "best_config.yaml")
