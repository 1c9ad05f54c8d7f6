"""Triton kernels for a STORM(ToMe) step: score the local pairs of both passes, then apply the plan.

Imported lazily by ``reduction.py``, which holds the PyTorch reference of each (``pair_similarity`` on an fp32
copy, ``_sum_runs``, :func:`~.reduction.sum_groups`); importing this module raises ``ImportError`` without
Triton, and the references run instead. The references move the map many times (an fp32 copy, strided
differences, gathers of the row-merged map, a scatter-add); here each kernel reads the 16-bit map once:

* ``row_pair_scores``: similarity of tokens (2j, 2j+1) of every row, accumulated in fp32;
* ``column_pair_scores``: similarity of rows (2i, 2i+1) of every column of the *row-merged* map, summing each
  row slot's run of 1-2 tokens on the fly (head + tail, as the reference) instead of materialising that map;
* ``sum_groups_triton``: every output slot sums its <= 4 source tokens (fp32, ascending order, one rounding),
  where a scatter-add zero-fills, adds with 16-bit CAS-loop atomics and copies out of a padded buffer.
"""
from __future__ import annotations

import torch

try:  # every triton import stays inside this try: transformers' remote-code checker then treats triton as optional
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised on machines without triton
    raise ImportError("reduction_triton needs the `triton` package; the PyTorch gathers are used without it.") from exc


SIMILARITY_CODES = {"l1": 0, "l2": 1, "cosine": 2}


@triton.jit
def _accumulate(a, b, acc, norm_a, norm_b, KIND: tl.constexpr):
    if KIND == 0:
        acc += tl.sum(tl.abs(a - b), 1)
    elif KIND == 1:
        acc += tl.sum((a - b) * (a - b), 1)
    else:
        acc += tl.sum(a * b, 1)
        norm_a += tl.sum(a * a, 1)
        norm_b += tl.sum(b * b, 1)
    return acc, norm_a, norm_b


@triton.jit
def _finish(acc, norm_a, norm_b, KIND: tl.constexpr):
    if KIND == 2:  # STORM's x / (|x| + 1e-6) normalisation
        return acc / ((tl.sqrt(norm_a) + 1e-6) * (tl.sqrt(norm_b) + 1e-6))
    return -acc  # negative distances: larger = more alike


