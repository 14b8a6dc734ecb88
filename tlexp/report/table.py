"""``tlexp-table SWEEP_DIR``: every job's metrics.json → the comparison table (Markdown, CSV) and plots."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from omegaconf import OmegaConf

from tlexp.errors import TlexpError
from tlexp.record import RECORD, read_record
from tlexp.report.plotting import pyplot

# The reference study's columns in its order, then ours. (header, metrics.json key, format)
COLUMNS = [
    ("Model", "model", "text"),
    ("Strategy", "strategy", "text"),
    ("Training Accuracy", "train_acc", "pct"),
    ("Training Loss", "train_loss", "loss"),
    ("Validation Accuracy", "val_acc", "pct"),
    ("Validation Loss", "val_loss", "loss"),
    ("Test Accuracy", "test_acc", "pct"),
    ("Trainable Parameters", "trainable_params", "int"),
    ("Inference Speed (ms/image)", "ms_per_image", "ms"),
    ("Speed measured on", "speed_on", "text"),
    ("Test macro-F1", "test_f1_macro", "pct"),
    ("GFLOPs", "gflops", "gflops"),
    ("Total Parameters", "total_params", "int"),
    ("Wall time (s)", "wall_time_s", "secs"),
    ("Seed", "seed", "text"),
]
SORT_KEYS = {"none", *(key for _, key, _ in COLUMNS)}


def _fmt(value, kind: str) -> str:
    if value is None or value == "":
        return "—"
    return {
        "pct": lambda v: f"{100 * float(v):.2f}%",
        "loss": lambda v: f"{float(v):.4f}",
        "int": lambda v: f"{int(v):,}",
        "ms": lambda v: f"{float(v):.2f}",
        "gflops": lambda v: f"{float(v):.3f}",
        "secs": lambda v: f"{float(v):.0f}",
        "text": str,
    }[kind](value)


def load_rows(sweep_dir: Path) -> list[dict]:
    """One row per job directory (a metrics.json or a Hydra config), in job order; a job without a
    record, or whose record is not of its config, is a failed row that says so."""
    jobs = {f.parent for f in sweep_dir.rglob(RECORD)} | {c.parent.parent for c in sweep_dir.rglob(".hydra/config.yaml")}
    if not any((job / RECORD).exists() for job in jobs):
        raise TlexpError(f"no metrics.json under {sweep_dir}: is it a sweep directory (outputs/multirun/<stamp>)?")
    rows = [_row(job) | {"job_dir": str(job.relative_to(sweep_dir))} for job in sorted(jobs, key=lambda j: _job_order(j.name))]
    return [row | {"speed_on": _speed_on(row.get("speed_setup"))} for row in rows]


def _row(job: Path) -> dict:
    config = job / ".hydra" / "config.yaml"
    if not (job / RECORD).exists():
        settings = OmegaConf.load(config)
        return {"status": "missing", "model": OmegaConf.select(settings, "model.name"), "strategy": settings.get("strategy"),
                "seed": settings.get("seed"), "error": "no metrics.json: the job was killed before it could record (resume=true runs it again)"}
    try:
        row = read_record(job)
    except ValueError as exc:  # empty or half-written: a row that names the file, not a traceback
        return {"status": "unreadable", "error": f"{job / RECORD} is not valid JSON ({exc})"}
    saved = row.get("run", {}).get("hydra_files", {}).get("config.yaml")
    if row.get("status") == "completed" and saved is not None and config.exists() and config.read_text() != saved:
        return row | {"status": "mismatch", "error": "metrics.json was computed with another config than .hydra/config.yaml"}
    return row


def _speed_on(setup: dict | None) -> str | None:
    """Where (and how) ms/image was timed: a GPU's figure is no CPU's."""
    if not setup:
        return None
    name = setup.get("device_name") or setup.get("processor")
    return f"{setup.get('device', 'cpu')}: {name} ({setup['runtime']})"


def _job_order(name: str):
    head = name.split("_", 1)[0]
    return (0, int(head), name) if head.isdigit() else (1, 0, name)


def formatted(rows: list[dict]) -> list[list[str]]:
    out = []
    for row in rows:
        if row.get("status") != "completed":
            cells = [_fmt(row.get(key), kind) if key in ("model", "strategy", "seed") else "" for _, key, kind in COLUMNS]
            cells[2] = f"FAILED: {row.get('error', 'unknown error')}".replace("|", "/").splitlines()[0][:120]
            out.append(cells)
        else:
            out.append([_fmt(row.get(key), kind) for _, key, kind in COLUMNS])
    return out


def markdown(rows: list[dict]) -> str:
    header = [h for h, _, _ in COLUMNS]
    align = ["---" if kind == "text" else "---:" for _, _, kind in COLUMNS]
    lines = ["| " + " | ".join(r) + " |" for r in [header, align, *formatted(rows)]]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    """Raw numbers (fractions, not percentages) so the CSV feeds other tools without parsing."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([h for h, _, _ in COLUMNS] + ["Status", "Error", "Job"])
        for row in rows:
            writer.writerow([row.get(key, "") for _, key, _ in COLUMNS] + [row.get("status"), row.get("error", ""), row["job_dir"]])


