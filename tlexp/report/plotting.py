"""Headless matplotlib, imported only by the commands that draw (it costs ~1 s to import)."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: runs write PNGs, also on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
