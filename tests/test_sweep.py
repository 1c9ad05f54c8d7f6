"""Sweeps: methods x FLOPs ratios, infeasible points, atomic resumable results, outputs and plots."""
from __future__ import annotations

import csv
import json
import sys

import pytest
import torch

from storm_hf.tools.archs import get_arch
from storm_hf.tools.cli import main
from storm_hf.tools.data import load_image_dataset, processor_for
from storm_hf.tools.evaluation import evaluate_model
from storm_hf.tools.hub import save_model_folder
from storm_hf.tools.sweep import append_row, plan_points, read_rows, run_sweep, write_outputs

from .test_data import make_parquet, random_images
from .tiny_configs import TINY_CONFIGS

# where the tiny VMamba (8x8 tokens at 32x32) may reduce, so that some ratios are reachable and some are not
POSITIONS = [[0, 0], [1, 0], [2, 0], [2, 1]]
METHODS = ["storm_tome", "storm_evit"]
RATIOS = [0.1, 0.25]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def tiny_model():
    torch.manual_seed(0)
    spec = get_arch("vmamba")
    return spec.classifier_cls(spec.config_cls(**TINY_CONFIGS["vmamba"])).eval().set_storm(positions=POSITIONS)


@pytest.fixture
def setup(tmp_path):
    model = tiny_model()
    path = make_parquet(tmp_path / "data" / "test.parquet", random_images(9, seed=5), [i % 10 for i in range(9)])
    dataset = load_image_dataset(str(path), "test", image_processor=processor_for(model), cache_dir=str(tmp_path / "c"))
    return model, dataset


def reachable(model, method: str, ratio: float) -> bool:
    saved = model.config.storm
    try:
        model.set_storm(method=method, flops_ratio=ratio).count_flops((32, 32))
        return True
    except ValueError:
        return False
    finally:
        model.config.storm = saved


class Counting:
    """Wraps the evaluation loop: counts calls and raises KeyboardInterrupt at call `stop_at` (1-based)."""

    def __init__(self, stop_at=None):
        self.calls, self.stop_at = [], stop_at

    def __call__(self, model, dataset, batch_size, accelerator, **kwargs):
        if self.stop_at is not None and len(self.calls) + 1 == self.stop_at:
            raise KeyboardInterrupt
        self.calls.append(kwargs.get("description"))
        return evaluate_model(model, dataset, batch_size, accelerator, **kwargs)


STABLE = ("key", "method", "ratio", "status", "reason", "top1", "top5", "n_samples", "gflops", "flops_cut")


def stable(rows):
    return [{k: r.get(k) for k in STABLE} for r in rows]


def test_sweep_rows_and_infeasible_points(tmp_path, setup):
    model, dataset = setup
    before = dict(model.config.storm)
    evaluate = Counting()
    rows = run_sweep(model, dataset, METHODS, RATIOS, tmp_path / "r.jsonl", setup={"model": "tiny"}, batch_size=4,
                     evaluate_fn=evaluate, progress=False, log=lambda s: None)
    assert [r["key"] for r in rows] == ["none@0"] + [f"{m}@{r:g}" for m in METHODS for r in RATIOS]
    assert model.config.storm == before  # the model's own setting is restored
    feasible = {r["key"]: r["status"] == "ok" for r in rows}
    for row in rows[1:]:
        assert feasible[row["key"]] == reachable(model, row["method"], row["ratio"])
    assert not all(feasible.values()) and sum(feasible.values()) >= 2, feasible  # both kinds are exercised
    for row in rows:
        if row["status"] == "infeasible":
            assert "Cannot cut FLOPs" in row["reason"] and "top1" not in row
        else:
            assert {"gflops", "top1", "top5", "img_per_s", "device", "batch_size"} <= set(row)
            assert abs(row["flops_cut"] - row["ratio"]) <= 0.01 + 1e-9
    assert evaluate.calls == [k for k, ok in feasible.items() if ok]  # infeasible points never ran
    assert rows[0]["method"] == "none" and rows[0]["flops_cut"] == 0.0
    assert read_rows(tmp_path / "r.jsonl") == rows


