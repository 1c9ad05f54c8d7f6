"""scripts/sweep_table.py: the README's methods x ratios pivot of a sweep's rows."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pivot():
    spec = importlib.util.spec_from_file_location("sweep_table", ROOT / "scripts" / "sweep_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.pivot


def test_pivot_shows_delta_infeasible_and_missing_points():
    rows = [
        {"method": "none", "ratio": 0.0, "status": "ok", "top1": 0.80},
        {"method": "storm_tome", "ratio": 0.1, "status": "ok", "top1": 0.785},
        {"method": "storm_tome", "ratio": 0.2, "status": "infeasible"},
        {"method": "evit", "ratio": 0.1, "status": "ok", "top1": 0.5},
        {"method": "evit", "ratio": 0.2, "status": "ok", "top1": 0.45, "ratio_used": 0.18},
        {"method": "vit_tome", "ratio": 0.0, "status": "ok", "top1": 0.75},
        {"method": "vit_tome", "ratio": 0.1, "status": "ok", "top1": 0.74},
    ]
    lines = _pivot()(rows).splitlines()
    assert lines[0] == "| method | r ≈ 0.1 | r ≈ 0.2 |"
    assert lines[2] == "| **STORM(ToMe)** | 78.5 (-1.5) | infeasible |"
    assert lines[3] == "| EViT | 50.0 (-30.0) | 45.0 (-35.0) at 0.18 |"
    assert lines[4] == "| ViT + ToMe (reference model) (75.0 unreduced) | 74.0 (-1.0) | — |"  # delta vs its own base
