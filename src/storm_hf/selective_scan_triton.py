"""Triton kernels for the Mamba-1 selective scan (forward and backward).

Imported lazily by `selective_scan.py`; importing this module raises `ImportError` when Triton is
missing so that model code can fall back to the PyTorch paths.

Layout of the work: one program owns one batch element, one B/C group and `BLOCK_D` channels of
that group, and walks the sequence in chunks of `BLOCK_L` time steps. Inside a chunk the linear
recurrence `h_t = a_t h_{t-1} + b_t` is a parallel associative scan over a
(BLOCK_D, N, BLOCK_L) tile; the state at the chunk's end is carried to the next chunk. Inputs are
read once and the output written once, so the forward is bound by memory traffic, not arithmetic.

The forward stores the state at every chunk start (fp32, batch x channels x N x chunks: small next
to the inputs). The backward walks the chunks in reverse, recomputes the states inside each chunk
from its stored start, and runs the adjoint recurrence `g_t = dA_{t+1} g_{t+1} + C_t dy_t` as a
reverse scan. Gradients of B and C (shared by the channels of a group) are summed over the tile's
channels and then added atomically across programs; per-channel parameter gradients (A, D,
delta_bias) are written per batch element and summed in PyTorch, which keeps them deterministic.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised on machines without triton
    raise ImportError(
        "storm_hf.selective_scan_triton needs Triton (pip install 'storm-hf[gpu]'); "
        "use selective_scan(..., backend='chunked') without it"
    ) from exc

__all__ = ["selective_scan_triton", "MAX_D_STATE"]

MAX_D_STATE = 16
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _linear_combine(a_left, b_left, a_right, b_right):
    # Composition of h -> a_left*h + b_left followed by h -> a_right*h + b_right.
    return a_left * a_right, a_right * b_left + b_right


@triton.jit
def _softplus(v):
    # PyTorch's softplus (threshold 20), with Kahan's log1p so tiny Δ keep full relative precision.
    e = tl.exp(v)
    w = 1.0 + e
    log1p_e = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
    return tl.where(v > 20.0, v, log1p_e)


@triton.jit
def _softplus_and_grad(v):
    # softplus(v) and its derivative sigmoid(v) = e / (1 + e), sharing one exp.
    e = tl.exp(v)
    w = 1.0 + e
    log1p_e = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
    big = v > 20.0
    return tl.where(big, v, log1p_e), tl.where(big, 1.0, e / w)


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


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

    d_loc = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d_loc < per_group
    chan = g * per_group + d_loc
    n_idx = tl.arange(0, N_PAD)
    n_mask = n_idx < n_state
    l_loc = tl.arange(0, BLOCK_L)

    dn_mask = d_mask[:, None] & n_mask[None, :]
    A2 = tl.load(A_ptr + chan[:, None] * n_state + n_idx[None, :], mask=dn_mask, other=0.0)
    A2 = A2.to(tl.float32) * 1.4426950408889634  # exp(x) == exp2(x * log2 e)
    if HAS_D:
        Dv = tl.load(D_ptr + chan, mask=d_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + chan, mask=d_mask, other=0.0).to(tl.float32)

    u_base = u_ptr + b * s_u_b + chan[:, None] * s_u_c
    dt_base = dt_ptr + b * s_dt_b + chan[:, None] * s_dt_c
    o_base = out_ptr + b * s_o_b + chan[:, None] * s_o_c
    if HAS_Z:
        z_base = z_ptr + b * s_z_b + chan[:, None] * s_z_c
    B_base = B_ptr + b * s_B_b + g * s_B_g + n_idx[:, None] * s_B_n
    C_base = C_ptr + b * s_C_b + g * s_C_g + n_idx[:, None] * s_C_n
    st_base = state_ptr + ((b * n_channels + chan[:, None]) * n_state + n_idx[None, :]) * n_chunks

    h = tl.zeros((BLOCK_D, N_PAD), dtype=tl.float32)
    for k in range(0, n_chunks):
        l_idx = k * BLOCK_L + l_loc
        l_mask = l_idx < length
        dl_mask = d_mask[:, None] & l_mask[None, :]
        nl_mask = n_mask[:, None] & l_mask[None, :]

        u = tl.load(u_base + l_idx[None, :], mask=dl_mask, other=0.0).to(tl.float32)
        dt = tl.load(dt_base + l_idx[None, :], mask=dl_mask, other=0.0).to(tl.float32)
        Bt = tl.load(B_base + l_idx[None, :], mask=nl_mask, other=0.0).to(tl.float32)
        Ct = tl.load(C_base + l_idx[None, :], mask=nl_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt = dt + bias[:, None]
        if SOFTPLUS:
            dt = _softplus(dt)

        if STORE_STATES:
            tl.store(st_base + k, h, mask=dn_mask)

        decay = tl.exp2(dt[:, None, :] * A2[:, :, None])
        drive = (dt * u)[:, None, :] * Bt[None, :, :]
        a_cum, b_cum = tl.associative_scan((decay, drive), 2, _linear_combine)
        hs = a_cum * h[:, :, None] + b_cum

        y = tl.sum(hs * Ct[None, :, :], axis=1)
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            zz = tl.load(z_base + l_idx[None, :], mask=dl_mask, other=0.0).to(tl.float32)
            y = y * zz * _sigmoid(zz)
        tl.store(o_base + l_idx[None, :], y, mask=dl_mask)

        # Carry the state after the chunk's last step (only read when another full chunk follows).
        h = tl.sum(tl.where(l_loc[None, None, :] == BLOCK_L - 1, hs, 0.0), axis=2)


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

    d_loc = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d_loc < per_group
    chan = g * per_group + d_loc
    n_idx = tl.arange(0, N_PAD)
    n_mask = n_idx < n_state
    l_loc = tl.arange(0, BLOCK_L)

    dn_mask = d_mask[:, None] & n_mask[None, :]
    A = tl.load(A_ptr + chan[:, None] * n_state + n_idx[None, :], mask=dn_mask, other=0.0)
    A = A.to(tl.float32)
    A2 = A * 1.4426950408889634
    if HAS_D:
        Dv = tl.load(D_ptr + chan, mask=d_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + chan, mask=d_mask, other=0.0).to(tl.float32)

    # Gradient tensors of u, delta, z share the contiguous (batch, channels, L) layout.
    row = (b * n_channels + chan[:, None]) * length
    u_base = u_ptr + b * s_u_b + chan[:, None] * s_u_c
    dt_base = dt_ptr + b * s_dt_b + chan[:, None] * s_dt_c
    dy_base = dy_ptr + b * s_dy_b + chan[:, None] * s_dy_c
    if HAS_Z:
        z_base = z_ptr + b * s_z_b + chan[:, None] * s_z_c
    B_base = B_ptr + b * s_B_b + g * s_B_g + n_idx[:, None] * s_B_n
    C_base = C_ptr + b * s_C_b + g * s_C_g + n_idx[:, None] * s_C_n
    dBC_off = ((b * n_groups + g) * n_state + n_idx[:, None]) * length
    st_base = state_ptr + ((b * n_channels + chan[:, None]) * n_state + n_idx[None, :]) * n_chunks

    carry = tl.zeros((BLOCK_D, N_PAD), dtype=tl.float32)  # dL/dh at the next chunk's first step
    dA_acc = tl.zeros((BLOCK_D, N_PAD), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)

    for kk in range(0, n_chunks):
        k = n_chunks - 1 - kk
        l_idx = k * BLOCK_L + l_loc
        l_mask = l_idx < length
        dl_mask = d_mask[:, None] & l_mask[None, :]
        nl_mask = n_mask[:, None] & l_mask[None, :]
        nxt_mask = d_mask[:, None] & ((l_idx + 1) < length)[None, :]

        u = tl.load(u_base + l_idx[None, :], mask=dl_mask, other=0.0).to(tl.float32)
        v = tl.load(dt_base + l_idx[None, :], mask=dl_mask, other=0.0).to(tl.float32)
        v_nxt = tl.load(dt_base + l_idx[None, :] + 1, mask=nxt_mask, other=0.0).to(tl.float32)
        Bt = tl.load(B_base + l_idx[None, :], mask=nl_mask, other=0.0).to(tl.float32)
        Ct = tl.load(C_base + l_idx[None, :], mask=nl_mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_base + l_idx[None, :], mask=dl_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            v = v + bias[:, None]
            v_nxt = v_nxt + bias[:, None]
        if SOFTPLUS:
            dt, dsoftplus = _softplus_and_grad(v)
            dt_nxt = _softplus(v_nxt)
        else:
            dt = v
            dt_nxt = v_nxt

        # Recompute this chunk's states from its stored start.
        h0 = tl.load(st_base + k, mask=dn_mask, other=0.0)
        decay = tl.exp2(dt[:, None, :] * A2[:, :, None])
        dtu = dt * u
        drive = dtu[:, None, :] * Bt[None, :, :]
        a_cum, b_cum = tl.associative_scan((decay, drive), 2, _linear_combine)
        hs = a_cum * h0[:, :, None] + b_cum

        if HAS_Z:
            zz = tl.load(z_base + l_idx[None, :], mask=dl_mask, other=0.0).to(tl.float32)
            y = tl.sum(hs * Ct[None, :, :], axis=1)
            if HAS_D:
                y += Dv[:, None] * u
            sig = _sigmoid(zz)
            dz = dy * y * sig * (1.0 + zz * (1.0 - sig))
            tl.store(dz_ptr + row + l_idx[None, :], dz, mask=dl_mask)
            dy = dy * zz * sig
        if HAS_D:
            dD_acc += tl.sum(dy * u, axis=1)

        # Adjoint: g_t = exp(Δ_{t+1} A) g_{t+1} + C_t dy_t, scanned right to left.
        decay_nxt = tl.exp2(dt_nxt[:, None, :] * A2[:, :, None])
        src = dy[:, None, :] * Ct[None, :, :]
        a_rev, b_rev = tl.associative_scan((decay_nxt, src), 2, _linear_combine, reverse=True)
        gh = a_rev * carry[:, :, None] + b_rev
        carry = tl.sum(tl.where(l_loc[None, None, :] == 0, gh, 0.0), axis=2)

        dB_t = tl.sum(gh * dtu[:, None, :], axis=0)
        dC_t = tl.sum(hs * dy[:, None, :], axis=0)
        tl.atomic_add(dB_ptr + dBC_off + l_idx[None, :], dB_t, mask=nl_mask)
        tl.atomic_add(dC_ptr + dBC_off + l_idx[None, :], dC_t, mask=nl_mask)

        gB = tl.sum(gh * Bt[None, :, :], axis=1)
        du = dt * gB
        if HAS_D:
            du += Dv[:, None] * dy
        # decay * h_{t-1} == h_t - Δ_t B_t u_t: avoids keeping a shifted copy of the states.
        g_prev = gh * (hs - drive)
        ddt = u * gB + tl.sum(g_prev * A[:, :, None], axis=1)
        dA_acc += tl.sum(g_prev * dt[:, None, :], axis=2)
        if SOFTPLUS:
            ddt = ddt * dsoftplus
        ddt = tl.where(dl_mask, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_ptr + row + l_idx[None, :], du, mask=dl_mask)
        tl.store(ddt_ptr + row + l_idx[None, :], ddt, mask=dl_mask)

    part = b * n_channels + chan
    tl.store(dA_part_ptr + part[:, None] * n_state + n_idx[None, :], dA_acc, mask=dn_mask)
    if HAS_D:
        tl.store(dD_part_ptr + part, dD_acc, mask=d_mask)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + part, dbias_acc, mask=d_mask)


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def launch_config(n_state: int, length: int, per_group: int) -> dict:
    """Tile sizes: forward and backward share BLOCK_L (the backward restarts from per-chunk states).

    Tiles hold about 2-4k fp32 elements per program so the scan stays in registers; the
    state dimension is padded to a power of two and fills part of that budget.
    """
    n_pad = _next_pow2(n_state)
    cap_l = 128 if n_pad <= 2 else (64 if n_pad <= 8 else 32)
    block_l = max(16, min(cap_l, _next_pow2(length)))
    per_group_pow2 = _next_pow2(per_group)

    def block_d(budget: int) -> int:
        return max(1, min(per_group_pow2, budget // (n_pad * block_l)))

    return {
        "N_PAD": n_pad,
        "BLOCK_L": block_l,
        "FWD_BLOCK_D": block_d(2048),
        "BWD_BLOCK_D": block_d(1024),
        "FWD_WARPS": 4,
        "BWD_WARPS": 4,
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
    n_chunks = triton.cdiv(length, cfg["BLOCK_L"])
    out = torch.empty((batch, channels, length), device=u.device, dtype=out_dtype)
    if store_states:
        states = torch.empty((batch, channels, n_state, n_chunks), device=u.device, dtype=torch.float32)
    else:
        states = out  # never touched
    dummy = u
    zz = z if z is not None else dummy
    grid = (batch * groups, triton.cdiv(per_group, cfg["FWD_BLOCK_D"]))
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else dummy, zz,
        delta_bias if delta_bias is not None else dummy, out, states,
        length, n_state, groups, per_group, n_chunks,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1),
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        zz.stride(0), zz.stride(1), out.stride(0), out.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), STORE_STATES=bool(store_states),
        BLOCK_D=cfg["FWD_BLOCK_D"], N_PAD=cfg["N_PAD"], BLOCK_L=cfg["BLOCK_L"],
        num_warps=cfg["FWD_WARPS"],
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
    cfg = launch_config(A.shape[1], u.shape[2], u.shape[1] // B.shape[1])
    out_dtype = u.dtype if out_dtype is None else out_dtype
    return _SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), out_dtype, cfg)
