"""Token reduction: STORM's row/column passes, the baselines, schedules and the FLOPs budget solver.

Outputs are compared with the loop implementations in tests/references/reduction_reference.py; structural
properties (dense grids, adjacency of merged tokens, conservation of sums, batch independence) are checked
with hypothesis over odd/even, non-square grids; the solver runs against a small synthetic backbone whose
FLOPs and grids are written out here independently of the mixin.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.references import reduction_reference as ref
from storm_hf.reduction import (
    EVEN_WEIGHTS,
    StormConfig,
    StormMixin,
    reduce_tokens,
    storm_plan,
    plan_reduction,
    window_budgets,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "storm"
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _maps(seed: int, b: int, h: int, w: int, c: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, w, c, generator=g, dtype=dtype), torch.randn(b, h, w, c, generator=g, dtype=dtype)


def _t(nested) -> torch.Tensor:
    return torch.tensor(nested, dtype=torch.float64)


@st.composite
def storm_case(draw, max_side=64):
    h = draw(st.integers(2, max_side))
    w = draw(st.integers(2, max_side))
    out_h = draw(st.integers(-(-h // 2), h))
    out_w = draw(st.integers(-(-w // 2), w))
    return h, w, out_h, out_w, draw(st.integers(1, 8)), draw(st.integers(0, 2**16))


# ------------------------------------------------------------------------------------------ config


def test_config_round_trips_through_json():
    cfg = StormConfig(method="storm_evit", schedule=[{"stage": 0, "block": 1, "size": [7, 6]}], window=3,
                      importance="l2", merge_mode="mean", seed=4)
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert StormConfig.from_any(d) == cfg
    assert StormConfig.from_any(None).method == "none" and not StormConfig.from_any(None).enabled


@pytest.mark.parametrize(
    "value, message",
    [
        ({"method": "pool"}, "Unknown reduction method"),
        ({"speed": 2}, "Unknown StormConfig field"),
        ({"similarity": "dot"}, "Unknown similarity"),
        ({"importance": "max"}, "Unknown importance"),
        ({"merge_mode": "max"}, "Unknown merge_mode"),
        ({"flops_ratio": 1.0}, r"\[0, 1\)"),
        ({"flops_ratio": -0.1}, r"\[0, 1\)"),
        ({"window": 0}, "window must be a positive integer"),
        ({"flops_ratio": 0.2, "schedule": []}, "not both"),
        ({"schedule": [{"stage": 0, "block": 1}]}, "Each schedule entry"),
        ({"schedule": [{"stage": 0, "block": 1, "size": [0, 3]}]}, "below 1x1"),
        ({"schedule": [{"stage": -1, "block": 1, "size": [3, 3]}]}, "non-negative"),
        ({"positions": [[0]]}, "positions must be"),
        ({"placement": "odd"}, "Unknown placement"),
    ],
)
def test_config_rejects_bad_values(value, message):
    with pytest.raises(ValueError, match=message):
        StormConfig.from_any(value)


def test_window_budgets_match_reference_split():
    for n in range(1, 26):
        for window in range(1, 8):
            for budget in range(n + 1):
                _, expected = ref.spread(n, budget, window)
                assert list(window_budgets(n, budget, window)) == expected, (n, budget, window)


# ------------------------------------------------------------------------------------- STORM passes


def _check_line_pairs(slots: torch.Tensor, out_len: int, drop: bool):
    """Each output slot of a line holds one token or the local pair (2j, 2j+1); dropped = even of a pair."""
    for line in slots.reshape(-1, slots.shape[-1]).tolist():
        members: dict[int, list[int]] = {}
        for t, s in enumerate(line):
            members.setdefault(s, []).append(t)
        assert sorted(k for k in members if k != out_len) == list(range(out_len))
        for s, toks in members.items():
            if s == out_len:  # dropped: an even token whose odd partner survives alone
                assert drop and all(t % 2 == 0 and t + 1 < len(line) and line[t + 1] < out_len for t in toks)
            elif len(toks) == 2:
                assert toks[0] % 2 == 0 and toks[1] == toks[0] + 1
            else:
                assert len(toks) == 1
        kept = [line[t] for t in range(len(line)) if line[t] < out_len]
        assert kept == sorted(kept)  # survivors keep their order


@FAST
@given(case=storm_case(), similarity=st.sampled_from(["l1", "cosine", "l2"]),
       mode=st.sampled_from(["sum", "mean", "drop"]))
def test_storm_tome_merges_only_local_pairs_and_keeps_a_dense_grid(case, similarity, mode):
    h, w, out_h, out_w, window, seed = case
    x, branch = _maps(seed, 2, h, w, 3)
    plan, row_slots, col_slots = storm_plan(x, (out_h, out_w), kind="tome", window=window,
                                            similarity=similarity, merge_mode=mode)
    assert row_slots.shape == (2, h, w) and col_slots.shape == (2, out_w, h)
    _check_line_pairs(row_slots, out_w, drop=mode == "drop")
    _check_line_pairs(col_slots, out_h, drop=mode == "drop")
    # composed plan: every output cell draws from rows {2i, 2i+1} only, 1 to 4 tokens
    dest = plan.dest.view(2, h, w)
    for b in range(2):
        for cell in range(out_h * out_w):
            rows = (dest[b] == cell).nonzero()[:, 0].unique().tolist()
            assert 1 <= len(rows) <= 2 and (len(rows) == 1 or (rows[0] % 2 == 0 and rows[1] == rows[0] + 1))
    cfg = StormConfig(method="storm_tome", window=window, similarity=similarity, merge_mode=mode)
    out, out_branch, _ = reduce_tokens(cfg, x, branch, (out_h, out_w))
    assert out.shape == out_branch.shape == (2, out_h, out_w, 3)
    if mode == "sum":  # STORM sums: the width pass keeps every row's sum, both passes the total
        rows_only, _, _ = reduce_tokens(cfg, x, branch, (h, out_w))
        torch.testing.assert_close(rows_only.sum(2), x.sum(2))
        torch.testing.assert_close(out.sum((1, 2)), x.sum((1, 2)))
    single, single_branch, _ = reduce_tokens(cfg, x[1:], branch[1:], (out_h, out_w))
    torch.testing.assert_close(single, out[1:], rtol=0, atol=0)
    torch.testing.assert_close(single_branch, out_branch[1:], rtol=0, atol=0)


@FAST
@given(case=storm_case(), importance=st.sampled_from(["abs_mean", "mean", "l2"]))
def test_storm_evit_keeps_quota_per_window_in_order(case, importance):
    h, w, _, _, window, seed = case
    g = torch.Generator().manual_seed(seed)
    out_h, out_w = int(torch.randint(1, h + 1, (1,), generator=g)), int(torch.randint(1, w + 1, (1,), generator=g))
    x, branch = _maps(seed, 2, h, w, 3)
    plan, row_slots, col_slots = storm_plan(x, (out_h, out_w), kind="evit", window=window, importance=importance)
    for line in row_slots.reshape(-1, w).tolist():
        wins, drops = ref.spread(w, w - out_w, window)
        for (s, e), d in zip(wins, drops):
            assert sum(v == out_w for v in line[s:e]) == d
        kept = [v for v in line if v < out_w]
        assert kept == list(range(out_w))
    cfg = StormConfig(method="storm_evit", window=window, importance=importance)
    out, out_branch, sizes = reduce_tokens(cfg, x, branch, (out_h, out_w))
    assert out.shape == (2, out_h, out_w, 3) and sizes is None
    # pure drop: every output token is an input token, taken from the same sample, same place in both maps
    src = plan._sources()
    torch.testing.assert_close(out.reshape(2, -1, 3), x.reshape(2, -1, 3).gather(1, src[..., None].expand(-1, -1, 3)))
    torch.testing.assert_close(out_branch.reshape(2, -1, 3),
                               branch.reshape(2, -1, 3).gather(1, src[..., None].expand(-1, -1, 3)))
    single, _, _ = reduce_tokens(cfg, x[:1], branch[:1], (out_h, out_w))
    torch.testing.assert_close(single, out[:1], rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(case=storm_case(max_side=11), similarity=st.sampled_from(["l1", "cosine", "l2"]),
       mode=st.sampled_from(["sum", "mean", "drop"]), with_sizes=st.booleans())
def test_storm_tome_matches_loop_reference(case, similarity, mode, with_sizes):
    h, w, out_h, out_w, window, seed = case
    x, branch = _maps(seed, 2, h, w, 3)
    sizes = torch.randint(1, 4, (2, h, w), generator=torch.Generator().manual_seed(seed)).double() if with_sizes else None
    cfg = StormConfig(method="storm_tome", window=window, similarity=similarity, merge_mode=mode)
    out, out_branch, out_sizes = reduce_tokens(cfg, x, branch, (out_h, out_w), sizes=sizes)
    e_res, e_br, e_sizes = ref.storm_tome(x.tolist(), branch.tolist(), (out_h, out_w), window, similarity, mode,
                                          None if sizes is None else sizes.tolist())
    torch.testing.assert_close(out, _t(e_res))
    torch.testing.assert_close(out_branch, _t(e_br))
    if with_sizes or (mode == "mean" and (out_h, out_w) != (h, w)):
        torch.testing.assert_close(out_sizes, _t(e_sizes))
    else:  # sizes are only tracked when given or needed for a mean
        assert out_sizes is None
    if with_sizes and mode == "mean":  # size-weighted mean conserves sum(size * x)
        torch.testing.assert_close((out * out_sizes[..., None]).sum((1, 2)), (x * sizes[..., None]).sum((1, 2)))


@settings(max_examples=25, deadline=None)
@given(case=storm_case(max_side=11), importance=st.sampled_from(["abs_mean", "mean", "l2"]))
def test_storm_evit_matches_loop_reference(case, importance):
    h, w, _, _, window, seed = case
    out_hw = (max(1, h - seed % h), max(1, w - (seed // 7) % w))
    x, branch = _maps(seed, 2, h, w, 3)
    cfg = StormConfig(method="storm_evit", window=window, importance=importance)
    out, out_branch, _ = reduce_tokens(cfg, x, branch, out_hw)
    e_res, e_br = ref.storm_evit(x.tolist(), branch.tolist(), out_hw, window, importance)
    torch.testing.assert_close(out, _t(e_res), rtol=0, atol=0)
    torch.testing.assert_close(out_branch, _t(e_br), rtol=0, atol=0)


def test_storm_windows_confine_merges():
    """A row whose most similar pairs all sit in the first window still merges in every window."""
    w = 20  # 10 pairs = two windows of 5 pairs, budget 4 -> 2 merges per window
    row = torch.arange(w, dtype=torch.float64).view(1, 1, w, 1) * 10.0
    row[0, 0, 1::2, 0] = row[0, 0, 0::2, 0] + torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 5, 6, 7, 8, 9], dtype=torch.float64)
    _, slots, _ = storm_plan(row, (1, 16), kind="tome", window=5)
    merged_pairs = [t // 2 for t in range(0, w, 2) if slots[0, 0, t] == slots[0, 0, t + 1]]
    assert merged_pairs == [0, 1, 5, 6]
    _, slots, _ = storm_plan(row, (1, 16), kind="tome", window=10)
    assert [t // 2 for t in range(0, w, 2) if slots[0, 0, t] == slots[0, 0, t + 1]] == [0, 1, 2, 3]


def test_window_default_comes_from_backbone_unless_configured():
    x, branch = _maps(0, 1, 1, 40, 2)
    plain = StormConfig(method="storm_evit")
    for window, defaults in [(5, None), (20, {"storm_evit": 20})]:
        expected, _ = ref.storm_evit(x.tolist(), branch.tolist(), (1, 30), window, "abs_mean")
        out, _, _ = reduce_tokens(plain, x, branch, (1, 30), window_defaults=defaults)
        torch.testing.assert_close(out, _t(expected), rtol=0, atol=0)
    expected, _ = ref.storm_evit(x.tolist(), branch.tolist(), (1, 30), 3, "abs_mean")
    out, _, _ = reduce_tokens(plain.replace(window=3), x, branch, (1, 30), window_defaults={"storm_evit": 20})
    torch.testing.assert_close(out, _t(expected), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ baselines


@st.composite
def flat_case(draw, max_side=24, half=False):
    h, w = draw(st.integers(2, max_side)), draw(st.integers(2, max_side))
    out_h, out_w = draw(st.integers(1, h)), draw(st.integers(1, w))
    if half:
        while 2 * out_h * out_w < h * w:
            out_h, out_w = min(h, out_h + 1), min(w, out_w + 1)
    return h, w, out_h, out_w, draw(st.integers(0, 2**16))


def _raster_positions(plan_dest: torch.Tensor, n_out: int) -> list[list[int]]:
    """For drop-only plans: the input raster index held by each output slot."""
    out = []
    for row in plan_dest.tolist():
        slots = {s: t for t, s in enumerate(row) if s < n_out}
        out.append([slots[s] for s in range(n_out)])
    return out


@FAST
@given(case=flat_case(), method=st.sampled_from(["evit", "random", "top", "mtr_drop", "tome_drop"]))
def test_dropping_baselines_keep_exact_counts_and_raster_order(case, method):
    h, w, out_h, out_w, seed = case
    if method == "tome_drop" and 2 * out_h * out_w < h * w:
        out_h, out_w = h, -(-w // 2)
    x, branch = _maps(seed, 2, h, w, 3)
    delta = torch.randn(2, h, w, dtype=torch.float64)
    name, _, drop = method.partition("_")
    cfg = StormConfig(method=name, merge_mode="drop" if drop else None, seed=seed)
    plan = plan_reduction(cfg, x, branch, (out_h, out_w), extras={"delta": delta})
    out, out_branch, _ = reduce_tokens(cfg, x, branch, (out_h, out_w), extras={"delta": delta})
    assert out.shape == out_branch.shape == (2, out_h, out_w, 3)
    n = out_h * out_w
    for b, kept in enumerate(_raster_positions(plan.dest, n)):
        assert kept == sorted(kept) and len(set(kept)) == n
        torch.testing.assert_close(out[b].reshape(n, 3), x[b].reshape(-1, 3)[kept], rtol=0, atol=0)
        torch.testing.assert_close(out_branch[b].reshape(n, 3), branch[b].reshape(-1, 3)[kept], rtol=0, atol=0)
    single, _, _ = reduce_tokens(cfg, x[1:], branch[1:], (out_h, out_w), extras={"delta": delta[1:]})
    torch.testing.assert_close(single, out[1:], rtol=0, atol=0)


@FAST
@given(case=flat_case(half=True), method=st.sampled_from(["tome", "mtr"]))
def test_merging_baselines_conserve_size_weighted_sums(case, method):
    h, w, out_h, out_w, seed = case
    x, branch = _maps(seed, 2, h, w, 3)
    sizes = torch.randint(1, 5, (2, h, w), generator=torch.Generator().manual_seed(seed)).double()
    cfg = StormConfig(method=method)
    extras = {"delta": torch.randn(2, h, w, generator=torch.Generator().manual_seed(seed))}
    out, out_branch, out_sizes = reduce_tokens(cfg, x, branch, (out_h, out_w), sizes=sizes, extras=extras)
    single, _, single_sizes = reduce_tokens(cfg, x[1:], branch[1:], (out_h, out_w), sizes=sizes[1:],
                                            extras={"delta": extras["delta"][1:]})
    torch.testing.assert_close(single, out[1:], rtol=0, atol=0)
    torch.testing.assert_close(single_sizes, out_sizes[1:], rtol=0, atol=0)
    assert out.shape == (2, out_h, out_w, 3) and out_sizes.shape == (2, out_h, out_w)
    torch.testing.assert_close(out_sizes.sum((1, 2)), sizes.sum((1, 2)))
    for a, b in ((out, x), (out_branch, branch)):
        torch.testing.assert_close((a * out_sizes[..., None]).sum((1, 2)), (b * sizes[..., None]).sum((1, 2)))


@settings(max_examples=30, deadline=None)
@given(case=flat_case(max_side=7), importance=st.sampled_from(["mean", "abs_mean", "l2"]))
def test_evit_and_top_match_loop_reference(case, importance):
    h, w, out_h, out_w, seed = case
    x, branch = _maps(seed, 2, h, w, 3)
    signal = torch.randn(2, h, w, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    out, out_br, _ = reduce_tokens(StormConfig(method="evit", importance=importance), x, branch, (out_h, out_w))
    e_res, e_br = ref.evit(x.tolist(), branch.tolist(), (out_h, out_w), importance)
    torch.testing.assert_close(out, _t(e_res), rtol=0, atol=0)
    torch.testing.assert_close(out_br, _t(e_br), rtol=0, atol=0)
    for extras, sig in (({}, None), ({"branch": signal}, signal.tolist())):
        out, out_br, _ = reduce_tokens(StormConfig(method="top"), x, branch, (out_h, out_w), extras=extras)
        e_res, e_br = ref.top(x.tolist(), branch.tolist(), (out_h, out_w), sig)
        torch.testing.assert_close(out, _t(e_res), rtol=0, atol=0)
        torch.testing.assert_close(out_br, _t(e_br), rtol=0, atol=0)


@settings(max_examples=30, deadline=None)
@given(case=flat_case(max_side=7, half=True), mode=st.sampled_from(["mean", "sum", "drop"]), with_sizes=st.booleans())
def test_tome_matches_loop_reference(case, mode, with_sizes):
    h, w, out_h, out_w, seed = case
    x, branch = _maps(seed, 2, h, w, 3)
    sizes = torch.randint(1, 4, (2, h, w), generator=torch.Generator().manual_seed(seed)).double() if with_sizes else None
    cfg = StormConfig(method="tome", merge_mode=mode)
    out, out_br, out_sizes = reduce_tokens(cfg, x, branch, (out_h, out_w), sizes=sizes)
    e_res, e_br, e_sizes = ref.tome(x.tolist(), branch.tolist(), (out_h, out_w), mode,
                                    None if sizes is None else sizes.tolist())
    torch.testing.assert_close(out, _t(e_res))
    torch.testing.assert_close(out_br, _t(e_br))
    if out_sizes is not None:
        torch.testing.assert_close(out_sizes, _t(e_sizes))


@settings(max_examples=30, deadline=None)
@given(case=flat_case(max_side=7), mode=st.sampled_from(["mean", "drop"]))
def test_mtr_matches_loop_reference(case, mode):
    h, w, out_h, out_w, seed = case
    x, branch = _maps(seed, 2, h, w, 3)
    delta = torch.randn(2, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 2))
    cfg = StormConfig(method="mtr", merge_mode=mode)
    out, out_br, _ = reduce_tokens(cfg, x, branch, (out_h, out_w), extras={"delta": delta})
    e_res, e_br = ref.mtr(x.tolist(), branch.tolist(), (out_h, out_w), delta.tolist(), mode)
    torch.testing.assert_close(out, _t(e_res))
    torch.testing.assert_close(out_br, _t(e_br))


def test_random_is_seeded_shared_across_batch_and_per_sample_equal():
    ids = torch.arange(2 * 9 * 8, dtype=torch.float64).view(2, 9, 8, 1) % 72
    cfg = StormConfig(method="random", seed=3)
    a, _, _ = reduce_tokens(cfg, ids, ids, (6, 7))
    b, _, _ = reduce_tokens(cfg, ids, ids, (6, 7))
    c, _, _ = reduce_tokens(cfg.replace(seed=4), ids, ids, (6, 7))
    single, _, _ = reduce_tokens(cfg, ids[1:], ids[1:], (6, 7))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[0], a[1]) and torch.equal(single, a[1:])
    kept = a[0].flatten().tolist()
    assert kept == sorted(kept) and len(set(kept)) == 42


def test_top_score_is_clipped():
    """Token 0 has the largest raw channel sum, token 1 the largest clipped one: ToP keeps token 1."""
    x = torch.zeros(1, 1, 2, 1)
    signal = torch.tensor([[[[3.0, 0.0], [4.0, -3.0]]]])
    out, _, _ = reduce_tokens(StormConfig(method="top"), x + torch.tensor([[[[0.0], [1.0]]]]), x, (1, 1),
                              extras={"branch": signal})
    assert out.item() == 1.0


# ----------------------------------------------------------------------------------- identity & errors


@pytest.mark.parametrize("method", ["none", "storm_tome", "storm_evit", "evit", "tome", "random", "top", "mtr"])
def test_unchanged_grid_returns_the_inputs_themselves(method):
    x, branch = _maps(0, 2, 5, 6, 3)
    sizes = torch.ones(2, 5, 6)
    out = reduce_tokens(StormConfig(method=method), x, branch, (5, 6), sizes=sizes)
    assert out[0] is x and out[1] is branch and out[2] is sizes


@pytest.mark.parametrize(
    "method, shape, out_hw, extras, message",
    [
        ("none", (1, 4, 4, 2), (3, 3), None, "Reduction is off"),
        ("storm_tome", (1, 16, 2), (3, 3), None, r"\(B, H, W, C\)"),
        ("storm_tome", (1, 4, 4, 2), (5, 4), None, "larger than the current"),
        ("storm_tome", (1, 8, 8, 2), (3, 8), None, "at most once per step"),
        ("storm_evit", (1, 4, 4, 2), (0, 4), None, "below 1x1"),
        ("tome", (1, 8, 8, 2), (4, 7), None, "at most half"),
        ("mtr", (1, 4, 4, 2), (3, 3), None, r"extras\['delta'\]"),
        ("mtr", (1, 4, 4, 2), (3, 3), {"delta": torch.zeros(1, 16)}, r"extras\['delta'\]"),
    ],
)
def test_bad_steps_fail_clearly(method, shape, out_hw, extras, message):
    x = torch.randn(*shape)
    with pytest.raises(ValueError, match=message):
        reduce_tokens(StormConfig(method=method), x, x.clone(), out_hw, extras=extras)


def test_branch_shape_mismatch_fails_clearly():
    with pytest.raises(ValueError, match="same shape"):
        reduce_tokens(StormConfig(method="evit"), torch.randn(1, 4, 4, 2), torch.randn(1, 4, 4, 3), (3, 3))


def test_gradients_flow_through_both_maps():
    x, branch = _maps(1, 1, 6, 6, 2)
    x.requires_grad_(True)
    branch.requires_grad_(True)
    out, out_branch, _ = reduce_tokens(StormConfig(method="storm_tome"), x, branch, (4, 4))
    (out.sum() + 2 * out_branch.sum()).backward()
    assert torch.equal(x.grad, torch.ones_like(x)) and torch.equal(branch.grad, 2 * torch.ones_like(branch))


# ------------------------------------------------------------------------- schedules and the solver


class TinyHierarchical(StormMixin):
    """A VMamba-like stand-in: /4 stem, stride-2 (ceil) downsampling between stages; a block costs
    11*d^2 per token in its mixer (at the input grid) and 8*d^2 per token in its MLP (after reducing)."""

    def __init__(self, storm=None, depths=(2, 2, 8, 2), dims=(96, 192, 384, 768), image_size=224):
        self.depths, self.dims = depths, dims
        self.config = SimpleNamespace(storm=StormConfig.from_any(storm).to_dict(), image_size=image_size,
                                      dims=list(dims))
        self.flops_calls = 0

    def _natural_grids(self, image_size):
        h, w = -(-image_size[0] // 4), -(-image_size[1] // 4)
        grids = {}
        for s, depth in enumerate(self.depths):
            if s:
                h, w = -(-h // 2), -(-w // 2)
            for b in range(depth):
                grids[(s, b)] = (h, w)
        return grids

    def _flops(self, image_size, schedule):
        self.flops_calls += 1
        h, w = -(-image_size[0] // 4), -(-image_size[1] // 4)
        total = 48 * self.dims[0] * h * w
        for s, (depth, d) in enumerate(zip(self.depths, self.dims)):
            if s:
                h, w = -(-h // 2), -(-w // 2)
                total += 9 * self.dims[s - 1] * d * h * w
            for b in range(depth):
                total += 11 * d * d * h * w
                h, w = schedule.get((s, b), (h, w))
                total += 8 * d * d * h * w
        return SimpleNamespace(total=total)


class TinyPlain(TinyHierarchical):
    """A PlainMamba/Vim-like single-stage stand-in (stage 0, layer index as block)."""

    def __init__(self, storm=None, depth=12):
        super().__init__(storm, depths=(depth,), dims=(64,))

    def _natural_grids(self, image_size):
        return {(0, b): (image_size[0] // 16, image_size[1] // 16) for b in range(self.depths[0])}

    def _flops(self, image_size, schedule):
        h, w = image_size[0] // 16, image_size[1] // 16
        total = 0
        for b in range(self.depths[0]):
            total += 10 * h * w
            h, w = schedule.get((0, b), (h, w))
            total += 6 * h * w
        return SimpleNamespace(total=total)


def _cut(model, size, schedule):
    return 1 - model._flops(size, schedule).total / model._flops(size, {}).total


def _check_monotone(model, size, schedule):
    grids = model.storm_grids(size, schedule)
    for pos, target in schedule.items():
        assert target[0] <= grids[pos][0] and target[1] <= grids[pos][1]


@pytest.mark.parametrize("method", ["storm_tome", "storm_evit", "tome"])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.4])
def test_solver_hits_the_flops_budget_with_square_non_increasing_grids(method, ratio):
    model = TinyHierarchical({"method": method, "flops_ratio": ratio})
    schedule = model.storm_schedule((224, 224))
    assert abs(_cut(model, (224, 224), schedule) - ratio) <= 0.01
    assert all(h == w for h, w in schedule.values())
    _check_monotone(model, (224, 224), schedule)
    again = TinyHierarchical({"method": method, "flops_ratio": ratio}).storm_schedule((224, 224))
    assert again == schedule
    assert abs(1 - model.count_flops().total / model._flops((224, 224), {}).total - ratio) <= 0.01


@pytest.mark.parametrize("size, ratio", [((192, 288), 0.3), ((200, 200), 0.2)])
def test_solver_handles_odd_and_non_square_inputs(size, ratio):
    model = TinyHierarchical({"method": "storm_tome", "flops_ratio": ratio})
    schedule = model.storm_schedule(size)
    assert abs(_cut(model, size, schedule) - ratio) <= 0.01
    _check_monotone(model, size, schedule)
    if size[0] == size[1]:
        assert all(h == w for h, w in schedule.values())


def test_solver_uses_given_positions_and_the_single_stage_default():
    model = TinyHierarchical({"method": "storm_evit", "flops_ratio": 0.2, "positions": [[0, 1], [2, 0], [2, 4]]})
    schedule = model.storm_schedule((224, 224))
    assert set(schedule) <= {(0, 1), (2, 0), (2, 4)} and abs(_cut(model, (224, 224), schedule) - 0.2) <= 0.01
    plain = TinyPlain({"method": "storm_tome", "flops_ratio": 0.3})
    schedule = plain.storm_schedule((224, 224))
    assert set(schedule) <= {(0, b) for b in range(1, 11, 2)}
    assert abs(_cut(plain, (224, 224), schedule) - 0.3) <= 0.01


def _stage_ends(model, size):
    """(stage, last block) of every stage followed by a downsampling, from the model's natural grids."""
    natural = model._natural_grids(size)
    stages = sorted({s for s, _ in natural})
    return {s: max(b for t, b in natural if t == s) for s in stages[:-1]}


