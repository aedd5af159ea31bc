"""The demo's before/after report as a terminal table, Markdown and a plot (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLUMNS = (("params", "params", "{:,}"), ("weight_bytes", "weights", "{}"), ("macs", "MACs", "{}"),
           ("peak_activation_bytes", "peak memory", "{}"), ("latency_ms", "latency ms (measured)", "{:.3f}"),
           ("accuracy", "accuracy % (measured)", "{:.2f}"))


def _bytes(n: float) -> str:
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _macs(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{int(n):,}"


def cells(row: dict[str, Any]) -> list[str]:
    out = []
    for key, _, fmt in COLUMNS:
        v = row[key]
        out.append(_bytes(v) if "bytes" in key else _macs(v) if key == "macs" else fmt.format(v))
    return out


def to_markdown(report: dict[str, Any]) -> str:
    head = "| stage | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [f"# efficientml demo: {report['model']}", "", head, "|" + " --- |" * (len(COLUMNS) + 1)]
    lines += ["| " + " | ".join([r["stage"], *cells(r)]) + " |" for r in report["stages"]]
    eng, first, last = report["engine"], report["stages"][0], report["stages"][-1]
    be = eng["bit_exact"]
    lines += ["", f"- engine vs Python integer reference: {be['images'] - be['mismatched_images']}/{be['images']} "
              "test images bit-exact", f"- C code: {eng['c_source']}, {eng['header']}",
              f"- overall: {first['params'] / last['params']:.1f}× fewer parameters, "
              f"{first['weight_bytes'] / last['weight_bytes']:.1f}× smaller weights, "
              f"{first['macs'] / last['macs']:.1f}× fewer MACs, "
              f"{first['peak_activation_bytes'] / last['peak_activation_bytes']:.1f}× less peak memory, "
              f"{first['latency_ms'] / last['latency_ms']:.2f}× the speed, "
              f"accuracy {last['accuracy'] - first['accuracy']:+.2f} points"]
    mcu = eng.get("mcu", {})
    if "flash_kb" in mcu:
        lines.append(f"- Cortex-M3 build: Flash {mcu['flash_kb']:.1f} KB, SRAM {mcu['sram_kb']:.1f} KB ({mcu['how']})")
    elif mcu:
        lines.append(f"- Cortex-M3 build skipped: {mcu['skipped']}")
    lines += ["", "How each number was obtained: " + "; ".join(f"{k}: {v}" for k, v in report["how_measured"].items()),
              f"Total time {report['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"efficientml demo: {report['model']}")
    t.add_column("stage")
    for _, title, _ in COLUMNS:
        t.add_column(title, justify="right")
    for r in report["stages"]:
        t.add_row(r["stage"], *cells(r))
    Console().print(t)


def plot(report: dict[str, Any], path: Path) -> str:
    """Each metric of each stage relative to the baseline, as grouped bars; '' or why it was skipped."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install 'efficientml[plot]')"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages, base = report["stages"], report["stages"][0]
    keys = [c for c in COLUMNS if c[0] != "accuracy"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(stages)
    for i, r in enumerate(stages):
        ax.bar([k + i * width for k in range(len(keys))], [r[c[0]] / base[c[0]] for c in keys], width,
               label=r["stage"])
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], [c[1] for c in keys], fontsize=8)
    ax.set_ylabel("relative to the baseline (lower is better)")
    ax.legend(fontsize=7)
    ax2.bar(range(len(stages)), [r["accuracy"] for r in stages], color="gray")
    ax2.set_ylim(min(r["accuracy"] for r in stages) - 2, 100)
    ax2.set_xticks(range(len(stages)), [str(i + 1) for i in range(len(stages))])
    ax2.set_title("test accuracy % per stage", fontsize=9)
    fig.tight_layout()
    from efficientml.core.serialization import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return ""
