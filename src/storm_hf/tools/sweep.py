"""Accuracy/FLOPs/throughput sweeps: reduction methods x FLOPs ratios on one model, resumable.

Every finished (method, ratio) point is appended to a JSON-lines file by rewriting it atomically (temp
file + ``os.replace``), so a sweep killed at any moment leaves either the old or the new file, never half
a row; run it again with the same file and it evaluates only the missing points. Points the budget solver
cannot reach (it raises ``ValueError``) are recorded as ``status: "infeasible"`` rows with the reason; with
``snap`` the nearest reachable ratio within that distance is evaluated instead (``ratio`` stays the requested
point, ``ratio_used`` says what ran), and a resumed sweep with a larger ``snap`` retries its infeasible points.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from .evaluation import evaluate_model, format_table, nearest_feasible_ratio

#: a reference run outside the swept model (hook for e.g. ToMe on a ViT): ``fn(ratio) -> row dict`` with at
#: least ``gflops``, ``top1``, ``top5``, ``img_per_s``; it may raise ValueError for an infeasible ratio.
ReferenceRun = Callable[[float], dict]

CSV_COLUMNS = ("method", "ratio", "ratio_used", "status", "reason", "gflops", "gflops_unreduced", "flops_cut", "top1", "top5",
               "n_samples", "img_per_s", "device", "batch_size", "num_processes", "mixed_precision", "image_size")


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    method: str
    ratio: float

    @property
    def key(self) -> str:
        return f"{self.method}@{self.ratio:g}"


def plan_points(methods: Sequence[str], ratios: Sequence[float], include_baseline: bool = True) -> list[SweepPoint]:
    """The points of a sweep in run order: the unreduced baseline, then each method at each ratio."""
    from ..reduction import StormConfig

    points = [SweepPoint("none", 0.0)] if include_baseline else []
    for method in methods:
        if method == "none":
            raise ValueError("'none' is the baseline row; list only reduction methods (use include_baseline).")
        for ratio in ratios:
            StormConfig(method=method, flops_ratio=float(ratio)).validate()  # unknown method / ratio: fail now
            points.append(SweepPoint(method, round(float(ratio), 6)))
    keys = [p.key for p in points]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"Sweep points repeat: {duplicates}.")
    return points


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a results file (missing file: none); a key written again (a retried point) keeps its last row."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number} is not JSON ({err}); it was edited by hand? "
                             "Fix or delete that line to resume.") from err
    return _latest_per_key(rows)


def _latest_per_key(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    latest = {row.get("key", id(row)): row for row in rows}  # dicts keep first-insertion order of keys
    return list(latest.values())


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: write a temp file beside it, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append one row to a JSON-lines results file atomically (the whole file is rewritten and swapped in)."""
    rows = read_rows(path) + [row]
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def _check_setup(rows: Sequence[dict], setup: Mapping[str, Any], path: Path) -> None:
    for row in rows:
        if row.get("setup") != dict(setup):
            raise ValueError(
                f"{path} holds results of another setup ({row.get('setup')}), not {dict(setup)}; "
                "resume with the same model/data/split/limit/batch size, or write to a new output."
            )