@pytest.mark.parametrize("method", ["storm_tome", "storm_evit"])
@pytest.mark.parametrize("depths, ratio", [((2, 2, 8, 2), 0.1), ((2, 2, 8, 2), 0.3), ((2, 4, 2), 0.2),
                                           ((2, 2, 15, 2), 0.4)])
def test_even_placement_is_the_hierarchical_default_and_keeps_downsampling_exact(method, depths, ratio):
    model = TinyHierarchical({"method": method, "flops_ratio": ratio}, depths=depths, dims=(96, 192, 384, 768)[:len(depths)])
    schedule = model.storm_schedule(224)
    assert schedule and abs(_cut(model, (224, 224), schedule) - ratio) <= 0.01
    assert schedule == model.set_storm(placement="even").storm_schedule(224)
    assert schedule != model.set_storm(placement="legacy").storm_schedule(224)
    grids = model.storm_grids(224, schedule)
    ends, last_stage = _stage_ends(model, (224, 224)), len(depths) - 1
    for (s, b), (h, w) in schedule.items():
        incoming = grids[(s, b)]
        if s < last_stage:  # every grid a step leaves in front of a stride-2 downsampling is even
            assert h % 2 == 0 and w % 2 == 0, ((s, b), (h, w))
            if b != ends[s]:  # inner (odd) blocks: one unit of 2 at most, never a hard cut
                assert b % 2 == 1 and incoming[0] - h <= 2 and incoming[1] - w <= 2
        else:  # the last stage: only its first block, and mildly
            assert b == 0 and 4 * h >= 3 * incoming[0] and 4 * w >= 3 * incoming[1]