@triton.jit
def _row_pair_scores_kernel(
    x_ptr, out_ptr, width, pairs, channels,
    KIND: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    line = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = p < pairs
    base = x_ptr + line * width * channels
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    norm_a = tl.zeros((BLOCK_P,), dtype=tl.float32)
    norm_b = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = ok[:, None] & (cols < channels)[None, :]
        first = (2 * p).to(tl.int64)[:, None] * channels + cols[None, :]
        a = tl.load(base + first, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(base + first + channels, mask=mask, other=0.0).to(tl.float32)
        acc, norm_a, norm_b = _accumulate(a, b, acc, norm_a, norm_b, KIND)
    tl.store(out_ptr + line * pairs + p, _finish(acc, norm_a, norm_b, KIND), mask=ok)


@triton.jit
def _run_sum(base, last, count, cols, mask, channels):
    """A row slot's token: its run of 1-2 tokens summed in fp32, head + tail."""
    tail = tl.load(base + last.to(tl.int64)[:, None] * channels + cols[None, :], mask=mask, other=0.0)
    head = tl.load(base + (last - 1).to(tl.int64)[:, None] * channels + cols[None, :],
                   mask=mask & (count == 2)[:, None], other=0.0)
    return head.to(tl.float32) + tail.to(tl.float32)


@triton.jit
def _column_pair_scores_kernel(
    x_ptr, last_ptr, count_ptr, out_ptr, height, width, out_w, pairs, channels,
    KIND: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # (pair i, column w') flattened
    ok = q < pairs * out_w
    i = q // out_w
    col = q % out_w
    runs = batch * height * out_w + (2 * i) * out_w + col  # row 2i's slot; row 2i + 1 is out_w further
    last_a = tl.load(last_ptr + runs, mask=ok, other=0)
    count_a = tl.load(count_ptr + runs, mask=ok, other=1)
    last_b = tl.load(last_ptr + runs + out_w, mask=ok, other=0)
    count_b = tl.load(count_ptr + runs + out_w, mask=ok, other=1)
    row_a = x_ptr + batch * height * width * channels + (2 * i).to(tl.int64)[:, None] * width * channels
    row_b = row_a + width * channels
    acc = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    norm_a = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    norm_b = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = ok[:, None] & (cols < channels)[None, :]
        a = _run_sum(row_a, last_a, count_a, cols, mask, channels)
        b = _run_sum(row_b, last_b, count_b, cols, mask, channels)
        acc, norm_a, norm_b = _accumulate(a, b, acc, norm_a, norm_b, KIND)
    tl.store(out_ptr + batch * pairs * out_w + q, _finish(acc, norm_a, norm_b, KIND), mask=ok)


def _check_map(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 4 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} expects a (B, H, W, C) fp32/fp16/bf16 map, got {tuple(x.shape)} {x.dtype}.")
    return x.contiguous()


def _channel_block(channels: int) -> int:
    return min(triton.next_power_of_2(max(channels, 1)), 64)


def row_pair_scores(x: torch.Tensor, similarity: str) -> torch.Tensor:
    """(B, H, W, C) -> (B, H, W // 2) fp32: similarity of tokens (2j, 2j+1) of every row (larger = more alike)."""
    x = _check_map(x, "row_pair_scores")
    b, h, w, c = x.shape
    pairs = w // 2
    out = torch.empty(b, h, pairs, device=x.device, dtype=torch.float32)
    if out.numel():
        block_p = 32
        _row_pair_scores_kernel[(b * h, triton.cdiv(pairs, block_p))](
            x, out, w, pairs, c, KIND=SIMILARITY_CODES[similarity], BLOCK_P=block_p, BLOCK_C=_channel_block(c),
            num_warps=4)
    return out


def column_pair_scores(x: torch.Tensor, last: torch.Tensor, count: torch.Tensor, similarity: str) -> torch.Tensor:
    """Similarity of rows (2i, 2i+1) of every column of the row-merged map, (B, H // 2, W') fp32.

    ``last``/``count`` (B, H, W'): the last token and the run length (1 or 2) of every row slot.
    """
    x = _check_map(x, "column_pair_scores")
    b, h, w, c = x.shape
    out_w = last.shape[-1]
    if tuple(last.shape) != (b, h, out_w) or last.shape != count.shape:
        raise ValueError(f"last/count must be (B, H, W') = {(b, h, out_w)}, got {tuple(last.shape)} and "
                         f"{tuple(count.shape)}.")
    pairs = h // 2
    out = torch.empty(b, pairs, out_w, device=x.device, dtype=torch.float32)
    if out.numel():
        block_q = 32
        _column_pair_scores_kernel[(b, triton.cdiv(pairs * out_w, block_q))](
            x, last.contiguous(), count.contiguous(), out, h, w, out_w, pairs, c,
            KIND=SIMILARITY_CODES[similarity], BLOCK_Q=block_q, BLOCK_C=_channel_block(c), num_warps=4)
    return out


@triton.jit
def _sum_groups_kernel(
    x_ptr, groups_ptr, out_ptr,
    num_out, channels,
    stride_xb, stride_xl, stride_gb, stride_gn, stride_ob, stride_on,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    block = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    slots = block * BLOCK_N + tl.arange(0, BLOCK_N)
    slot_ok = slots < num_out
    for c0 in range(0, channels, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < channels
        acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for k in tl.static_range(K):
            index = tl.load(groups_ptr + batch * stride_gb + slots * stride_gn + k, mask=slot_ok, other=-1)
            present = (index >= 0) & slot_ok
            rows = tl.where(present, index, 0).to(tl.int64)
            ptrs = x_ptr + batch * stride_xb + rows[:, None] * stride_xl + cols[None, :]
            acc += tl.load(ptrs, mask=present[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        out = out_ptr + batch * stride_ob + slots[:, None].to(tl.int64) * stride_on + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=slot_ok[:, None] & col_ok[None, :])


def sum_groups_triton(flat: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(B, L, C) fp32/fp16/bf16 and groups (B, N, K) (input indices, -1 = none) -> (B, N, C) slot sums."""
    if flat.dim() != 3 or groups.dim() != 3 or groups.shape[0] != flat.shape[0]:
        raise ValueError(f"sum_groups_triton expects flat (B, L, C) and groups (B, N, K) with the same B, got "
                         f"{tuple(flat.shape)} and {tuple(groups.shape)}.")
    if flat.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"sum_groups_triton handles fp32/fp16/bf16, not {flat.dtype}; use reduction.sum_groups.")
    flat = flat if flat.stride(-1) == 1 else flat.contiguous()
    groups = groups.contiguous()
    batch, _, channels = flat.shape
    num_out, k = groups.shape[1], groups.shape[2]
    out = flat.new_empty(batch, num_out, channels)
    if out.numel() == 0:
        return out
    block_c = min(triton.next_power_of_2(channels), 128)
    block_n = max(16, min(64, 4096 // block_c))
    grid = (triton.cdiv(num_out, block_n), batch)
    _sum_groups_kernel[grid](
        flat, groups, out, num_out, channels,
        flat.stride(0), flat.stride(1), groups.stride(0), groups.stride(1), out.stride(0), out.stride(1),
        K=k, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=4,
    )
    return out
