"""VMamba v2: parity with an independent reference on official-layout weights, HF behaviour, converter."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from storm_hf import modeling_vmamba
from storm_hf.configuration_vmamba import VMambaConfig
from storm_hf.modeling_vmamba import VMambaForImageClassification, natural_grids
from storm_hf.tools import convert_vmamba
from tests.references import vmamba_reference as ref
from tests.helpers import seeded_image as _image, rel_error as _rel

REPO = Path(__file__).resolve().parents[1]
TINY = dict(dims=(8, 16, 32, 64), depths=(1, 1, 2, 1), num_classes=10)


def _converted(sd: dict) -> VMambaForImageClassification:
    config = convert_vmamba.infer_config(sd)
    model = VMambaForImageClassification(config).eval()
    model.load_state_dict(convert_vmamba.convert_state_dict(sd, config), strict=True)
    return model


@pytest.fixture(scope="module")
def tiny_model():
    return _converted(ref.random_state_dict(**TINY, seed=3))


# --------------------------------------------------------------------------------------------------
# parity with the independent reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ssm_ratio, d_state, hw",
    [(1.0, 1, (32, 32)), (2.0, 2, (33, 47)), (2.0, 1, (31, 20))],
    ids=["s1-n1-32x32", "s2-n2-33x47", "s2-n1-31x20"],
)
def test_logits_match_reference(ssm_ratio, d_state, hw):
    sd = ref.random_state_dict(**TINY, ssm_ratio=ssm_ratio, d_state=d_state, seed=1)
    model = _converted(sd)
    x = _image(1, 3, *hw)
    expected, stages = ref.forward(sd, x, return_stages=True)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    assert out.logits.dtype == torch.float32
    assert _rel(out.logits, expected) <= 1e-4
    for ours, theirs in zip(out.hidden_states[1:], stages):
        assert ours.shape == theirs.shape
        assert _rel(ours, theirs) <= 1e-4


def test_ss2d_matches_reference_with_conv_bias_and_explicit_rank():
    """Odd grid, conv bias, fixed dt rank and N=3: one SS2D against the reference directly."""
    sd = ref.random_state_dict(dims=(8, 16), depths=(1, 1), ssm_ratio=1.5, d_state=3, dt_rank=3,
                               conv_bias=True, num_classes=4, seed=7)
    model = _converted(sd)
    assert model.config.dt_rank == 3 and model.config.ssm_conv_bias
    op = model.vmamba.layers[1].blocks[0].op
    x = _image(2, 16, 3, 5, seed=2)  # channels-first, as the reference takes it
    expected = ref.ss2d(sd, "layers.1.blocks.0.op.", x.double(), d_state=3)
    with torch.no_grad():
        ours, delta = op(x.permute(0, 2, 3, 1), return_delta=True)
    assert _rel(ours.permute(0, 3, 1, 2), expected) <= 1e-4
    assert _rel(delta, ref.delta_map(sd, "layers.1.blocks.0.op.", x.double())) <= 1e-5


def test_scan_orders_of_the_reference_are_the_official_ones():
    """The official example (H=2, W=3, grid [[0,1,2],[3,4,5]]) from MzeroMiko/VMamba's cross-scan."""
    assert ref.scan_orders(2, 3) == [[0, 1, 2, 3, 4, 5], [0, 3, 1, 4, 2, 5], [5, 4, 3, 2, 1, 0], [5, 2, 4, 1, 3, 0]]
    x = torch.arange(6.0).view(1, 1, 2, 3)
    xs = modeling_vmamba.cross_scan(x)
    assert xs[0, :, 0].tolist() == [[0, 1, 2, 3, 4, 5], [0, 3, 1, 4, 2, 5], [5, 4, 3, 2, 1, 0], [5, 2, 4, 1, 3, 0]]
    assert torch.equal(modeling_vmamba.cross_merge(xs, 2, 3)[..., 0], 4 * x[:, 0])


# --------------------------------------------------------------------------------------------------
# Transformers behaviour
# --------------------------------------------------------------------------------------------------


