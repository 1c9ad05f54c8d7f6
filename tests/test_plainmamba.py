"""PlainMamba: parity with an independent reference on official-layout weights, converter, HF behaviour,
STORM reduction hook, FLOPs and presets."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from storm_hf import modeling_plainmamba
from storm_hf.configuration_plainmamba import PlainMambaConfig
from storm_hf.modeling_plainmamba import (
    PlainMambaForImageClassification,
    PlainMambaModel,
    default_image_processor_kwargs,
    plainmamba_flops,
    zigzag_paths,
)
from storm_hf.reduction import StormConfig, reduce_tokens
from storm_hf.tools import convert_plainmamba
from storm_hf.tools.checkpoints import CheckpointError
from storm_hf.tools.convert import convert_state_dict_to_model
from tests.references import plainmamba_reference as ref
from tests.helpers import seeded_image as _image, rel_error as _rel

REPO = Path(__file__).resolve().parents[1]
# L1-like: one extra stem conv and the layer-0 depthwise block; L2/L3-like: two stem convs, no block.
TINY_L1 = dict(embed_dims=8, num_layers=2, num_convs=1, dwconv_layers=(0,), d_state=4, stem_channels=8)
TINY_L2 = dict(embed_dims=16, num_layers=2, num_convs=2, dwconv_layers=(), d_state=3, stem_channels=8)
POS_GRID = (2, 2)  # the stored position embedding belongs to 32x32 images


def _converted(sd: dict) -> PlainMambaForImageClassification:
    config = convert_plainmamba.infer_config(sd)
    model = PlainMambaForImageClassification(config).eval()
    model.load_state_dict(convert_plainmamba.convert_state_dict(sd, config), strict=True)
    return model


@pytest.fixture(scope="module")
def tiny_sd():
    return ref.random_official_state_dict(**{**TINY_L1, "num_layers": 3}, pos_grid=POS_GRID, seed=3)


@pytest.fixture(scope="module")
def tiny_model(tiny_sd):
    return _converted(tiny_sd)


# --------------------------------------------------------------------------------------------------
# parity with the independent reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, hw",
    [("l1", (32, 32)), ("l1", (47, 33)), ("l1", (40, 56)), ("l2", (32, 32)), ("l2", (63, 41))],
    ids=["l1-square", "l1-odd", "l1-nonsquare", "l2-square", "l2-odd-nonsquare"],
)
def test_logits_match_reference(arch, hw):
    """Square (stored 2x2 grid), odd sizes (corner padding) and non-square grids (bicubic position resize);
    the L2-like file also carries EMACheckpointHook buffers, which must be ignored."""
    kwargs = TINY_L1 if arch == "l1" else dict(TINY_L2, with_ema=True)
    sd = ref.random_official_state_dict(**kwargs, pos_grid=POS_GRID, seed=1)
    model = _converted(sd)
    x = _image(2 if hw == (32, 32) else 1, 3, *hw)
    expected = ref.forward_logits(sd, x, POS_GRID)
    with torch.no_grad():
        logits = model(x).logits
    assert logits.dtype == torch.float32
    assert _rel(logits, expected) <= 1e-4


@pytest.mark.parametrize("height, width", [(1, 1), (1, 5), (4, 1), (2, 3), (3, 4), (5, 5), (6, 3)])
def test_zigzag_paths_match_the_reference_walk(height, width):
    order, inverse, direction = zigzag_paths(height, width)
    expected = ref.zigzag_orders(height, width)
    assert order.tolist() == [o for o, _, _ in expected]
    assert inverse.tolist() == [i for _, i, _ in expected]
    assert direction.tolist() == [d for _, _, d in expected]


# --------------------------------------------------------------------------------------------------
# converter
# --------------------------------------------------------------------------------------------------


def test_infer_config_recovers_the_hyperparameters():
    sd = ref.random_official_state_dict(
        embed_dims=24, num_layers=3, num_convs=2, dwconv_layers=(1,), d_state=3, expand=3, conv_size=5,
        patch_size=8, pos_grid=(3, 3), in_channels=1, num_classes=7, stem_channels=16,
    )
    assert convert_plainmamba.looks_like(sd)
    c = convert_plainmamba.infer_config(sd)
    assert (c.hidden_size, c.num_hidden_layers, c.num_stem_convs, c.layers_with_dwconv) == (24, 3, 2, [1])
    assert (c.d_state, c.expand, c.dt_rank, c.conv_size) == (3, 3, 2, 5)
    assert (c.patch_size, c.image_size, c.position_grid) == (8, [24, 24], (3, 3))
    assert (c.num_channels, c.stem_channels, c.num_labels) == (1, 16, 7)
    assert c.conv_bias and c.proj_bias
    model = PlainMambaForImageClassification(c)
    model.load_state_dict(convert_plainmamba.convert_state_dict(sd, c), strict=True)


def test_module_prefix_and_ema_buffers_are_handled():
    sd = ref.random_official_state_dict(**TINY_L2, pos_grid=POS_GRID, with_ema=True, seed=2)
    assert any(k.startswith("ema_backbone_layers_0_mamba") for k in sd)
    wrapped = {"module." + k: v for k, v in sd.items()}
    config = convert_plainmamba.infer_config(wrapped)
    converted = convert_plainmamba.convert_state_dict(wrapped, config)
    plain = {k: v for k, v in sd.items() if not k.startswith("ema_")}
    reference = convert_plainmamba.convert_state_dict(plain, config)
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[k], reference[k]) for k in reference)
    assert torch.equal(converted["plainmamba.layers.1.mixer.A_log"], sd["backbone.layers.1.mamba.A_log"])


def _vim_like(sd):
    return {"cls_token": torch.zeros(1, 1, 8), "pos_embed": torch.zeros(1, 5, 8),
            "patch_embed.proj.weight": torch.zeros(8, 3, 16, 16), "layers.0.mixer.in_proj.weight": torch.zeros(32, 8),
            "norm_f.weight": torch.zeros(8), "head.weight": torch.zeros(2, 8)}


def _vmamba_like(sd):
    return {"patch_embed.0.weight": torch.zeros(4, 3, 3, 3), "layers.0.blocks.0.op.in_proj.weight": torch.zeros(8, 8),
            "classifier.head.weight": torch.zeros(2, 8)}


def _rms_norm(sd):
    return {k: v for k, v in sd.items() if not (k.startswith("backbone.layers.") and k.endswith("norm.bias"))}


def _layer_scale(sd):
    return {**sd, "backbone.layers.0.mamba.gamma": torch.ones(8)}


def _detection(sd):
    return {**sd, "backbone.norm_layer5.weight": torch.ones(8), "backbone.norm_layer5.bias": torch.zeros(8)}


@pytest.mark.parametrize(
    "make, message",
    [(_vim_like, "not an official PlainMamba"), (_vmamba_like, "not an official PlainMamba"),
     (_rms_norm, "RMSNorm"), (_layer_scale, "layer scale"), (_detection, "dense-prediction")],
    ids=["vim", "vmamba", "rmsnorm", "layer-scale", "detection-backbone"],
)
def test_wrong_architectures_and_variants_are_rejected(make, message):
    bad = make(ref.random_official_state_dict(**TINY_L1, pos_grid=POS_GRID))
    with pytest.raises(convert_plainmamba.PlainMambaConversionError, match=message):
        convert_plainmamba.infer_config(bad)
    if message == "not an official PlainMamba":
        assert not convert_plainmamba.looks_like(bad)


def test_incomplete_or_mismatched_checkpoints_are_rejected():
    sd = ref.random_official_state_dict(**TINY_L1, pos_grid=POS_GRID)
    config = convert_plainmamba.infer_config(sd)
    truncated = {k: v for k, v in sd.items() if k != "backbone.layers.1.mamba.D"}
    with pytest.raises(ValueError, match=r"missing .*layers\.1\.mixer\.D"):
        convert_plainmamba.convert_state_dict(truncated, config)
    with pytest.raises(ValueError, match="shape mismatches"):
        convert_plainmamba.convert_state_dict(sd, PlainMambaConfig(**{**config.to_dict(), "d_state": 5}))
    with pytest.raises(convert_plainmamba.PlainMambaConversionError, match="Unexpected key"):
        convert_plainmamba.convert_state_dict({**sd, "backbone.layers.0.mamba.extra": torch.zeros(1)}, config)
    with pytest.raises(CheckpointError, match="not an official plainmamba"):
        convert_state_dict_to_model("plainmamba", _vmamba_like(sd))
    model = convert_state_dict_to_model("plainmamba", sd)  # the generic path: strict load, eval mode
    assert isinstance(model, PlainMambaForImageClassification) and not model.training


# --------------------------------------------------------------------------------------------------
# Transformers behaviour
# --------------------------------------------------------------------------------------------------


def test_outputs_hidden_states_and_loss(tiny_model):
    x = _image(2, 3, 47, 64)  # grid 3x4
    labels = torch.tensor([1, 4])
    with torch.no_grad():
        out = tiny_model(x, labels=labels, output_hidden_states=True)
        base = tiny_model.plainmamba(x)
        tup = tiny_model(x, return_dict=False)
    assert [tuple(h.shape) for h in out.hidden_states] == [(2, 8, 3, 4)] * 4
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, labels))
    assert base.last_hidden_state.shape == (2, 8, 3, 4) and base.pooler_output.shape == (2, 8)
    assert torch.allclose(base.pooler_output, base.last_hidden_state.mean(dim=(2, 3)))
    assert torch.equal(tiny_model.classifier(base.pooler_output), out.logits)
    assert torch.equal(tup[0], out.logits)


def test_training_step_reaches_every_parameter(tiny_sd):
    model = _converted(tiny_sd).train()
    out = model(_image(2, 3, 32, 40), labels=torch.tensor([0, 3]))
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@pytest.mark.parametrize(
    "shape, message",
    [((1, 3, 15, 32), "smaller than one 16-pixel patch"), ((1, 3, 32, 8), "smaller than one"),
     ((1, 1, 32, 32), "3 input channels"), ((3, 32, 32), "batch")],
)
def test_bad_inputs_raise_clear_errors(tiny_model, shape, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(torch.zeros(shape))


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="patch_size must be an even"):
        PlainMambaConfig(patch_size=15)
    with pytest.raises(ValueError, match="conv_size must be odd"):
        PlainMambaConfig(conv_size=4)
    with pytest.raises(ValueError, match="layers_with_dwconv"):
        PlainMambaConfig(num_hidden_layers=2, layers_with_dwconv=[3])


def test_init_weights_follow_the_official_recipe():
    config = PlainMambaConfig(hidden_size=16, num_hidden_layers=1, d_state=3, stem_channels=8, num_labels=3)
    model = PlainMambaForImageClassification(config)
    mixer = model.plainmamba.layers[0].mixer
    assert torch.equal(mixer.A_log, torch.log(torch.arange(1.0, 4.0)).expand(32, 3))
    assert torch.equal(mixer.D, torch.ones(32))
    dt = F.softplus(mixer.dt_proj.bias)
    assert (dt >= 1e-4 * 0.999).all() and (dt <= 0.1 * 1.001).all()
    assert mixer.dt_proj.weight.abs().max() <= config.dt_rank**-0.5
    assert 0 < model.plainmamba.embeddings.position_embeddings.std() < 0.05


def test_save_and_from_pretrained_keep_the_weights(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "storm_plainmamba"
    assert set(saved["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageClassification"}
    for name in ("modeling_plainmamba.py", "configuration_plainmamba.py", "reduction.py", "selective_scan.py",
                 "flops.py"):
        assert (tmp_path / name).is_file(), name
    loaded = PlainMambaForImageClassification.from_pretrained(tmp_path).eval()
    expected = tiny_model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())  # nothing re-initialised
    x = _image(1, 3, 40, 56)
    with torch.no_grad():
        # Weights are bit-equal; logits only up to BLAS rounding (mmapped tensors are not 64-byte aligned).
        assert torch.allclose(loaded(x).logits, tiny_model(x).logits, rtol=1e-6, atol=1e-6)
    backbone = PlainMambaModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(backbone(x).pooler_output, tiny_model.plainmamba(x).pooler_output)


def test_image_processor_follows_the_mmcls_pipeline():
    from transformers.models.convnext import ConvNextImageProcessorPil

    kwargs = default_image_processor_kwargs(PlainMambaConfig())
    processor = ConvNextImageProcessorPil(**kwargs)  # what tools/hub.py saves with every model
    # mmcls: Resize(short side 256, bicubic) -> CenterCrop(224) -> (x - mean) / std on 0..255.
    image = (torch.rand(3, 300, 400) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    out = processor(images=image, return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 3, 224, 224)
    assert math.isclose(kwargs["crop_pct"] * 256, 224)
    assert [round(m * 255, 3) for m in kwargs["image_mean"]] == [123.675, 116.28, 103.53]
    assert [round(s * 255, 3) for s in kwargs["image_std"]] == [58.395, 57.12, 57.375]


# --------------------------------------------------------------------------------------------------
# STORM reduction hook
# --------------------------------------------------------------------------------------------------

SCHEDULE = [{"stage": 0, "block": 1, "size": [5, 4]}, {"stage": 0, "block": 2, "size": [4, 3]}]
METHODS = ("storm_tome", "storm_evit", "evit", "tome", "random", "top", "mtr")


@pytest.fixture
def storm_model(tiny_model):
    yield tiny_model
    tiny_model.set_storm(method="none", schedule=None, flops_ratio=None, window=None)


def test_method_none_is_bit_identical_and_runs_no_reduction(storm_model, monkeypatch):
    x = _image(1, 3, 88, 72)
    with torch.no_grad():
        plain = storm_model(x).logits

    def boom(*args, **kwargs):
        raise AssertionError("reduction code ran with method='none'")

    monkeypatch.setattr(modeling_plainmamba, "reduce_tokens", boom)
    storm_model.set_storm(method="none", schedule=SCHEDULE)
    with torch.no_grad():
        off = storm_model(x).logits
    assert torch.equal(plain, off)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_reduces_odd_non_square_grids(storm_model, method):
    """88x72 pixels -> a 6x5 grid; layer 1 reduces to 5x4, layer 2 to 4x3; FLOPs must drop accordingly."""
    base = storm_model.count_flops((88, 72)).total
    storm_model.set_storm(method=method, schedule=SCHEDULE)
    with torch.no_grad():
        out = storm_model(_image(2, 3, 88, 72), output_hidden_states=True)
    assert [tuple(h.shape[1:]) for h in out.hidden_states] == [(8, 6, 5), (8, 6, 5), (8, 5, 4), (8, 4, 3)]
    assert out.logits.shape == (2, 5) and torch.isfinite(out.logits).all()
    reduced = storm_model.count_flops((88, 72))
    assert reduced.total < base
    assert [(b.height, b.width) for b in reduced.blocks] == [(6, 5), (6, 5), (5, 4)]


@pytest.mark.parametrize("method, window", [("storm_evit", 20), ("storm_tome", None), ("tome", None)])
def test_reduction_sits_where_storm_puts_it(tiny_sd, method, window):
    """In float64 against the reference with the same reduction injected after each reducing layer's mixer
    (before the residual add and before L1's depthwise block); the reference grid is rebuilt from scratch.
    STORM(EViT)'s PlainMamba window is 20 tokens, so the reference pins window=20 explicitly."""
    model = _converted(tiny_sd).double()
    model.set_storm(method=method, schedule=[{"stage": 0, "block": 0, "size": [5, 3]},
                                             {"stage": 0, "block": 2, "size": [3, 3]}])
    cfg = StormConfig(method=method, window=window)
    targets = {0: (5, 3), 2: (3, 3)}
    state = {"sizes": None}

    def reduce_fn(layer, x, mixed, hw):
        if layer not in targets:
            return x, mixed, hw
        bsz, _, ch = x.shape
        x4, m4, state["sizes"] = reduce_tokens(cfg, x.reshape(bsz, *hw, ch), mixed.reshape(bsz, *hw, ch),
                                               targets[layer], sizes=state["sizes"])
        new_hw = targets[layer]
        return x4.reshape(bsz, -1, ch), m4.reshape(bsz, -1, ch), new_hw

    x = _image(2, 3, 88, 72, seed=4).double()  # 6x5 grid
    expected = ref.forward_logits(tiny_sd, x, POS_GRID, reduce_fn=reduce_fn)
    with torch.no_grad():
        logits = model(x).logits
    assert _rel(logits, expected) <= 1e-7


def test_mtr_receives_the_delta_map(storm_model, monkeypatch):
    seen = {}
    real = modeling_plainmamba.reduce_tokens

    def spy(cfg, residual, branch, out_hw, **kwargs):
        seen["delta"], seen["shape"] = kwargs["extras"]["delta"], tuple(residual.shape)
        return real(cfg, residual, branch, out_hw, **kwargs)

    monkeypatch.setattr(modeling_plainmamba, "reduce_tokens", spy)
    storm_model.set_storm(method="mtr", schedule=[{"stage": 0, "block": 1, "size": [5, 4]}])
    with torch.no_grad():
        storm_model(_image(2, 3, 88, 72))
    assert seen["shape"] == (2, 6, 5, 8) and seen["delta"].shape == (2, 6, 5)
    # 4 paths share the raster Δ = softplus(dt_proj(...) + bias): the map is 4x a mean of positives.
    assert (seen["delta"] > 0).all()


def test_schedule_that_does_not_fit_the_input_is_rejected(storm_model):
    storm_model.set_storm(method="storm_evit", schedule=[{"stage": 0, "block": 1, "size": [4, 4]}])
    with pytest.raises(ValueError, match="4x4|larger"):
        storm_model(_image(1, 3, 48, 48))  # a 3x3 grid
    storm_model.set_storm(method="storm_evit", schedule=[{"stage": 0, "block": 7, "size": [2, 2]}])
    with pytest.raises(ValueError, match="does not exist"):
        storm_model(_image(1, 3, 48, 48))


def test_flops_ratio_is_solved_at_the_default_positions():
    config = PlainMambaConfig(hidden_size=32, num_hidden_layers=24, num_stem_convs=0, stem_channels=4,
                              layers_with_dwconv=[], d_state=4, num_labels=3)
    with torch.device("meta"):
        model = PlainMambaForImageClassification(config)
    assert model._default_storm_positions() == [(0, 4), (0, 10), (0, 16), (0, 22)]
    base = model.count_flops((224, 224)).total
    model.set_storm(method="storm_tome", flops_ratio=0.3)
    schedule = model.storm_schedule((224, 224))
    assert set(schedule) <= {(0, 4), (0, 10), (0, 16), (0, 22)} and schedule
    assert abs(1 - model.count_flops((224, 224)).total / base - 0.3) <= 0.01


# --------------------------------------------------------------------------------------------------
# FLOPs: the analytic count against hooks on a real forward
# --------------------------------------------------------------------------------------------------


def _hooked_flops(model: nn.Module, x: torch.Tensor, monkeypatch, convention: str) -> int:
    """Count FLOPs of one image from the modules a forward actually runs and the scans it actually calls."""
    total = [0]
    full = convention == "fvcore"

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total[0] += output.numel() * (module.in_channels // module.groups) * k
        elif isinstance(module, nn.Linear):
            if full or module is not model.classifier:
                total[0] += output.numel() * module.in_features
        elif isinstance(module, nn.LayerNorm) and full:
            total[0] += 5 * inputs[0].numel()
        elif isinstance(module, nn.BatchNorm2d) and full:
            total[0] += 2 * inputs[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    real = modeling_plainmamba.selective_scan

    def counting_scan(u, delta, A, B, C, D=None, z=None, **kwargs):
        bsz, channels, length = u.shape
        total[0] += 9 * bsz * channels * length * A.shape[1]
        if full:
            total[0] += bsz * channels * length * ((D is not None) + (z is not None))
        return real(u, delta, A, B, C, D=D, z=z, **kwargs)

    monkeypatch.setattr(modeling_plainmamba, "selective_scan", counting_scan)
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


@pytest.mark.parametrize("convention", ["fvcore", "plainmamba"])
@pytest.mark.parametrize("schedule", [None, SCHEDULE], ids=["dense", "reduced"])
def test_analytic_flops_equal_a_hooked_forward(storm_model, monkeypatch, convention, schedule):
    if schedule is not None:
        storm_model.set_storm(method="storm_evit", schedule=schedule)
    x = _image(1, 3, 88, 72)
    analytic = plainmamba_flops(storm_model.config, (88, 72), storm_model.storm_schedule((88, 72)), convention)
    assert _hooked_flops(storm_model, x, monkeypatch, convention) == analytic.total
    assert sum(analytic.parts.values()) == analytic.total


# --------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------

OFFICIAL = {  # PlainMamba README params (M, backbone only, truncated) and paper GFLOPs at 224
    "plainmamba_l1": (7.3, 3.0),
    "plainmamba_l2": (25.7, 8.1),
    "plainmamba_l3": (50.5, 14.4),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_presets_reproduce_official_params_and_flops(name):
    config = PlainMambaConfig(**json.loads((REPO / "configs" / "plainmamba" / f"{name}.json").read_text()))
    with torch.device("meta"):
        model = PlainMambaForImageClassification(config)
    params, gflops = OFFICIAL[name]
    backbone = sum(p.numel() for p in model.plainmamba.parameters())
    assert math.floor(backbone / 1e5) / 10 == params
    assert round(plainmamba_flops(config, (224, 224), convention="plainmamba").total / 1e9, 1) == gflops
    assert config.num_labels == 1000 and config.position_grid == (14, 14)


def test_reduced_flops_reproduce_storm_readme_for_l3():
    """STORM's README: PlainMamba-L3 14.44 GFLOPs, 9.74 with its `schedual_1` (layers 4/10/16/22 -> 13², 12², 10²,
    9² tokens). Both are our fvcore count without LayerNorms (STORM's counter skips them)."""
    config = PlainMambaConfig(**json.loads((REPO / "configs" / "plainmamba" / "plainmamba_l3.json").read_text()))
    schedule = {(0, 4): (13, 13), (0, 10): (12, 12), (0, 16): (10, 10), (0, 22): (9, 9)}
    for sched, gflops in ((None, 14.44), (schedule, 9.74)):
        report = plainmamba_flops(config, (224, 224), sched)
        assert round((report.total - report.parts["norm"]) / 1e9, 2) == gflops
