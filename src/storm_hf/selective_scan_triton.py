"""Triton kernels for the Mamba-1 selective scan (forward and backward).

Imported lazily by `selective_scan.py`; importing this module raises `ImportError` when Triton is
missing so that model code can fall back to the PyTorch paths.

Work split: one program owns one batch element, one B/C group and `BLOCK_D` channels of that group,
and walks the sequence in chunks of `BLOCK_L` steps, carrying the (BLOCK_D, N) state between
chunks. Inside a chunk the recurrence `h_t = a_t h_{t-1} + b_t` is an associative scan over a
(BLOCK_D, N, BLOCK_L) tile. Every tensor is built from loads of 3-D pointer blocks whose last axis
is time, so Triton gives them one layout in which each thread holds a run of consecutive time
steps: the scan is then mostly sequential inside threads, with few shuffles and no layout
conversions. The forward reads its inputs once and writes y once (memory-bound for small N).

The forward stores the state at every chunk start (fp32, batch x channels x N x chunks: small next
to the inputs). The backward walks the chunks in reverse, recomputes the states of each chunk from
its stored start, and runs the adjoint `g_t = C_t dy_t + exp(Δ_{t+1} A) g_{t+1}` as a reverse scan.
The shift by one step is folded into the scan (see `_adjoint_combine`) instead of re-loading Δ at
t+1. Gradients of B and C (shared by a group's channels) are summed over the tile's channels, then
added atomically across programs; per-channel parameter gradients (A, D, delta_bias) are written
per batch element and summed in PyTorch, which keeps them deterministic.

`ordered_selective_scan_triton` is the same forward recurrence for K scan orders of one raster-ordered
input (see the section "ordered scan" below): inputs are read through the order, the K outputs are
summed in raster order inside the kernel. It has no backward: `ordered_selective_scan` sends calls
that need gradients through the materialised path (a fused backward measured slower, BENCHMARKS.md).
"""
from __future__ import annotations

import os

import torch

from .selective_scan import ORDERED_INPUTS

try:  # every triton import stays inside this try: transformers' remote-code checker then treats triton as optional
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError as exc:  # pragma: no cover - exercised on machines without triton
    raise ImportError(
        "storm_hf.selective_scan_triton needs Triton (pip install 'storm-hf[gpu]'); "
        "use selective_scan(..., backend='chunked') without it"
    ) from exc

__all__ = ["selective_scan_triton", "ordered_selective_scan_triton", "launch_config", "MAX_D_STATE"]

MAX_D_STATE = 16
# Approximate division (rcp + mul) on the GPU; Triton's CPU interpreter has no libdevice.
_FAST_MATH = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _linear_combine(a_left, b_left, a_right, b_right):
    # Composition of h -> a_left*h + b_left followed by h -> a_right*h + b_right.
    return a_left * a_right, a_right * b_left + b_right


@triton.jit
def _adjoint_combine(a_late, p_late, o_late, x_late, a_early, p_early, o_early, x_early):
    # Reverse scan of the adjoint. A segment [t..e] of steps carries
    #   a = prod_{s=t..e} decay_s,  p = prod_{s=t+1..e} decay_s,
    #   o = sum_{s=t..e} (prod_{r=t..s} decay_r) src_s   (what flows into step t-1),
    #   x = sum_{s=t+1..e} (prod_{r=t+1..s} decay_r) src_s  (what flows into step t: the shifted o).
    # Then g_t = src_t + x_t + p_t * carry, with carry = o of the following chunk's first step.
    return (a_early * a_late, p_early * a_late, o_early + a_early * o_late, x_early + p_early * o_late)


@triton.jit
def _div(a, b):
    # Callers divide by values in [1, 3]: the approximate divide (2 ulp) is exact enough, and
    # avoids the range checks of IEEE division.
    if _FAST_MATH:
        q = libdevice.fast_dividef(a, b)
    else:
        q = a / b
    return q


@triton.jit
def _softplus_parts(v):
    # softplus(v) = max(v, 0) + log1p(t), t = exp(-|v|) in (0, 1]; log1p(t) = 2 atanh(t / (2 + t))
    # by its odd series (|s| <= 1/3, 7 terms: < 2e-8 relative). Fast (one exp2, one divide) and
    # accurate for tiny Δ, where log(1 + exp(v)) in fp32 would lose every digit. Equals PyTorch's
    # thresholded softplus in fp32: above 20 the log1p term is below half an ulp of v.
    t = tl.exp2(tl.abs(v) * -1.4426950408889634)
    s = _div(t, 2.0 + t)
    s2 = s * s
    poly = s2 * (1.0 / 13.0) + (1.0 / 11.0)
    poly = poly * s2 + (1.0 / 9.0)
    poly = poly * s2 + (1.0 / 7.0)
    poly = poly * s2 + (1.0 / 5.0)
    poly = poly * s2 + (1.0 / 3.0)
    poly = poly * s2 + 1.0
    return tl.maximum(v, 0.0) + 2.0 * s * poly, t


