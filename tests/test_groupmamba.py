"""GroupMamba: parity with an independent reference on official-layout weights, HF behaviour, reduction,
FLOPs, converter and presets."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from storm_hf import modeling_groupmamba
from storm_hf.configuration_groupmamba import GroupMambaConfig
from storm_hf.modeling_groupmamba import (
    GroupMambaForImageClassification,
    merge_sequence,
    natural_grids,
    scan_sequence,
)
from storm_hf.reduction import METHODS
from storm_hf.tools import convert_groupmamba
from storm_hf.tools.checkpoints import CheckpointError
from tests.references import groupmamba_reference as ref
from tests.helpers import seeded_image as _image, rel_error as _rel

REPO = Path(__file__).resolve().parents[1]
TINY = dict(embed_dims=(16, 24, 32, 40), depths=(1, 2, 1, 1), mlp_ratios=(2, 2, 3, 2), stem_hidden_dim=8,
            num_classes=10)


def _converted(sd: dict) -> GroupMambaForImageClassification:
    config = convert_groupmamba.infer_config(sd)
    model = GroupMambaForImageClassification(config).eval()
    model.load_state_dict(convert_groupmamba.convert_state_dict(sd, config), strict=True)
    return model


@pytest.fixture(scope="module")
def tiny_sd():
    return ref.random_official_state_dict(**TINY, seed=3)


@pytest.fixture(scope="module")
def tiny_model(tiny_sd):
    return _converted(tiny_sd)


# --------------------------------------------------------------------------------------------------
# parity with the independent reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant, hw",
    [({}, (32, 32)),
     (dict(d_state=2, ssm_ratio=2.0, distillation=False, cls_mlp_ratio=3.0), (37, 29)),
     ({}, (48, 24))],
    ids=["square-32", "odd-37x29-n2-r2-nodist", "nonsquare-48x24"],
)
def test_logits_match_reference(variant, hw):
    sd = ref.random_official_state_dict(**TINY, seed=1, **variant)
    model = _converted(sd)
    x = _image(2, 3, *hw)
    expected = ref.groupmamba_reference(sd, x)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        pooled = model.groupmamba(x).pooler_output
    assert out.logits.dtype == torch.float32
    assert _rel(out.logits, expected["logits"]) <= 1e-4
    assert _rel(pooled, expected["pooled"]) <= 1e-4
    assert len(out.hidden_states) == 1 + len(expected["stages"])
    for ours, theirs in zip(out.hidden_states[1:], expected["stages"]):
        assert ours.shape == theirs.shape
        assert _rel(ours, theirs) <= 1e-4


def test_scan_orders_are_the_official_ones():
    """The reference's index lists reproduce the official CrossScan_1..4 example (H=2, W=3), and the model's
    scan/merge visit the same pixels on a non-square grid."""
    assert [ref.scan_order(k, 2, 3) for k in range(4)] == [
        [0, 1, 2, 3, 4, 5], [0, 3, 1, 4, 2, 5], [5, 4, 3, 2, 1, 0], [5, 2, 4, 1, 3, 0]]
    grid = torch.arange(15.0).view(1, 1, 3, 5)
    for k in range(4):
        seq = scan_sequence(grid, k)
        assert seq[0, 0].tolist() == [float(i) for i in ref.scan_order(k, 3, 5)]
        assert torch.equal(merge_sequence(seq, k, 3, 5), grid)


# --------------------------------------------------------------------------------------------------
# Transformers behaviour
# --------------------------------------------------------------------------------------------------


def test_outputs_hidden_states_and_loss(tiny_model):
    x = _image(2, 3, 37, 29)
    labels = torch.tensor([1, 7])
    with torch.no_grad():
        out = tiny_model(x, labels=labels, output_hidden_states=True)
        base = tiny_model.groupmamba(x)
        tup = tiny_model(x, return_dict=False)
    grids = [(10, 8), (10, 8), (5, 4), (3, 2), (2, 1)]
    widths = [16, 16, 24, 32, 40]
    assert [tuple(h.shape) for h in out.hidden_states] == [(2, c, *g) for c, g in zip(widths, grids)]
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, labels))
    assert base.last_hidden_state.shape == (2, 40, 2, 1) and base.pooler_output.shape == (2, 40)
    both = (tiny_model.classifier(base.pooler_output) + tiny_model.distillation_classifier(base.pooler_output)) / 2
    assert torch.allclose(both, out.logits, atol=1e-6)
    assert torch.equal(tup[0], out.logits)


@pytest.mark.parametrize(
    "shape, message",
    [((1, 3, 3, 32), "too small"), ((1, 3, 32, 2), "too small"), ((1, 4, 32, 32), "channels"),
     ((3, 32, 32), "4-D")],
)
def test_bad_inputs_raise_clear_errors(tiny_model, shape, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(torch.zeros(shape))


def test_config_rejects_widths_that_do_not_split_into_four_groups():
    with pytest.raises(ValueError, match="multiple of 4"):
        GroupMambaConfig(embed_dims=(16, 26), depths=(1, 1), mlp_ratios=(2, 2))
    with pytest.raises(ValueError, match="same length"):
        GroupMambaConfig(embed_dims=(16, 32), depths=(1, 1, 1), mlp_ratios=(2, 2))


def test_init_weights_follow_the_official_recipe():
    config = GroupMambaConfig(embed_dims=[16, 32], depths=[1, 1], mlp_ratios=[2, 2], d_state=3, num_labels=3)
    model = GroupMambaForImageClassification(config)
    group = model.groupmamba.stages[0].layers[0].mixer.groups[2]
    assert torch.equal(group.A_log, torch.log(torch.arange(1.0, 4.0)).expand(4, 3))
    assert torch.equal(group.D, torch.ones(4))
    dt = F.softplus(group.dt_bias)
    assert (dt >= 1e-4 * 0.999).all() and (dt <= 0.1 * 1.001).all()
    assert group.dt_proj.weight.abs().max() <= group.rank**-0.5
    assert torch.equal(model.groupmamba.stages[0].layers[0].mixer.skip_scale, torch.ones(1))


def test_save_and_load_with_auto_classes(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert set(saved["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageClassification"}
    for name in ("modeling_groupmamba.py", "configuration_groupmamba.py", "reduction.py", "selective_scan.py",
                 "flops.py"):
        assert (tmp_path / name).is_file(), name
    x = _image(1, 3, 33, 40)
    with torch.no_grad():
        expected = tiny_model(x).logits
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModel, AutoModelForImageClassification\n"
        "d = sys.argv[1]\n"
        "m = AutoModelForImageClassification.from_pretrained(d, trust_remote_code=True).eval()\n"
        "b = AutoModel.from_pretrained(d, trust_remote_code=True)\n"
        "assert type(b).__name__ == 'GroupMambaModel', type(b)\n"
        "assert 'storm_hf' not in sys.modules\n"
        "with torch.no_grad(): torch.save(m(torch.load(d + '/x.pt')).logits, d + '/y.pt')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env=env, cwd=tmp_path, timeout=120)
    remote = torch.load(tmp_path / "y.pt")
    # Weights loaded from safetensors are mmapped at unaligned addresses, and CPU BLAS rounds single-token
    # matmuls (the class-token block) differently then: exact equality holds against the same loaded weights.
    reloaded = GroupMambaForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(remote, reloaded(x).logits)
    assert _rel(remote, expected) <= 1e-6


# --------------------------------------------------------------------------------------------------
# token reduction
# --------------------------------------------------------------------------------------------------

# 37x29 -> stem 10x8; stage 0 reduces to 8x7, stage 1 (4x4) to 4x3, then ceil-halving: 2x2, 1x1.
SCHEDULE = [{"stage": 0, "block": 0, "size": [8, 7]}, {"stage": 1, "block": 1, "size": [4, 3]}]


@pytest.fixture
def storm(tiny_model):
    yield tiny_model
    tiny_model.set_storm(method="none", schedule=None, flops_ratio=None)


def test_method_none_is_bit_identical_and_runs_no_reduction(storm, monkeypatch):
    x = _image(1, 3, 32, 32)
    with torch.no_grad():
        plain = storm(x).logits

    def boom(*args, **kwargs):
        raise AssertionError("reduction code ran with method='none'")

    monkeypatch.setattr(modeling_groupmamba, "reduce_tokens", boom)
    storm.set_storm(method="none", schedule=SCHEDULE)
    with torch.no_grad():
        off = storm(x).logits
    assert torch.equal(plain, off)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_every_method_follows_the_schedule_and_cuts_flops(storm, method):
    x = _image(2, 3, 37, 29)
    full = storm.count_flops((37, 29)).total
    storm.set_storm(method=method, schedule=SCHEDULE)
    with torch.no_grad():
        out = storm(x, output_hidden_states=True)
    assert [tuple(h.shape[2:]) for h in out.hidden_states] == [(10, 8), (8, 7), (4, 3), (2, 2), (1, 1)]
    assert out.logits.shape == (2, 10) and torch.isfinite(out.logits).all()
    assert storm.count_flops((37, 29)).total < full


def test_schedule_that_does_not_fit_the_input_is_rejected(storm):
    storm.set_storm(method="storm_evit", schedule=[{"stage": 1, "block": 0, "size": [4, 4]}])
    with pytest.raises(ValueError, match="4x4|larger"):
        storm(_image(1, 3, 16, 16))  # stage 1 sees a 2x2 grid


def test_mtr_receives_the_reference_step_size_map(storm, tiny_sd, monkeypatch):
    """extras['delta'] is softplus(Δ + bias) averaged over each group's channels and summed over the four
    directions, in raster order: checked against the reference layer on the block's actual input."""
    seen = {}
    real = modeling_groupmamba.reduce_tokens

    def spy(cfg, residual, branch, out_hw, *, sizes=None, extras=None):
        seen["residual"], seen["delta"] = residual.clone(), extras["delta"]
        return real(cfg, residual, branch, out_hw, sizes=sizes, extras=extras)

    monkeypatch.setattr(modeling_groupmamba, "reduce_tokens", spy)
    storm.set_storm(method="mtr", schedule=[{"stage": 0, "block": 0, "size": [7, 6]}])
    with torch.no_grad():
        storm(_image(2, 3, 37, 29))
    b, h, w, c = seen["residual"].shape
    assert (b, h, w) == (2, 10, 8) and seen["delta"].shape == (2, 10, 8)
    _, expected = ref.group_mamba_layer(seen["residual"].double().reshape(b, h * w, c), tiny_sd,
                                        "block1.0.attn", h, w, return_delta=True)
    assert _rel(seen["delta"], expected) <= 1e-5


