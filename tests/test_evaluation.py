"""The top-k metric, the Accelerate evaluation loop, and the `storm-hf eval` / `storm-hf push` commands."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch

from storm_hf.tools.archs import get_arch
from storm_hf.tools.cli import main
from storm_hf.tools.data import collate_batch, load_image_dataset, processor_for
from storm_hf.tools.evaluation import DEFAULT_EVAL_LIMIT, METRIC_PATH, evaluate_model, load_metric
from storm_hf.tools.hub import save_model_folder

from .test_data import make_parquet, random_images
from .tiny_configs import TINY_CONFIGS

# a schedule the tiny VMamba (8x8 tokens at 32x32) can run: merge stage 0 down to 6x6
TINY_SCHEDULE = {"method": "storm_tome", "schedule": [{"stage": 0, "block": 0, "size": [6, 6]}]}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate's state is a process-wide singleton; each test may pick its own mixed precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    spec = get_arch("vmamba")
    return spec.classifier_cls(spec.config_cls(**TINY_CONFIGS["vmamba"])).eval()


@pytest.fixture
def tiny_data(tmp_path):
    """11 random 32x32 images with labels 0..9 (and a repeat), as a parquet file."""
    labels = [i % 10 for i in range(11)]
    return make_parquet(tmp_path / "data" / "test.parquet", random_images(11, seed=3), labels)


def hand_topk(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Plain loop: is the label among the k classes with the highest scores?"""
    hits = 0
    for row, label in zip(logits.tolist(), labels.tolist()):
        order = sorted(range(len(row)), key=lambda c: -row[c])
        hits += label in order[:k]
    return hits / len(labels)


# -- metric ------------------------------------------------------------------------------------------------


