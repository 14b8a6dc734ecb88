"""Screenshot a run's TensorBoard in headless Chromium (Debian's ``chromium`` package).

    python scripts/tensorboard_screenshot.py <run dir>/tensorboard docs/tensorboard

writes ``<out>_scalars.png`` (train/val curves and the learning rate of each optimizer group) and
``<out>_images.png`` (test confusion matrix and misclassified images). It starts TensorBoard on a
free loopback port, checks through TensorBoard's own HTTP API that the run's scalars and images are
served (a screenshot of an empty dashboard fails instead of being kept), and stops it again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

SCALARS = ("train/acc", "train/loss", "val/acc", "val/loss")
IMAGES = ("test/confusion_matrix", "test/misclassified")
PAGES = {
    "scalars": "#scalars&tagFilter=" + quote(r"^(train|val)/|^lr-") + "&_smoothingWeight=0",
    "images": "#images&tagFilter=" + quote("^test/"),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def _wait_for_run(base: str, timeout: float) -> dict:
    """TensorBoard's tag lists once it has loaded the event files."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            scalars = _get(f"{base}/data/plugin/scalars/tags")
            images = _get(f"{base}/data/plugin/images/tags")
            if any(set(SCALARS) <= set(tags) for tags in scalars.values()):
                return {"scalars": scalars, "images": images}
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"TensorBoard at {base} did not serve the scalars {', '.join(SCALARS)} within {timeout:.0f} s")


def screenshot(chromium: str, url: str, out: Path, width: int, height: int) -> None:
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--window-size={width},{height}", "--virtual-time-budget=15000", f"--screenshot={out}", url],
        check=True, capture_output=True, timeout=120,
    )
    if not out.exists() or out.stat().st_size < 20_000:
        raise SystemExit(f"{out}: Chromium wrote no screenshot, or an empty page")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path, help="a run's tensorboard/ folder (or any log dir)")
    parser.add_argument("out", type=Path, help="output prefix: writes <out>_scalars.png and <out>_images.png")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1100)
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for TensorBoard")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH: apt-get install chromium")
    if not args.logdir.is_dir():
        raise SystemExit(f"{args.logdir}: no such folder (pass <run dir>/tensorboard)")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(args.logdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        tags = _wait_for_run(base, args.timeout)
        missing = [t for t in IMAGES if not any(t in run_tags for run_tags in tags["images"].values())]
        if missing:
            raise SystemExit(f"{args.logdir}: no {', '.join(missing)} images (a run that reached its test)")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for page, fragment in PAGES.items():
            target = args.out.with_name(f"{args.out.name}_{page}.png")
            screenshot(chromium, f"{base}/{fragment}", target, args.width, args.height)
            print(target)
    finally:
        server.terminate()
        server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