def test_flops_ratio_is_solved_at_odd_blocks_of_the_first_three_stages():
    config = GroupMambaConfig(**json.loads((REPO / "configs/groupmamba/groupmamba_tiny.json").read_text()))
    with torch.device("meta"):
        model = GroupMambaForImageClassification(config)
    full = model.count_flops((224, 224)).total
    model.set_storm(method="storm_tome", flops_ratio=0.3, placement="legacy")  # STORM's own odd-block rule
    schedule = model.storm_schedule((224, 224))
    assert schedule and all(s < 3 and b % 2 == 1 for s, b in schedule)
    assert abs(1 - model.count_flops((224, 224)).total / full - 0.3) <= 0.01


def test_default_placement_leaves_even_grids_before_every_downsampling():
    config = GroupMambaConfig(**json.loads((REPO / "configs/groupmamba/groupmamba_tiny.json").read_text()))
    with torch.device("meta"):
        model = GroupMambaForImageClassification(config)
    full = model.count_flops((224, 224)).total
    model.set_storm(method="storm_tome", flops_ratio=0.3)
    schedule = model.storm_schedule((224, 224))
    last_stage = len(config.depths) - 1
    exits = {s: max(b for t, b in schedule if t == s) for s, _ in schedule if s < last_stage}
    assert all(h % 2 == 0 and w % 2 == 0 for (s, b), (h, w) in schedule.items() if s < last_stage and b == exits[s])
    assert abs(1 - model.count_flops((224, 224)).total / full - 0.3) <= 0.01