def test_metric_against_hand_computation():
    metric = load_metric()
    scores = [
        [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # label 1: top-1 hit
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 4: 5th best -> top-5 hit only
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 5: 6th best -> miss
        [0.0, 0.2, 0.1, 0.3, 0.0, 0.0],  # label 3: top-1 hit
    ]
    assert metric.compute(predictions=scores, references=[1, 4, 5, 3]) == {"top1": 0.5, "top5": 0.75}
    # batches accumulate like one call
    metric.add_batch(predictions=scores[:2], references=[1, 4])
    metric.add_batch(predictions=scores[2:], references=[5, 3])
    assert metric.compute(top_k=(1, 2, 5)) == {"top1": 0.5, "top2": 0.5, "top5": 0.75}


def test_metric_ties_count_against_and_bad_input_is_rejected():
    metric = load_metric()
    # a constant prediction never scores, whatever order a sort would visit the tied classes in
    assert metric.compute(predictions=[[1.0] * 3, [1.0] * 3], references=[0, 2]) == {"top1": 0.0, "top5": 1.0}
    assert metric.compute(predictions=[[2.0, 2.0, 1.0]], references=[1], top_k=(1, 2)) == {"top1": 0.0, "top2": 1.0}
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        metric.compute(predictions=[[0.1, 0.2, 0.3]], references=[3])
    with pytest.raises(ValueError, match="NaN"):
        metric.compute(predictions=[[float("nan"), 0.2, 0.3]], references=[0])


def test_metric_loads_offline_from_its_folder(tmp_path):
    code = (
        "import evaluate, sys\n"
        "m = evaluate.load(sys.argv[1])\n"
        "print(m.compute(predictions=[[0.0, 1.0], [1.0, 0.0]], references=[1, 1], top_k=(1,)))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", code, str(METRIC_PATH)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "{'top1': 0.5}" in result.stdout


# -- evaluation loop -----------------------------------------------------------------------------------------


def test_evaluate_model_matches_a_direct_forward(tmp_path, tiny_data):
    model = tiny_model()
    dataset = load_image_dataset(str(tiny_data), "test", image_processor=processor_for(model),
                                 cache_dir=str(tmp_path / "c"))
    result = evaluate_model(model, dataset, batch_size=4, progress=False)
    batch = collate_batch([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logits = model(batch["pixel_values"]).logits
    assert result["n_samples"] == 11
    assert result["top1"] == hand_topk(logits, batch["labels"], 1)
    assert result["top5"] == hand_topk(logits, batch["labels"], 5)
    assert result["method"] == "none" and result["ratio"] == 0.0 and result["flops_cut"] == 0.0
    assert result["gflops"] == pytest.approx(model.count_flops((32, 32)).total / 1e9)
    assert result["image_size"] == [32, 32] and result["batch_size"] == 4 and result["num_processes"] == 1
    assert result["device"].startswith("cpu") and result["img_per_s"] > 0
    assert result["mixed_precision"] == "no"


def test_evaluate_model_under_storm_reports_the_reduced_model(tmp_path, tiny_data):
    model = tiny_model().set_storm(TINY_SCHEDULE)
    dataset = load_image_dataset(str(tiny_data), "test", image_processor=processor_for(model),
                                 cache_dir=str(tmp_path / "c"))
    result = evaluate_model(model, dataset, batch_size=5, progress=False)
    batch = collate_batch([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logits = model(batch["pixel_values"]).logits
    assert result["top1"] == hand_topk(logits, batch["labels"], 1)
    assert result["top5"] == hand_topk(logits, batch["labels"], 5)
    assert result["method"] == "storm_tome" and result["ratio"] is None  # explicit schedule, no requested ratio
    assert 0 < result["gflops"] < result["gflops_unreduced"] and result["flops_cut"] > 0
    assert result["storm"]["schedule"] == TINY_SCHEDULE["schedule"]


def test_evaluate_model_bf16_autocast_runs(tmp_path, tiny_data):
    model = tiny_model()
    dataset = load_image_dataset(str(tiny_data), "test", image_processor=processor_for(model),
                                 cache_dir=str(tmp_path / "c"))
    result = evaluate_model(model, dataset, batch_size=8, mixed_precision="bf16", progress=False)
    assert result["mixed_precision"] == "bf16" and result["n_samples"] == 11
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0


def test_evaluate_model_rejects_bad_setups(tmp_path, tiny_data):
    model = tiny_model()
    cache = str(tmp_path / "c")
    dataset = load_image_dataset(str(tiny_data), "test", image_processor=processor_for(model), cache_dir=cache)
    with pytest.raises(ValueError, match="Cannot cut FLOPs"):
        evaluate_model(model.set_storm(method="storm_tome", flops_ratio=0.9), dataset, 4, progress=False)
    model.set_storm(method="none", flops_ratio=None)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        evaluate_model(model, dataset, 0, progress=False)
    raw = load_image_dataset(str(tiny_data), "test", cache_dir=cache)
    with pytest.raises(ValueError, match="no pixel_values"):
        evaluate_model(model, raw, 4, progress=False)
    many = make_parquet(tmp_path / "many.parquet", random_images(3, seed=1), [0, 12, 1])
    dataset = load_image_dataset(str(many), "test", image_processor=processor_for(model), cache_dir=cache)
    with pytest.raises(ValueError, match="label 12 but the model has 10 classes"):
        evaluate_model(model, dataset, 4, progress=False)


# -- storm-hf eval --------------------------------------------------------------------------------------------


def test_cli_eval_folder_baseline_and_storm(tmp_path, tiny_data, capsys):
    model = tiny_model()
    folder = save_model_folder(model, tmp_path / "model")
    out = tmp_path / "out" / "eval.json"
    code = main(["eval", "--model", str(folder), "--data", str(tiny_data.parent), "--batch-size", "4",
                 "--baseline", "--storm", "method=storm_tome", "--storm",
                 "schedule=" + json.dumps(TINY_SCHEDULE["schedule"]), "--no-progress", "--output", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "storm_tome"]
    assert all(r["n_samples"] == 11 for r in rows)
    assert rows[1]["gflops"] < rows[0]["gflops"]
    # the folder's weights were loaded: the unreduced row equals evaluating the in-memory model
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    dataset = load_image_dataset(str(tiny_data), "test", image_processor=processor_for(model, str(folder)),
                                 cache_dir=str(tmp_path / "c"))
    direct = evaluate_model(model, dataset, 4, progress=False)
    assert (rows[0]["top1"], rows[0]["top5"]) == (direct["top1"], direct["top5"])
    table = capsys.readouterr().out
    assert "| none |" in table and "| storm_tome |" in table


def test_cli_eval_without_arguments_needs_the_default_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STORM_HF_EVAL_CHECKPOINT", str(tmp_path / "missing"))
    assert main(["eval"]) == 2
    err = capsys.readouterr().err
    assert "No default checkpoint" in err and "STORM_HF_EVAL_CHECKPOINT" in err and "--model" in err


def test_cli_eval_without_arguments_compares_unreduced_and_default_storm(tmp_path, tiny_data, monkeypatch, capsys):
    folder = save_model_folder(tiny_model(), tmp_path / "ckpt")
    monkeypatch.setenv("STORM_HF_EVAL_CHECKPOINT", str(folder))
    monkeypatch.setenv("STORM_HF_CIFAR10", str(tiny_data.parent))
    out = tmp_path / "demo.json"
    assert main(["eval", "--no-progress", "--output", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["limit"] == DEFAULT_EVAL_LIMIT and payload["data"] == str(tiny_data.parent)
    rows = payload["rows"]
    assert rows[0]["method"] == "none"
    printed = capsys.readouterr().out
    assert len(rows) == 2 and rows[1]["method"] == "storm_tome" and abs(rows[1]["ratio"] - 0.3) <= 0.1
    assert "storm_tome" in printed


# -- storm-hf push --------------------------------------------------------------------------------------------

LOADER = textwrap.dedent(
    """
    import sys
    sys.modules["storm_hf"] = None  # the pushed files must be enough
    sys.path = [p for p in sys.path if not p.rstrip("/").endswith("src")]
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    model = AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert "storm_hf" not in type(model).__module__
    processor = AutoImageProcessor.from_pretrained(sys.argv[1])
    with torch.no_grad():
        logits = model(torch.load(sys.argv[2])).logits
    torch.save({"logits": logits, "crop_pct": processor.crop_pct}, sys.argv[3])
    """
)


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi in `hub.push_folder`: records the repo and the uploaded folder."""

    uploads: dict = {}

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        FakeHfApi.uploads["repo"] = (repo_id, private, exist_ok)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, **kwargs):
        root = Path(folder_path)
        FakeHfApi.uploads["files"] = {p.relative_to(root).as_posix(): p.read_bytes()
                                      for p in root.rglob("*") if p.is_file()}
        return mock.MagicMock(oid="b" * 40)


def test_cli_push_then_offline_load_by_repo_id(tmp_path, capsys):
    model = tiny_model(seed=4)
    folder = save_model_folder(model, tmp_path / "tiny")
    with mock.patch("huggingface_hub.HfApi", FakeHfApi):
        assert main(["push", str(folder), "--repo", "acme/storm-tiny", "--private"]) == 0
    assert "https://huggingface.co/acme/storm-tiny" in capsys.readouterr().out
    assert FakeHfApi.uploads["repo"] == ("acme/storm-tiny", True, True)
    files = FakeHfApi.uploads["files"]
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "modeling_vmamba.py",
            "reduction.py", "selective_scan.py"} <= set(files)

    repo = tmp_path / "hf_home" / "hub" / "models--acme--storm-tiny"
    snapshot = repo / "snapshots" / ("b" * 40)
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)

    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values).logits
    torch.save(pixel_values, tmp_path / "x.pt")
    (tmp_path / "loader.py").write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")})
    result = subprocess.run([sys.executable, str(tmp_path / "loader.py"), "acme/storm-tiny", str(tmp_path / "x.pt"),
                             str(tmp_path / "y.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    got = torch.load(tmp_path / "y.pt")
    assert torch.equal(got["logits"], expected)
    assert got["crop_pct"] == 0.875


def test_cli_push_incomplete_folder_fails_clearly(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with mock.patch("huggingface_hub.HfApi", FakeHfApi):
        assert main(["push", str(tmp_path / "half"), "--repo", "acme/x"]) == 2
        assert main(["push", str(tmp_path / "nope"), "--repo", "acme/x"]) == 2
    err = capsys.readouterr().err
    assert "not a complete storm-hf model folder" in err and "model.safetensors" in err
    assert "is not a folder" in err


def test_nearest_feasible_ratio_restores_the_model():
    from storm_hf.tools.evaluation import nearest_feasible_ratio

    positions = [[0, 0], [1, 0], [2, 0], [2, 1]]
    model = tiny_model().set_storm(positions=positions)
    before = dict(model.config.storm)
    assert nearest_feasible_ratio(model, "storm_tome", 0.1, (32, 32)) == 0.1
    with pytest.raises(ValueError, match="Cannot cut FLOPs"):
        model.set_storm(method="storm_tome", flops_ratio=0.25).count_flops((32, 32))
    model.set_storm(before)
    ratio = nearest_feasible_ratio(model, "storm_tome", 0.25, (32, 32))
    assert ratio is not None and ratio != 0.25 and abs(ratio - 0.25) <= 0.1 + 1e-9
    assert model.config.storm == before
    model.set_storm(method="storm_tome", flops_ratio=ratio).count_flops((32, 32))  # reachable indeed


def test_cli_eval_rejects_foreign_and_corrupt_model_folders(tmp_path, tiny_data, capsys):
    from transformers import ViTConfig

    ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=16).save_pretrained(tmp_path / "vit")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text("{not json")
    for name in ("vit", "corrupt"):
        assert main(["eval", "--model", str(tmp_path / name), "--data", str(tiny_data), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds a 'vit' model, not a storm-hf backbone" in err
    assert "Could not read the model config" in err