@triton.jit
def _softplus(v):
    sp, _ = _softplus_parts(v)
    return sp


@triton.jit
def _softplus_and_grad(v):
    # softplus(v) and its derivative sigmoid(v), sharing the exp.
    sp, t = _softplus_parts(v)
    return sp, _div(tl.where(v >= 0.0, 1.0, t), 1.0 + t)


@triton.jit
def _sigmoid(v):
    # 1 / (1 + exp(-v)) from t = exp(-|v|) in (0, 1], so the divisor stays in [1, 2].
    t = tl.exp2(tl.abs(v) * -1.4426950408889634)
    return _div(tl.where(v >= 0.0, 1.0, t), 1.0 + t)


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_fwd_chunk(u_base, dt_base, B_base, C_base, z_base, l_idx, d_mask, n_mask, length,
                    HAS_Z: tl.constexpr):
    # Raw (input-dtype) tiles of one chunk; steps past the end read as 0.
    l_mask = l_idx < length
    u = tl.load(u_base + l_idx, mask=d_mask & l_mask, other=0.0)
    dt = tl.load(dt_base + l_idx, mask=d_mask & l_mask, other=0.0)
    Bt = tl.load(B_base + l_idx, mask=n_mask & l_mask, other=0.0)
    Ct = tl.load(C_base + l_idx, mask=n_mask & l_mask, other=0.0)
    if HAS_Z:
        zz = tl.load(z_base + l_idx, mask=d_mask & l_mask, other=0.0)
    else:
        zz = u
    return u, dt, Bt, Ct, zz