def test_natural_grids_follow_the_stem_and_ceil_halving():
    config = GroupMambaConfig(embed_dims=[16, 24, 32, 40], depths=[1, 2, 1, 1], mlp_ratios=[2, 2, 2, 2])
    assert natural_grids(config, (37, 29)) == {(0, 0): (10, 8), (1, 0): (5, 4), (1, 1): (5, 4), (2, 0): (3, 2),
                                               (3, 0): (2, 1)}


# --------------------------------------------------------------------------------------------------
# FLOPs: the analytic count equals hooks on a real forward
# --------------------------------------------------------------------------------------------------


def _hooked_flops(model: nn.Module, x: torch.Tensor, monkeypatch) -> int:
    """fvcore conventions counted from the shapes a real forward sees (batch 1)."""
    total = [0]

    def conv(m, inp, out):
        total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, inp, out):
        total[0] += inp[0].numel() * m.out_features

    def layer_norm(m, inp, out):
        total[0] += 5 * inp[0].numel()

    def batch_norm(m, inp, out):
        total[0] += 2 * inp[0].numel()

    real_scan = modeling_groupmamba.selective_scan

    def counting_scan(u, delta, A, B, C, D=None, z=None, **kwargs):
        batch, channels, length = u.shape
        total[0] += 9 * batch * length * channels * A.shape[1]
        total[0] += batch * channels * length * ((D is not None) + (z is not None))
        return real_scan(u, delta, A, B, C, D=D, z=z, **kwargs)

    monkeypatch.setattr(modeling_groupmamba, "selective_scan", counting_scan)
    kinds = {nn.Conv2d: conv, nn.Linear: linear, nn.LayerNorm: layer_norm, nn.BatchNorm2d: batch_norm}
    handles = [m.register_forward_hook(kinds[type(m)]) for m in model.modules() if type(m) in kinds]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return total[0]