def test_even_placement_is_deterministic_and_adapts_to_the_input():
    first = TinyHierarchical({"method": "storm_tome", "flops_ratio": 0.25}).storm_schedule(224)
    assert all(TinyHierarchical({"method": "storm_tome", "flops_ratio": 0.25}).storm_schedule(224) == first
               for _ in range(2))
    model = TinyHierarchical({"method": "storm_tome", "flops_ratio": 0.25})
    for size in [(192, 288), (200, 200)]:
        schedule = model.storm_schedule(size)
        assert abs(_cut(model, size, schedule) - 0.25) <= 0.01
        _check_monotone(model, size, schedule)


def test_even_placement_prefers_exits_over_inner_and_last_stage_steps():
    """With a budget one exit step can meet, nothing else is touched (exits weigh least), and the exit
    step is the mildest one that does it."""
    assert EVEN_WEIGHTS["exit"] < EVEN_WEIGHTS["inner"] < EVEN_WEIGHTS["last"]
    model = TinyHierarchical({"method": "storm_tome", "schedule": [{"stage": 0, "block": 1, "size": [50, 50]}]})
    ratio = _cut(model, (224, 224), {(0, 1): (50, 50)})
    model.set_storm(schedule=None, flops_ratio=round(ratio, 4))
    schedule = model.storm_schedule(224)
    assert len(schedule) <= 2 and (0, 1) in schedule
    assert all(b == _stage_ends(model, (224, 224))[s] for s, b in schedule)


