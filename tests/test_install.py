"""Issue 16: the package as pip installs it (a wheel, not the source tree) runs its CLIs from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import FAST, REPO, make_image_tree


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """(folder the wheel is installed into, environment that imports tlexp from there and nowhere else)."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "source"  # setuptools builds in the source tree: a copy keeps the checkout clean
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    for name in ("tlexp", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", root / "dist", source],
        check=True, capture_output=True,
    )
    (wheel,) = (root / "dist").glob("tlexp-*.whl")
    assert "tlexp/conf/train.yaml" in zipfile.ZipFile(wheel).namelist()
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return site, {**env, "PYTHONPATH": str(site), "PATH": f"{site / 'bin'}{os.pathsep}{env['PATH']}"}


def cli(installed, name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    site, env = installed
    result = subprocess.run(
        [sys.executable, site / "bin" / name, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_the_installed_clis_run_from_another_folder(installed, tmp_path):
    site, env = installed
    where = subprocess.run(
        [sys.executable, "-c", "import tlexp, tlexp.hydra_config as h; print(tlexp.__file__, h.CONFIG_PATH)"],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=True,
    ).stdout.split()
    assert where == [str(site / "tlexp" / "__init__.py"), "pkg://tlexp.conf"]  # not the checkout's files
    composed = subprocess.run(
        [sys.executable, "-c", "import tlexp; print(tlexp.compose('model=mobilenet_v2').model.name)"],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=True,
    )
    assert composed.stdout.strip() == "mobilenet_v2"  # library use composes the installed configs too

    tree = make_image_tree(tmp_path / "images", {"red": 10, "green": 10, "blue": 10})
    job = cli(installed, "tlexp-train", "--cfg", "job", "model=resnet18", cwd=tmp_path)
    assert "name: resnet18" in job.stdout
    run = tmp_path / "run"
    cli(installed, "tlexp-train", *FAST, "model=resnet18", f"data.root={tree}", f"hydra.run.dir={run}", cwd=tmp_path)
    assert (run / "metrics.json").is_file() and not (REPO / "outputs" / "runs" / "run").exists()
    ckpt = run / "checkpoints" / "best.ckpt"
    predicted = cli(installed, "tlexp-predict", f"ckpt={ckpt}", f"images={tree / 'red'}", cwd=tmp_path)
    assert "top-3 predictions" in predicted.stdout
    cli(installed, "tlexp-export", f"ckpt={ckpt}", "formats=[torchscript]", cwd=tmp_path)
    assert (run / "export" / "model.torchscript.pt").is_file()
