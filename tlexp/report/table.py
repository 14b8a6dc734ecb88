"""``tlexp-table SWEEP_DIR``: every job's metrics.json → the comparison table (Markdown, CSV) and plots."""

from __future__ import annotations

import argparse
import csv
import fcntl
import sys
import textwrap
from collections import Counter
from pathlib import Path

from omegaconf import OmegaConf

from tlexp.errors import TlexpError
from tlexp.record import RECORD, NotARecord, read_record
from tlexp.report import repeats
from tlexp.report.plotting import pyplot

RUNNING = ".tlexp.running"  # tlexp.runs.RUNNING: runs imports torch, which the table does without

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
    ("Best epoch (phase)", "best_at", "text"),
    ("Seed", "seed", "text"),
]
# Overrides that are columns already (Model, Strategy, Seed) or say where, not what, a job ran; any
# other key is a setting, ``model.tta`` and ``model.head.dropout`` too.
NOT_SWEPT = {"model", "strategy", "seed", "data.root", "resume", "ckpt_path"}
IDENTITY = ("model", "strategy", "seed")  # the cells a row that did not complete still has
SORT_KEYS = {"none", *(key for _, key, _ in COLUMNS)}
COMPARED = ("pct", "int", "ms")  # the kinds of column --compare takes differences of
# A reference's columns that are not settings: the table's own, and table.csv's last three.
NOT_SETTINGS = {*(header for header, _, _ in COLUMNS), "Status", "Error", "Job"}


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
    """One row per job directory (a metrics.json or a Hydra config), in job order (sweeps under one parent: folder
    by folder, each sweep's jobs together); a job without a record, or whose record is not of its config, is a
    failed row that says so."""
    jobs = {f.parent for f in sweep_dir.rglob(RECORD)} | {c.parent.parent for c in sweep_dir.rglob(".hydra/config.yaml")}
    if not any((job / RECORD).exists() for job in jobs):
        if running := sum(_running(job) for job in jobs):
            raise TlexpError(f"no job under {sweep_dir} has recorded yet ({running} running): run tlexp-table again when they have")
        raise TlexpError(f"no metrics.json under {sweep_dir}: is it a sweep directory (outputs/multirun/<stamp>)?")
    ordered = sorted(jobs, key=lambda j: [_job_order(part) for part in j.relative_to(sweep_dir).parts])
    rows = [_row(job) | {"job_dir": str(job.relative_to(sweep_dir)), "overrides": _overrides(job)} for job in ordered]
    return [row | {"speed_on": _speed_on(row.get("speed_setup")), "best_at": _best_at(row)} for row in rows]


def _overrides(job: Path) -> dict[str, str]:
    """The job's command-line overrides (``.hydra/overrides.yaml``), ``key -> value``."""
    path = job / ".hydra" / "overrides.yaml"
    items = OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else []
    return dict(item.lstrip("+~").split("=", 1) for item in items if "=" in item)


def swept(rows: list[dict]) -> list[str]:
    """Override keys whose value differs between jobs: the settings a sweep compares (``optim.lr``, ...)."""
    keys = sorted({k for r in rows for k in r["overrides"] if k not in NOT_SWEPT and not k.startswith("hydra.")})
    return [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1]


def columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """The study's columns, with the swept settings right after Model and Strategy."""
    return [*COLUMNS[:2], *((key, f"swept:{key}", "text") for key in swept(rows)), *COLUMNS[2:]]


def _cell(row: dict, key: str):
    return row["overrides"].get(key[len("swept:"):], "default") if key.startswith("swept:") else row.get(key)


def _best_at(row: dict) -> str | None:
    """``epoch (phase)`` of the best validation epoch: a fine-tuning row may have peaked in phase A."""
    best = next((e for e in row.get("history", []) if e.get("epoch") == row.get("best_epoch")), None)
    return None if best is None else f"{best['epoch']} ({'B' if best.get('phase_b') else 'A'})"