@triton.jit
def _scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, state_ptr,
    length, n_state, n_groups, per_group, n_chunks,
    s_u_b, s_u_c, s_dt_b, s_dt_c, s_B_b, s_B_g, s_B_n, s_C_b, s_C_g, s_C_n,
    s_z_b, s_z_c, s_o_b, s_o_c,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    STORE_STATES: tl.constexpr,
    BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_bg = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = (pid_bg // n_groups).to(tl.int64)
    g = pid_bg % n_groups
    n_channels = n_groups * per_group

    # Index blocks: channel (D, 1, 1), state (1, N, 1), time (1, 1, L).
    d_loc = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)[:, None, None]
    d_mask = d_loc < per_group
    chan = g * per_group + d_loc
    n_idx = tl.arange(0, N_PAD)[None, :, None]
    n_mask = n_idx < n_state
    dn_mask = d_mask & n_mask
    l_loc = tl.arange(0, BLOCK_L)[None, None, :]

    A2 = tl.load(A_ptr + chan * n_state + n_idx, mask=dn_mask, other=0.0).to(tl.float32)
    A2 = A2 * 1.4426950408889634  # exp(x) == exp2(x * log2 e)
    if HAS_D:
        Dv = tl.load(D_ptr + chan, mask=d_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + chan, mask=d_mask, other=0.0).to(tl.float32)

    u_base = u_ptr + b * s_u_b + chan * s_u_c
    dt_base = dt_ptr + b * s_dt_b + chan * s_dt_c
    o_base = out_ptr + b * s_o_b + chan * s_o_c
    z_base = z_ptr + b * s_z_b + chan * s_z_c  # z_ptr is u_ptr when there is no gate
    B_base = B_ptr + b * s_B_b + g * s_B_g + n_idx * s_B_n
    C_base = C_ptr + b * s_C_b + g * s_C_g + n_idx * s_C_n
    st_base = state_ptr + ((b * n_channels + chan) * n_state + n_idx) * n_chunks

    # Loads for chunk k+1 are issued before chunk k is computed: a hand-made software pipeline
    # (Triton pipelines only loads that feed a dot), so memory latency overlaps the scan.
    u_n, dt_n, B_n, C_n, z_n = _load_fwd_chunk(
        u_base, dt_base, B_base, C_base, z_base, l_loc, d_mask, n_mask, length, HAS_Z)

    h = tl.zeros((BLOCK_D, N_PAD, 1), dtype=tl.float32)
    for k in range(0, n_chunks):
        l_idx = k * BLOCK_L + l_loc
        dl_mask = d_mask & (l_idx < length)
        u = u_n.to(tl.float32)
        dt = dt_n.to(tl.float32)
        Bt = B_n.to(tl.float32)
        Ct = C_n.to(tl.float32)
        zz = z_n.to(tl.float32)
        u_n, dt_n, B_n, C_n, z_n = _load_fwd_chunk(
            u_base, dt_base, B_base, C_base, z_base, l_idx + BLOCK_L, d_mask, n_mask, length, HAS_Z)

        if HAS_BIAS:
            dt = dt + bias
        if SOFTPLUS:
            dt = _softplus(dt)
        if STORE_STATES:
            tl.store(st_base + k, h, mask=dn_mask)

        decay = tl.exp2(dt * A2)
        drive = (dt * u) * Bt
        a_cum, b_cum = tl.associative_scan((decay, drive), 2, _linear_combine)
        hs = a_cum * h + b_cum

        y = tl.sum(hs * Ct, axis=1, keep_dims=True)
        if HAS_D:
            y += Dv * u
        if HAS_Z:
            y = y * zz * _sigmoid(zz)
        tl.store(o_base + l_idx, y, mask=dl_mask)

        # State after the chunk's last step (only used when another full chunk follows).
        h = tl.sum(tl.where(l_loc == BLOCK_L - 1, hs, 0.0), axis=2, keep_dims=True)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dy_ptr, state_ptr,
    du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_part_ptr, dD_part_ptr, dbias_part_ptr,
    length, n_state, n_groups, per_group, n_chunks,
    s_u_b, s_u_c, s_dt_b, s_dt_c, s_B_b, s_B_g, s_B_n, s_C_b, s_C_g, s_C_n,
    s_z_b, s_z_c, s_dy_b, s_dy_c,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_bg = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = (pid_bg // n_groups).to(tl.int64)
    g = pid_bg % n_groups
    n_channels = n_groups * per_group

    d_loc = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)[:, None, None]
    d_mask = d_loc < per_group
    chan = g * per_group + d_loc
    n_idx = tl.arange(0, N_PAD)[None, :, None]
    n_mask = n_idx < n_state
    dn_mask = d_mask & n_mask
    l_loc = tl.arange(0, BLOCK_L)[None, None, :]

    A = tl.load(A_ptr + chan * n_state + n_idx, mask=dn_mask, other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634
    if HAS_D:
        Dv = tl.load(D_ptr + chan, mask=d_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + chan, mask=d_mask, other=0.0).to(tl.float32)

    # Gradients of u, delta, z are allocated contiguous (batch, channels, L).
    row = (b * n_channels + chan) * length
    u_base = u_ptr + b * s_u_b + chan * s_u_c
    dt_base = dt_ptr + b * s_dt_b + chan * s_dt_c
    dy_base = dy_ptr + b * s_dy_b + chan * s_dy_c
    if HAS_Z:
        z_base = z_ptr + b * s_z_b + chan * s_z_c
    B_base = B_ptr + b * s_B_b + g * s_B_g + n_idx * s_B_n
    C_base = C_ptr + b * s_C_b + g * s_C_g + n_idx * s_C_n
    dBC_base = ((b * n_groups + g) * n_state + n_idx) * length
    st_base = state_ptr + ((b * n_channels + chan) * n_state + n_idx) * n_chunks

    carry = tl.zeros((BLOCK_D, N_PAD, 1), dtype=tl.float32)  # adjoint flowing in from later chunks
    dA_acc = tl.zeros((BLOCK_D, N_PAD, 1), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D, 1, 1), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D, 1, 1), dtype=tl.float32)

    # Hand-made software pipeline as in the forward: chunk k-1 is loaded while k is computed.
    l_last = (n_chunks - 1) * BLOCK_L + l_loc
    l_mask = l_last < length
    u_nxt = tl.load(u_base + l_last, mask=d_mask & l_mask, other=0.0)
    v_nxt = tl.load(dt_base + l_last, mask=d_mask & l_mask, other=0.0)
    dy_nxt = tl.load(dy_base + l_last, mask=d_mask & l_mask, other=0.0)
    B_nxt = tl.load(B_base + l_last, mask=n_mask & l_mask, other=0.0)
    C_nxt = tl.load(C_base + l_last, mask=n_mask & l_mask, other=0.0)
    if HAS_Z:
        z_nxt = tl.load(z_base + l_last, mask=d_mask & l_mask, other=0.0)

    for kk in range(0, n_chunks):
        k = n_chunks - 1 - kk
        l_idx = k * BLOCK_L + l_loc
        l_mask = l_idx < length
        dl_mask = d_mask & l_mask
        nl_mask = n_mask & l_mask
        u = u_nxt.to(tl.float32)
        v = v_nxt.to(tl.float32)
        dy = dy_nxt.to(tl.float32)
        Bt = B_nxt.to(tl.float32)
        Ct = C_nxt.to(tl.float32)
        if HAS_Z:
            zz = z_nxt.to(tl.float32)

        l_pre = l_idx - BLOCK_L
        pre_mask = l_pre >= 0
        u_nxt = tl.load(u_base + l_pre, mask=d_mask & pre_mask, other=0.0)
        v_nxt = tl.load(dt_base + l_pre, mask=d_mask & pre_mask, other=0.0)
        dy_nxt = tl.load(dy_base + l_pre, mask=d_mask & pre_mask, other=0.0)
        B_nxt = tl.load(B_base + l_pre, mask=n_mask & pre_mask, other=0.0)
        C_nxt = tl.load(C_base + l_pre, mask=n_mask & pre_mask, other=0.0)
        if HAS_Z:
            z_nxt = tl.load(z_base + l_pre, mask=d_mask & pre_mask, other=0.0)

        if HAS_BIAS:
            v = v + bias
        if SOFTPLUS:
            dt, dsoftplus = _softplus_and_grad(v)
        else:
            dt = v

        # Recompute this chunk's states from its stored start.
        h0 = tl.load(st_base + k, mask=dn_mask, other=0.0)
        decay = tl.exp2(dt * A2)
        dtu = dt * u
        drive = dtu * Bt
        a_cum, b_cum = tl.associative_scan((decay, drive), 2, _linear_combine)
        hs = a_cum * h0 + b_cum

        if HAS_Z:
            y = tl.sum(hs * Ct, axis=1, keep_dims=True)
            if HAS_D:
                y += Dv * u
            sig = _sigmoid(zz)
            dz = dy * y * sig * (1.0 + zz * (1.0 - sig))
            tl.store(dz_ptr + row + l_idx, dz, mask=dl_mask)
            dy = dy * zz * sig
        if HAS_D:
            dD_acc += tl.sum(dy * u, axis=2, keep_dims=True)

        # Adjoint g_t = dL/dh_t, right to left, as a forward scan over the time-reversed chunk:
        # tl.flip stays in registers when threads hold runs of time steps, whereas Triton lowers
        # `reverse=True` scans with a full-warp lane reversal. Padded steps have dy = 0.
        src = dy * Ct
        # `zeros` comes from a loaded tensor on purpose: it pins the scan to the layout of the
        # loads (threads own runs of time steps) rather than the one tl.flip's reshapes suggest.
        zeros = tl.broadcast_to(dy * 0.0, decay.shape)
        decay_r = tl.flip(decay, 2)
        a_r, p_r, o_r, x_r = tl.associative_scan(
            (decay_r, zeros + 1.0, decay_r * tl.flip(src, 2), zeros), 2, _adjoint_combine
        )
        gh = src + tl.flip(x_r + p_r * carry, 2)
        carry = tl.sum(tl.where(l_loc == BLOCK_L - 1, o_r + a_r * carry, 0.0), axis=2, keep_dims=True)

        dB_t = tl.sum(gh * dtu, axis=0, keep_dims=True)
        dC_t = tl.sum(hs * dy, axis=0, keep_dims=True)
        tl.atomic_add(dB_ptr + dBC_base + l_idx, dB_t, mask=nl_mask, sem="relaxed")
        tl.atomic_add(dC_ptr + dBC_base + l_idx, dC_t, mask=nl_mask, sem="relaxed")

        gB = tl.sum(gh * Bt, axis=1, keep_dims=True)
        du = dt * gB
        if HAS_D:
            du += Dv * dy
        # decay_t * h_{t-1} == h_t - Δ_t B_t u_t: no shifted copy of the states needed.
        g_prev = gh * (hs - drive)
        ddt = u * gB + tl.sum(g_prev * A, axis=1, keep_dims=True)
        dA_acc += tl.sum(g_prev * dt, axis=2, keep_dims=True)
        if SOFTPLUS:
            ddt = ddt * dsoftplus
        ddt = tl.where(dl_mask, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=2, keep_dims=True)
        tl.store(du_ptr + row + l_idx, du, mask=dl_mask)
        tl.store(ddt_ptr + row + l_idx, ddt, mask=dl_mask)

    part = b * n_channels + chan
    tl.store(dA_part_ptr + part * n_state + n_idx, dA_acc, mask=dn_mask)
    if HAS_D:
        tl.store(dD_part_ptr + part, dD_acc, mask=d_mask)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + part, dbias_acc, mask=d_mask)


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def launch_config(n_state: int, length: int, per_group: int, elem_size: int = 2) -> dict:
    """Tile shapes (BLOCK_L steps x BLOCK_D channels, warps) for one call.

    Picked from sweeps on an H100 with bf16 activations (scripts/bench_scan.py --sweep, numbers
    in BENCHMARKS.md). Inference and training use different chunk lengths: long chunks (64 steps =
    128-byte row segments) make the forward's loads most efficient, while the backward, whose
    per-chunk work is heavier, is fastest with 16-step chunks, and a training forward must store
    its states at the backward's chunk boundaries. Rows that start on 16-byte boundaries allow
    vector loads, which changes the best shapes.
    """
    n_pad = _next_pow2(n_state)
    aligned = (length * elem_size) % 16 == 0
    if n_pad == 1:
        if aligned:
            infer, train, bwd = (64, 32, 8), (16, 16, 1), (16, 16, 1)
        else:
            infer = (32, 32, 4) if length >= 128 else (16, 16, 1)
            train = bwd = (16, 32, 4)
    elif n_pad <= 8:
        infer = train = bwd = (16, 32 // n_pad, 2)
    else:
        infer, train, bwd = (8, 4, 2), (8, 4, 2), (8, 2, 2)

    def fit(tile):
        block_l, block_d, warps = tile
        block_l = max(8, min(block_l, _next_pow2(length)))
        fitted_d = min(block_d, _next_pow2(per_group))
        return block_l, fitted_d, max(1, warps * fitted_d // block_d)

    infer_l, infer_d, infer_w = fit(infer)
    train_l, train_d, train_w = fit(train)
    _, bwd_d, bwd_w = fit(bwd)
    return {
        "N_PAD": n_pad,
        "INFER_BLOCK_L": infer_l, "INFER_BLOCK_D": infer_d, "INFER_WARPS": infer_w,
        "BLOCK_L": train_l, "FWD_BLOCK_D": train_d, "FWD_WARPS": train_w,
        "BWD_BLOCK_D": bwd_d, "BWD_WARPS": bwd_w,
    }


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(
            f"u and delta must both be (batch, channels, L); got {tuple(u.shape)} and {tuple(delta.shape)}"
        )
    batch, channels, length = u.shape
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"A must be (channels={channels}, d_state); got {tuple(A.shape)}")
    n_state = A.shape[1]
    if not 1 <= n_state <= MAX_D_STATE:
        raise ValueError(
            f"the Triton scan supports d_state 1..{MAX_D_STATE}, got {n_state}; use backend='chunked'"
        )
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 4 or t.shape[0] != batch or t.shape[2] != n_state or t.shape[3] != length:
            raise ValueError(
                f"{name} must be (batch={batch}, groups, d_state={n_state}, L={length}) or "
                f"(batch, d_state, L); got {tuple(t.shape)}"
            )
    if B.shape[1] != C.shape[1]:
        raise ValueError(f"B and C must have the same number of groups; got {B.shape[1]} and {C.shape[1]}")
    if channels % B.shape[1]:
        raise ValueError(f"channels ({channels}) must be divisible by the number of B/C groups ({B.shape[1]})")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (channels,):
            raise ValueError(f"{name} must be (channels={channels},); got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}; got {tuple(z.shape)}")
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    if not _interpreting() and not all(t.is_cuda for t in tensors):
        raise ValueError("the Triton scan needs every input on a CUDA device; use backend='chunked' on CPU")
    if len({t.device for t in tensors}) != 1:
        raise ValueError("all selective-scan inputs must be on the same device")


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------


def _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_dtype, store_states, cfg):
    batch, channels, length = u.shape
    groups, n_state = B.shape[1], B.shape[2]
    per_group = channels // groups
    # A training forward stores states at the backward's chunk boundaries, so it uses its tiles.
    if store_states:
        block_l, block_d, warps = cfg["BLOCK_L"], cfg["FWD_BLOCK_D"], cfg["FWD_WARPS"]
    else:
        block_l, block_d, warps = cfg["INFER_BLOCK_L"], cfg["INFER_BLOCK_D"], cfg["INFER_WARPS"]
    n_chunks = triton.cdiv(length, block_l)
    out = torch.empty((batch, channels, length), device=u.device, dtype=out_dtype)
    if store_states:
        states = torch.empty((batch, channels, n_state, n_chunks), device=u.device, dtype=torch.float32)
    else:
        states = out  # never touched
    dummy = u
    zz = z if z is not None else dummy
    grid = (batch * groups, triton.cdiv(per_group, block_d))
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else dummy, zz,
        delta_bias if delta_bias is not None else dummy, out, states,
        length, n_state, groups, per_group, n_chunks,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1),
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        zz.stride(0), zz.stride(1), out.stride(0), out.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), STORE_STATES=bool(store_states),
        BLOCK_D=block_d, N_PAD=cfg["N_PAD"], BLOCK_L=block_l, num_warps=warps,
    )
    return out, (states if store_states else None)


