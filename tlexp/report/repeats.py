"""Seed repeats: rows that differ only in ``seed`` become one row of mean ± std (n).

A single run's difference between two strategies may be chance (one TF Flowers test image is
0.18 %). With repeats (``seed=1,2,3``; ``data.split_seed`` keeps one test set) the table says
which differences exceed the spread: two rows are told apart when their means differ by more than
the sum of their standard deviations, a plain, conservative rule.
"""

from __future__ import annotations

import statistics

# (header, metrics.json key, format) of the numbers averaged over repeats
METRICS = [
    ("Training Accuracy", "train_acc", "pct"),
    ("Validation Accuracy", "val_acc", "pct"),
    ("Validation Loss", "val_loss", "loss"),
    ("Test Accuracy", "test_acc", "pct"),
    ("Test Loss", "test_loss", "loss"),
    ("Test macro-F1", "test_f1_macro", "pct"),
    ("Wall time (s)", "wall_time_s", "secs"),
]
# averaged too, as the plots' x axes
PLOTTED = ("trainable_params", "ms_per_image")


def repeat_groups(rows: list[dict], swept: list[str]) -> list[dict]:
    """Completed rows grouped by model, strategy and swept settings, in first-seen order; [] without repeats."""
    groups: dict[tuple, dict] = {}
    for row in (r for r in rows if r.get("status") == "completed"):
        settings = {k: row["overrides"].get(k, "default") for k in swept}
        key = (row["model"], row["strategy"], tuple(settings.items()))
        group = groups.setdefault(key, {"model": row["model"], "strategy": row["strategy"], "settings": settings, "rows": []})
        group["rows"].append(row)
    if all(len(g["rows"]) < 2 for g in groups.values()):
        return []
    for group in groups.values():
        group["n"], group["seeds"] = len(group["rows"]), [r.get("seed") for r in group["rows"]]
        for key in (*(key for _, key, _ in METRICS), *PLOTTED):
            values = [float(r[key]) for r in group["rows"] if r.get(key) is not None]
            group[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)) if values else None
    return list(groups.values())


def _cell(stat, kind: str, n: int) -> str:
    """mean ± std; over fewer runs than the group's n (a run that did not record it), says how many."""
    if stat is None:
        return "—"
    mean, std, count = stat
    fewer = f" ({count} of {n})" if count < n else ""
    if kind == "pct":
        return f"{100 * mean:.2f} ± {100 * std:.2f}%{fewer}"
    return (f"{mean:.4f} ± {std:.4f}" if kind == "loss" else f"{mean:.0f} ± {std:.0f}") + fewer


def markdown(groups: list[dict]) -> str:
    settings = list(groups[0]["settings"])
    header = ["Model", "Strategy", *settings, *(h for h, _, _ in METRICS), "n (seeds)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * (2 + len(settings)) + "---:|" * (len(METRICS) + 1)]
    for g in groups:
        cells = [g["model"], g["strategy"], *g["settings"].values(), *(_cell(g[key], kind, g["n"]) for _, key, kind in METRICS)]
        lines.append("| " + " | ".join([*map(str, cells), f"{g['n']} ({', '.join(map(str, g['seeds']))})"]) + " |")
    return "\n".join(lines) + "\n"


def separations(groups: list[dict], key: str = "test_acc") -> list[str]:
    """The best group by mean ``key`` against every other: beyond or within their spread."""
    # one seed twice (a sweep copied, or run again, under one parent) is one run counted twice, not a repeat
    lines = [f"{_name(g)}: seed {', '.join(map(str, twice))} ran more than once: its n and spread count the same seed again"
             for g in groups if (twice := sorted({s for s in g["seeds"] if g["seeds"].count(s) > 1}, key=str))]
    scored = sorted((g for g in groups if g[key] is not None), key=lambda g: g[key][0], reverse=True)
    if not scored:
        return lines
    best = scored[0]
    for other in scored[1:]:
        gap, spread = best[key][0] - other[key][0], best[key][1] + other[key][1]
        if min(best["n"], other["n"]) < 2:  # one run has no spread to measure a gap against
            verdict = "not told apart: a single run has no spread"
        else:
            verdict = "beyond the spread" if gap > spread else "within the spread: not told apart"
        lines.append(f"{_name(best)} vs {_name(other)}: {100 * gap:+.2f} pt (std {100 * best[key][1]:.2f} + {100 * other[key][1]:.2f}), {verdict}")
    return lines


def _name(group: dict) -> str:
    return " · ".join([group["model"], group["strategy"], *(f"{k}={v}" for k, v in group["settings"].items())])