@pytest.mark.parametrize("schedule", [None, SCHEDULE], ids=["full", "reduced"])
def test_analytic_flops_equal_hooked_count(storm, monkeypatch, schedule):
    if schedule:
        storm.set_storm(method="storm_tome", schedule=schedule)
    assert storm.count_flops((37, 29)).total == _hooked_flops(storm, _image(1, 3, 37, 29), monkeypatch)


# --------------------------------------------------------------------------------------------------
# small-image stem (patch_size=2: the 7x7 conv has stride 1)
# --------------------------------------------------------------------------------------------------


def _small_stem(sd: dict) -> GroupMambaForImageClassification:
    """Official-layout weights in a patch_size=2 model (the stem's weights have the same shapes)."""
    config = convert_groupmamba.infer_config(sd)
    assert config.patch_size == 4  # the converter keeps the official stem
    config = GroupMambaConfig(**{**config.to_dict(), "patch_size": 2})
    model = GroupMambaForImageClassification(config).eval()
    model.load_state_dict(convert_groupmamba.convert_state_dict(sd, config), strict=True)
    return model


@pytest.mark.parametrize("hw", [(32, 32), (19, 13)], ids=["cifar-32", "odd-19x13"])
def test_patch_size_2_logits_match_reference_with_a_stride_1_stem_conv(hw):
    sd = ref.random_official_state_dict(**TINY, seed=5)
    model = _small_stem(sd)
    x = _image(2, 3, *hw)
    expected = ref.groupmamba_reference(sd, x, stem_stride=1)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    assert _rel(out.logits, expected["logits"]) <= 1e-4
    for ours, theirs in zip(out.hidden_states[1:], expected["stages"]):
        assert ours.shape == theirs.shape
        assert _rel(ours, theirs) <= 1e-4
    # the official stride would give a different network: the reference is sensitive to the stem stride
    assert _rel(out.logits, ref.groupmamba_reference(sd, x)["logits"]) > 1e-3