def _backward(dy, u, delta, A, B, C, D, z, delta_bias, delta_softplus, states, cfg):
    batch, channels, length = u.shape
    groups, n_state = B.shape[1], B.shape[2]
    per_group = channels // groups
    n_chunks = states.shape[-1]
    dev = u.device
    f32 = torch.float32
    # Per-element gradients are written once, directly in their inputs' dtypes.
    du = torch.empty((batch, channels, length), device=dev, dtype=u.dtype)
    ddelta = torch.empty((batch, channels, length), device=dev, dtype=delta.dtype)
    dz = torch.empty((batch, channels, length), device=dev, dtype=z.dtype) if z is not None else None
    dB = torch.zeros((batch, groups, n_state, length), device=dev, dtype=f32)
    dC = torch.zeros((batch, groups, n_state, length), device=dev, dtype=f32)
    dA_part = torch.empty((batch, channels, n_state), device=dev, dtype=f32)
    dD_part = torch.empty((batch, channels), device=dev, dtype=f32) if D is not None else None
    dbias_part = torch.empty((batch, channels), device=dev, dtype=f32) if delta_bias is not None else None
    dummy = du
    zz = z if z is not None else u
    grid = (batch * groups, triton.cdiv(per_group, cfg["BWD_BLOCK_D"]))
    _scan_bwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else dummy, zz,
        delta_bias if delta_bias is not None else dummy, dy, states,
        du, ddelta, dz if dz is not None else dummy, dB, dC, dA_part,
        dD_part if dD_part is not None else dummy, dbias_part if dbias_part is not None else dummy,
        length, n_state, groups, per_group, n_chunks,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1),
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        zz.stride(0), zz.stride(1), dy.stride(0), dy.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus),
        BLOCK_D=cfg["BWD_BLOCK_D"], N_PAD=cfg["N_PAD"], BLOCK_L=cfg["BLOCK_L"],
        num_warps=cfg["BWD_WARPS"],
    )
    return {
        "u": du, "delta": ddelta, "z": dz, "B": dB, "C": dC, "A": dA_part.sum(0),
        "D": dD_part.sum(0) if dD_part is not None else None,
        "delta_bias": dbias_part.sum(0) if dbias_part is not None else None,
    }


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_dtype, cfg):
        needs_grad = any(ctx.needs_input_grad[:8])
        out, states = _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_dtype, needs_grad, cfg)
        if needs_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
            ctx.delta_softplus = delta_softplus
            ctx.cfg = cfg
        return out

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        dy = _last_dim_contiguous(dy)
        grads = _backward(dy, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, states, ctx.cfg)
        inputs = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
        out = []
        for i, name in enumerate(("u", "delta", "A", "B", "C", "D", "z", "delta_bias")):
            grad = grads[name]
            out.append(grad.to(inputs[name].dtype) if ctx.needs_input_grad[i] and grad is not None else None)
        return (*out, None, None, None)


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Mamba-1 selective scan on the GPU (same contract as `selective_scan`, see ARCHITECTURE.md).

    Accumulates in fp32 whatever the input dtypes; differentiable in every tensor argument.
    """
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    u, delta, B, C = (_last_dim_contiguous(t) for t in (u, delta, B, C))
    z = _last_dim_contiguous(z) if z is not None else None
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    cfg = launch_config(A.shape[1], u.shape[2], u.shape[1] // B.shape[1], u.element_size())
    out_dtype = u.dtype if out_dtype is None else out_dtype
    return _SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), out_dtype, cfg)


# --------------------------------------------------------------------------------------------
# ordered scan: K directions over one raster-ordered input, merged output
# --------------------------------------------------------------------------------------------
#
# Direction k visits raster position order[k, l] at step l. An input "by position" is read at
# order[k, l] (a gather, instead of a materialised permuted copy); one "by step" is read at l. An
# input shared by the directions has direction stride 0. One program owns one batch element and
# BLOCK_D channels and runs the K directions one after another, so the merged output (raster order)
# is accumulated by plain load-add-store in that program: no atomics, a fixed summation order, and a
# barrier between directions makes the previous direction's stores visible to every thread of the
# program. Accumulation runs in an fp32 buffer; the last direction writes the result in the output's
# dtype (the buffer *is* the output when that is fp32). Forward only (inference).


@triton.jit
def _ordered_index(ord_base, l_idx, l_mask):
    # Raster positions of one chunk's steps (0 past the end; those lanes are masked anyway).
    return tl.load(ord_base + l_idx, mask=l_mask, other=0).to(tl.int64)


@triton.jit
def _ordered_load_chunk(u_base, dt_base, B_base, C_base, ord_base, l_idx, d_mask, n_mask, length,
                        U_POS: tl.constexpr, DT_POS: tl.constexpr, B_POS: tl.constexpr,
                        C_POS: tl.constexpr):
    # Raw tiles of one chunk, each read at the raster position or at the step as its flag says.
    l_mask = l_idx < length
    pos = _ordered_index(ord_base, l_idx, l_mask)
    u = tl.load(u_base + (pos if U_POS else l_idx), mask=d_mask & l_mask, other=0.0)
    dt = tl.load(dt_base + (pos if DT_POS else l_idx), mask=d_mask & l_mask, other=0.0)
    Bt = tl.load(B_base + (pos if B_POS else l_idx), mask=n_mask & l_mask, other=0.0)
    Ct = tl.load(C_base + (pos if C_POS else l_idx), mask=n_mask & l_mask, other=0.0)
    return pos, u, dt, Bt, Ct


@triton.jit
def _accumulate_store(acc_base, out_base, idx, value, mask, k, n_dirs):
    # Add what earlier directions left in the fp32 buffer, keep the sum there, and write the last
    # direction's total in the output dtype.
    value += tl.load(acc_base + idx, mask=mask & (k > 0), other=0.0)
    tl.store(acc_base + idx, value, mask=mask & (k < n_dirs - 1))
    tl.store(out_base + idx, value, mask=mask & (k == n_dirs - 1))


@triton.jit
def _ordered_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, order_ptr, acc_ptr, out_ptr,
    length, n_state, channels, n_dirs, n_chunks,
    s_u_b, s_u_k, s_u_c, s_dt_b, s_dt_k, s_dt_c, s_B_b, s_B_k, s_B_n, s_C_b, s_C_k, s_C_n, s_A_k, s_D_k, s_bias_k,
    U_POS: tl.constexpr, DT_POS: tl.constexpr, B_POS: tl.constexpr, C_POS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    d_loc = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)[:, None, None]
    d_mask = d_loc < channels
    n_idx = tl.arange(0, N_PAD)[None, :, None]
    n_mask = n_idx < n_state
    dn_mask = d_mask & n_mask
    l_loc = tl.arange(0, BLOCK_L)[None, None, :]
    row = (b * channels + d_loc) * length  # output and accumulator: contiguous (batch, channels, L)

    for k in range(0, n_dirs):
        A2 = tl.load(A_ptr + k * s_A_k + d_loc * n_state + n_idx, mask=dn_mask, other=0.0).to(tl.float32)
        A2 = A2 * 1.4426950408889634
        if HAS_D:
            Dv = tl.load(D_ptr + k * s_D_k + d_loc, mask=d_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + k * s_bias_k + d_loc, mask=d_mask, other=0.0).to(tl.float32)
        u_base = u_ptr + b * s_u_b + k * s_u_k + d_loc * s_u_c
        dt_base = dt_ptr + b * s_dt_b + k * s_dt_k + d_loc * s_dt_c
        B_base = B_ptr + b * s_B_b + k * s_B_k + n_idx * s_B_n
        C_base = C_ptr + b * s_C_b + k * s_C_k + n_idx * s_C_n
        ord_base = order_ptr + k * length

        pos_n, u_n, dt_n, B_n, C_n = _ordered_load_chunk(
            u_base, dt_base, B_base, C_base, ord_base, l_loc, d_mask, n_mask, length, U_POS, DT_POS, B_POS, C_POS)
        h = tl.zeros((BLOCK_D, N_PAD, 1), dtype=tl.float32)
        for c in range(0, n_chunks):
            l_idx = c * BLOCK_L + l_loc
            dl_mask = d_mask & (l_idx < length)
            pos = pos_n
            u = u_n.to(tl.float32)
            dt = dt_n.to(tl.float32)
            Bt = B_n.to(tl.float32)
            Ct = C_n.to(tl.float32)
            pos_n, u_n, dt_n, B_n, C_n = _ordered_load_chunk(
                u_base, dt_base, B_base, C_base, ord_base, l_idx + BLOCK_L, d_mask, n_mask, length,
                U_POS, DT_POS, B_POS, C_POS)

            if HAS_BIAS:
                dt = dt + bias
            if SOFTPLUS:
                dt = _softplus(dt)
            decay = tl.exp2(dt * A2)
            drive = (dt * u) * Bt
            a_cum, b_cum = tl.associative_scan((decay, drive), 2, _linear_combine)
            hs = a_cum * h + b_cum
            y = tl.sum(hs * Ct, axis=1, keep_dims=True)
            if HAS_D:
                y += Dv * u
            _accumulate_store(acc_ptr + row, out_ptr + row, pos, y, dl_mask, k, n_dirs)
            h = tl.sum(tl.where(l_loc == BLOCK_L - 1, hs, 0.0), axis=2, keep_dims=True)
        tl.debug_barrier()  # this direction's sums are visible to every thread before the next adds


def _check_ordered(u, delta, A, B, C, order, D, delta_bias, per_direction, by_step) -> tuple[int, int, int, int, int]:
    """Validate the ordered-scan inputs; return (batch, channels, L, d_state, K)."""
    if order.dim() != 2 or order.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"order must be a (K, L) int32/int64 tensor; got {tuple(order.shape)} {order.dtype}")
    n_dirs, length = order.shape
    if u.dim() != 3 or u.shape[2] != length:
        raise ValueError(f"u must be (batch, channels, L={length}) (or K*channels); got {tuple(u.shape)}")
    batch = u.shape[0]
    rep = {name: (n_dirs if name in per_direction else 1) for name in ORDERED_INPUTS}
    if u.shape[1] % rep["u"]:
        raise ValueError(f"u is per direction but its {u.shape[1]} channels are not a multiple of K={n_dirs}")
    channels = u.shape[1] // rep["u"]
    if tuple(delta.shape) != (batch, rep["delta"] * channels, length):
        raise ValueError(f"delta must be {(batch, rep['delta'] * channels, length)}; got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != rep["A"] * channels:
        raise ValueError(f"A must be ({rep['A'] * channels}, d_state); got {tuple(A.shape)}")
    n_state = A.shape[1]
    if not 1 <= n_state <= MAX_D_STATE:
        raise ValueError(f"the Triton scan supports d_state 1..{MAX_D_STATE}, got {n_state}; use backend='chunked'")
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (batch, rep[name], n_state, length):
            raise ValueError(f"{name} must be {(batch, rep[name], n_state, length)}; got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (rep[name] * channels,):
            raise ValueError(f"{name} must be ({rep[name] * channels},); got {tuple(t.shape)}")
    tensors = [t for t in (u, delta, A, B, C, order, D, delta_bias) if t is not None]
    if not _interpreting() and not all(t.is_cuda for t in tensors):
        raise ValueError("the Triton scan needs every input on a CUDA device; use backend='chunked' on CPU")
    if len({t.device for t in tensors}) != 1:
        raise ValueError("all ordered-scan inputs must be on the same device")
    return batch, channels, length, n_state, n_dirs


def _ordered_strides(x, name, channels, per_direction, bc: bool) -> tuple[int, int, int]:
    """(batch, direction, channel-or-state) element strides; a shared input has direction stride 0."""
    if bc:  # (batch, K or 1, N, L)
        return x.stride(0), (x.stride(1) if name in per_direction else 0), x.stride(2)
    return x.stride(0), (channels * x.stride(1) if name in per_direction else 0), x.stride(1)


def _ordered_geometry(u, delta, A, B, C, per_direction, by_step, channels) -> tuple[list[int], dict]:
    """Kernel strides (direction strides 0 for shared inputs) and the by-position flags."""
    strides = []
    for name, x in (("u", u), ("delta", delta)):
        strides += _ordered_strides(x, name, channels, per_direction, False)
    for name, x in (("B", B), ("C", C)):
        strides += _ordered_strides(x, name, channels, per_direction, True)
    n_state = A.shape[1]
    strides += [channels * n_state if "A" in per_direction else 0]
    strides += [channels if "D" in per_direction else 0, channels if "delta_bias" in per_direction else 0]
    flags = dict(U_POS="u" not in by_step, DT_POS="delta" not in by_step,
                 B_POS="B" not in by_step, C_POS="C" not in by_step)
    return strides, flags


def _ordered_forward(u, delta, A, B, C, order, D, delta_bias, per_direction, by_step, delta_softplus, out_dtype,
                     cfg):
    batch, channels, length = u.shape[0], u.shape[1] // (order.shape[0] if "u" in per_direction else 1), u.shape[2]
    n_dirs = order.shape[0]
    block_l, block_d, warps = cfg["INFER_BLOCK_L"], cfg["INFER_BLOCK_D"], cfg["INFER_WARPS"]
    n_chunks = triton.cdiv(length, block_l)
    out = torch.empty((batch, channels, length), device=u.device, dtype=out_dtype)
    acc = out if out_dtype == torch.float32 or n_dirs == 1 else torch.empty_like(out, dtype=torch.float32)
    strides, flags = _ordered_geometry(u, delta, A, B, C, per_direction, by_step, channels)
    grid = (batch, triton.cdiv(channels, block_d))
    _ordered_fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else u, delta_bias if delta_bias is not None else u, order,
        acc, out, length, A.shape[1], channels, n_dirs, n_chunks, *strides, **flags,
        HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        BLOCK_D=block_d, N_PAD=cfg["N_PAD"], BLOCK_L=block_l, num_warps=warps,
    )
    return out


def ordered_selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    order: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    per_direction: tuple[str, ...] = (),
    by_step: tuple[str, ...] = (),
    delta_softplus: bool = True,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """K-direction scan with merged raster output (contract: `ordered_selective_scan` in selective_scan.py).

    Forward only. ``order`` rows must be permutations of 0..L-1 (not checked here: the caller does).
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (u, delta, A, B, C, D, delta_bias)):
        raise ValueError("ordered_selective_scan_triton has no backward; call ordered_selective_scan, which runs "
                         "calls that need gradients through the materialised path.")
    per_direction, by_step = tuple(sorted(set(per_direction))), tuple(sorted(set(by_step)))
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    batch, channels, length, n_state, n_dirs = _check_ordered(
        u, delta, A, B, C, order, D, delta_bias, per_direction, by_step)
    u, delta, B, C = (_last_dim_contiguous(t) for t in (u, delta, B, C))
    order = order.to(torch.int32).contiguous()
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    cfg = launch_config(n_state, length, channels, u.element_size())
    out_dtype = u.dtype if out_dtype is None else out_dtype
    return _ordered_forward(u, delta, A, B, C, order, D, delta_bias, per_direction, by_step, delta_softplus,
                            out_dtype, cfg)
