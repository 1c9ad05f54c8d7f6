"""CIFAR-10 training tooling: data decoding, augmentation, schedule, presets, end-to-end runs on tiny data."""
from __future__ import annotations

import copy
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from storm_hf.configuration_vmamba import VMambaConfig
from storm_hf.modeling_vmamba import VMambaForImageClassification, vmamba_flops
from storm_hf.tools import training
from storm_hf.tools.training import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    TrainingConfig,
    WarmupCosine,
    build_model,
    cifar10_image_processor,
    crop_flip,
    load_preset,
    load_split,
    normalize,
    param_groups,
    random_crop_flip,
)

REPO = Path(__file__).resolve().parents[1]
PRESETS = ("vmamba", "plainmamba", "vim", "groupmamba", "vit")

TINY_VMAMBA = {
    "arch": "vmamba",
    "model": {"image_size": 32, "patch_size": 2, "dims": [8, 16], "depths": [1, 1], "mlp_ratio": 2.0},
    "training": {"epochs": 1, "batch_size": 8, "lr": 0.01, "warmup_epochs": 0.5, "eval_batch_size": 5},
}
TINY_VIT = {
    "arch": "vit",
    "model": {"image_size": 32, "patch_size": 2, "hidden_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 32},
    "training": {"epochs": 1, "batch_size": 8, "lr": 0.01, "warmup_epochs": 0.5, "eval_batch_size": 5},
}


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps one process-wide state; each run here may pick its own mixed precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
    AcceleratorState._reset_state(reset_partial_state=True)


# --------------------------------------------------------------------------------------------------
# a tiny CIFAR-10-shaped parquet dataset (HF `datasets` layout: image = {bytes, path}, label)
# --------------------------------------------------------------------------------------------------


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _write_shard(path: Path, blobs: list[bytes], labels: list[int], image_column: str = "image") -> None:
    images = pa.array([{"bytes": b, "path": f"x/{i:04d}.img"} for i, b in enumerate(blobs)],
                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({image_column: images, "label": pa.array(labels, pa.int64())}), path)


def _smooth_images(n: int, seed: int) -> np.ndarray:
    """Low-frequency colour images (JPEG keeps them nearly intact)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:32] / 31.0
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        img = 40 + 170 * (a * x[..., None] + b * y[..., None] + c) / (a + b + c)
        out.append(img.clip(0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar10")
    train = _smooth_images(24, seed=0)
    test = _smooth_images(10, seed=1)
    train_labels = [i % 10 for i in range(24)]
    test_labels = [(3 * i) % 10 for i in range(10)]
    # Two PNG train shards (lossless, so decoding can be checked exactly) and a JPEG test split, like the real one.
    _write_shard(root / "train-00000-of-00002.parquet", [_encode(a, "PNG") for a in train[:16]], train_labels[:16])
    _write_shard(root / "train-00001-of-00002.parquet", [_encode(a, "PNG") for a in train[16:]], train_labels[16:])
    _write_shard(root / "test.parquet", [_encode(a, "JPEG") for a in test], test_labels)
    return {"dir": root, "train": train, "test": test, "train_labels": train_labels, "test_labels": test_labels}


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def test_load_split_decodes_every_shard_in_order(tiny_data):
    images, labels = load_split(tiny_data["dir"], "train")
    assert images.dtype == torch.uint8 and images.shape == (24, 3, 32, 32)
    assert labels.dtype == torch.int64 and labels.tolist() == tiny_data["train_labels"]
    assert torch.equal(images, torch.from_numpy(tiny_data["train"]).permute(0, 3, 1, 2))

    test_images, test_labels = load_split(tiny_data["dir"], "test")
    assert test_labels.tolist() == tiny_data["test_labels"]
    error = (test_images.float() - torch.from_numpy(tiny_data["test"]).permute(0, 3, 1, 2).float()).abs().mean()
    assert error < 2.0  # JPEG at quality 100 of smooth images

    # A limit keeps rows spread evenly over the split (row i * n // limit), across shard boundaries.
    some, some_labels = load_split(tiny_data["dir"], "train", limit=5)
    rows = [0, 4, 9, 14, 19]
    assert torch.equal(some, images[rows]) and some_labels.tolist() == [tiny_data["train_labels"][r] for r in rows]


def test_load_split_rejects_bad_data(tmp_path, tiny_data):
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_split(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="split"):
        load_split(tiny_data["dir"], "validation")

    small = tmp_path / "small"
    small.mkdir()
    _write_shard(small / "test.parquet", [_encode(np.zeros((16, 16, 3), np.uint8), "PNG")], [0])
    with pytest.raises(ValueError, match="32x32"):
        load_split(small, "test")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    _write_shard(corrupt / "test.parquet", [b"not an image"], [0])
    with pytest.raises(ValueError, match="not a readable image"):
        load_split(corrupt, "test")

    columns = tmp_path / "columns"
    columns.mkdir()
    _write_shard(columns / "test.parquet", [_encode(tiny_data["test"][0], "PNG")], [0], image_column="img")
    with pytest.raises(ValueError, match="'image'"):
        load_split(columns, "test")

    labels = tmp_path / "labels"
    labels.mkdir()
    _write_shard(labels / "test.parquet", [_encode(tiny_data["test"][0], "PNG")], [10])
    with pytest.raises(ValueError, match="labels"):
        load_split(labels, "test")


# --------------------------------------------------------------------------------------------------
# augmentation and normalization
# --------------------------------------------------------------------------------------------------


def _crop_flip_loop(images, top, left, flip, padding):
    """Per-image reference: paste into a zero canvas, slice the window, mirror it."""
    out = torch.empty_like(images)
    _, channels, height, width = images.shape
    for i in range(images.shape[0]):
        canvas = torch.zeros(channels, height + 2 * padding, width + 2 * padding, dtype=images.dtype)
        canvas[:, padding:padding + height, padding:padding + width] = images[i]
        window = canvas[:, int(top[i]):int(top[i]) + height, int(left[i]):int(left[i]) + width]
        out[i] = window.flip(-1) if flip[i] else window
    return out


@pytest.mark.parametrize("dtype, padding", [(torch.uint8, 4), (torch.float32, 2)])
def test_crop_flip_matches_a_per_image_loop(dtype, padding):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (7, 3, 32, 32), generator=g).to(dtype)
    top = torch.tensor([0, 2 * padding, 3, padding, 1, 0, 2 * padding])
    left = torch.tensor([2 * padding, 0, 1, padding, 2, 0, 2 * padding])
    flip = torch.tensor([True, False, True, False, True, False, True])
    out = crop_flip(images, top, left, flip, padding)
    assert out.dtype == dtype and out.shape == images.shape
    assert torch.equal(out, _crop_flip_loop(images, top, left, flip, padding))


def test_random_crop_flip_is_seeded_and_covers_every_offset():
    images = torch.randint(0, 256, (16, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    a = random_crop_flip(images, torch.Generator().manual_seed(5))
    b = random_crop_flip(images, torch.Generator().manual_seed(5))
    c = random_crop_flip(images, torch.Generator().manual_seed(6))
    assert a.dtype == torch.uint8 and a.shape == images.shape
    assert torch.equal(a, b) and not torch.equal(a, c)

    # Read the drawn offsets back from a coordinate image: pixel (r, c) holds 1 + 64 r + c (0 = padding).
    n = 2000
    coords = (1 + 64 * torch.arange(32)[:, None] + torch.arange(32)[None, :]).float()
    out = random_crop_flip(coords.expand(n, 1, 32, 32), torch.Generator().manual_seed(0))
    centre, right = out[:, 0, 16, 16] - 1, out[:, 0, 16, 17] - 1
    flipped = right < centre
    rows, cols = centre // 64, centre % 64
    tops = rows + 4 - 16
    lefts = torch.where(flipped, cols + 4 - 15, cols + 4 - 16)
    assert set(tops.long().tolist()) == set(range(9)) and set(lefts.long().tolist()) == set(range(9))
    assert 0.45 < flipped.float().mean() < 0.55


def test_normalize_matches_the_saved_image_processor():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    processed = cifar10_image_processor()(Image.fromarray(image), return_tensors="pt").pixel_values
    expected = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - torch.tensor(CIFAR10_MEAN)[:, None, None]) \
        / torch.tensor(CIFAR10_STD)[:, None, None]
    assert processed.shape == (1, 3, 32, 32)
    torch.testing.assert_close(processed[0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(normalize(torch.from_numpy(image).permute(2, 0, 1)[None])[0], expected)


# --------------------------------------------------------------------------------------------------
# optimisation pieces
# --------------------------------------------------------------------------------------------------


def test_warmup_cosine_schedule():
    schedule = WarmupCosine(total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert schedule(110) == pytest.approx(0.1) and schedule(500) == pytest.approx(0.1)
    values = [schedule(s) for s in range(10, 111)]
    assert all(x >= y for x, y in zip(values, values[1:]))
    schedule.total_steps = 60  # a time budget shortens the run: the cosine ends earlier, warm-up unchanged
    assert schedule(5) == pytest.approx(0.6) and schedule(35) == pytest.approx(0.55)
    assert schedule(60) == pytest.approx(0.1)


def test_param_groups_decay_only_weight_matrices():
    model = VMambaForImageClassification(VMambaConfig(dims=[8, 16], depths=[1, 1], num_labels=10))
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(kept) and decayed | kept == set(names.values())
    op = "vmamba.layers.0.blocks.0.op."
    assert {op + "in_proj.weight", op + "x_proj_weight", op + "dt_projs_weight", op + "conv2d.weight",
            "classifier.weight", "vmamba.patch_embed.0.weight"} <= decayed
    assert {op + "A_logs", op + "Ds", op + "dt_projs_bias", op + "out_norm.weight", "classifier.bias",
            "vmamba.norm.weight"} <= kept


def test_training_config_rejects_bad_options():
    with pytest.raises(ValueError, match="Unknown training option"):
        TrainingConfig.from_dict({"epochs": 1, "learning_rate": 1e-3})
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainingConfig.from_dict({}, mixed_precision="fp8")
    with pytest.raises(ValueError, match="positive"):
        TrainingConfig.from_dict({"epochs": 0})
    assert TrainingConfig.from_dict({"epochs": 3}, epochs=None, lr=0.5).lr == 0.5


def test_fit_epochs_to_a_time_budget():
    assert training._fit_epochs(100, elapsed_s=12, epoch_s=5, budget_s=60) == 10
    assert training._fit_epochs(8, elapsed_s=12, epoch_s=5, budget_s=600) == 8
    assert training._fit_epochs(8, elapsed_s=90, epoch_s=5, budget_s=60) == 1


# --------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------


def _first_grid(model) -> tuple[int, int]:
    if hasattr(model, "_natural_grids"):
        return tuple(model._natural_grids((32, 32))[(0, 0)])
    with torch.no_grad():
        hidden = model.vit.embeddings.patch_embeddings.projection(torch.zeros(1, 3, 32, 32))
    return tuple(hidden.shape[-2:])


@pytest.mark.parametrize("name", PRESETS)
def test_cifar10_presets_fit_the_budget(name):
    preset = load_preset(name)
    assert preset["arch"] == name
    assert {"epochs", "batch_size", "lr", "weight_decay"} <= set(preset["training"])
    model = build_model(preset)
    assert model.config.num_labels == 10 and model.config.id2label[0] == "airplane"
    assert training.count_params(model) <= 2_000_000
    assert _first_grid(model) == (16, 16)


def test_unknown_presets_and_archs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="known presets: .*vmamba"):
        load_preset("resnet")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**TINY_VMAMBA, "arch": "resnet"}))
    with pytest.raises(ValueError, match="unknown arch"):
        load_preset(bad)
    bad.write_text(json.dumps({"arch": "vmamba", "model": {}}))
    with pytest.raises(ValueError, match="'training'"):
        load_preset(bad)


# --------------------------------------------------------------------------------------------------
# VMamba's small-image stem (patch_size=2)
# --------------------------------------------------------------------------------------------------


def test_vmamba_patch_size_2_stem_is_a_stride_1_then_stride_2_conv():
    torch.manual_seed(0)
    model = VMambaForImageClassification(VMambaConfig(dims=[8, 16], depths=[1, 1], num_labels=10, patch_size=2)).eval()
    stem = model.vmamba.patch_embed
    x = torch.randn(2, 3, 32, 30)
    h = F.conv2d(x, stem[0].weight, stem[0].bias, stride=1, padding=1)
    h = F.layer_norm(h.permute(0, 2, 3, 1), (4,), stem[2].weight, stem[2].bias, 1e-5).permute(0, 3, 1, 2)
    h = F.conv2d(F.gelu(h), stem[5].weight, stem[5].bias, stride=2, padding=1)
    h = F.layer_norm(h.permute(0, 2, 3, 1), (8,), stem[7].weight, stem[7].bias, 1e-5).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    assert out.hidden_states[0].shape == (2, 8, 16, 15)
    torch.testing.assert_close(out.hidden_states[0], h, atol=1e-5, rtol=1e-5)
    assert [tuple(s.shape[-2:]) for s in out.hidden_states[1:]] == [(16, 15), (8, 8)]
    with pytest.raises(ValueError, match="too small"):
        model(torch.randn(1, 3, 1, 32))


def test_vmamba_patch_size_defaults_to_the_official_stem_and_is_validated():
    config = VMambaConfig(dims=[8, 16], depths=[1, 1])
    assert config.patch_size == 4
    model = VMambaForImageClassification(config)
    assert model.vmamba.patch_embed[0].stride == (2, 2) and model.vmamba.patch_embed[5].stride == (2, 2)
    assert model._natural_grids((32, 32))[(0, 0)] == (8, 8)
    with pytest.raises(ValueError, match="patch_size"):
        VMambaConfig(patch_size=8)


def test_vmamba_patch_size_2_flops_equal_the_real_forward(monkeypatch):
    from tests.test_flops import count_real_flops

    config = VMambaConfig(dims=[8, 16], depths=[2, 1], num_labels=10, patch_size=2)
    model = VMambaForImageClassification(config).eval()
    assert count_real_flops(model, torch.randn(1, 3, 32, 27), monkeypatch) == vmamba_flops(config, (32, 27)).total
    stem_4 = vmamba_flops(VMambaConfig(dims=[8, 16], depths=[2, 1], num_labels=10), 32).parts["stem"]
    assert vmamba_flops(config, 32).parts["stem"] > stem_4  # the first conv runs at full resolution


# --------------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------------


def _run_script(argv: list[str]) -> None:
    spec = importlib.util.spec_from_file_location("train_script", REPO / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


def _load_in_subprocess(folder: Path, tmp_path: Path, x: torch.Tensor) -> torch.Tensor:
    """Load with AutoModelForImageClassification(trust_remote_code=True) where storm_hf cannot be imported."""
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch\n"
        "sys.modules['storm_hf'] = None\n"
        "from transformers import AutoModelForImageClassification\n"
        "m = AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True).float().eval()\n"
        "with torch.no_grad(): torch.save(m(torch.load(sys.argv[2])).logits, sys.argv[3])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, env=env, cwd=tmp_path, timeout=120)
    return torch.load(tmp_path / "y.pt")


def _check_folder(folder: Path, preset: dict, history_len: int) -> None:
    from safetensors import safe_open

    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "train_log.json"} <= files
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 32} and processor["crop_pct"] == 1.0
    assert processor["image_mean"] == list(CIFAR10_MEAN) and processor["image_std"] == list(CIFAR10_STD)
    log = json.loads((folder / "train_log.json").read_text())
    assert len(log["history"]) == history_len and log["preset"] == preset
    card = (folder / "README.md").read_text()
    top1 = f"{100 * log['history'][-1]['test_accuracy']:.2f} %"
    assert top1 in card and "{" + "top1}" not in card and preset["arch"] in card


def test_vmamba_trains_end_to_end_through_the_script(tmp_path, tiny_data):
    preset_path = tmp_path / "tiny_vmamba.json"
    preset_path.write_text(json.dumps(TINY_VMAMBA))
    out = tmp_path / "tiny-vmamba-cifar10"
    _run_script([str(preset_path), "--data-dir", str(tiny_data["dir"]), "--output-dir", str(out), "--cpu",
                 "--epochs", "2"])
    _check_folder(out, TINY_VMAMBA, history_len=2)
    assert (out / "modeling_vmamba.py").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["patch_size"] == 2 and config["storm"]["method"] == "none"
    card = (out / "README.md").read_text()
    assert "scripts/train.py" in card and "--epochs 2" in card

    # The folder holds the trained weights: they moved away from the seeded init, and load where storm_hf is absent.
    torch.manual_seed(0)
    init = build_model(TINY_VMAMBA)
    from safetensors.torch import load_file

    saved = load_file(out / "model.safetensors")
    assert not torch.equal(saved["classifier.weight"].float(), init.classifier.weight.half().float())
    init.load_state_dict({k: v.float() for k, v in saved.items()})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = init.eval()(x).logits
    torch.testing.assert_close(_load_in_subprocess(out, tmp_path, x), expected, atol=1e-6, rtol=1e-6)


def test_vit_reference_trains_end_to_end_and_runs_are_seeded(tmp_path, tiny_data):
    from accelerate.state import AcceleratorState
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    result = training.train(TINY_VIT, data_dir=tiny_data["dir"], output_dir=tmp_path / "vit", cpu=True,
                            log=lambda *_: None)
    _check_folder(tmp_path / "vit", TINY_VIT, history_len=1)
    assert 0.0 <= result.test_accuracy <= 1.0 and math.isfinite(result.history[0]["train_loss"])
    assert result.history[0]["train_images_per_second"] > 0

    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "vit", trust_remote_code=True).float().eval()
    processor = AutoImageProcessor.from_pretrained(tmp_path / "vit")
    pixels = processor(Image.fromarray(tiny_data["test"][0]), return_tensors="pt").pixel_values
    rounded = copy.deepcopy(result.model).half().float().eval()  # the folder holds fp16 weights
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, rounded(pixels).logits)

    AcceleratorState._reset_state(reset_partial_state=True)
    again = training.train(TINY_VIT, data_dir=tiny_data["dir"], cpu=True, log=lambda *_: None)
    assert again.history[0]["train_loss"] == result.history[0]["train_loss"]
    for (name, a), b in zip(result.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a.float(), b.float()), name


def test_train_rejects_a_batch_larger_than_the_data(tiny_data):
    with pytest.raises(ValueError, match="batch_size 64 exceeds"):
        training.train(TINY_VIT, data_dir=tiny_data["dir"], overrides={"batch_size": 64}, cpu=True, log=lambda *_: None)


def test_time_budget_cuts_the_epochs_after_the_first(tiny_data):
    messages = []
    result = training.train(TINY_VIT, data_dir=tiny_data["dir"], overrides={"epochs": 4}, cpu=True,
                            time_budget_minutes=1e-6, log=messages.append)
    assert [r["epoch"] for r in result.history] == [1]
    assert any("training 1 epochs instead of 4" in m for m in messages)
    assert result.history[0]["train_images_per_second"] > 0 and result.history[0]["eval_seconds"] >= 0