def test_patch_size_2_grids_are_ceil_half_the_image_and_follow_the_convs(tiny_sd):
    model = _small_stem(tiny_sd)
    # conv7x7 s1 p3 keeps 37x29; the stride-2 projection (3x3 p1) gives ceil(37/2) x ceil(29/2) = 19x15,
    # then each stride-2 downsampling halves with ceiling: 10x8, 5x4, 3x2.
    assert natural_grids(model.config, (37, 29)) == {(0, 0): (19, 15), (1, 0): (10, 8), (1, 1): (10, 8),
                                                     (2, 0): (5, 4), (3, 0): (3, 2)}
    assert natural_grids(model.config, (32, 32))[(0, 0)] == (16, 16)
    stem = model.groupmamba.embeddings
    assert stem.conv[0].stride == (1, 1) and stem.proj.stride == (2, 2)
    for hw in [(32, 32), (37, 29), (2, 3), (5, 2)]:
        with torch.no_grad():
            hidden = model(_image(1, 3, *hw), output_hidden_states=True).hidden_states
        grids = natural_grids(model.config, hw)
        firsts = [grids[(s, 0)] for s in range(model.config.num_stages)]
        assert [tuple(h.shape[2:]) for h in hidden] == [firsts[0]] + firsts
        assert firsts[0] == (-(-hw[0] // 2), -(-hw[1] // 2))


def test_patch_size_2_changes_the_too_small_limit(tiny_sd):
    model = _small_stem(tiny_sd)
    with torch.no_grad():
        model(_image(1, 3, 2, 2))  # one token per 2x2 pixels: allowed here, rejected by the official stem
    with pytest.raises(ValueError, match="too small.*2x2 pixels.*at least 2"):
        model(_image(1, 3, 1, 8))
    with pytest.raises(ValueError, match="too small.*4x4 pixels.*at least 4"):
        _converted(tiny_sd)(_image(1, 3, 2, 2))


@pytest.mark.parametrize("value", [1, 3, 8, True, "2"])
def test_config_rejects_unsupported_patch_sizes(value):
    with pytest.raises(ValueError, match="patch_size must be 4 .* or 2"):
        GroupMambaConfig(embed_dims=[16, 32], depths=[1, 1], mlp_ratios=[2, 2], patch_size=value)


def test_patch_size_defaults_to_the_official_stem_and_survives_save(tmp_path):
    assert GroupMambaConfig().patch_size == 4
    assert GroupMambaConfig().stem_stride == 2
    config = GroupMambaConfig(embed_dims=[16, 32], depths=[1, 1], mlp_ratios=[2, 2], patch_size=2)
    config.save_pretrained(tmp_path)
    assert GroupMambaConfig.from_pretrained(tmp_path).patch_size == 2


# 37x29 at patch_size=2 -> stem 19x15 reduced to 12x10; stage 1 (6x5) reduced to 5x3; then 3x2, 2x1.
SMALL_STEM_SCHEDULE = [{"stage": 0, "block": 0, "size": [12, 10]}, {"stage": 1, "block": 1, "size": [5, 3]}]


@pytest.mark.parametrize("schedule", [None, SMALL_STEM_SCHEDULE], ids=["full", "reduced"])
def test_patch_size_2_analytic_flops_equal_hooked_count(tiny_sd, monkeypatch, schedule):
    model = _small_stem(tiny_sd)
    if schedule:
        model.set_storm(method="storm_tome", schedule=schedule)
    analytic = model.count_flops((37, 29))
    assert analytic.total == _hooked_flops(model, _image(1, 3, 37, 29), monkeypatch)
    # the stem's first three convs now run at 37x29 instead of 19x15
    assert analytic.total > _converted(tiny_sd).count_flops((37, 29)).total


# --------------------------------------------------------------------------------------------------
# converter
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{}, dict(d_state=2, ssm_ratio=2.0, num_classes=7, in_chans=1),
     dict(distillation=False, cls_mlp_ratio=3.0, mlp_ratios=(4, 1.5, 2, 2))],
)
def test_infer_config_recovers_the_hyperparameters(kwargs):
    base = dict(TINY)
    base.update(kwargs)
    sd = ref.random_official_state_dict(**base)
    assert convert_groupmamba.looks_like(sd)
    config = convert_groupmamba.infer_config(sd)
    assert config.embed_dims == list(base["embed_dims"]) and config.depths == list(base["depths"])
    assert config.mlp_ratios == [float(r) for r in base["mlp_ratios"]]
    assert config.stem_hidden_dim == base["stem_hidden_dim"]
    assert config.d_state == base.get("d_state", 1) and config.ssm_ratio == base.get("ssm_ratio", 1.0)
    assert config.dt_rank == "auto" and config.d_conv == 3 and config.affinity_reduction == 16
    assert config.distillation == base.get("distillation", True)
    assert config.cls_mlp_ratio == base.get("cls_mlp_ratio")
    assert config.num_labels == base["num_classes"] and config.num_channels == base.get("in_chans", 3)
    model = GroupMambaForImageClassification(config)
    model.load_state_dict(convert_groupmamba.convert_state_dict(sd, config), strict=True)


