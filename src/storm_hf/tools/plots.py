"""Sweep figures: top-1 accuracy against GFLOPs and against throughput, one line per method.

matplotlib is an optional dependency (``pip install "storm-hf[plot]"``); it is imported here only, with
the headless Agg backend, so sweeps run without it when plots are switched off.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

PLOTS = {
    "plot_gflops": ("top1_vs_gflops.png", "gflops", "GFLOPs per image"),
    "plot_throughput": ("top1_vs_throughput.png", "img_per_s", "throughput (img/s)"),
}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "Plots need matplotlib: pip install 'storm-hf[plot]' (or matplotlib), or pass --no-plots."
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rows_of_main_device(rows: Sequence[dict]) -> tuple[list[dict], str]:
    """The rows measured on the sweep's most common device, and that device.

    img/s only compares within one device, and a resumed sweep may hold rows measured elsewhere (e.g. a GPU
    sweep finished on a CPU), so the throughput plot shows these rows only.
    """
    device = Counter(r.get("device", "") for r in rows).most_common(1)[0][0]
    return [r for r in rows if r.get("device", "") == device], device


def plot_sweep(rows: Sequence[dict], out_dir: str | Path) -> dict[str, Path]:
    """Write the two PNGs for the feasible rows; the unreduced baseline is a star on every figure.

    Reference rows from another model (``reference_model`` set, e.g. ToMe on a ViT) are a dashed series
    whose ratio-0 point, that model unreduced, is a hollow star.
    """
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = [r for r in rows if r.get("status", "ok") == "ok" and r.get("top1") is not None]
    if not ok:
        raise ValueError("No feasible sweep rows to plot.")
    baseline = [r for r in ok if r["method"] == "none"]
    methods = sorted({r["method"] for r in ok} - {"none"})
    references = {r["method"] for r in ok if "reference_model" in r}
    same_device, device = rows_of_main_device(ok)
    written = {}
    for name, (filename, x_key, x_label) in PLOTS.items():
        shown = ok if x_key != "img_per_s" else same_device
        fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
        for method in methods:
            points = sorted((r[x_key], 100 * r["top1"]) for r in shown if r["method"] == method)
            if not points:
                continue
            style = {"linestyle": "--", "marker": "s"} if method in references else {"marker": "o"}
            line, = ax.plot([p[0] for p in points], [p[1] for p in points], label=method, **style)
            for row in (r for r in shown if r["method"] == method and method in references and not r.get("ratio")):
                ax.scatter([row[x_key]], [100 * row["top1"]], marker="*", s=160, facecolors="none",
                           edgecolors=line.get_color(), zorder=3, label=f"{method} unreduced")
        for row in (r for r in baseline if r in shown):
            ax.scatter([row[x_key]], [100 * row["top1"]], marker="*", s=160, color="black", zorder=3,
                       label="unreduced")
        xs = [r[x_key] for r in shown if r.get(x_key)]
        if xs and min(xs) > 0 and max(xs) / min(xs) > 5:  # e.g. a ViT reference 8x the backbone's GFLOPs
            ax.set_xscale("log")
        ax.set_xlabel(x_label + (" (log scale)" if ax.get_xscale() == "log" else ""))
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"top-1 vs {x_label}" + (f" — {device}, batch {shown[0].get('batch_size')}"
                                                if x_key == "img_per_s" else ""), fontsize=9)
        if len(shown) < len(ok):
            ax.annotate(f"{len(ok) - len(shown)} row(s) measured on another device not shown",
                        xy=(0.01, 0.01), xycoords="axes fraction", fontsize=7, color="gray")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path)
        plt.close(fig)
        written[name] = path
    return written