def _row(job: Path) -> dict:
    config = job / ".hydra" / "config.yaml"
    if not (job / RECORD).exists():
        settings = OmegaConf.load(config)
        if _running(job):  # a sweep looked at before its end: this job has not recorded yet, it was not killed
            return {"status": "running", "model": OmegaConf.select(settings, "model.name"), "strategy": settings.get("strategy"),
                    "seed": settings.get("seed"), "error": "no metrics.json yet: the job is running; run tlexp-table again when the sweep is done"}
        return {"status": "missing", "model": OmegaConf.select(settings, "model.name"), "strategy": settings.get("strategy"),
                "seed": settings.get("seed"), "error": "no metrics.json: the job was killed before it could record (resume=true runs it again)"}
    try:
        row = read_record(job)
    except NotARecord as exc:  # another tool's file, a record of another format: said, not a traceback
        return {"status": "foreign", "error": str(exc)}
    except ValueError as exc:  # empty or half-written: a row that names the file, not a traceback
        return {"status": "unreadable", "error": f"{job / RECORD} is not valid JSON ({exc})"}
    saved = row.get("run", {}).get("hydra_files", {}).get("config.yaml")
    if row.get("status") == "completed" and saved is not None and config.exists() and config.read_text() != saved:
        return row | {"status": "mismatch", "error": "metrics.json was computed with another config than .hydra/config.yaml"}
    return row


def _running(job: Path) -> bool:
    """A tlexp-train holds the job's RUNNING lock (tlexp.runs.locked) for as long as it runs."""
    try:
        with open(job / RUNNING) as probe:
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # let go when the file closes
    except BlockingIOError:
        return True
    except OSError:  # no such file: never started by tlexp-train, or an older one
        return False
    return False


def _speed_on(setup: dict | None) -> str | None:
    """Where (and how) ms/image was timed: a GPU's figure is no CPU's, nor a bf16 one an fp32 one (records
    before ``precision`` was kept were timed in fp32)."""
    if not setup:
        return None
    name = setup.get("device_name") or setup.get("processor")
    precision = "" if setup.get("precision", "32-true") == "32-true" else f", {setup['precision']}"
    shared = f", {setup['sweep_jobs']} jobs at once" if setup.get("sweep_jobs", 1) > 1 else ""
    return f"{setup.get('device', 'cpu')}: {name} ({setup['runtime']}{precision}{shared})"


def _job_order(name: str):
    """A path part's place: by its number first (job 2 before job 10), so sweeps side by side keep their rows together."""
    head = name.split("_", 1)[0]
    return (0, int(head), name) if head.isdigit() else (1, 0, name)


def formatted(rows: list[dict], cols: list[tuple[str, str, str]]) -> list[list[str]]:
    out = []
    first_metric = [key for _, key, _ in cols].index("train_acc")
    for row in rows:
        if row.get("status") != "completed":
            cells = [_fmt(_cell(row, key), kind) if key in IDENTITY or key.startswith("swept:") else ""
                     for _, key, kind in cols]
            status = str(row.get("status")).upper()  # FAILED, or INTERRUPTED (resumable), RUNNING, MISSING, MISMATCH, UNREADABLE
            cells[first_metric] = f"{status}: {row.get('error', 'unknown error')}".replace("|", "/").splitlines()[0][:120]
            out.append(cells)
        else:
            out.append([_fmt(_cell(row, key), kind) for _, key, kind in cols])
    return out


def markdown(rows: list[dict]) -> str:
    cols = columns(rows)
    header = [h for h, _, _ in cols]
    align = ["---" if kind == "text" else "---:" for _, _, kind in cols]
    lines = ["| " + " | ".join(r) + " |" for r in [header, align, *formatted(rows, cols)]]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    """Raw numbers (fractions, not percentages) so the CSV feeds other tools without parsing."""
    cols = columns(rows)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([h for h, _, _ in cols] + ["Status", "Error", "Job"])
        for row in rows:
            # as table.md: a row that did not complete has no results (a mismatch's numbers are another config's)
            shown = [key for _, key, _ in cols if row.get("status") == "completed" or key in IDENTITY or key.startswith("swept:")]
            cells = ["" if key not in shown or (value := _cell(row, key)) is None else value for _, key, _ in cols]
            writer.writerow(cells + [row.get("status"), row.get("error", ""), row["job_dir"]])


