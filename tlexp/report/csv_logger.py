"""Lightning's CSVLogger, keeping the rows before a resume point in ``csv/metrics.csv``.

Lightning's writer deletes an existing ``metrics.csv`` when it starts, so a resumed run's file
began at the resume point. This one reads the old rows first and, at its first save with an epoch's
rows, replaces the file with the old rows from before the first epoch it logs (the LR monitor's
rows, which carry no epoch, by their step; a killed epoch's rows are logged again) and its own;
until then the old file stays as it was, for a run killed again before that.
"""

from __future__ import annotations

import csv
import math
import os

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only


class _KeepingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # instead of Lightning's "will be deleted" warning and deletion
        self._earlier: list[dict] | None = None
        self.ending = False
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self._earlier = [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]

    def save(self) -> None:
        if self._earlier is not None and self.metrics:
            epochs = [float(m["epoch"]) for m in self.metrics if "epoch" in m]
            if not epochs and not self.ending:
                return  # rows without an epoch (the LR monitor's) wait for one that says where the old rows end
            first_epoch = min(epochs, default=math.inf)
            first_step = min(float(m["step"]) for m in self.metrics)
            before = lambda r: float(r["epoch"]) < first_epoch if "epoch" in r else float(r["step"]) < first_step
            self.metrics = [r for r in self._earlier if before(r)] + self.metrics
            self._earlier = None
            os.remove(self.metrics_file_path)  # written whole again just below
        super().save()


class RunCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is not None:  # a run ending before an epoch's rows: what waited is written now
            self._experiment.ending = True
        super().finalize(status)
