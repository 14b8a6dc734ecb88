"""The suite's CLI runs fork from a preloaded process (tests/zygote.py): a run ends as in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from tests import conftest
from tests.conftest import REPO


@pytest.mark.parametrize("how", ["ok", "exit_3", "exit_text", "raise", "ctrl_c", "kill"])
def test_a_forked_run_ends_as_a_fresh_interpreter_does(how, monkeypatch):
    monkeypatch.setenv("PROBE", "seen")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    fresh = subprocess.run([sys.executable, "-m", "tests.zygote_probe", how], capture_output=True, text=True, env=env, cwd=REPO, check=False)
    assert conftest._zygote is not None or os.environ.get("TLEXP_TEST_FRESH_INTERPRETERS") or torch.cuda.is_available()
    forked = conftest.run_module("tests.zygote_probe", how)
    assert forked.returncode == fresh.returncode and forked.stdout == fresh.stdout
    assert forked.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1]
    assert fresh.stdout.startswith(f"out seen {REPO} ['{how}']\n")


def test_a_run_past_its_timeout_is_killed_and_the_next_run_gets_its_own_status():
    env = {**os.environ, "PYTHONPATH": conftest._pythonpath()}
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        conftest._run("tests.zygote_probe", ["sleep"], env, timeout=2)
    assert time.monotonic() - started < 30
    assert conftest.run_module("tests.zygote_probe", "exit_3").returncode == 3
