"""The two screens a person reads: what each phase trains (before fitting) and what came out (after).

Lightning's ModelSummary counts trainable parameters at one moment only; a phased run needs both
phases side by side to check that the strategy unfreezes what the user meant.
"""

from __future__ import annotations

from pathlib import Path

from lightning_fabric.utilities.rank_zero import rank_zero_only
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from torch import nn

from tlexp.model.strategies import Unit
from tlexp.record import resume_command

MAX_UNIT_ROWS = 8


def _count(params) -> int:
    return sum(p.numel() for p in params)


def phase_table(head: nn.Module, backbone: nn.Module, units: list[Unit]) -> Table:
    """Rows: head, each unit phase B unfreezes (last first), the rest of the backbone."""
    table = Table(title="trainable parameters per phase", title_justify="left")
    for column, justify in (("part", "left"), ("params", "right"), ("phase A", "center"), ("phase B", "center")):
        table.add_column(column, justify=justify)
    yes, no = "[green]trains[/]", "[dim]frozen[/]"
    head_in_b = yes if units else "– (no phase B)"
    head_params = _count(head.parameters())
    table.add_row("head", f"{head_params:,}", yes, head_in_b)
    seen: set[int] = set()
    shown = 0
    for unit in reversed(units):
        params = [p for p in unit.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        if shown < MAX_UNIT_ROWS:
            table.add_row(f"backbone {unit.name}", f"{_count(params):,}", no, yes)
            shown += 1
    if len(units) > shown:
        table.add_row(f"… {len(units) - shown} more units", "", no, yes)
    unfrozen = sum(p.numel() for p in backbone.parameters() if id(p) in seen)
    rest = _count(backbone.parameters()) - unfrozen
    table.add_row("backbone, the rest", f"{rest:,}", no, no if units else "–")
    table.add_section()
    table.add_row("trainable", "", f"{head_params:,}", f"{head_params + unfrozen:,}" if units else "–")
    table.add_row("total", f"{head_params + unfrozen + rest:,}", "", "")
    return table


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def run_summary(metrics: dict, overrides: list[str]) -> list:
    """Results, where they are, and the commands that come next."""
    run_dir = Path(metrics["run_dir"])
    results = Table.grid(padding=(0, 2))
    results.add_column(style="bold")
    results.add_column()
    rows = {
        "test accuracy": f"{_percent(metrics['test_acc'])}   (loss {metrics['test_loss']:.4f}, macro-F1 {metrics['test_f1_macro']:.4f})",
        "best epoch": f"{metrics['best_epoch']}: train {_percent(metrics['train_acc'])}, val {_percent(metrics['val_acc'])}",
        "trainable params": f"{metrics['trainable_params']:,} of {metrics['total_params']:,}",
        "wall time": f"{metrics['wall_time_s']:.0f} s",
        "ran as": _how_it_ran(metrics),
    }
    if metrics.get("ms_per_image") is not None:
        rows["inference"] = f"{metrics['ms_per_image']:.1f} ms/image at batch 1"
    if metrics["skipped_images"]:
        rows["skipped images"] = f"{metrics['skipped_images']} (listed in metrics.json)"
    for key, value in rows.items():
        results.add_row(key, value)
    title = f"{metrics['model']} · {metrics['strategy']} · seed {metrics['seed']}"
    commands = {  # plain lines, never wrapped or cut: they are for copy and paste
        "run dir": str(run_dir),
        "dashboard": f"tensorboard --logdir {run_dir / 'tensorboard'}",
        "resume": resume_command(run_dir, overrides),
        "predict": f"tlexp-predict ckpt={run_dir / 'checkpoints' / 'best.ckpt'} images=<file|folder|glob>",
    }
    return [
        Panel(results, title=title, title_align="left", expand=False),
        *(f"{key:<10} {line}" for key, line in commands.items()),
    ]


def _views(n: int | None) -> str:
    """data.augment.cached_views in words: 0 is the un-augmented crop, not "no views"."""
    return "clean crops" if n == 0 else f"{n} fixed augmented views"


def _how_it_ran(metrics: dict) -> str:
    """perf preset and what it changed: the settings that can move the numbers (bf16, cached fixed views)."""
    cache = metrics.get("feature_cache", {})
    cached = f"frozen-prefix cache (phase A {_views(cache.get('phase_a'))}, B {_views(cache.get('phase_b'))})" if cache.get("enabled") else "no cache"
    layout = "channels_last" if metrics.get("channels_last") else "NCHW"
    return f"perf={metrics['perf']}: {metrics['precision']}, {layout}, {cached}"


@rank_zero_only
def show(*renderables, save_as: Path | None = None) -> None:
    """Print to the terminal (strings unwrapped); with ``save_as``, keep a plain-text copy too."""
    console = Console(record=save_as is not None)
    for item in renderables:
        if isinstance(item, str):
            console.print(item, soft_wrap=True, markup=False, highlight=False)
        else:
            console.print(item)
    if save_as is not None:
        save_as.write_text(console.export_text())
