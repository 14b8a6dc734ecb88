"""``make bench-gpu``: the seed_table_offline sweep with perf=naive and perf=fast on one CUDA GPU.

The sweeps run one after the other in this call (a ratio means something only side by side), each
in its own process with its own empty feature cache, so the fast figure includes building it. A third
sweep, fast_bf16, is perf=fast with the CPU's choices (bf16-mixed, channels_last): the measurement
behind perf=fast's fp32/NCHW on a GPU (tlexp/speed/defaults.py). Two more, run only when named in
--variants, try what might speed up phase B with jobs side by side: fast_mps (perf.mps=true: the jobs as
clients of one CUDA MPS daemon) and fast_cudnn_benchmark (cuDNN times its convolution kernels).
Writes docs/bench_gpu.md and docs/bench_gpu.json: the whole sweep's wall time, per row the phase
times, training images/s, peak GPU memory and test accuracy, the ratios, and where each row's time
went (metrics.json's time_split: when its job started, data and model setup, fit with the feature
cache's decoded views, prefix outputs and waiting for another job's entry, test, speed timing).

    python scripts/bench_gpu.py --root /root/data [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from tlexp.record import RECORD, read_record

VARIANTS = {
    "naive": ["perf=naive"],
    "fast": ["perf=fast"],
    "fast_bf16": ["perf=fast", "trainer.precision=bf16-mixed", "perf.channels_last=true"],
    # perf=fast with CUDA's Multi-Process Service: whether the side-by-side jobs' phase B is slowed by the GPU
    # taking their CUDA contexts in turn (time-slicing), which MPS lets run kernels at once (tlexp/speed/mps.py).
    "fast_mps": ["perf=fast", "perf.mps=true"],
    # perf=fast with cuDNN choosing its convolution kernels by timing them (Lightning's Trainer(benchmark=True)).
    "fast_cudnn_benchmark": ["perf=fast", "+trainer.benchmark=true"],
}
REPORT = Path(__file__).resolve().parent.parent / "docs"


def sweep(variant: str, out: Path, root: str, extra: list[str]) -> dict:
    sweep_dir, cache = out / variant, out / f"cache_{variant}"
    for folder in (sweep_dir, cache):  # fresh runs with an empty cache, every time
        shutil.rmtree(folder, ignore_errors=True)
    env = {**os.environ, "TLEXP_DATA_DIR": str(cache)}
    args = [sys.executable, "-m", "tlexp.train", "experiment=seed_table_offline", *VARIANTS[variant], f"data.root={root}",
            f"hydra.sweep.dir={sweep_dir}", "trainer.enable_progress_bar=false", *extra]
    start, started_at = time.perf_counter(), time.time()
    with open(out / f"{variant}.log", "w") as log:
        code = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"bench-gpu: {variant} failed; see {out / f'{variant}.log'}")
    if "perf.mps=true" in VARIANTS[variant] and "jobs run as clients of an MPS daemon" not in (out / f"{variant}.log").read_text():
        raise SystemExit(f"bench-gpu: {variant} ran without an MPS daemon of its own; see {out / f'{variant}.log'}")
    rows = {}
    for file in sorted(sweep_dir.glob(f"*/{RECORD}")):
        m = read_record(file)
        if m["status"] != "completed":
            raise SystemExit(f"bench-gpu: {file} did not complete: {m.get('error')}")
        history = m["history"]
        seconds = sum(e["seconds"] for e in history)
        split = m.get("time_split", {})
        rows[m["strategy"]] = {
            "fit_and_test_s": m["wall_time_s"],
            "phase_a_s": sum(e["seconds"] for e in history if not e["phase_b"]),
            "phase_b_s": sum(e["seconds"] for e in history if e["phase_b"]),
            "train_images_per_s": m["images"]["train"] * len(history) / seconds,
            "peak_gpu_memory_mib": m.get("peak_gpu_memory_mib"),
            "test_acc": m["test_acc"],
            "ms_per_image": m.get("ms_per_image"),
            "runtime": m.get("speed_setup", {}).get("runtime"),
            "precision": m["precision"],
            "jobs_at_once": m.get("speed_setup", {}).get("sweep_jobs", 1),
            # where the row's time went: its job's start after the sweep's, then the parts of the run
            "time_split": {"job_start_s": split["started_at"] - started_at, **{k: v for k, v in split.items() if k != "started_at"}}
            if split else None,
        }
    return {"wall_s": wall, "mean_test_acc": statistics.mean(r["test_acc"] for r in rows.values()), "rows": rows}


def machine() -> dict:
    return {
        "gpu": torch.cuda.get_device_name(0), "cpu_cores": os.cpu_count(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": sys.version.split()[0],
    }


def write_report(report: Path, results: dict, info: dict, command: str) -> None:
    naive = results.get("naive")
    (report / "bench_gpu.json").write_text(json.dumps({"machine": info, "command": command, "results": results}, indent=2))
    lines = [
        "# perf=naive vs perf=fast on one GPU: experiment=seed_table_offline",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} with `{command}`.",
        f"Machine: {info['gpu']}, {info['cpu_cores']} CPU cores; torch {info['torch']} (CUDA {info['cuda']}), Python {info['python']}.",
        "",
        f"Whole sweep ({len(next(iter(results.values()))['rows'])} rows, process start to end)"
        + (", against perf=naive:" if naive else " (perf=naive not run: no ratio):"),
        "",
    ]
    for variant, result in results.items():
        against = ""
        if naive:
            points = 100 * (result["mean_test_acc"] - naive["mean_test_acc"])
            against = f", **{naive['wall_s'] / result['wall_s']:.2f}x**"
        lines.append(
            f"- {variant} ({' '.join(VARIANTS[variant])}): {result['wall_s']:.0f} s{against}; "
            f"mean test accuracy {100 * result['mean_test_acc']:.2f} %" + (f" ({points:+.2f} points)" if naive else "")
        )
    lines += [
        "",
        "Jobs at once: the most of the sweep's jobs running when a row's speed timing began or when it ended, the",
        "row's own included (speed_setup.sweep_jobs): its ms/image was timed beside up to that many jobs.",
        "",
        "| strategy | variant | jobs at once | fit, test, speed timing (s) | phase A (s) | phase B (s) | train images/s | peak GPU memory (MiB) | test acc | ms/image (batch 1) | runtime | precision |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for strategy in next(iter(results.values()))["rows"]:
        for variant, result in results.items():
            r = result["rows"].get(strategy)
            if r is None:
                continue
            memory = "–" if r["peak_gpu_memory_mib"] is None else f"{r['peak_gpu_memory_mib']:,.0f}"
            speed = "–" if r["ms_per_image"] is None else f"{r['ms_per_image']:.2f}"
            lines.append(
                f"| {strategy} | {variant} | {r.get('jobs_at_once', 1)} | {r['fit_and_test_s']:.1f} | {r['phase_a_s']:.1f} | {r['phase_b_s']:.1f} | "
                f"{r['train_images_per_s']:,.0f} | {memory} | {100 * r['test_acc']:.2f} % | {speed} | {r['runtime']} | {r['precision']} |"
            )
    lines += time_split_table(results)
    (report / "bench_gpu.md").write_text("\n".join(lines) + "\n")


SPLIT = (("job_start_s", "job started (s after the sweep)"), ("before_fit_s", "before fit: data, model (s)"),
         ("fit_s", "fit (s)"), ("decoded_views_s", "of which decoded views (s)"), ("prefix_outputs_s", "prefix outputs (s)"),
         ("waiting_for_other_jobs_s", "waiting for other jobs (s)"), ("test_s", "test (s)"), ("speed_s", "speed timing (s)"),
         ("speed_cpu_s", "of which CPU figures (s)"))


def time_split_table(results: dict) -> list[str]:
    """Per row, where its time went (metrics.json's time_split)."""
    rows = [(strategy, variant, r["time_split"]) for variant, result in results.items()
            for strategy, r in result["rows"].items() if r.get("time_split")]
    if not rows:
        return []
    lines = [
        "", "Where each row's time went (metrics.json's time_split). The feature cache's columns are part of fit: the",
        "time to get its entries (loaded, built, or waited for while another job built them), and of that, waiting:", "",
        "| strategy | variant | " + " | ".join(title for _, title in SPLIT) + " |", "|---|---|" + "---:|" * len(SPLIT),
    ]
    for strategy, variant, split in rows:
        lines.append(f"| {strategy} | {variant} | " + " | ".join("–" if key not in split else f"{split[key]:.1f}" for key, _ in SPLIT) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data/flower_photos", help="TF Flowers: a folder of class sub-folders")
    parser.add_argument("--variants", default="naive,fast,fast_bf16", help=f"which of {','.join(VARIANTS)} to run, in this order")
    parser.add_argument("overrides", nargs="*", help="extra tlexp-train overrides for every sweep, e.g. data.num_workers=12")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    if not set(variants) <= set(VARIANTS):
        raise SystemExit(f"bench-gpu: --variants may name only {', '.join(VARIANTS)}")
    if not torch.cuda.is_available():
        raise SystemExit("bench-gpu: no CUDA GPU here; `make bench` measures the CPU")
    out = Path("outputs/bench_gpu")  # sweep dirs, logs and feature caches
    out.mkdir(parents=True, exist_ok=True)
    command = "python scripts/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {}
    for variant in variants:
        print(f"bench-gpu: {variant} ...", flush=True)
        results[variant] = sweep(variant, out, args.root, args.overrides)
        print(f"bench-gpu: {variant}: {results[variant]['wall_s']:.0f} s", flush=True)
        write_report(REPORT, results, machine(), command)  # after each sweep: a cut-short call keeps what finished
    print(f"bench-gpu: wrote {REPORT / 'bench_gpu.md'}")


if __name__ == "__main__":
    main()