def test_interrupted_sweep_resumes_without_losing_or_recomputing(tmp_path, setup):
    model, dataset = setup
    full = run_sweep(model, dataset, METHODS, RATIOS, tmp_path / "full.jsonl", setup={"model": "tiny"}, batch_size=4,
                     progress=False, log=lambda s: None)
    n_ok = sum(r["status"] == "ok" for r in full)
    k = 2
    path = tmp_path / "r.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(model, dataset, METHODS, RATIOS, path, setup={"model": "tiny"}, batch_size=4,
                  evaluate_fn=Counting(stop_at=k + 1), progress=False, log=lambda s: None)
    partial = read_rows(path)
    assert sum(r["status"] == "ok" for r in partial) == k
    assert stable(partial) == stable(full[: len(partial)])
    (tmp_path / ".r.jsonl.tmp-99999").write_text('{"half a row')  # debris of a write killed mid-way
    resumed = Counting()
    rows = run_sweep(model, dataset, METHODS, RATIOS, path, setup={"model": "tiny"}, batch_size=4,
                     evaluate_fn=resumed, progress=False, log=lambda s: None)
    assert len(resumed.calls) == n_ok - k  # only the missing points were evaluated
    assert stable(rows) == stable(full) and stable(read_rows(path)) == stable(full)
    again = Counting()
    run_sweep(model, dataset, METHODS, RATIOS, path, setup={"model": "tiny"}, batch_size=4, evaluate_fn=again,
              progress=False, log=lambda s: None)
    assert again.calls == []


def test_resume_refuses_another_setup_and_corrupt_files(tmp_path, setup):
    model, dataset = setup
    path = tmp_path / "r.jsonl"
    run_sweep(model, dataset, [], [], path, setup={"model": "tiny"}, batch_size=4, progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="holds results of another setup"):
        run_sweep(model, dataset, [], [], path, setup={"model": "other"}, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="holds results of another setup"):
        run_sweep(model, dataset, [], [], path, setup={"model": "tiny"}, batch_size=8, progress=False)
    path.write_text(path.read_text() + "{broken\n")
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        run_sweep(model, dataset, [], [], path, setup={"model": "tiny"}, batch_size=4, progress=False)


def test_plan_points_validates():
    assert [p.key for p in plan_points(["evit"], [0.2, 0.3])] == ["none@0", "evit@0.2", "evit@0.3"]
    assert [p.key for p in plan_points(["evit"], [0.2], include_baseline=False)] == ["evit@0.2"]
    with pytest.raises(ValueError, match="Unknown reduction method 'magic'"):
        plan_points(["magic"], [0.2])
    with pytest.raises(ValueError, match=r"flops_ratio must lie in \[0, 1\)"):
        plan_points(["evit"], [1.5])
    with pytest.raises(ValueError, match="repeat"):
        plan_points(["evit"], [0.2, 0.2])
    with pytest.raises(ValueError, match="baseline"):
        plan_points(["none"], [0.2])


def test_reference_hook_rows_are_stored_and_resumed(tmp_path, setup):
    model, dataset = setup
    calls = []

    def vit_tome(ratio):
        calls.append(ratio)
        if ratio > 0.12:
            raise ValueError("ToMe cannot reach that cut on this ViT")
        return {"gflops": 1.0 - ratio, "top1": 0.5, "top5": 0.9, "img_per_s": 10.0, "device": "cpu", "batch_size": 4}

    kwargs = dict(setup={"model": "tiny"}, batch_size=4, include_baseline=False, references={"vit_tome": vit_tome},
                  progress=False, log=lambda s: None)
    rows = run_sweep(model, dataset, [], RATIOS, tmp_path / "r.jsonl", **kwargs)
    assert [(r["key"], r["status"]) for r in rows] == [("vit_tome@0.1", "ok"), ("vit_tome@0.25", "infeasible")]
    assert rows[0]["gflops"] == 0.9 and "ToMe cannot" in rows[1]["reason"]
    run_sweep(model, dataset, [], RATIOS, tmp_path / "r.jsonl", **kwargs)
    assert calls == [0.1, 0.25]


