"""Formatting for cost reports: human-readable numbers, Markdown and rich tables, plots (lazy)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def format_count(n: float | int | None, digits: int = 2) -> str:
    """``11689512`` → ``"11.69M"``; ``1818558976`` → ``"1.82G"``; small numbers stay as they are."""
    if n is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f}{unit}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def format_bytes(b: float | int | None, digits: int = 2) -> str:
    """Bytes in binary units: ``46758048`` → ``"44.59 MiB"``."""
    if b is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= scale:
            return f"{b / scale:.{digits}f} {unit}"
    return f"{b:g} B"


def format_shape(shape: Sequence[int] | None) -> str:
    return "-" if shape is None else "×".join(str(d) for d in shape)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                   align_right: Sequence[bool] | None = None) -> str:
    """A GitHub Markdown table; ``|`` in cells is escaped."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    align = align_right or [False] * len(headers)
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---:" if r else "---" for r in align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def rich_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]],
               align_right: Sequence[bool] | None = None):
    """A ``rich.table.Table`` with the given columns (rich is imported on use)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    align = align_right or [False] * len(headers)
    for h, r in zip(headers, align):
        table.add_column(str(h), justify="right" if r else "left")
    for row in rows:
        table.add_row(*(str(v) for v in row))
    return table


def plot_layers(profile: Any, path: str | Path | None = None, metric: str = "macs"):
    """Bar chart of a per-layer metric (``"macs"``, ``"params"``, ``"live_elements"``) of a
    :class:`~efficientml.analysis.profile.ModelProfile`; saved to ``path`` when given.

    matplotlib is imported here, not with the package (``pip install 'efficientml[plot]'``).
    """
    from efficientml.core.lazy import optional_import

    optional_import("matplotlib", "plot", "plots")
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    layers = [l for l in profile.layers if getattr(l, metric) or metric == "live_elements"]
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(layers)), 4))
    ax.bar(range(len(layers)), [getattr(l, metric) for l in layers])
    ax.set_xticks(range(len(layers)), [l.name for l in layers], rotation=90, fontsize=6)
    ax.set_ylabel(metric)
    ax.set_title(f"{profile.name}: {metric} per layer")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=150)
        plt.close(fig)
    return fig
