"""Pivot a `storm-hf sweep` results.json into the README's table: methods x ratios, top-1 % (delta vs unreduced).

    python scripts/sweep_table.py docs/results/cifar10/vmamba/results.json --title "VMamba"
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

NAMES = {"storm_tome": "**STORM(ToMe)**", "storm_evit": "**STORM(EViT)**", "evit": "EViT", "tome": "ToMe",
         "random": "random", "top": "ToP", "mtr": "MTR", "vit_tome": "ViT + ToMe (reference model)"}


def pivot(rows: list[dict]) -> str:
    """Markdown table; infeasible points say so; a point run at a snapped ratio says at which."""
    base = next(r for r in rows if r["method"] == "none" and r.get("status") == "ok")["top1"]
    ratios = sorted({r["ratio"] for r in rows if r["method"] != "none" and r["ratio"]})
    methods = [m for m in NAMES if any(r["method"] == m for r in rows)]
    lines = ["| method | " + " | ".join(f"r ≈ {x:g}" for x in ratios) + " |", "|---" * (len(ratios) + 1) + "|"]
    for method in methods:
        cells = []
        ref = base
        if method == "vit_tome":
            zero = [r for r in rows if r["method"] == method and not r["ratio"] and r.get("status") == "ok"]
            ref = zero[0]["top1"] if zero else None
        for ratio in ratios:
            row = next((r for r in rows if r["method"] == method and r["ratio"] == ratio), None)
            if row is None:
                cells.append("—")
            elif row.get("status") != "ok":
                cells.append("infeasible")
            else:
                delta = f" ({100 * (row['top1'] - ref):+.1f})" if ref is not None else ""
                used = f" at {row['ratio_used']:g}" if row.get("ratio_used") else ""
                cells.append(f"{100 * row['top1']:.1f}{delta}{used}")
        label = NAMES[method] + (f" ({100 * ref:.1f} unreduced)" if method == "vit_tome" and ref else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results")
    args = parser.parse_args()
    print(pivot(json.loads(Path(args.results).read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
