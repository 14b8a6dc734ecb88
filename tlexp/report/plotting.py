"""Headless matplotlib, imported only by the commands that draw (it costs ~1 s to import)."""

from __future__ import annotations

from contextlib import contextmanager


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: runs write PNGs, also on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def closing_figures():
    """``pyplot()``, and every figure made inside closed on leaving, also when saving one fails.

    A sweep's jobs can share one process (the local launcher, one job at a time): a figure left open
    by each job piles up there (matplotlib warns past 20).
    """
    plt = pyplot()
    before = set(plt.get_fignums())
    try:
        yield plt
    finally:
        for number in set(plt.get_fignums()) - before:
            plt.close(number)
