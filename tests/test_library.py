"""Issue 16: tlexp as a library, in one's own pl.Trainer, with the CLI's defaults."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO, _pythonpath


def test_the_example_trains_and_tests_in_its_own_trainer(tiny_tree, tmp_path):
    example, cwd = REPO / "examples" / "own_trainer.py", tmp_path / "cwd"
    cwd.mkdir()
    assert len(example.read_text().splitlines()) <= 15
    quick = ["model.weights=null", "data.image_size=32", "data.num_workers=0", "finetune.phase_a_epochs=1", "finetune.phase_b_epochs=1"]
    result = subprocess.run(
        [sys.executable, example, str(tiny_tree), *quick], capture_output=True, text=True, cwd=cwd, timeout=600, check=False,
        env={**os.environ, "PYTHONPATH": _pythonpath(), "TLEXP_DATA_DIR": str(tmp_path / "data")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'test/acc'" in result.stdout
    assert not list(cwd.iterdir())  # nothing written where it ran (logger and checkpoints are off in the example)


def test_import_tlexp_is_light_and_names_the_public_api():
    # tlexp.cli too: the console scripts answer --help and tab completion without torch (0.8 s, was 5.7 s)
    probe = "import sys, tlexp, tlexp.cli; print('torch' in sys.modules, sorted(tlexp.__all__)); tlexp.TransferModule"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={"PYTHONPATH": _pythonpath()}, check=True)
    heavy, names = result.stdout.split(" ", 1)
    assert heavy == "False" and "TransferModule" in names and "compose" in names