def accuracy_vs_speed(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    done = [r for r in rows if r.get("status") == "completed" and r.get("ms_per_image") is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    span = max((r["ms_per_image"] for r in done), default=1) - min((r["ms_per_image"] for r in done), default=0) or 1
    groups: list[dict] = []  # rows on (nearly) the same spot share one label instead of overprinting
    for row in done:
        x, y = row["ms_per_image"], 100 * row["test_acc"]
        ax.scatter(x, y, s=36)
        near = next((g for g in groups if abs(x - g["x"]) < 0.03 * span and abs(y - g["y"]) < 0.15), None)
        if near is None:
            groups.append({"x": x, "y": y, "labels": [f"{row['model']} · {row['strategy']}"]})
        else:
            near["labels"].append(row["strategy"])
    for group in groups:
        ax.annotate(" / ".join(group["labels"]), (group["x"], group["y"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.margins(x=0.15, y=0.08)
    ax.set_xlabel("inference speed (ms/image, batch 1)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy against inference time, one point per run")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curves(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    switches = set()
    for row in (r for r in rows if r.get("history")):
        epochs = [e["epoch"] + 1 for e in row["history"] if "val_acc" in e]
        ax.plot(epochs, [100 * e["val_acc"] for e in row["history"] if "val_acc" in e], marker=".",
                label=f"{row['model']} · {row['strategy']}")
        if row.get("phase_b_epochs"):
            switches.add(row["phase_a_epochs"] + 0.5)
    for x in sorted(switches):
        ax.axvline(x, color="grey", linestyle="--", linewidth=1)
        ax.text(x, ax.get_ylim()[0], " phase B →", color="grey", fontsize=8, va="bottom")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Validation accuracy per epoch (dashed: backbone unfrozen)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(rows: list[dict], reference: Path) -> str:
    """Per-row differences (ours − reference) for rows whose Model and Strategy match the reference CSV."""
    with open(reference, newline="") as f:
        ref_rows = list(csv.DictReader(f))
    numeric = [(h, key, kind) for h, key, kind in COLUMNS if kind in ("pct", "int", "ms") and any(h in r for r in ref_rows)]
    lines = ["| Model | Strategy | " + " | ".join(f"Δ {h}" for h, _, _ in numeric) + " |",
             "|---|---|" + "---:|" * len(numeric)]
    by_key = {(r["Model"].lower(), r["Strategy"].lower()): r for r in ref_rows}
    for row in rows:
        ref = by_key.get((str(row.get("model")).lower(), str(row.get("strategy")).lower()))
        if ref is None or row.get("status") != "completed":
            continue
        cells = []
        for header, key, kind in numeric:
            theirs = _number(ref.get(header))
            if theirs is None or row.get(key) is None:
                cells.append("—")
            elif kind == "pct":
                cells.append(f"{100 * float(row[key]) - theirs:+.2f} pt")
            else:
                cells.append(f"{float(row[key]) - theirs:+,.2f}" if kind == "ms" else f"{int(row[key]) - int(theirs):+,}")
        lines.append(f"| {row['model']} | {row['strategy']} | " + " | ".join(cells) + " |")
    if len(lines) == 2:
        raise TlexpError(f"no row of the sweep matches a (Model, Strategy) of {reference}")
    return "\n".join(lines) + "\n"


def _number(text) -> float | None:
    if text is None or str(text).strip() in ("", "—"):
        return None
    return float(str(text).replace(",", "").replace("%", "").strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tlexp-table", description=__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a Hydra sweep directory, e.g. outputs/multirun/<stamp>")
    parser.add_argument("--sort", default="none", choices=sorted(SORT_KEYS), help="sort rows by this metrics.json key")
    parser.add_argument("--descending", action="store_true", help="with --sort: largest first")
    parser.add_argument("--compare", type=Path, metavar="REF_CSV",
                        help="a reference table (CSV with the same headers) to print per-row differences against")
    parser.add_argument("--print", action="store_true", dest="show", help="print the table to the terminal")
    args = parser.parse_args(argv)
    try:
        rows = load_rows(args.sweep_dir)
        if args.sort != "none":
            known = sorted((r for r in rows if r.get(args.sort) is not None), key=lambda r: r[args.sort], reverse=args.descending)
            rows = known + [r for r in rows if r.get(args.sort) is None]
        table = markdown(rows)
        (args.sweep_dir / "table.md").write_text(table)
        write_csv(rows, args.sweep_dir / "table.csv")
        accuracy_vs_speed(rows, args.sweep_dir / "accuracy_vs_speed.png")
        curves(rows, args.sweep_dir / "curves.png")
        if args.show:
            print(table)
        if args.compare:
            print(compare(rows, args.compare))
    except TlexpError as exc:
        print(f"tlexp-table: error: {exc}", file=sys.stderr)
        return 2
    failed = sum(r.get("status") != "completed" for r in rows)
    print(f"{len(rows)} rows ({failed} failed) → {args.sweep_dir}/table.md, table.csv, accuracy_vs_speed.png, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
