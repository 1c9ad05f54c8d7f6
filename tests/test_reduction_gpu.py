"""The Triton reduction kernels (`reduction_triton.py`: pair similarities, plan application) against their PyTorch
references, and the reduction step on CUDA against the CPU. Marked `gpu`: runs on the device, or on the CPU through
Triton's interpreter (`TRITON_INTERPRET=1`)."""
from __future__ import annotations

import pytest
import torch

from storm_hf import reduction
from storm_hf.reduction import StormConfig, reduce_tokens, storm_plan, sum_groups
from tests.gpu_markers import DEVICE, HAS_CUDA, INTERPRET, gpu, needs_cuda, needs_kernel


def _random_groups(batch: int, length: int, num_out: int, k: int, seed: int) -> torch.Tensor:
    """Ascending source indices with absent (-1) entries, at least one source per slot."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, length, (batch, num_out, k), generator=g).sort(-1).values
    absent = torch.rand(batch, num_out, k, generator=g) < 0.4
    absent[..., -1] = False
    return idx.masked_fill(absent, -1)


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 37, 29, 3, 4), (3, 300, 190, 96, 4), (1, 64, 10, 200, 2), (2, 5, 0, 8, 4)],
                         ids=lambda s: "b{}_L{}_N{}_C{}_K{}".format(*s))
def test_sum_groups_kernel_equals_the_reference(shape, dtype):
    from storm_hf.reduction_triton import sum_groups_triton

    batch, length, num_out, channels, k = shape
    flat = torch.randn(batch, length, channels, generator=torch.Generator().manual_seed(1)).to(dtype)
    groups = _random_groups(batch, length, num_out, k, seed=2)
    want = sum_groups(flat, groups)  # CPU reference: fp32 accumulation in ascending order, one rounding
    got = sum_groups_triton(flat.to(DEVICE), groups.to(DEVICE))
    assert got.dtype == dtype and got.shape == want.shape
    if INTERPRET and not HAS_CUDA and dtype == torch.bfloat16:  # the interpreter truncates fp32 -> bf16
        torch.testing.assert_close(got.cpu().float(), want.float(), rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(got.cpu(), want)


@gpu
@needs_kernel
def test_sum_groups_kernel_rejects_what_it_cannot_do():
    from storm_hf.reduction_triton import sum_groups_triton

    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        sum_groups_triton(torch.zeros(1, 4, 2, dtype=torch.float64, device=DEVICE),
                          torch.zeros(1, 2, 1, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="same B"):
        sum_groups_triton(torch.zeros(2, 4, 2, device=DEVICE), torch.zeros(1, 2, 1, dtype=torch.long, device=DEVICE))


@gpu
@needs_kernel
@pytest.mark.parametrize("similarity", ["l1", "l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 9, 5), (1, 12, 16, 96), (2, 3, 1, 70)], ids=lambda s: "x".join(map(str, s)))
def test_pair_score_kernels_match_the_reference(shape, dtype, similarity):
    """Both passes' similarities: the row kernel on local pairs, the column kernel on the row-merged map it never
    materialises, against pair_similarity on an fp32 copy (the reference path of storm_plan)."""
    from storm_hf.reduction import _slot_runs, _sum_runs, pair_merge_slots, pair_similarity
    from storm_hf.reduction_triton import column_pair_scores, row_pair_scores

    b, h, w, c = shape
    x = torch.randn(b, h, w, c, generator=torch.Generator().manual_seed(5)).to(dtype)
    ref32 = x.float()
    pairs = w // 2
    want = pair_similarity(ref32[:, :, 0:2 * pairs:2], ref32[:, :, 1:2 * pairs:2], similarity)
    got = row_pair_scores(x.to(DEVICE), similarity).cpu()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    out_w = w - pairs // 2
    slots = pair_merge_slots(ref32.reshape(b * h, w, c), w - out_w, 5, similarity, drop=False)
    last, count = _slot_runs(slots, out_w)
    merged = _sum_runs(ref32.reshape(b * h, w, c), last, count).view(b, h, out_w, c)
    rows = h // 2
    want = pair_similarity(merged[:, 0:2 * rows:2], merged[:, 1:2 * rows:2], similarity)
    got = column_pair_scores(x.to(DEVICE), last.view(b, h, out_w).to(DEVICE), count.view(b, h, out_w).to(DEVICE),
                             similarity).cpu()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@gpu
@needs_cuda
@pytest.mark.parametrize("similarity", ["l1", "cosine"])
def test_storm_plan_with_kernels_equals_the_reference_plan(similarity, monkeypatch):
    x = torch.randn(3, 28, 30, 64, generator=torch.Generator().manual_seed(6), device="cpu").cuda().bfloat16()
    fast = storm_plan(x, (20, 21), kind="tome", similarity=similarity)
    monkeypatch.setenv("STORM_HF_REDUCTION_KERNEL", "0")
    slow = storm_plan(x, (20, 21), kind="tome", similarity=similarity)
    for a, b in zip(fast[1:], slow[1:]):
        assert torch.equal(a, b)
    assert torch.equal(fast[0].dest, slow[0].dest) and torch.equal(fast[0].groups, slow[0].groups)


@gpu
@needs_cuda
@pytest.mark.parametrize("method", ["storm_tome", "storm_evit", "tome", "evit"])
def test_reduction_step_on_cuda_matches_cpu(method, monkeypatch):
    calls = []
    kernels = reduction._reduction_kernels(torch.zeros(1, device="cuda"))
    assert kernels is not None, "Triton reduction kernels did not load on a CUDA machine"
    monkeypatch.setattr(reduction, "_reduction_kernels", lambda x: (calls.append(1), kernels)[1] if x.is_cuda else None)
    g = torch.Generator().manual_seed(0)
    x, branch = torch.randn(4, 28, 30, 48, generator=g), torch.randn(4, 28, 30, 48, generator=g)
    cfg = StormConfig(method=method, flops_ratio=0.3)
    want = reduce_tokens(cfg, x, branch, (20, 21))
    got = reduce_tokens(cfg, x.cuda(), branch.cuda(), (20, 21))
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)
    # kernels plan and apply STORM(ToMe); drop plans of this small map keep torch.gather; tome merges by mean
    assert bool(calls) == (method == "storm_tome")
    plan_cpu, _, _ = storm_plan(x, (20, 21), kind="tome")
    plan_gpu, _, _ = storm_plan(x.cuda(), (20, 21), kind="tome")
    assert torch.equal(plan_gpu.dest.cpu(), plan_cpu.dest) and torch.equal(plan_gpu.groups.cpu(), plan_cpu.groups)


@gpu
@needs_cuda
@pytest.mark.parametrize("method", ["storm_evit", "evit", "random"])
def test_drop_plans_through_the_kernel_equal_the_gather(method, monkeypatch):
    g = torch.Generator().manual_seed(1)
    x, branch = torch.randn(3, 20, 22, 40, generator=g).cuda(), torch.randn(3, 20, 22, 40, generator=g).cuda()
    cfg = StormConfig(method=method, flops_ratio=0.3)
    want = reduce_tokens(cfg, x, branch, (16, 18))
    monkeypatch.setattr(reduction, "KERNEL_GATHER_MIN_ELEMENTS", 0)  # large-map path on a small map
    got = reduce_tokens(cfg, x, branch, (16, 18))
    for a, b in zip(got[:2], want[:2]):
        assert torch.equal(a, b)
