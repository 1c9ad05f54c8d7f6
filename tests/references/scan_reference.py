"""The Mamba-1 selective scan as a plain per-element loop, in float64.

Written from the recurrence in the Mamba paper / mamba-ssm `selective_scan_ref`:
    Δ_t = softplus(δ_t + bias),  h_t = exp(Δ_t·A)·h_{t-1} + Δ_t·B_t·u_t,
    y_t = Σ_n C_t[n]·h_t[n] + D·u_t,  y_t ← y_t·silu(z_t).
Slow by design: used only on tiny shapes as ground truth.
"""
from __future__ import annotations

import math

import torch


def _softplus(v: float) -> float:
    return v if v > 20.0 else math.log1p(math.exp(v))


def scan_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
    """u, delta: (b, d, l); A: (d, n); B, C: (b, g, n, l) or (b, n, l); D, delta_bias: (d,); z: (b, d, l)."""
    u = u.double()
    delta = delta.double()
    A = A.double()
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    B = B.double()
    C = C.double()
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = B.shape[1]
    per_group = dim // groups
    out = torch.zeros(batch, dim, length, dtype=torch.float64)
    for b in range(batch):
        for c in range(dim):
            g = c // per_group
            h = [0.0] * n_state
            bias = float(delta_bias[c]) if delta_bias is not None else 0.0
            for t in range(length):
                dt = float(delta[b, c, t]) + bias
                if delta_softplus:
                    dt = _softplus(dt)
                x = float(u[b, c, t])
                y = 0.0
                for n in range(n_state):
                    h[n] = math.exp(dt * float(A[c, n])) * h[n] + dt * float(B[b, g, n, t]) * x
                    y += float(C[b, g, n, t]) * h[n]
                if D is not None:
                    y += float(D[c]) * x
                if z is not None:
                    zz = float(z[b, c, t])
                    y *= zz / (1.0 + math.exp(-zz))
                out[b, c, t] = y
    return out
