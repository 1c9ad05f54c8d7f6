"""Vim: parity with the official forward, conversion, input errors, presets, FLOPs and token reduction.

Parity is checked against tests/references/vim_reference.py, a float64 transcription of the official
VisionMamba / bimamba-v2 fast path working on OFFICIAL-layout state dicts (it never imports storm_hf).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import storm_hf.modeling_vim as modeling_vim
from storm_hf.configuration_vim import VimConfig
from storm_hf.modeling_vim import VimForImageClassification, vim_flops
from storm_hf.tools.convert_vim import VimConversionError, convert_state_dict, infer_config, looks_like
from tests.references.vim_reference import random_official_state_dict, vim_reference
from tests.helpers import rel_error as _rel

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "vim"

# (image height, width), patch, stride: square, odd with a truncated border, non-square with overlapping patches
CASES = {
    "square": ((24, 24), 8, 8),
    "odd": ((27, 35), 8, 6),
    "non_square": ((20, 30), 6, 4),
}


def _grid(size, patch, stride):
    return tuple((s - patch) // stride + 1 for s in size)


def _official(size, patch, stride, *, dim=16, depth=2, d_state=4, seed=0):
    rows, cols = _grid(size, patch, stride)
    return random_official_state_dict(dim=dim, depth=depth, d_state=d_state, patch_size=patch,
                                      num_patches=rows * cols, num_classes=5, seed=seed)


def _converted(sd, size, stride, **config_kwargs):
    config = infer_config(sd, image_size=size, stride=stride, **config_kwargs)
    model = VimForImageClassification(config).eval()
    model.load_state_dict(convert_state_dict(sd, config), strict=True)
    return model


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_official_reference(case):
    size, patch, stride = CASES[case]
    sd = _official(size, patch, stride)
    model = _converted(sd, size, stride)
    pixel_values = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    ref = vim_reference(sd, pixel_values, patch_size=patch, stride=stride)
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True)
        base = model.vim(pixel_values)
    assert _rel(out.logits, ref["logits"]) <= 1e-4
    assert _rel(base.pooler_output, ref["cls"]) <= 1e-4
    rows, cols = _grid(size, patch, stride)
    mid = rows * cols // 2
    patches = torch.cat([ref["tokens"][:, :mid], ref["tokens"][:, mid + 1:]], dim=1)
    expected_map = patches.reshape(2, rows, cols, -1).permute(0, 3, 1, 2)
    assert _rel(base.last_hidden_state, expected_map) <= 1e-4
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (2, 16, rows, cols) for h in out.hidden_states)


def test_backward_direction_and_divide_are_used():
    """The official slow path drops the `_b` parameters; ours must not (and must halve the sum)."""
    size, patch, stride = CASES["odd"]
    sd = _official(size, patch, stride)
    pixel_values = torch.randn(1, 3, *size)
    model = _converted(sd, size, stride)
    with torch.no_grad():
        before = model(pixel_values).logits
        model.vim.layers[1].mixer.scan_backward.D.add_(1.0)
        after = model(pixel_values).logits
    assert _rel(after, before) > 1e-3
    undivided = _converted(sd, size, stride, divide_output=False)
    ref = vim_reference(sd, pixel_values, patch_size=patch, stride=stride, divide_out=False)
    with torch.no_grad():
        assert _rel(undivided(pixel_values).logits, ref["logits"]) <= 1e-4


# ---------------------------------------------------------------------------------------------- conversion


def test_infer_config_recovers_hyperparameters():
    sd = random_official_state_dict(dim=40, depth=3, d_state=6, expand=3, d_conv=3, patch_size=5,
                                    num_patches=4 * 7, num_classes=11)
    config = infer_config(sd, image_size=(20, 35))
    assert (config.hidden_size, config.num_hidden_layers, config.d_state) == (40, 3, 6)
    assert (config.expand, config.d_conv) == (3, 3)
    assert (config.dt_rank, config.patch_size, config.stride, config.num_labels) == (3, 5, 5, 11)
    assert config.grid_size == (4, 7)


@pytest.mark.parametrize("num_patches,stride", [(196, 16), (729, 8)])
def test_infer_config_released_layouts(num_patches, stride):
    """Released models: 224x224, stride 16 (14x14) or the stride-8 '+' fine-tunes (27x27)."""
    sd = random_official_state_dict(dim=16, depth=1, d_state=2, patch_size=16, num_patches=num_patches, num_classes=3)
    config = infer_config(sd)
    assert config.image_size == [224, 224] and config.stride == stride and config.num_patches == num_patches


def test_converter_rejects_wrong_checkpoints():
    size, patch, stride = CASES["square"]
    sd = _official(size, patch, stride, depth=1)
    plainmamba_like = {"backbone." + k.replace("mixer", "mamba"): v for k, v in sd.items()}
    assert looks_like(sd) and looks_like({"module." + k: v for k, v in sd.items()})
    assert not looks_like(plainmamba_like)
    with pytest.raises(VimConversionError, match="Not an official Vim checkpoint"):
        infer_config(plainmamba_like)
    unidirectional = {k: v for k, v in sd.items() if not any(s in k for s in ("_b.", "_b_log", "D_b"))}
    with pytest.raises(VimConversionError, match="bimamba v2"):
        infer_config(unidirectional, image_size=size)
    with pytest.raises(VimConversionError, match="classification head"):
        infer_config({k: v for k, v in sd.items() if not k.startswith("head.")}, image_size=size)
    config = infer_config(sd, image_size=size, stride=stride)
    with pytest.raises(VimConversionError, match="Unexpected keys"):
        convert_state_dict({**sd, "layers.0.mixer.mystery": torch.zeros(1)}, config)
    other = VimConfig(image_size=32, patch_size=8, stride=8, hidden_size=24, num_hidden_layers=1, d_state=4,
                      num_labels=5)
    with pytest.raises(VimConversionError, match="position embedding"):
        convert_state_dict(sd, other)
    non_square = random_official_state_dict(dim=16, depth=1, d_state=2, patch_size=16, num_patches=14 * 15,
                                            num_classes=3)
    with pytest.raises(VimConversionError, match="image_size"):
        infer_config(non_square)


# ---------------------------------------------------------------------------------------------- errors


def _tiny_config(**kwargs) -> VimConfig:
    base = dict(image_size=(27, 35), patch_size=8, stride=6, hidden_size=16, num_hidden_layers=4, d_state=2,
                num_labels=5)
    return VimConfig(**{**base, **kwargs})


def test_bad_inputs_raise_clear_errors():
    model = VimForImageClassification(_tiny_config()).eval()
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 27, 35))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 1, 27, 35))
    with pytest.raises(ValueError, match="accepts only that size"):
        model(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="smaller than patch_size"):
        VimConfig(image_size=7, patch_size=8)
    with pytest.raises(ValueError, match="positive integer"):
        VimConfig(hidden_size=0)


def test_labels_give_cross_entropy_loss():
    model = VimForImageClassification(_tiny_config()).eval()
    labels = torch.tensor([1, 4])
    out = model(torch.randn(2, 3, 27, 35), labels=labels)
    assert torch.allclose(out.loss, nn.functional.cross_entropy(out.logits, labels))


# ---------------------------------------------------------------------------------------------- presets


# name: (params in M computed from the official module definitions; README rounding), GFLOPs one direction
# (Vim-Ti 1.45 / S 5.08 / B 18.87 as quoted by ToP, R-MeeTo, AMVim), GFLOPs both directions.
PRESETS = {
    "vim_tiny": (7.148, 7, 1.45, 1.82),
    "vim_tiny_stride8": (7.250, 7, 5.37, 6.75),
    "vim_small": (25.797, 26, 5.08, 5.91),
    "vim_small_stride8": (26.001, 26, 18.81, 21.91),
    "vim_base": (97.598, 98, 18.87, 20.89),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_match_official_params_and_flops(name):
    params_m, readme_m, one_dir, both_dir = PRESETS[name]
    config = VimConfig(**json.loads((CONFIGS / f"{name}.json").read_text()))
    with torch.device("meta"):
        model = VimForImageClassification(config)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / 1e6 - params_m) < 1e-3 and round(params / 1e6) == readme_m
    report = vim_flops(config)
    assert abs(report.gflops_one_direction - one_dir) < 0.005
    assert abs(report.gflops - both_dir) < 0.005


# ---------------------------------------------------------------------------------------------- FLOPs


def _hook_count(model: nn.Module, pixel_values: torch.Tensor, monkeypatch) -> int:
    """fvcore-style count of a real forward: convs and linears by hooks, scans where they are called."""
    total = 0

    def conv_hook(module, inputs, output):
        nonlocal total
        total += output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    def linear_hook(module, inputs, output):
        nonlocal total
        total += output.numel() * module.in_features

    original = modeling_vim.selective_scan

    def counting_scan(u, delta, A, B, C, D=None, z=None, **kwargs):
        nonlocal total
        batch, channels, length = u.shape
        total += 9 * batch * length * channels * A.shape[1]
        total += batch * channels * length * ((D is not None) + (z is not None))
        return original(u, delta, A, B, C, D=D, z=z, **kwargs)

    monkeypatch.setattr(modeling_vim, "selective_scan", counting_scan)
    handles = []
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    with torch.no_grad():
        model(pixel_values)
    for handle in handles:
        handle.remove()
    monkeypatch.setattr(modeling_vim, "selective_scan", original)
    return total


def test_flops_match_hook_count(monkeypatch):
    model = VimForImageClassification(_tiny_config()).eval()
    counted = _hook_count(model, torch.randn(1, 3, 27, 35), monkeypatch)
    report = model.count_flops((27, 35))
    assert counted == report.total == vim_flops(model.config).total
    assert report.total_one_direction < report.total


# ---------------------------------------------------------------------------------------------- reduction

METHODS = ("storm_tome", "storm_evit", "evit", "tome", "random", "top", "mtr")
# image size, patch, stride -> patch grid: 6x9 (odd, non-square) and 5x5 (odd, square)
REDUCTION_INPUTS = {"6x9": ((31, 47), 6, 5), "5x5": ((29, 29), 6, 5)}


def _reduction_model(size, patch, stride, **storm) -> VimForImageClassification:
    torch.manual_seed(0)
    config = VimConfig(image_size=size, patch_size=patch, stride=stride, hidden_size=16, num_hidden_layers=3,
                       d_state=2, num_labels=5, storm=storm or None)
    return VimForImageClassification(config).eval()


@pytest.mark.parametrize("grid_name", sorted(REDUCTION_INPUTS))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_reduces_grid_and_flops(method, grid_name, monkeypatch):
    size, patch, stride = REDUCTION_INPUTS[grid_name]
    rows, cols = _grid(size, patch, stride)
    first, second = (rows - 1, cols - 1), (rows - 2, cols - 2)
    schedule = [{"stage": 0, "block": 0, "size": list(first)}, {"stage": 0, "block": 1, "size": list(second)}]
    model = _reduction_model(size, patch, stride, method=method, schedule=schedule)
    pixel_values = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True)
    grids = [tuple(h.shape[2:]) for h in out.hidden_states]
    assert grids == [(rows, cols), first, second, second]
    assert out.logits.shape == (2, 5) and torch.isfinite(out.logits).all()
    reduced = model.count_flops(size)
    unreduced = vim_flops(model.config, size)
    assert reduced.total < unreduced.total and reduced.total_one_direction < unreduced.total_one_direction
    assert _hook_count(model, pixel_values[:1], monkeypatch) == reduced.total


def test_disabled_or_identity_reduction_is_bit_identical():
    size, patch, stride = REDUCTION_INPUTS["6x9"]
    rows, cols = _grid(size, patch, stride)
    pixel_values = torch.randn(2, 3, *size)
    with torch.no_grad():
        base = _reduction_model(size, patch, stride)(pixel_values).logits
        no_schedule = _reduction_model(size, patch, stride, method="storm_tome")(pixel_values).logits
        identity = _reduction_model(size, patch, stride, method="storm_tome",
                                    schedule=[{"stage": 0, "block": 1, "size": [rows, cols]}])(pixel_values).logits
    assert torch.equal(base, no_schedule) and torch.equal(base, identity)


def test_reduction_plumbing_matches_reference(monkeypatch):
    """Both residual and mixer output lose the same tokens, the class token goes back to the middle, later
    layers and the readout run on the new sequence: compared with the reference's pruning (explicit indices)."""
    size, patch, stride = CASES["odd"]  # 4x5 patch grid
    rows, cols = _grid(size, patch, stride)
    keep_rows, keep_cols = [0, 2, 3], [1, 2, 4]
    sd = _official(size, patch, stride)
    model = _converted(sd, size, stride)
    model.set_storm(method="random", schedule=[{"stage": 0, "block": 0, "size": [3, 3]}])

    def crop(cfg, residual, branch, out_hw, sizes=None, extras=None, window_defaults=None):
        assert tuple(residual.shape[1:3]) == (rows, cols) and tuple(out_hw) == (3, 3)
        pick = lambda t: t[:, keep_rows][:, :, keep_cols]  # noqa: E731
        return pick(residual), pick(branch), sizes

    monkeypatch.setattr(modeling_vim, "reduce_tokens", crop)
    pixel_values = torch.randn(2, 3, *size)
    kept = [r * cols + c for r in keep_rows for c in keep_cols]
    ref = vim_reference(sd, pixel_values, patch_size=patch, stride=stride, keep={0: kept})
    with torch.no_grad():
        assert _rel(model(pixel_values).logits, ref["logits"]) <= 1e-4