def test_outputs_table_csv_json_and_plots(tmp_path, setup):
    model, dataset = setup
    rows = run_sweep(model, dataset, ["storm_tome"], RATIOS, tmp_path / "r.jsonl", setup={"model": "tiny"},
                     batch_size=4, progress=False, log=lambda s: None)
    out = write_outputs(rows, tmp_path / "out")
    assert json.loads(out["json"].read_text()) == rows
    with open(out["csv"]) as handle:
        table = list(csv.DictReader(handle))
    assert [t["method"] for t in table] == [r["method"] for r in rows]
    assert [t["status"] for t in table] == [r["status"] for r in rows]
    ok = [(t, r) for t, r in zip(table, rows) if r["status"] == "ok"]
    assert all(float(t["top1"]) == r["top1"] for t, r in ok)
    markdown = out["markdown"].read_text()
    assert markdown.count("\n") == len(rows) + 2 and "| storm_tome |" in markdown
    for name in ("plot_gflops", "plot_throughput"):
        assert out[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_without_matplotlib_say_how_to_get_it(tmp_path, monkeypatch):
    from storm_hf.tools.plots import plot_sweep

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"storm-hf\[plot\].*--no-plots"):
        plot_sweep([{"method": "none", "status": "ok", "top1": 0.5, "gflops": 1.0, "img_per_s": 1.0}], tmp_path)


def test_cli_sweep_writes_everything_and_resumes(tmp_path, setup, capsys):
    model, _ = setup
    folder = save_model_folder(model, tmp_path / "m")
    data = tmp_path / "data"
    args = ["sweep", "--model", str(folder), "--data", str(data), "--methods", "storm_tome", "--ratios", "0.1",
            "--storm", "positions=" + json.dumps(POSITIONS), "--batch-size", "4", "--output-dir",
            str(tmp_path / "out"), "--no-progress"]
    assert main(args) == 0
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"results.jsonl", "results.json", "results.csv", "results.md", "top1_vs_gflops.png",
            "top1_vs_throughput.png"} <= names
    rows = read_rows(tmp_path / "out" / "results.jsonl")
    assert [r["key"] for r in rows] == ["none@0", "storm_tome@0.1"] and rows[1]["status"] == "ok"
    assert "| storm_tome |" in capsys.readouterr().out
    append_row(tmp_path / "out" / "results.jsonl", {**rows[1], "key": "marker"})  # resumed, not rewritten
    assert main(args) == 0
    assert [r["key"] for r in read_rows(tmp_path / "out" / "results.jsonl")] == ["none@0", "storm_tome@0.1", "marker"]


def test_throughput_plot_keeps_one_device_only():
    from storm_hf.tools.plots import rows_of_main_device

    rows = [{"method": "none", "device": "H100"}, {"method": "tome", "device": "H100"},
            {"method": "vit_tome", "device": "cpu (2 threads)"}]
    shown, device = rows_of_main_device(rows)
    assert device == "H100" and [r["method"] for r in shown] == ["none", "tome"]


def test_snap_runs_the_nearest_reachable_ratio_and_retries_old_infeasible_points(tmp_path, setup):
    from storm_hf.tools.evaluation import nearest_feasible_ratio

    model, dataset = setup
    path = tmp_path / "r.jsonl"
    plain = run_sweep(model, dataset, METHODS, RATIOS, path, setup={"model": "tiny"}, batch_size=4,
                      progress=False, log=lambda s: None)
    infeasible = [r["key"] for r in plain if r["status"] == "infeasible"]
    assert infeasible
    evaluate = Counting()
    rows = run_sweep(model, dataset, METHODS, RATIOS, path, setup={"model": "tiny"}, batch_size=4, snap=0.1,
                     evaluate_fn=evaluate, progress=False, log=lambda s: None)
    assert sorted(evaluate.calls) == sorted(infeasible)  # only the old infeasible points were retried
    assert [r["key"] for r in rows] == [r["key"] for r in plain]  # one row per point, in the same order
    for row in rows:
        if row["key"] not in infeasible:
            assert "ratio_used" not in row
            continue
        expected = nearest_feasible_ratio(model, row["method"], row["ratio"], (32, 32), max_shift=0.1)
        if expected is None:
            assert row["status"] == "infeasible" and row["snap"] == 0.1
        else:
            assert row["status"] == "ok" and row["ratio_used"] == expected != row["ratio"]
            assert abs(row["flops_cut"] - expected) <= 0.01 + 1e-9
    assert any(r.get("ratio_used") for r in rows)
    assert read_rows(path) == rows  # the file's last row per key wins
    again = Counting()
    run_sweep(model, dataset, METHODS, RATIOS, path, setup={"model": "tiny"}, batch_size=4, snap=0.1,
              evaluate_fn=again, progress=False, log=lambda s: None)
    assert again.calls == []  # infeasible even with this snap: not retried again