def test_ddp_prefix_is_stripped(tiny_sd):
    wrapped = {"module." + k: v for k, v in tiny_sd.items()}
    config = convert_groupmamba.infer_config(wrapped)
    assert config.to_dict() == convert_groupmamba.infer_config(tiny_sd).to_dict()
    a = convert_groupmamba.convert_state_dict(wrapped, config)
    b = convert_groupmamba.convert_state_dict(tiny_sd, config)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _two_directions(sd):
    out = dict(sd)
    key = "block1.0.attn.mamba_g1.x_proj_weight"
    out[key] = torch.cat([sd[key], sd[key]])
    return out


def _no_gate(sd):
    out = dict(sd)
    key = "block1.0.attn.mamba_g1.in_proj.weight"
    out[key] = sd[key][: sd[key].shape[0] // 2]
    return out


VMAMBA_LIKE = {"patch_embed.0.weight": torch.zeros(8, 3, 3, 3), "layers.0.blocks.0.op.A_logs": torch.zeros(32, 1),
               "classifier.head.weight": torch.zeros(10, 64)}


@pytest.mark.parametrize(
    "make, message",
    [(lambda sd: VMAMBA_LIKE, "not an official GroupMamba"),
     (_two_directions, "not one direction"),
     (_no_gate, "z gate"),
     (lambda sd: {k: v for k, v in sd.items() if k != "block1.0.attn.mamba_g1.conv2d.bias"}, "conv bias"),
     (lambda sd: {**sd, "post_network.1.norm1.weight": torch.ones(40)}, "more than one class-token")],
    ids=["vmamba", "two-directions", "no-z-gate", "no-conv-bias", "two-class-blocks"],
)
def test_wrong_architectures_are_rejected(tiny_sd, make, message):
    with pytest.raises(CheckpointError, match=message):
        convert_groupmamba.infer_config(make(tiny_sd))


def test_not_groupmamba_is_not_recognised():
    assert not convert_groupmamba.looks_like(VMAMBA_LIKE)
    assert not convert_groupmamba.looks_like({"layers.0.mixer.in_proj.weight": torch.zeros(4, 4)})


def test_unknown_keys_and_mismatched_configs_are_rejected(tiny_sd):
    config = convert_groupmamba.infer_config(tiny_sd)
    with pytest.raises(CheckpointError, match="not part of GroupMamba"):
        convert_groupmamba.convert_state_dict({**tiny_sd, "block1.0.attn.extra": torch.zeros(1)}, config)
    deeper = GroupMambaConfig(**{**config.to_dict(), "depths": [1, 3, 1, 1]})
    with pytest.raises(CheckpointError, match="missing .*stages.1.layers.2"):
        convert_groupmamba.convert_state_dict(tiny_sd, deeper)
    wider = GroupMambaConfig(**{**config.to_dict(), "num_labels": 11})
    with pytest.raises(CheckpointError, match="shape mismatches"):
        convert_groupmamba.convert_state_dict(tiny_sd, wider)


# --------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------

# Params: README 23M / 34M / 57M; exact counts and fvcore GFLOPs at 224 from instantiating the official
# `groupmamba_{tiny,small,base}` and running fvcore on it (scan counted as 9·B·L·D·N + B·D·L, the repo's
# `flops_selective_scan_fn`). fvcore's einsum count rounds to 4 digits, hence the 1e-6 tolerance.
OFFICIAL = {
    "groupmamba_tiny": (23_361_917, 4_705_847_116),
    "groupmamba_small": (34_781_555, 7_280_967_832),
    "groupmamba_base": (57_150_838, 14_186_455_816),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_presets_reproduce_official_params_and_flops(name):
    kwargs = json.loads((REPO / "configs" / "groupmamba" / f"{name}.json").read_text())
    config = GroupMambaConfig(**kwargs)
    with torch.device("meta"):
        model = GroupMambaForImageClassification(config)
    params, flops = OFFICIAL[name]
    assert sum(p.numel() for p in model.parameters()) == params
    assert abs(model.count_flops((224, 224)).total / flops - 1) <= 1e-6
    assert config.num_labels == 1000


def test_default_image_processor_matches_the_official_eval_transform():
    kwargs = modeling_groupmamba.default_image_processor_kwargs(GroupMambaConfig())
    assert int(kwargs["size"]["shortest_edge"] / kwargs["crop_pct"]) == int(256 / 224 * 224)
    assert kwargs["resample"] == 3 and kwargs["image_mean"] == [0.485, 0.456, 0.406]