@pytest.mark.parametrize("method,extra,signal", [("mtr", "delta", "delta"), ("top", "branch", "scan_backward")])
def test_methods_get_their_planning_signal(method, extra, signal, monkeypatch):
    """MTR plans from Δ of both directions; ToP from the backward direction's SSM output (in image order)."""
    size, patch, stride = CASES["odd"]
    rows, cols = _grid(size, patch, stride)
    sd = _official(size, patch, stride)
    model = _converted(sd, size, stride)
    model.set_storm(method=method, schedule=[{"stage": 0, "block": 1, "size": [3, 4]}])
    seen = {}
    original = modeling_vim.reduce_tokens

    def spy(cfg, residual, branch, out_hw, **kwargs):
        seen[extra] = kwargs["extras"][extra]
        return original(cfg, residual, branch, out_hw, **kwargs)

    monkeypatch.setattr(modeling_vim, "reduce_tokens", spy)
    pixel_values = torch.randn(1, 3, *size)
    with torch.no_grad():
        model(pixel_values)
    full = vim_reference(sd, pixel_values, patch_size=patch, stride=stride)["signals"][1][signal]
    mid = rows * cols // 2
    expected = torch.cat([full[:, :mid], full[:, mid + 1:]], dim=1).reshape(1, rows, cols, *full.shape[2:])
    assert _rel(seen[extra], expected) <= 1e-4