def test_legacy_placement_stays_selectable_and_explicit_positions_default_to_it():
    legacy = TinyHierarchical({"method": "storm_tome", "flops_ratio": 0.2, "placement": "legacy"})
    schedule = legacy.storm_schedule(224)
    assert set(schedule) <= {(0, 1), (1, 1), (2, 1), (2, 3), (2, 5), (2, 7)}  # odd blocks, never the last stage
    odd = [[s, b] for s, b in sorted(schedule)]
    with_positions = TinyHierarchical({"method": "storm_tome", "flops_ratio": 0.2, "positions": odd})
    explicit_legacy = TinyHierarchical({"method": "storm_tome", "flops_ratio": 0.2, "positions": odd,
                                        "placement": "legacy"})
    assert with_positions.storm_schedule(224) == explicit_legacy.storm_schedule(224)
    plain = TinyPlain({"method": "storm_tome", "flops_ratio": 0.3})  # single stage: the legacy default
    assert plain.storm_schedule(224) == plain.set_storm(placement="legacy").storm_schedule(224)


def test_even_placement_errors_say_what_to_change():
    with pytest.raises(ValueError, match="placement='legacy'"):
        TinyHierarchical({"method": "storm_tome", "flops_ratio": 0.9}).storm_schedule(224)
    with pytest.raises(ValueError, match="beyond the model's depth"):
        TinyHierarchical({"method": "storm_tome", "flops_ratio": 0.2, "placement": "even",
                          "positions": [[2, 8]]}).storm_schedule(224)


