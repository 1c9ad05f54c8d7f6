"""Triton kernel for applying a merge plan: every output slot sums a few gathered input tokens in one pass.

Imported lazily by ``reduction.py`` (:func:`~.reduction.sum_groups`, its PyTorch reference); importing this
module raises ``ImportError`` without Triton, and the reference runs instead. A STORM(ToMe) slot sums at most
four tokens (a 2 x 2 block of local pairs), so reading them by index and summing in registers moves each byte
once, where a scatter-add zero-fills, adds with (16-bit CAS-loop) atomics and copies the result out of a
padded buffer. Sums accumulate in fp32 in ascending source order and round once to the input dtype, exactly
as the reference does.
"""
from __future__ import annotations

import torch

try:  # every triton import stays inside this try: transformers' remote-code checker then treats triton as optional
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised on machines without triton
    raise ImportError("reduction_triton needs the `triton` package; the PyTorch gathers are used without it.") from exc


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