def _label(row: dict, keys: list[str], with_model: bool = True) -> str:
    """Model, strategy and the swept settings this run overrides: a default one would only lengthen it."""
    head = [row["model"], row["strategy"]] if with_model else [row["strategy"]]
    return " · ".join([*head, *(f"{k}={row['overrides'][k]}" for k in keys if k in row["overrides"])])


def _models(rows: list[dict]) -> set:
    return {r.get("model") for r in rows if r.get("status") == "completed"}


def _points(rows: list[dict], groups: list[dict], keys: list[str], with_model: bool) -> list[dict]:
    """One point per run, or per group of seed repeats (mean, with its std as an error bar)."""
    if not groups:
        return [{**r, "acc": 100 * r["test_acc"], "err": 0.0, "label": _label(r, keys, with_model)} for r in rows if r.get("status") == "completed"]
    return [
        {"model": g["model"], **{k: g[k][0] for k in ("trainable_params", "wall_time_s", "ms_per_image") if g[k] is not None},
         "acc": 100 * g["test_acc"][0], "err": 100 * g["test_acc"][1], "label": f"{_label(g['rows'][0], keys, with_model)} (n={g['n']})"}
        for g in groups
    ]


def accuracy_plot(rows: list[dict], sweep_dir: Path, groups: list[dict]) -> str:
    """Test accuracy against inference time where the networks differ; else against training cost.

    The strategies of one backbone are the same network at inference (only which weights trained
    differs), so their ms/image differ by timing noise alone: such a sweep is plotted against
    trainable parameters and training wall time instead. Seed repeats are one point each, their
    standard deviation the error bar. Returns the file's name.
    """
    plt = pyplot()
    keys, models = swept(rows), _models(rows)
    one_network = len(models) <= 1
    done = _points(rows, groups, keys, with_model=not one_network)
    axes_spec = (
        [("trainable_params", "trainable parameters (log scale)", True), ("wall_time_s", "training wall time (s)", False)]
        if one_network else [("ms_per_image", "inference speed (ms/image, batch 1)", False)]
    )
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(7 * len(axes_spec), 5.5), squeeze=False)
    for ax, (key, xlabel, log_x) in zip(axes[0], axes_spec):
        labels: dict[tuple, list[str]] = {}  # runs that land on one spot (e.g. two names for one unfreezing) share a label
        for point in (p for p in done if p.get(key) is not None):
            ax.errorbar(point[key], point["acc"], yerr=point["err"] or None, fmt="o", markersize=6, capsize=4)
            labels.setdefault((point[key], point["acc"]), []).append(point["label"])
        if not labels:  # an empty frame would say nothing of why
            timed = " (runs with profile.enabled=false are not timed)" if key == "ms_per_image" else ""
            ax.text(0.5, 0.5, f"no completed run recorded {key}{timed}", transform=ax.transAxes, ha="center", wrap=True)
        if log_x:
            ax.set_xscale("log")
        ax.margins(x=0.15, y=0.08)
        ax.autoscale_view()
        for spot, names in labels.items():  # wrapped, and to the left of points in the right part: inside the axes
            right = ax.transAxes.inverted().transform(ax.transData.transform(spot))[0] > 0.6
            ax.annotate(textwrap.fill(" = ".join(names), 38, break_long_words=False), spot, textcoords="offset points",
                        xytext=(-5 if right else 5, 4), ha="right" if right else "left", fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    what = "what training costs (one network at inference)" if one_network else "inference time"
    each = "per setting: mean ± std over seeds" if groups else "one point per run"
    fig.suptitle(f"{next(iter(models)) + ': ' if one_network and models else ''}Test accuracy against {what}, {each}")
    fig.tight_layout()
    name = "accuracy_vs_cost.png" if one_network else "accuracy_vs_speed.png"
    fig.savefig(sweep_dir / name, dpi=120)
    plt.close(fig)
    return name


def curves(rows: list[dict], path: Path) -> None:
    """Accuracy and loss per epoch, training dashed and validation solid, one colour per run: the completed
    runs (a mismatch row's history is of another config than its job's)."""
    plt = pyplot()
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(13, 5.5))
    keys, switches, models = swept(rows), set(), _models(rows)
    with_model = len(models) > 1  # one model: named once, in the title
    for i, row in enumerate(r for r in rows if r.get("status") == "completed" and r.get("history")):
        colour = f"C{i % 10}"
        for ax, metric, scale in ((acc, "acc", 100), (loss, "loss", 1)):
            for subset, style in (("train", "--"), ("val", "-")):
                key = f"{subset}_{metric}"  # an epoch not validated (check_val_every_n_epoch > 1) is left out, not a break in the line
                drawn = [e for e in row["history"] if e.get(key) is not None]
                ax.plot([e["epoch"] for e in drawn], [scale * e[key] for e in drawn], style, color=colour, marker=".", alpha=0.85,
                        label=_label(row, keys, with_model) if (subset, metric) == ("val", "acc") else None)
        if row.get("phase_b_epochs"):
            switches.add(row["phase_a_epochs"] - 0.5)
    for ax, ylabel in ((acc, "accuracy (%)"), (loss, "loss")):
        for x in sorted(switches):
            ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True, min_n_ticks=1))  # epochs are whole: no 0.5 ticks on a short run
        ax.set_xlabel("epoch (dotted: phase B starts)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    acc.set_title(f"{'' if with_model or not models else next(iter(models)) + ': '}Accuracy per epoch (solid: validation, dashed: training)")
    loss.set_title("Loss per epoch (solid: validation, dashed: training)")
    if acc.get_legend_handles_labels()[0]:
        acc.legend(fontsize=7, ncol=1 + len(rows) // 8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_reference(path: Path) -> list[dict]:
    """The reference table's rows, read before the sweep so that a wrong path costs no plotting."""
    hint = "give a CSV with Model and Strategy columns, such as docs/reference_study.csv or a sweep's table.csv"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's BOM is not part of "Model"
            reader = csv.DictReader(f)
            rows, header = list(reader), reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TlexpError(f"--compare {path}: {getattr(exc, 'strerror', None) or exc}: {hint}") from exc
    missing = [name for name in ("Model", "Strategy") if name not in header]
    if missing:
        raise TlexpError(f"--compare {path} has no {' or '.join(missing)} column (its header: {', '.join(header) or 'none'}): {hint}")
    for i, row in enumerate(rows, start=1):
        for column in (h for h, _, kind in COLUMNS if kind in COMPARED and h in header):
            try:
                _number(row[column])
            except ValueError:
                raise TlexpError(f"--compare {path}, row {i}: {column} {row[column]!r} is not a number: "
                                 "write numbers (92.10%, 0.921, 1,234) or leave the cell empty") from None
    return rows


def compare(rows: list[dict], reference: list[dict], name: Path) -> str:
    """Per-row differences (ours − reference), one line per row of the sweep.

    A row is matched on Model, Strategy and each setting the reference has as a column (``optim.lr``:
    a sweep's table.csv has its swept settings; Seed too when either has several seeds): a setting
    this sweep sweeps is shown with its value; one it does not sweep (a reference over several
    learning rates, ours at one) is matched on the value each job ran with (its override, else its
    config) and shown as the reference's cell it matched. A row with no reference row, or with
    several, says so instead of being compared. Accuracy cells are fractions when none has a % sign
    and all are <= 1 (tlexp's table.csv), else percentages (the study's table,
    docs/reference_study.csv): a sweep compared with its own table.csv gives zeros.
    """
    header = list(reference[0]) if reference else []
    done = [r for r in rows if r.get("status") == "completed"]
    sweeps = swept(rows)
    fixed = [h for h in header if h not in NOT_SETTINGS and h not in sweeps and any(_setting(r, h) is not None for r in done)]
    several_seeds = len({r.get("seed") for r in done}) > 1 or len({_norm(r.get("Seed")) for r in reference}) > 1
    seeds = ["Seed"] if "Seed" in header and several_seeds else []
    settings = [*(key for key in sweeps if key in header), *fixed]
    numeric = [(h, key, kind) for h, key, kind in COLUMNS if kind in COMPARED and h in header]
    accuracies = [r[h] for r in reference for h, _, kind in numeric if kind == "pct" and _number(r[h]) is not None]
    fractions = not any("%" in text for text in accuracies) and all(_number(text) <= 1 for text in accuracies)
    lines = ["| " + " | ".join(["Model", "Strategy", *sweeps, *(f"{h} (reference)" for h in fixed), *seeds, *(f"Δ {h}" for h, _, _ in numeric)]) + " |",
             "|---|---|" + "---|" * (len(sweeps) + len(fixed) + len(seeds)) + "---:|" * len(numeric)]
    matched = 0
    for row in rows:
        ours = {"Model": {_norm(row.get("model"))}, "Strategy": {_norm(row.get("strategy"))},
                **{h: _spellings(row, h) for h in settings}, **{h: {_norm(row.get("seed"))} for h in seeds}}
        matching = [ref for ref in reference if all(_norm(ref[h]) in spellings for h, spellings in ours.items())]
        # a table.csv's failed or mismatch row has no numbers, or numbers of another config: nothing to compare with
        found = [ref for ref in matching if (ref.get("Status") or "completed") == "completed"]
        what = ", ".join([f"Model={row.get('model')}", f"Strategy={row.get('strategy')}",
                          *(f"{h}={_setting(row, h)}" for h in settings), *(f"Seed={row.get('seed')}" for _ in seeds)])
        if row.get("status") != "completed":
            cells = [f"{row.get('status')}: nothing to compare"]
        elif matching and not found:
            cells = [f"the reference row with {what} is {', '.join(sorted({ref['Status'] for ref in matching}))}: not compared"]
        elif len(found) != 1:
            cells = [f"no reference row with {what}" if not found else f"{len(found)} reference rows with {what}: not compared"]
        else:
            matched += 1
            cells = [_delta(row.get(key), _number(found[0].get(h)), kind, fractions) for h, key, kind in numeric]
        head = [_fmt(_cell(row, key), "text") for key in ("model", "strategy", *(f"swept:{k}" for k in sweeps))]
        head += [found[0][h] if len(found) == 1 else "—" for h in fixed] + [_fmt(row.get("seed"), "text") for _ in seeds]
        lines.append("| " + " | ".join(head + cells + [""] * (len(numeric) - len(cells))) + " |")
    if not matched:
        raise TlexpError(f"no completed row of the sweep matches a row of {name} on {', '.join(['Model', 'Strategy', *settings, *seeds])}")
    return "\n".join(lines) + "\n"


def _setting(row: dict, key: str):
    """The value a job ran ``key`` with: its override, else its config's (as the record holds it); None if it has no such key."""
    if key in row.get("overrides", {}):
        return row["overrides"][key]
    text = row.get("run", {}).get("hydra_files", {}).get("config.yaml")
    return None if text is None else OmegaConf.select(OmegaConf.create(text), key, throw_on_resolution_failure=False)


def _spellings(row: dict, key: str) -> set[str]:
    """A reference cell that matches this job's ``key``: its value, or ``default`` (table.csv's word) where it did not override it."""
    return {_norm(_setting(row, key)), *(["default"] if key not in row.get("overrides", {}) else [])}


def _delta(ours, theirs: float | None, kind: str, fractions: bool) -> str:
    if ours is None or theirs is None:
        return "—"
    if kind == "pct":
        return f"{100 * (float(ours) - theirs):+.2f} pt" if fractions else f"{100 * float(ours) - theirs:+.2f} pt"
    return f"{float(ours) - theirs:+,.2f}" if kind == "ms" else f"{int(ours) - int(theirs):+,}"


def _norm(value) -> str:
    """A cell as a match key, case and number spelling aside (``1e-3`` is ``0.001``, Seed ``42`` is ``42.0``)."""
    text = str(value).strip().lower()
    try:
        return repr(float(text))
    except ValueError:
        return text


def _number(text) -> float | None:
    if text is None or str(text).strip() in ("", "—"):
        return None
    return float(str(text).replace(",", "").replace("%", "").strip())


def _sort_value(row: dict, key: str):
    """What --sort orders by: best_at by its epoch number (as text, "10 (B)" would come before "2 (A)"); a row that
    did not complete has only its identity to order by (a mismatch's hidden numbers are another config's)."""
    if row.get("status") != "completed" and key not in IDENTITY:
        return None
    if key == "best_at":
        return row.get("best_epoch") if row.get("best_at") is not None else None
    return row.get(key)


def write_files(rows: list[dict], table: str, groups, summary: str, sweep_dir: Path, shown: bool) -> list[str]:
    """The table's files in the sweep dir; a ``table_seeds.md`` of an earlier run without repeats now is removed."""
    try:
        (sweep_dir / "table.md").write_text(table)
        write_csv(rows, sweep_dir / "table.csv")
        written = ["table.md", "table.csv", accuracy_plot(rows, sweep_dir, groups), "curves.png"]
        curves(rows, sweep_dir / "curves.png")
        if groups:
            (sweep_dir / "table_seeds.md").write_text(summary)
            written.append("table_seeds.md")
        else:
            (sweep_dir / "table_seeds.md").unlink(missing_ok=True)
    except OSError as exc:  # a read-only or full disk: the table is still worth reading
        raise TlexpError(f"cannot write the table's files in {sweep_dir} ({exc.strerror or exc}): copy the sweep to a folder you "
                         f"can write{'' if shown else ', or add --print to see the table without them'}") from exc
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tlexp-table", description=__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a Hydra sweep directory, e.g. outputs/multirun/<stamp>")
    parser.add_argument("--sort", default="none", choices=sorted(SORT_KEYS), help="sort rows by this metrics.json key")
    parser.add_argument("--descending", action="store_true", help="with --sort: largest first")
    parser.add_argument("--compare", type=Path, metavar="REF_CSV",
                        help="a reference table to print per-row differences against: the study's "
                             "(docs/reference_study.csv, percentages) or a sweep's table.csv (fractions)")
    parser.add_argument("--print", action="store_true", dest="show", help="print the table to the terminal")
    args = parser.parse_args(argv)
    if args.descending and args.sort == "none":  # else the order would silently stay the folders'
        parser.error("--descending orders --sort's key: give --sort <key> too")
    try:
        reference = read_reference(args.compare) if args.compare else None
        rows = load_rows(args.sweep_dir)
        if args.sort != "none":
            # None and NaN (a diverged run's loss, which compares false with everything) go last, else the order breaks
            known = [r for r in rows if _sort_value(r, args.sort) is not None and _sort_value(r, args.sort) == _sort_value(r, args.sort)]
            rows = sorted(known, key=lambda r: _sort_value(r, args.sort), reverse=args.descending) + [r for r in rows if r not in known]
        table = markdown(rows)
        groups = repeats.repeat_groups(rows, swept(rows))
        summary = repeats.markdown(groups) + "\n" + "".join(f"- {line}\n" for line in repeats.separations(groups)) if groups else ""
        if args.show:
            print(table)
            if groups:
                print(summary)
        if reference is not None:  # before the files, as the table: shown though a read-only disk refuses them
            print(compare(rows, reference, args.compare))
        written = write_files(rows, table, groups, summary, args.sweep_dir, args.show)
    except TlexpError as exc:
        print(f"tlexp-table: error: {exc}", file=sys.stderr)
        return 2
    statuses = Counter(r.get("status") for r in rows if r.get("status") != "completed")
    print(f"{len(rows)} rows ({', '.join(f'{n} {s}' for s, n in statuses.items()) or '0 failed'}) → {args.sweep_dir}/: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    from tlexp.cli import table

    sys.exit(table())
