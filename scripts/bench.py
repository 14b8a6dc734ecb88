"""``make bench``: perf=naive and perf=fast side by side on real images, written to docs/bench.md + JSON.

Each case trains twice, naive then fast, in its own process (peak memory is that process's) with its
own empty feature cache, so the fast figure includes building the cache. Only ratios taken in one
run mean anything on a shared machine; the file records the machine and library versions beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning
import torch
import torchvision

from tlexp.record import read_record
from tlexp.speed.defaults import cpu_has_native_bf16


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    overrides: tuple[str, ...]


CASES = {
    c.name: c
    for c in (
        Case("resnet50_frozen", "ResNet-50 (random init: no offline weights), strategy=frozen, 5 epochs",
             ("model=resnet50", "model.weights=null", "strategy=frozen", "finetune.phase_a_epochs=5")),
        Case("resnet50_blocks_2",
             "ResNet-50 (random init), strategy=blocks_2, 1 + 4 epochs, 2 cached views: phase-B epochs 1-2 build a view, 3-4 reuse them",
             ("model=resnet50", "model.weights=null", "strategy=blocks_2", "finetune.phase_a_epochs=1", "finetune.phase_b_epochs=4",
              "data.augment.cached_views.phase_b=2")),
        Case("lite0_frozen", "EfficientNet-Lite0 (ImageNet weights), strategy=frozen, 5 epochs",
             ("model=efficientnet_lite0", "strategy=frozen", "finetune.phase_a_epochs=5")),
    )
}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), None)
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_mib": mem, "native_bf16": cpu_has_native_bf16(),
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "pytorch_lightning": pytorch_lightning.__version__, "platform": platform.platform(),
    }


def run_case(case: Case, perf: str, out: Path, root: str, extra: list[str]) -> dict:
    run_dir, cache = out / "runs" / f"{case.name}_{perf}", out / "cache" / f"{case.name}_{perf}"
    for folder in (run_dir, cache):  # a fresh run with an empty cache, every time
        shutil.rmtree(folder, ignore_errors=True)
    env = {**os.environ, "TLEXP_DATA_DIR": str(cache)}
    args = [sys.executable, "-m", "tlexp.train", *case.overrides, f"perf={perf}", f"data.root={root}",
            f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false", *extra]
    start = time.perf_counter()
    with open(out / f"{case.name}_{perf}.log", "w") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench: {case.name} perf={perf} failed; see {out / f'{case.name}_{perf}.log'}")
    metrics = read_record(run_dir)
    history = metrics["history"]
    phase_b = [e["seconds"] for e in history if e["phase_b"]]
    # epochs after every cached view exists: what the rest of a long phase B costs (naive: all of them)
    views = metrics["feature_cache"]["phase_b"] if metrics["feature_cache"]["enabled"] else 0
    return {
        "wall_s": wall,
        "fit_and_test_s": metrics["wall_time_s"],
        "phase_a_s": sum(e["seconds"] for e in history if not e["phase_b"]),
        "phase_b_s": sum(phase_b),
        "phase_b_epoch_s": statistics.mean(phase_b) if phase_b else None,
        "phase_b_steady_epoch_s": statistics.mean(phase_b[views:]) if phase_b[views:] else None,
        "train_images_per_s": metrics["images"]["train"] * len(history) / sum(e["seconds"] for e in history),
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "test_acc": metrics["test_acc"],
        "ms_per_image": metrics.get("ms_per_image"),
        "precision": metrics["precision"],
    }


def onnx_speed(case: Case, out: Path) -> dict:
    """Batch-1 latency of the fast run's best checkpoint: PyTorch and ONNX Runtime, side by side."""
    ckpt = out / "runs" / f"{case.name}_fast" / "checkpoints" / "best.ckpt"
    export_dir = out / f"export_{case.name}"
    args = [sys.executable, "-m", "tlexp.export", f"ckpt={ckpt}", f"out={export_dir}"]
    with open(out / f"{case.name}_export.log", "w") as log:
        if subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, check=False).returncode != 0:
            raise SystemExit(f"bench: export of {case.name} failed; see {out / f'{case.name}_export.log'}")
    return json.loads((export_dir / "model.json").read_text())["speed_batch1_ms"]


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def write_report(report: Path, results: dict, info: dict, command: str) -> None:
    (report / "bench.json").write_text(json.dumps({"machine": info, "command": command, "cases": results}, indent=2))
    lines = [
        "# perf=naive vs perf=fast",
        "",
        f"Latest run {time.strftime('%Y-%m-%d')}: `{command}` (each case below names the run that measured it).",
        "",
        (
            f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_mib']:,} MiB; native bf16: {info['native_bf16']}; "
            f"Python {info['python']}, torch {info['torch']}, torchvision {info['torchvision']}, Lightning {info['pytorch_lightning']}."
        ),
        "",
        "Phase B epoch: the mean over all phase-B epochs; steady: over those after every cached view exists.",
        "",
        "| case | perf | wall (s) | phase A (s) | phase B epoch (s) | steady phase B epoch (s) | train images/s | peak RSS (MiB) | test acc | ms/image (batch 1) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, by_perf in results.items():
        for perf, r in by_perf.items():
            if perf not in ("naive", "fast"):
                continue
            lines.append(
                f"| {name} | {perf} | {r['wall_s']:.0f} | {r['phase_a_s']:.0f} | {_fmt(r['phase_b_epoch_s'], '.1f')} | "
                f"{_fmt(r.get('phase_b_steady_epoch_s'), '.1f')} | "
                f"{r['train_images_per_s']:.1f} | {r['peak_rss_mib']:,.0f} | {r['test_acc']:.4f} | {_fmt(r['ms_per_image'], '.1f')} |"
            )
    lines += ["", "| case | measured | naive / fast, wall | naive / fast, phase B epoch | naive / fast, steady phase B epoch | test acc, fast − naive (points) |",
              "|---|---|---:|---:|---:|---:|"]
    for name, by_perf in results.items():
        ratio = by_perf["ratio"]
        times = [_fmt(ratio.get(k), ".2f") + ("×" if ratio.get(k) else "") for k in ("phase_b_epoch", "phase_b_steady_epoch")]
        lines.append(f"| {name} | {by_perf.get('measured', '–')} | {ratio['wall']:.2f}× | {times[0]} | {times[1]} | {ratio['test_acc_points']:+.2f} |")
    speeds = {n: r["onnx"] for n, r in results.items() if "onnx" in r}
    if speeds:
        lines += ["", "Inference at batch 1 (fast run's best checkpoint, `tlexp-export`'s side-by-side timing):", "",
                  "| case | PyTorch (ms) | ONNX Runtime (ms) | PyTorch / ONNX Runtime |", "|---|---:|---:|---:|"]
        lines += [f"| {n} | {s['torch']:.2f} | {s['onnxruntime']:.2f} | {s['torch_over_onnxruntime']:.2f}× |" for n, s in speeds.items()]
    lines += ["", "Cases (each with the command that measured it):", ""]
    lines += [f"- `{n}`: {CASES[n].title if n in CASES else n} — `{r.get('command', command)}`" for n, r in results.items()]
    (report / "bench.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data/flower_photos", help="folder of class sub-folders (TF Flowers)")
    parser.add_argument("--out", default="outputs/bench", help="run dirs, logs and feature caches go here")
    parser.add_argument("--report", default="docs", help="bench.md and bench.json go here")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the PyTorch vs ONNX Runtime latency")
    parser.add_argument("overrides", nargs="*", help="extra tlexp-train overrides for every run, e.g. data.limit_per_class=100")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}: choose from {', '.join(CASES)}")
    command = "python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    previous = Path(args.report) / "bench.json"
    # cases not re-run keep their figures (and the date and command that measured them)
    kept = json.loads(previous.read_text()) if previous.exists() else {"cases": {}}
    results: dict = {n: {"command": kept.get("command"), **r} for n, r in kept["cases"].items()}
    for name in names:
        by_perf = {}
        for perf in ("naive", "fast"):
            print(f"bench: {name} perf={perf} ...", flush=True)
            by_perf[perf] = run_case(CASES[name], perf, out, args.root, args.overrides)
            print(f"bench: {name} perf={perf}: {by_perf[perf]['wall_s']:.0f} s, test acc {by_perf[perf]['test_acc']:.4f}", flush=True)
        naive, fast = by_perf["naive"], by_perf["fast"]
        by_perf["ratio"] = {
            "wall": naive["wall_s"] / fast["wall_s"],
            "phase_b_epoch": naive["phase_b_epoch_s"] / fast["phase_b_epoch_s"] if fast["phase_b_epoch_s"] else None,
            "test_acc_points": 100 * (fast["test_acc"] - naive["test_acc"]),
            "phase_b_steady_epoch": (
                naive["phase_b_epoch_s"] / fast["phase_b_steady_epoch_s"] if fast["phase_b_steady_epoch_s"] else None
            ),
        }
        by_perf["measured"], by_perf["command"] = time.strftime("%Y-%m-%d %H:%M"), command
        if args.onnx:
            by_perf["onnx"] = onnx_speed(CASES[name], out)
        results[name] = by_perf
        write_report(Path(args.report), results, machine(), command)
    print(f"bench: wrote {Path(args.report) / 'bench.md'}")


if __name__ == "__main__":
    main()