def test_solver_rejects_unreachable_budgets_and_bad_positions():
    with pytest.raises(ValueError, match="closest schedule cuts"):
        TinyHierarchical({"method": "storm_tome", "flops_ratio": 0.6, "positions": [[3, 1]]}).storm_schedule(224)
    with pytest.raises(ValueError, match="beyond the model's depth"):
        TinyHierarchical({"method": "storm_tome", "flops_ratio": 0.2, "positions": [[2, 8]]}).storm_schedule(224)


def test_zero_ratio_and_method_none_mean_no_schedule():
    model = TinyHierarchical({"method": "storm_tome", "flops_ratio": 0.0})
    assert model.storm_schedule(224) == {}
    model.set_storm(method="none", flops_ratio=None, schedule=[{"stage": 0, "block": 0, "size": [50, 50]}])
    assert model.storm_schedule(224) == {}
    assert model.count_flops().total == model._flops((224, 224), {}).total
    assert model.storm_overhead_flops() == 0


def test_explicit_schedule_errors_say_what_to_change():
    entry = lambda s, b, n: {"stage": s, "block": b, "size": [n, n]}  # noqa: E731
    model = TinyHierarchical({"method": "storm_tome", "schedule": [entry(0, 1, 50), entry(2, 0, 12)]})
    assert model.storm_schedule(224) == {(0, 1): (50, 50), (2, 0): (12, 12)}
    assert model.storm_grids(224)[(1, 0)] == (25, 25) and model.storm_grids(224)[(2, 1)] == (12, 12)
    with pytest.raises(ValueError, match="larger than the current.*flops_ratio"):
        model.storm_schedule(160)
    for bad, message in [([entry(4, 0, 3)], "does not exist"), ([entry(0, 0, 50), entry(0, 0, 49)], "twice"),
                         ([entry(0, 0, 27)], "at most once per step")]:
        with pytest.raises(ValueError, match=message):
            model.set_storm(schedule=bad).storm_schedule(224)


