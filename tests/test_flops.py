"""FLOP primitives and the analytic VMamba count, checked against a count taken on a real forward.

The real count: torch's FlopCounterMode for every convolution / matmul the forward dispatches (it reports
2 FLOPs per multiply-add, halved here to fvcore's MACs), module forward hooks for LayerNorm (5 per element)
and adaptive average pooling (1 per input element), and the selective scan counted at each call from the
tensors it receives (9·B·L·D·N + B·D·L). Work done inside the scan kernel and inside the token reduction is
run in probe modules and subtracted, so neither implementation detail leaks into the count.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from storm_hf import flops as F
from storm_hf import modeling_vmamba
from storm_hf.configuration_vmamba import VMambaConfig
from storm_hf.modeling_vmamba import VMambaForImageClassification, vmamba_flops


def _mode_flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() // 2


# --------------------------------------------------------------------------------------------------
# primitives
# --------------------------------------------------------------------------------------------------


CONV_CASES = [
    (size, kernel, stride, padding)
    for size in (1, 2, 3, 7, 8, 33, 47, 56)
    for kernel, stride, padding in ((3, 2, 1), (3, 1, 1), (4, 4, 0), (7, 2, 3), (2, 2, 0))
    if size + 2 * padding >= kernel
]


@pytest.mark.parametrize("size, kernel, stride, padding", CONV_CASES)
def test_conv_out_size_matches_a_real_convolution(size, kernel, stride, padding):
    conv = nn.Conv2d(1, 1, kernel, stride, padding)
    out = conv(torch.zeros(1, 1, size, size + 1))
    assert tuple(out.shape[2:]) == (F.conv_out_size(size, kernel, stride, padding),
                                    F.conv_out_size(size + 1, kernel, stride, padding))


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_conv2d_flops_match_flop_counter(groups):
    conv = nn.Conv2d(6, 12, 3, stride=2, padding=1, groups=groups)
    x = torch.zeros(2, 6, 9, 12)
    out_hw = (F.conv_out_size(9, 3, 2, 1), F.conv_out_size(12, 3, 2, 1))
    assert F.conv2d_flops(6, 12, 3, out_hw, groups=groups, batch=2) == _mode_flops(conv, x)


def test_conv1d_and_linear_flops_match_flop_counter():
    conv = nn.Conv1d(8, 12, 1, groups=4)
    assert F.conv1d_flops(8, 12, 1, 10, groups=4, batch=3) == _mode_flops(conv, torch.zeros(3, 8, 10))
    lin = nn.Linear(7, 5)
    assert F.linear_flops(7, 5, 3 * 4 * 2) == _mode_flops(lin, torch.zeros(3, 4, 2, 7))


def test_norm_pool_and_scan_conventions():
    assert F.layer_norm_flops(10) == 50 and F.layer_norm_flops(10, affine=False) == 40
    assert F.batch_norm_flops(10) == 20 and F.batch_norm_flops(10, affine=False) == 10
    assert F.batch_norm_flops(10, training=True) == 50
    assert F.adaptive_avg_pool_flops(12) == 12
    assert F.scan_flops(2, 5, 3, 4) == 9 * 2 * 5 * 3 * 4 + 2 * 3 * 5
    assert F.scan_flops(2, 5, 3, 4, with_z=True) == F.scan_flops(2, 5, 3, 4) + 2 * 3 * 5
    with pytest.raises(ValueError, match="divisible"):
        F.conv2d_flops(6, 12, 3, (2, 2), groups=4)


def test_flops_report_sums_its_parts_and_prints_a_table():
    rows = [F.BlockFlops(0, 0, 4, 5, 30), F.BlockFlops(0, 1, 4, 5, 30)]
    report = F.FlopsReport.from_parts({"stem": 40, "blocks": 60}, rows, image_size=(16, 20))
    assert report.total == 100 and report.gflops == 1e-7
    half = F.FlopsReport.from_parts({"stem": 40, "blocks": 10}, rows[:1])
    assert half.ratio_to(report) == 0.5
    table = report.table()
    assert "stem" in table and "4 x 5" in table and "(16, 20)" in table


# --------------------------------------------------------------------------------------------------
# analytic VMamba count vs a count taken on the real forward
# --------------------------------------------------------------------------------------------------


class _ScanProbe(nn.Module):
    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


class _ReduceProbe(nn.Module):
    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def count_real_flops(model: nn.Module, pixel_values: torch.Tensor, monkeypatch) -> int:
    scan_total = 0
    scan_probe, reduce_probe = _ScanProbe(), _ReduceProbe()
    real_scan, real_reduce = modeling_vmamba.selective_scan, modeling_vmamba.reduce_tokens

    def counted_scan(u, delta, A, B, C, D=None, z=None, **kwargs):
        nonlocal scan_total
        batch, channels, length = u.shape
        scan_total += F.scan_flops(batch, length, channels, A.shape[1], with_d=D is not None, with_z=z is not None)
        return scan_probe(real_scan, u, delta, A, B, C, D=D, z=z, **kwargs)

    monkeypatch.setattr(modeling_vmamba, "selective_scan", counted_scan)
    monkeypatch.setattr(modeling_vmamba, "reduce_tokens", lambda *a, **k: reduce_probe(real_reduce, *a, **k))

    hooked = 0

    def norm_hook(module, inputs, output):
        nonlocal hooked
        hooked += F.layer_norm_flops(inputs[0].numel(), affine=module.elementwise_affine)

    def pool_hook(module, inputs, output):
        nonlocal hooked
        hooked += F.adaptive_avg_pool_flops(inputs[0].numel())

    handles = []
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            handles.append(module.register_forward_hook(norm_hook))
        elif isinstance(module, nn.AdaptiveAvgPool2d):
            handles.append(module.register_forward_hook(pool_hook))
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    counts = counter.get_flop_counts()
    probed = sum(sum(ops.values()) for name, ops in counts.items() if name.split(".")[-1] in ("_ScanProbe", "_ReduceProbe"))
    dispatched = counter.get_total_flops() - probed
    assert dispatched % 2 == 0
    return dispatched // 2 + hooked + scan_total


TINY = dict(dims=[8, 16, 32, 64], depths=[2, 2, 3, 1], num_labels=5)


@pytest.mark.parametrize(
    "extra, hw",
    [(dict(), (32, 32)), (dict(ssm_ratio=2.0, d_state=3, dt_rank=3), (33, 47)),
     (dict(ssm_conv=1, mlp_ratio=0.0), (29, 18)), (dict(ssm_conv=5, ssm_conv_bias=True, mlp_ratio=2.5), (40, 24))],
    ids=["plain", "s2-n3-odd", "noconv-nomlp", "conv5-mlp2.5"],
)
def test_analytic_flops_equal_the_real_forward(extra, hw, monkeypatch):
    config = VMambaConfig(**TINY, **extra)
    model = VMambaForImageClassification(config).eval()
    x = torch.randn(2, 3, *hw)
    assert count_real_flops(model, x, monkeypatch) == vmamba_flops(config, hw, batch=2).total


@pytest.mark.parametrize(
    "storm",
    [
        dict(method="storm_tome", schedule=[{"stage": 0, "block": 1, "size": [7, 9]},
                                            {"stage": 2, "block": 1, "size": [2, 2]}]),
        dict(method="storm_evit", flops_ratio=0.25),
        dict(method="mtr", schedule=[{"stage": 0, "block": 0, "size": [6, 7]}]),
    ],
    ids=["storm_tome-explicit", "storm_evit-ratio", "mtr"],
)
def test_reduced_forward_flops_equal_the_analytic_count(storm, monkeypatch):
    hw = (33, 47)
    config = VMambaConfig(**TINY, ssm_ratio=2.0, storm=storm)
    model = VMambaForImageClassification(config).eval()
    schedule = model.storm_schedule(hw)
    assert schedule, "the schedule should reduce somewhere"
    report = model.count_flops(hw)
    assert report.total < vmamba_flops(config, hw).total
    assert count_real_flops(model, torch.randn(1, 3, *hw), monkeypatch) == report.total
    grids = {(row.stage, row.block): (row.height, row.width) for row in report.blocks}
    assert grids == model.storm_grids(hw, schedule)


def test_vmamba_tiny_breakdown_matches_the_official_fvcore_run():
    """Per-part figures of the official VMamba-T[s1l8] fvcore count at 224 (shared/notes, verified there)."""
    report = vmamba_flops(VMambaConfig(num_labels=1000), 224)
    stage = [sum(b.flops for b in report.blocks if b.stage == s) / 1e9 for s in range(4)]
    assert [round(s, 3) for s in stage] == [0.650, 0.629, 2.471, 0.612]
    parts = {k: v / 1e9 for k, v in report.parts.items()}
    op = sum(parts[k] for k in ("in_proj", "dwconv", "x_proj", "dt_proj", "scan", "out_norm", "out_proj"))
    assert round(op, 3) == 1.110 and round(parts["mlp"], 3) == 3.237 and round(parts["stem"], 3) == 0.151
    assert round(parts["x_proj"], 3) == 0.114 and round(parts["dt_proj"], 3) == 0.101
    assert round(parts["scan"], 3) == 0.063 and round(report.gflops, 3) == 4.906


def test_reduction_shrinks_later_blocks_and_odd_grids_round_up():
    config = VMambaConfig(dims=[8, 16, 32, 64], depths=[2, 1, 1, 1])
    report = vmamba_flops(config, (64, 64), schedule={(0, 0): (15, 13)})
    assert [(b.height, b.width) for b in report.blocks] == [(16, 16), (15, 13), (8, 7), (4, 4), (2, 2)]
    with pytest.raises(ValueError, match="larger|between"):
        vmamba_flops(config, (64, 64), schedule={(1, 0): (9, 9)})
    with pytest.raises(ValueError, match="does not have"):
        vmamba_flops(config, (64, 64), schedule={(1, 1): (4, 4)})
    with pytest.raises(ValueError, match="too small"):
        vmamba_flops(config, (3, 64))
