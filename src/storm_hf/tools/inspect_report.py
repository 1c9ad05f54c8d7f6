"""The text `storm-hf inspect` prints: size, FLOPs and grids of a model, before and after reduction."""
from __future__ import annotations

from typing import Any, Optional


def _grid_summary(report: Any) -> list[str]:
    """One line per stage: its grid(s) and number of blocks."""
    stages: dict[int, list[Any]] = {}
    for row in report.blocks:
        stages.setdefault(row.stage, []).append(row)
    lines = []
    for stage, rows in stages.items():
        grids = []
        for row in rows:
            g = f"{row.height}x{row.width}"
            if not grids or grids[-1] != g:
                grids.append(g)
        lines.append(f"  stage {stage}: {' -> '.join(grids)} ({len(rows)} blocks)")
    return lines


def inspect_text(model: Any, image_size: Optional[tuple[int, int]] = None, storm: Optional[dict] = None) -> str:
    """Params, GFLOPs (fvcore convention) and grid sizes; with `storm`, the reduced schedule side by side."""
    config = model.config
    if image_size is None:
        size = config.image_size
        image_size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    total_params = sum(p.numel() for p in model.parameters())
    base_params = sum(p.numel() for p in model.base_model.parameters())
    model.set_storm(method="none", schedule=None, flops_ratio=None)
    base = model.count_flops(image_size)
    lines = [
        f"{type(model).__name__} ({config.model_type})",
        f"params: {total_params / 1e6:.2f} M (without the classifier head: {base_params / 1e6:.2f} M)",
        f"input: {image_size[0]} x {image_size[1]}",
        f"GFLOPs: {base.total / 1e9:.3f}   (1 multiply-add = 1 FLOP; selective scan 9·B·L·D·N)",
        "grids:",
        *_grid_summary(base),
    ]
    for name, value in base.parts.items():
        if name.startswith("scan_") or name.endswith("_one_direction"):
            lines.append(f"  {name}: {value / 1e9:.3f} G")
    if not storm:
        return "\n".join(lines)

    model.set_storm(storm)
    cfg = model.storm_config
    schedule = model.storm_schedule(image_size)
    reduced = model.count_flops(image_size)
    saved = 1.0 - reduced.total / base.total
    overhead = model.storm_overhead_flops(image_size)
    lines += [
        "",
        f"reduction: {cfg.to_dict()}",
        f"GFLOPs: {base.total / 1e9:.3f} -> {reduced.total / 1e9:.3f} ({-100 * saved:+.1f} %); "
        f"the reduction's own planning adds {overhead / 1e9:.4f} G ({100 * overhead / base.total:.2f} %)",
        "schedule (grid after the block's mixer):",
        *[f"  stage {s} block {b}: -> {h}x{w}" for (s, b), (h, w) in sorted(schedule.items())],
        "",
        "stage block   grid in (plain)   grid in (reduced)   GFLOPs plain   GFLOPs reduced",
    ]
    reduced_rows = {(r.stage, r.block): r for r in reduced.blocks}
    for row in base.blocks:
        red = reduced_rows.get((row.stage, row.block))
        red_grid = f"{red.height}x{red.width}" if red else "-"
        red_flops = f"{red.flops / 1e9:14.4f}" if red else f"{'-':>14}"
        lines.append(
            f"{row.stage:5d} {row.block:5d}   {f'{row.height}x{row.width}':>15}   {red_grid:>17}   "
            f"{row.flops / 1e9:12.4f}   {red_flops}"
        )
    return "\n".join(lines)