def test_count_flops_follows_the_schedule_and_overhead_is_separate():
    model = TinyHierarchical({"method": "storm_tome", "schedule": [{"stage": 0, "block": 1, "size": [50, 50]}]})
    base = model._flops((224, 224), {}).total
    reduced = model.count_flops().total
    assert reduced == model._flops((224, 224), {(0, 1): (50, 50)}).total < base
    # storm_tome l1: one C-wide similarity per local pair of each pass
    assert model.storm_overhead_flops() == (56 * 28 + 50 * 28) * 96
    assert model.set_storm(method="random").storm_overhead_flops() == 0
    assert model.set_storm(method="storm_evit").storm_overhead_flops() == 56 * 56 * 96


def test_schedule_is_cached_per_config_and_size():
    model = TinyHierarchical({"method": "storm_tome", "flops_ratio": 0.2})
    first = model.storm_schedule(224)
    calls = model.flops_calls
    assert model.storm_schedule((224, 224)) == first and model.flops_calls == calls
    assert model.set_storm(flops_ratio=0.3).storm_schedule(224) != first


def test_downsampling_rule_must_match_the_backbone():
    class FloorDownsample(TinyHierarchical):
        def _natural_grids(self, image_size):
            h = image_size[0] // 4
            return {(s, 0): (h >> s, h >> s) for s in range(2)}

    model = FloorDownsample({"method": "storm_tome", "flops_ratio": 0.1})
    with pytest.raises(NotImplementedError, match="_downsample_grid"):
        model.storm_schedule(196)  # 49 -> 24 is not a padded stride-2 step
    model._downsample_grid = lambda grid, stage: (grid[0] // 2, grid[1] // 2)
    grids = model.storm_grids(196, {(0, 0): (40, 40)})
    assert grids == {(0, 0): (49, 49), (1, 0): (20, 20)}


# ------------------------------------------------------------------------------------------ presets

# STORM's strategies.yml (VMamba): tokens removed after each (stage, block) at 224x224.
OFFICIAL_STRATEGIES = {
    "vmamba_tiny_prune_strategy_1": [[111, 109], [53, 0], [0, 25, 0, 23, 0, 21, 0, 0], [0, 0]],
    "vmamba_tiny_prune_strategy_2": [[220, 212], [51, 49], [0, 23, 0, 21, 0, 0, 0, 0], [0, 0]],
    "vmamba_tiny_prune_strategy_3": [[432, 400], [92, 84], [0, 19, 0, 17, 0, 0, 0, 0], [0, 0]],
    "vmamba_tiny_prune_strategy_4": [[636, 564], [84, 76], [0, 0, 0, 17, 0, 0, 0, 0], [0, 0]],
    "vmamba_tiny_prune_strategy_5": [[832, 704], [0, 0], [0, 19, 0, 17, 0, 0, 0, 0], [0, 0]],
    "vmamba_tiny_hybrid_1p1": [[0, 220], [0, 53], [0, 25, 0, 23, 0, 21, 0, 19], [0, 0]],
    "vmamba_tiny_hybrid_2p1": [[0, 432], [0, 100], [0, 23, 0, 21, 0, 19, 0, 17], [0, 0]],
    "vmamba_tiny_hybrid_3p1": [[0, 636], [0, 141], [0, 21, 0, 19, 0, 17, 0, 15], [0, 0]],
    "vmamba_tiny_hybrid_4p1": [[0, 832], [0, 176], [0, 19, 0, 17, 0, 15, 0, 13], [0, 0]],
    "vmamba_tiny_hybrid_5p1": [[0, 1200], [0, 160], [0, 17, 0, 15, 0, 13, 0, 11], [0, 0]],
    "vmamba_sb_hybrid_1p1": [[0, 220], [0, 53], [0, 0, 0, 25, 0, 0, 0, 23, 0, 0, 0, 21, 0, 0, 19], [0, 0]],
    "vmamba_sb_hybrid_2p1": [[0, 432], [0, 100], [0, 0, 0, 23, 0, 0, 0, 21, 0, 0, 0, 19, 0, 0, 17], [0, 0]],
    # the official list has 16 entries for the 15-block stage; the 16th is never read
    "vmamba_sb_hybrid_3p1": [[0, 636], [0, 141], [0, 0, 0, 21, 0, 0, 0, 19, 0, 0, 0, 17, 0, 0, 0, 15], [0, 0]],
    "vmamba_sb_hybrid_4p1": [[0, 832], [0, 176], [0, 0, 0, 19, 0, 0, 0, 17, 0, 0, 0, 15, 0, 0, 13], [0, 0]],
    "vmamba_sb_hybrid_5p1": [[0, 1200], [0, 160], [0, 0, 0, 17, 0, 0, 0, 15, 0, 0, 0, 13, 0, 0, 11], [0, 0]],
}


# STORM's scheduals.yml (PlainMamba): token count after layer index, at 224x224 (14x14 patches).
OFFICIAL_PLAINMAMBA_SCHEDULES = {
    1: {4: 169, 10: 144, 16: 100, 22: 81},
    2: {4: 144, 10: 100, 16: 64, 22: 36},
    3: {4: 100, 10: 64, 16: 36, 22: 16},
    4: {4: 100, 10: 64, 16: 25, 22: 9},
    5: {4: 64, 10: 36, 16: 16, 22: 9},
}


@pytest.mark.parametrize("index", sorted(OFFICIAL_PLAINMAMBA_SCHEDULES))
def test_plainmamba_presets_equal_the_official_token_counts(index):
    model = TinyPlain(json.loads((CONFIGS / f"plainmamba_schedule_{index}.json").read_text()), depth=24)
    schedule = model.storm_schedule(224)
    assert {b: h * w for (_, b), (h, w) in schedule.items()} == OFFICIAL_PLAINMAMBA_SCHEDULES[index]
    assert all(h == w for h, w in schedule.values())


def test_every_preset_is_a_valid_storm_config():
    files = sorted(CONFIGS.glob("*.json"))
    assert len(files) >= len(OFFICIAL_STRATEGIES)
    for path in files:
        cfg = StormConfig.from_any(json.loads(path.read_text()))
        assert cfg.enabled, path.name


@pytest.mark.parametrize("name", sorted(OFFICIAL_STRATEGIES))
def test_vmamba_presets_equal_the_official_token_counts(name):
    depths = (2, 2, 15, 2) if "_sb_" in name else (2, 2, 8, 2)
    model = TinyHierarchical(json.loads((CONFIGS / f"{name}.json").read_text()), depths=depths)
    schedule = model.storm_schedule(224)
    grids = model.storm_grids(224, schedule)
    expected = {}
    for s, removals in enumerate(OFFICIAL_STRATEGIES[name]):
        for b, n in enumerate(removals[: depths[s]]):
            if n:
                area = grids[(s, b)][0] * grids[(s, b)][1] - n
                assert math.isqrt(area) ** 2 == area
                expected[(s, b)] = (math.isqrt(area),) * 2
    assert schedule == expected


# ------------------------------------------------------------------------------- with a real backbone

ALL_METHODS = ["storm_tome", "storm_evit", "evit", "tome", "random", "top", "mtr"]
TINY_SCHEDULE = [{"stage": 0, "block": 0, "size": [12, 12]}, {"stage": 1, "block": 0, "size": [5, 5]}]


@pytest.fixture(scope="module")
def vmamba():
    modeling = pytest.importorskip("storm_hf.modeling_vmamba")
    from storm_hf.configuration_vmamba import VMambaConfig

    torch.manual_seed(0)
    config = VMambaConfig(dims=[8, 16, 32, 64], depths=[1, 1, 2, 1], num_labels=4, drop_path_rate=0.0)
    model = modeling.VMambaForImageClassification(config).eval()
    # Freshly initialised LayerNorms (weight 1, bias 0) give every token a channel mean of exactly 0, which
    # would leave `evit`'s signed-mean score to rounding noise; trained norms do not, so randomise them.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.5)
    return model


def _pixels(batch=2, size=64, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ALL_METHODS)
def test_vmamba_every_method_reduces_the_grid_and_changes_logits(vmamba, method):
    pixels = _pixels()
    with torch.no_grad():
        plain = vmamba(pixels).logits
        vmamba.set_storm(method=method, schedule=TINY_SCHEDULE)
        try:
            out = vmamba(pixels, output_hidden_states=True)
            single = vmamba(pixels[1:]).logits
        finally:
            vmamba.set_storm(method="none", schedule=None)
    assert [tuple(h.shape[1:]) for h in out.hidden_states] == [(8, 16, 16), (8, 12, 12), (16, 5, 5), (32, 3, 3), (64, 2, 2)]
    assert out.logits.shape == plain.shape and torch.isfinite(out.logits).all()
    assert not torch.allclose(out.logits, plain, atol=1e-4)
    torch.testing.assert_close(single, out.logits[1:], rtol=1e-4, atol=1e-5)  # no cross-sample leakage


def test_vmamba_count_flops_follows_the_schedule(vmamba):
    from storm_hf.modeling_vmamba import vmamba_flops

    base = vmamba.count_flops(64).total
    assert base == vmamba_flops(vmamba.config, (64, 64), {}).total
    vmamba.set_storm(method="storm_tome", schedule=TINY_SCHEDULE)
    try:
        reduced = vmamba.count_flops(64).total
        expected = vmamba_flops(vmamba.config, (64, 64), {(0, 0): (12, 12), (1, 0): (5, 5)}).total
        overhead = vmamba.storm_overhead_flops(64)
    finally:
        vmamba.set_storm(method="none", schedule=None)
    assert reduced == expected < base
    assert overhead == (16 * 8 + 12 * 8) * 8 + (6 * 3 + 5 * 3) * 16  # one 1-channel-wide L1 per local pair


def test_vmamba_flops_ratio_is_solved_from_its_own_counter(vmamba):
    vmamba.set_storm(method="storm_evit", flops_ratio=0.25, positions=[[0, 0], [1, 0], [2, 0], [2, 1]])
    try:
        schedule = vmamba.storm_schedule(224)
        cut = 1 - vmamba.count_flops(224).total / vmamba._flops((224, 224), {}).total
        with torch.no_grad():
            logits = vmamba(_pixels(1, 96)).logits  # solved again for a 96x96 input
    finally:
        vmamba.set_storm(method="none", flops_ratio=None, positions=None)
    assert abs(cut - 0.25) <= 0.01 and schedule and all(h == w for h, w in schedule.values())
    assert torch.isfinite(logits).all()


def test_a_classifier_reports_the_schedule_its_backbone_runs():
    """With a heavy head, solving with the head's FLOPs could pick another schedule than the forward runs."""
    from storm_hf import VMambaConfig, VMambaForImageClassification

    config = VMambaConfig(dims=[16, 32, 64, 128], depths=[2, 2, 4, 2], patch_size=2, num_labels=1000)
    with torch.device("meta"):
        model = VMambaForImageClassification(config)
    for method in ("storm_tome", "storm_evit", "evit"):
        model.set_storm(method=method, flops_ratio=0.3)
        assert model.storm_schedule((32, 32)) == model.vmamba.storm_schedule((32, 32)), method


# ----------------------------------------------------------------------------------------------------------
# The fast STORM(ToMe) apply: source groups + gathers instead of a scatter-add
# ----------------------------------------------------------------------------------------------------------


@FAST
@given(case=storm_case(), similarity=st.sampled_from(["l1", "cosine"]), dtype=st.sampled_from(["f32", "f64"]))
def test_storm_groups_hold_exactly_the_tokens_of_each_slot_and_sum_like_the_scatter(case, similarity, dtype):
    h, w, out_h, out_w, window, seed = case
    dt = torch.float32 if dtype == "f32" else torch.float64
    x, _ = _maps(seed, 2, h, w, 5, dtype=dt)
    plan, _, _ = storm_plan(x, (out_h, out_w), kind="tome", window=window, similarity=similarity)
    assert plan.groups is not None and plan.groups.shape == (2, out_h * out_w, 4)
    for b in range(2):
        for slot in range(out_h * out_w):
            want = (plan.dest[b] == slot).nonzero()[:, 0].tolist()
            got = [int(i) for i in plan.groups[b, slot] if i >= 0]
            assert got == want  # the same tokens, ascending (the summation order of a sequential scatter)
    fast, _ = plan.apply(x)
    slow, _ = dataclasses.replace(plan, groups=None).apply(x)
    assert torch.equal(fast, slow)  # CPU scatter-add sums in raster order: bit-identical


def test_storm_groups_in_half_precision_round_once():
    x, _ = _maps(3, 2, 14, 14, 8, dtype=torch.float32)
    plan, _, _ = storm_plan(x, (8, 9), kind="tome", window=5)
    for dtype in (torch.bfloat16, torch.float16):
        got, _ = plan.apply(x.to(dtype))
        assert got.dtype == dtype
        # fp32 accumulation, one rounding to `dtype`: exactly the rounded exact sum (inputs are already in dtype)
        exact_in_dtype, _ = dataclasses.replace(plan, groups=None).apply(x.to(dtype).double())
        assert torch.equal(got, exact_in_dtype.to(dtype))


def test_storm_mean_and_drop_plans_keep_the_general_arithmetic():
    x, branch = _maps(4, 2, 10, 12, 3)
    for mode in ("mean", "drop"):
        cfg = StormConfig(method="storm_tome", merge_mode=mode)
        plan, _, _ = storm_plan(x, (6, 7), kind="tome", merge_mode=mode)
        assert (plan.groups is not None) == (mode != "drop")
        out, _, _ = reduce_tokens(cfg, x, branch, (6, 7))
        want, _ = dataclasses.replace(plan, groups=None).apply(x, None, "mean" if mode == "mean" else "sum")
        torch.testing.assert_close(out, want)


@pytest.mark.parametrize("window", [1, 3, 5, 32, 33])
def test_window_ranking_by_comparison_matches_a_stable_sort(window):
    from storm_hf.reduction import _select_in_windows, window_budgets

    g = torch.Generator().manual_seed(window)
    scores = torch.randint(0, 4, (50, 71), generator=g).double()  # many ties
    quotas = [min(q, min(window, 71 - i * window)) for i, q in enumerate(window_budgets(71, 30, window))]
    got = _select_in_windows(scores, quotas, window)
    for row in range(50):
        for k, quota in enumerate(quotas):
            part = scores[row, k * window:(k + 1) * window]
            order = sorted(range(len(part)), key=lambda i: (-float(part[i]), i))[:quota]
            want = torch.zeros(len(part), dtype=torch.bool)
            want[order] = True
            assert torch.equal(got[row, k * window:(k + 1) * window], want)