def test_flops_ratio_solves_at_default_positions():
    config = VimConfig(**json.loads((CONFIGS / "vim_small.json").read_text()),
                       storm={"method": "storm_tome", "flops_ratio": 0.3})
    with torch.device("meta"):
        model = VimForImageClassification(config)
    schedule = model.storm_schedule((224, 224))
    assert set(schedule) <= {(0, 4), (0, 10), (0, 16), (0, 22)} and schedule
    cut = 1 - model.count_flops().total / vim_flops(config).total
    assert abs(cut - 0.3) <= 0.01


# ---------------------------------------------------------------------------------------------- preprocessing


def _official_eval_transform(image):
    """vim/datasets.py build_transform(is_train=False), written with PIL: Resize(int(224 / 0.875), bicubic)
    on the short side (torchvision's int() for the long side), CenterCrop(224) (torchvision's rounding),
    ToTensor, Normalize(ImageNet default)."""
    from PIL import Image

    w, h = image.size
    nw, nh = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    image = image.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - 224) / 2.0)), int(round((nw - 224) / 2.0))
    image = image.crop((left, top, left + 224, top + 224))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (x - mean) / std


def test_image_processor_matches_official_eval_transform():
    from PIL import Image
    from transformers.models.convnext import ConvNextImageProcessorPil

    processor = ConvNextImageProcessorPil(**modeling_vim.default_image_processor_kwargs(VimConfig()))
    generator = torch.Generator().manual_seed(0)
    for height, width in [(300, 400), (500, 333)]:
        pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8)
        image = Image.fromarray(pixels.numpy())
        got = processor(image, return_tensors="pt").pixel_values[0]
        assert torch.allclose(got, _official_eval_transform(image), atol=1e-5)