def test_outputs_hidden_states_and_loss(tiny_model):
    x = _image(2, 3, 33, 47)
    labels = torch.tensor([1, 7])
    with torch.no_grad():
        out = tiny_model(x, labels=labels, output_hidden_states=True)
    grids = [(9, 12), (9, 12), (5, 6), (3, 3), (2, 2)]
    widths = [8, 8, 16, 32, 64]
    assert [tuple(h.shape) for h in out.hidden_states] == [(2, c, *g) for c, g in zip(widths, grids)]
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, labels))
    with torch.no_grad():
        base = tiny_model.vmamba(x)
        tup = tiny_model(x, return_dict=False)
    assert base.last_hidden_state.shape == (2, 64, 2, 2) and base.pooler_output.shape == (2, 64)
    assert torch.equal(tiny_model.classifier(base.pooler_output), out.logits)
    assert torch.equal(tup[0], out.logits)


@pytest.mark.parametrize(
    "shape, message",
    [((1, 3, 3, 32), "too small"), ((1, 3, 32, 2), "too small"), ((1, 4, 32, 32), "channels"),
     ((3, 32, 32), "4-D")],
)
def test_bad_inputs_raise_clear_errors(tiny_model, shape, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(torch.zeros(shape))


def test_method_none_is_bit_identical_and_runs_no_reduction(tiny_model, monkeypatch):
    x = _image(1, 3, 32, 32)
    with torch.no_grad():
        plain = tiny_model(x).logits

    def boom(*args, **kwargs):
        raise AssertionError("reduction code ran with method='none'")

    monkeypatch.setattr(modeling_vmamba, "reduce_tokens", boom)
    tiny_model.set_storm(method="none", schedule=[{"stage": 0, "block": 0, "size": [4, 4]}])
    try:
        with torch.no_grad():
            off = tiny_model(x).logits
    finally:
        tiny_model.set_storm(method="none", schedule=None)
    assert torch.equal(plain, off)


def test_reduced_forward_follows_the_schedule(tiny_model):
    tiny_model.set_storm(method="storm_tome", schedule=[{"stage": 0, "block": 0, "size": [6, 5]}])
    try:
        with torch.no_grad():
            out = tiny_model(_image(1, 3, 32, 32), output_hidden_states=True)
    finally:
        tiny_model.set_storm(method="none", schedule=None)
    assert [tuple(h.shape[2:]) for h in out.hidden_states] == [(8, 8), (6, 5), (3, 3), (2, 2), (1, 1)]
    assert torch.isfinite(out.logits).all()


def test_schedule_that_does_not_fit_the_input_is_rejected(tiny_model):
    tiny_model.set_storm(method="storm_evit", schedule=[{"stage": 1, "block": 0, "size": [4, 4]}])
    try:
        with pytest.raises(ValueError, match="larger|4x4"):
            tiny_model(_image(1, 3, 16, 16))  # stage 1 sees a 2x2 grid
    finally:
        tiny_model.set_storm(method="none", schedule=None)


def test_mtr_receives_the_delta_map(tiny_model, monkeypatch):
    seen = {}
    real = modeling_vmamba.reduce_tokens

    def spy(cfg, residual, branch, out_hw, *, sizes=None, extras=None):
        seen["delta"] = extras["delta"]
        seen["shape"] = tuple(residual.shape)
        return real(cfg, residual, branch, out_hw, sizes=sizes, extras=extras)

    monkeypatch.setattr(modeling_vmamba, "reduce_tokens", spy)
    tiny_model.set_storm(method="mtr", schedule=[{"stage": 0, "block": 0, "size": [7, 7]}])
    try:
        with torch.no_grad():
            tiny_model(_image(2, 3, 32, 32))
    finally:
        tiny_model.set_storm(method="none", schedule=None)
    assert seen["shape"] == (2, 8, 8, 8) and seen["delta"].shape == (2, 8, 8)
    assert (seen["delta"] > 0).all()


def test_gradients_reach_every_parameter():
    config = VMambaConfig(dims=[8, 16, 32, 64], depths=[1, 1, 2, 1], num_labels=4, drop_path_rate=0.0)
    model = VMambaForImageClassification(config).train()
    model(_image(2, 3, 64, 64), labels=torch.tensor([0, 3])).loss.backward()  # every stage has L >= 2
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


def test_natural_grids_follow_ceil_halving():
    config = VMambaConfig(dims=[8, 16, 32, 64], depths=[1, 1, 2, 1])
    assert natural_grids(config, (33, 47)) == {(0, 0): (9, 12), (1, 0): (5, 6), (2, 0): (3, 3), (2, 1): (3, 3),
                                               (3, 0): (2, 2)}


def test_init_weights_follow_the_official_recipe():
    config = VMambaConfig(dims=[8, 16], depths=[1, 1], d_state=3, num_labels=3)
    op = VMambaForImageClassification(config).vmamba.layers[0].blocks[0].op
    assert torch.equal(op.A_logs, torch.log(torch.arange(1.0, 4.0)).expand(32, 3))
    assert torch.equal(op.Ds, torch.ones(32))
    dt = F.softplus(op.dt_projs_bias)
    assert (dt >= 1e-4 * 0.999).all() and (dt <= 0.1 * 1.001).all()
    assert op.dt_projs_weight.abs().max() <= op.dt_rank**-0.5


def test_save_and_load_with_auto_classes(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert set(saved["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageClassification"}
    for name in ("modeling_vmamba.py", "configuration_vmamba.py", "reduction.py", "selective_scan.py", "flops.py"):
        assert (tmp_path / name).is_file(), name
    x = _image(1, 3, 32, 32)
    with torch.no_grad():
        expected = tiny_model(x).logits
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModel, AutoModelForImageClassification\n"
        "d = sys.argv[1]\n"
        "m = AutoModelForImageClassification.from_pretrained(d, trust_remote_code=True).eval()\n"
        "b = AutoModel.from_pretrained(d, trust_remote_code=True)\n"
        "assert type(b).__name__ == 'VMambaModel', type(b)\n"
        "assert 'storm_hf' not in sys.modules\n"
        "with torch.no_grad(): torch.save(m(torch.load(d + '/x.pt')).logits, d + '/y.pt')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env=env, cwd=tmp_path, timeout=120)
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


# --------------------------------------------------------------------------------------------------
# converter
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [dict(ssm_ratio=2.0, d_state=1), dict(ssm_ratio=1.0, d_state=4, dt_rank=5, mlp_ratio=2.0, num_classes=7),
     dict(ssm_ratio=1.0, d_state=2, ssm_conv=5, conv_bias=True, in_chans=1), dict(mlp_ratio=0.0, ssm_conv=1)],
)
def test_infer_config_recovers_the_hyperparameters(kwargs):
    base = dict(TINY)
    base.update(kwargs)
    sd = ref.random_state_dict(**base)
    assert convert_vmamba.looks_like(sd)
    config = convert_vmamba.infer_config(sd)
    assert config.dims == list(base["dims"]) and config.depths == list(base["depths"])
    assert config.ssm_ratio == base.get("ssm_ratio", 1.0)
    assert config.d_state == base.get("d_state", 1)
    assert config.dt_rank == base.get("dt_rank", "auto")
    assert config.ssm_conv == base.get("ssm_conv", 3)
    assert config.ssm_conv_bias == base.get("conv_bias", False)
    assert config.mlp_ratio == base.get("mlp_ratio", 4.0)
    assert config.num_labels == base["num_classes"]
    assert config.num_channels == base.get("in_chans", 3)
    model = VMambaForImageClassification(config)
    model.load_state_dict(convert_vmamba.convert_state_dict(sd, config), strict=True)


def _legacy(sd: dict) -> dict:
    """The same weights under the names the official loaders rename, in the one-file layout, DDP-prefixed."""
    out = {}
    for key, value in sd.items():
        key = key.replace("patch_embed.0.", "patch_embed.proj.").replace("patch_embed.2.", "patch_embed.norm.")
        key = key.replace(".blocks.0.norm.", ".blocks.0.ln_1.").replace(".op.", ".self_attention.")
        key = key.replace("classifier.norm.", "norm.").replace("classifier.head.", "head.")
        if key.endswith("x_proj_weight"):
            key, value = key.replace("x_proj_weight", "x_proj.weight"), value.reshape(-1, value.shape[-1], 1)
        elif key.endswith("dt_projs_weight"):
            key, value = key.replace("dt_projs_weight", "dt_projs.weight"), value.reshape(-1, value.shape[-1], 1)
        elif key.endswith("dt_projs_bias"):
            key, value = key.replace("dt_projs_bias", "dt_projs.bias"), value.reshape(-1)
        elif key.endswith(("in_proj.weight", "out_proj.weight", "fc1.weight", "fc2.weight")):
            value = value[:, :, None, None]
        out["module." + key] = value
    return out


def test_legacy_keys_and_one_file_layout_are_accepted():
    sd = ref.random_state_dict(**TINY, ssm_ratio=2.0, d_state=2, seed=5)
    legacy = _legacy(sd)
    assert "module.layers.0.blocks.0.self_attention.x_proj.weight" in legacy
    assert "module.layers.2.blocks.0.ln_1.weight" in legacy and "module.head.weight" in legacy
    assert convert_vmamba.looks_like(legacy)
    config = convert_vmamba.infer_config(legacy)
    assert config.to_dict() == convert_vmamba.infer_config(sd).to_dict()
    new, old = convert_vmamba.convert_state_dict(sd, config), convert_vmamba.convert_state_dict(legacy, config)
    assert new.keys() == old.keys()
    assert all(torch.equal(new[k], old[k]) for k in new)


def _v0_like(sd: dict) -> dict:
    """Vanilla-VMamba-style: 4x4 patch conv, x/z in_proj, no MLP, PatchMerging."""
    out = {k: v for k, v in sd.items() if ".mlp." not in k and ".norm2." not in k and ".downsample." not in k}
    out["patch_embed.0.weight"] = torch.zeros(8, 3, 4, 4)
    out["layers.0.downsample.reduction.weight"] = torch.zeros(16, 32)
    return out


def _z_gated(sd: dict) -> dict:
    out = dict(sd)
    for key in [k for k in sd if k.endswith("op.in_proj.weight")]:
        out[key] = torch.cat([sd[key], sd[key]])
    return out


@pytest.mark.parametrize(
    "make, message",
    [(_v0_like, "v2 two-conv stem"), (_z_gated, "z gate"),
     (lambda sd: {"blocks.0.mixer.in_proj.weight": torch.zeros(4, 4), "head.weight": torch.zeros(2, 4)},
      "not a VMamba")],
    ids=["vanilla-v0", "z-gate", "not-vmamba"],
)
def test_wrong_architectures_are_rejected(make, message):
    bad = make(ref.random_state_dict(**TINY))
    with pytest.raises(ValueError, match=message):
        convert_vmamba.infer_config(bad)


def test_not_vmamba_is_not_recognised():
    assert not convert_vmamba.looks_like({"blocks.0.mixer.in_proj.weight": torch.zeros(4, 4)})
    assert not convert_vmamba.looks_like({"block1.0.attn.mamba_g1.x_proj_weight": torch.zeros(1, 3, 4)})


def test_state_dict_that_does_not_match_the_config_is_rejected():
    sd = ref.random_state_dict(**TINY)
    wrong = VMambaConfig(dims=[8, 16, 32, 64], depths=[1, 1, 3, 1], num_labels=10)
    with pytest.raises(ValueError, match="missing .*layers.2.blocks.2"):
        convert_vmamba.convert_state_dict(sd, wrong)
    wrong = VMambaConfig(dims=[8, 16, 32, 64], depths=[1, 1, 2, 1], num_labels=11)
    with pytest.raises(ValueError, match="shape mismatches"):
        convert_vmamba.convert_state_dict(sd, wrong)


# --------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------

OFFICIAL = {  # README of MzeroMiko/VMamba: params (M), fvcore GFLOPs at 224
    "vmamba_tiny_s1l8": (30.25, 4.906),
    "vmamba_tiny_s2l5": (30.71, 4.858),
    "vmamba_small_s2l15": (50.15, 8.716),
    "vmamba_base_s2l15": (88.56, 15.359),
    "vmamba_small_s1l20": (49.01, 8.612),
    "vmamba_base_s1l20": (86.61, 15.221),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_presets_reproduce_official_params_and_flops(name):
    kwargs = json.loads((REPO / "configs" / "vmamba" / f"{name}.json").read_text())
    config = VMambaConfig(**kwargs)
    with torch.device("meta"):
        model = VMambaForImageClassification(config)
    params, gflops = OFFICIAL[name]
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == params
    assert round(model.count_flops((224, 224)).total / 1e9, 3) == gflops
    assert config.num_labels == 1000