def run_sweep(
    model: Any,
    dataset: Any,
    methods: Sequence[str],
    ratios: Sequence[float],
    results_path: str | Path,
    *,
    setup: Optional[Mapping[str, Any]] = None,
    batch_size: int = 64,
    accelerator: Any = None,
    mixed_precision: str = "no",
    include_baseline: bool = True,
    references: Optional[Mapping[str, ReferenceRun]] = None,
    evaluate_fn: Callable[..., dict] = evaluate_model,
    progress: bool = True,
    log: Callable[[str], None] = print,
    snap: float = 0.0,
) -> list[dict[str, Any]]:
    """Evaluate ``model`` at every (method, ratio), appending each finished row to ``results_path``.

    Args:
        setup: what identifies this sweep (model, data, split, limit, ...); stored in every row and
            compared on resume so results of different setups never mix.
        references: extra rows from other models, ``{name: fn(ratio)}``, stored and resumed like the rest
            (the hook for a ToMe-on-ViT reference); with ``include_baseline`` each is also run at ratio 0.
        evaluate_fn: the evaluation loop (``evaluate_model``'s signature).
        snap: when a ratio is unreachable, evaluate the nearest reachable one within this distance instead
            (0: record the point as infeasible). Small inputs (a 16x16 grid) reach only a few FLOPs cuts.

    Returns all rows of the results file (old and new), in file order. The model's STORM setting is restored.
    """
    from accelerate import Accelerator

    results_path = Path(results_path)
    setup = {"batch_size": batch_size, **(setup or {})}
    points = plan_points(methods, ratios, include_baseline)
    # a reference at ratio 0 is its own unreduced model (e.g. the plain ViT), run along with the baseline
    reference_ratios = dict.fromkeys(([0.0] if include_baseline else []) + [round(float(r), 6) for r in ratios])
    reference_points = [SweepPoint(name, r) for name in (references or {}) for r in reference_ratios]
    accelerator = accelerator if accelerator is not None else Accelerator(mixed_precision=mixed_precision)
    rows = read_rows(results_path)
    _check_setup(rows, setup, results_path)
    done = {row["key"] for row in rows
            if not (snap and row.get("status") == "infeasible" and row.get("snap", 0.0) < snap)}
    image_size = tuple(int(s) for s in dataset[0]["pixel_values"].shape[-2:])
    saved_storm = model.config.storm

    def record(row: dict[str, Any]) -> None:
        if accelerator.is_main_process:
            append_row(results_path, row)
        accelerator.wait_for_everyone()
        rows[:] = _latest_per_key(rows + [row])
        done.add(row["key"])

    try:
        for point in points + reference_points:
            if point.key in done:
                continue
            base = {"key": point.key, "method": point.method, "ratio": point.ratio, "setup": dict(setup)}
            try:
                if point in reference_points:
                    result = dict(references[point.method](point.ratio))
                else:
                    model.set_storm(method=point.method, flops_ratio=point.ratio or None, schedule=None)
                    try:
                        model.count_flops(image_size)  # the budget solver raises ValueError when unreachable
                    except ValueError:
                        used = nearest_feasible_ratio(model, point.method, point.ratio, image_size, max_shift=snap) \
                            if snap and point.ratio else None
                        if used is None:
                            raise
                        model.set_storm(method=point.method, flops_ratio=used, schedule=None)
                        base["ratio_used"] = used
                    result = None
            except ValueError as err:
                record({**base, "status": "infeasible", "reason": str(err), **({"snap": snap} if snap else {})})
                if accelerator.is_main_process:
                    log(f"{point.key}: infeasible ({err})")
                continue
            if result is None:
                result = evaluate_fn(model, dataset, batch_size, accelerator, progress=progress, description=point.key)
            record({**result, **base, "status": "ok"})
            if accelerator.is_main_process:
                log(f"{point.key}: top-1 {100 * result['top1']:.2f}%  {result['gflops']:.4g} GFLOPs  "
                    f"{result['img_per_s']:.1f} img/s")
    finally:
        model.config.storm = saved_storm
    return rows


def write_csv(rows: Sequence[dict], path: str | Path) -> Path:
    lines: list[list[Any]] = []
    for row in rows:
        lines.append([json.dumps(row[c]) if isinstance(row.get(c), (list, dict)) else row.get(c, "")
                      for c in CSV_COLUMNS])
    path = Path(path)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    writer.writerows(lines)
    write_text_atomic(path, buffer.getvalue())
    return path


def write_outputs(rows: Sequence[dict], out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """``results.json``, ``results.csv``, ``results.md`` and (with matplotlib) the two PNG plots."""
    out_dir = Path(out_dir)
    out = {"json": out_dir / "results.json", "csv": out_dir / "results.csv", "markdown": out_dir / "results.md"}
    write_text_atomic(out["json"], json.dumps(list(rows), indent=1, sort_keys=True) + "\n")
    write_csv(rows, out["csv"])
    write_text_atomic(out["markdown"], format_table(list(rows)) + "\n")
    if plots:
        from .plots import plot_sweep

        out.update(plot_sweep(rows, out_dir))
    return out
