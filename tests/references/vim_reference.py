"""Vision Mamba (Vim, "midclstok" bimamba-v2 models) forward on an OFFICIAL-layout state dict, in float64.

Written from hustvl/Vim `vim/models_mamba.py` (VisionMamba.forward_features, Block with fused add+RMSNorm,
residual in fp32) and `mamba-1p1p1/mamba_ssm/modules/mamba_simple.py` (Mamba.forward, `bimamba_type="v2"`
fast path = two `mamba_inner_fn_no_out_proj` calls, the second on the L-flipped xz, then /2 and out_proj).
Orders are explicit index lists; the causal conv and RMSNorm are plain loops/formulas; the scan is the
per-element loop of `scan_reference.scan_loop`. Never imports storm_hf.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .scan_reference import scan_loop


def _d(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * w over the last axis (mamba-ssm rms_norm_ref, no bias)."""
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            row = x[b, t]
            scale = 1.0 / math.sqrt(float((row * row).mean()) + eps)
            out[b, t] = row * scale * weight
    return out


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """causal_conv1d_ref: out[t] = b + sum_k w[k] * x[t - (K-1) + k], zeros before t = 0. x: (B, E, L)."""
    batch, dim, length = x.shape
    kernel = weight.shape[-1]
    w = weight.reshape(dim, kernel)
    out = bias.reshape(1, dim, 1).expand(batch, dim, length).clone()
    for t in range(length):
        for k in range(kernel):
            src = t - (kernel - 1) + k
            if src >= 0:
                out[:, :, t] += w[:, k] * x[:, :, src]
    return out


def _inner_no_out_proj(xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, A_log, D):
    """mamba_inner_fn_no_out_proj: conv+SiLU, x_proj split, dt from the weight only, scan with z gate."""
    dim = xz.shape[1] // 2
    x, z = xz[:, :dim], xz[:, dim:]
    xc = F.silu(causal_conv1d(x, conv_w, conv_b))  # (B, E, L)
    rank = dt_proj_w.shape[1]
    n_state = A_log.shape[1]
    x_dbl = torch.einsum("bel,re->brl", xc, x_proj_w)  # (B, R+2N, L)
    dt_raw = x_dbl[:, :rank]
    Bm = x_dbl[:, rank:rank + n_state]
    Cm = x_dbl[:, rank + n_state:]
    delta = torch.einsum("brl,er->bel", dt_raw, dt_proj_w)
    A = -torch.exp(A_log)
    y = scan_loop(xc, delta, A, Bm, Cm, D=D, z=z, delta_bias=dt_proj_b, delta_softplus=True)
    mean_delta = F.softplus(delta + dt_proj_b[None, :, None]).mean(1)  # (B, L): MTR's per-token Δ score
    return y, mean_delta


def bimamba_v2(sd: dict, prefix: str, h: torch.Tensor, divide_out: bool = True) -> tuple[torch.Tensor, dict]:
    """Mamba(bimamba_type='v2') fast path on h (B, L, C) -> (B, L, C), and per-token signals in sequence order:
    `delta` (B, L) softplus(Δ) averaged over channels and summed over the two directions (MTR's score);
    `scan_backward` (B, L, E) the backward direction's gated scan output, flipped back (ToP's score input)."""
    p = lambda name: _d(sd[prefix + name])  # noqa: E731
    length = h.shape[1]
    xz = torch.einsum("blc,fc->bfl", h, p("in_proj.weight"))  # (B, 2E, L)
    flip = list(range(length - 1, -1, -1))
    y_f, delta_f = _inner_no_out_proj(xz, p("conv1d.weight"), p("conv1d.bias"), p("x_proj.weight"), p("dt_proj.weight"),
                             p("dt_proj.bias"), p("A_log"), p("D"))
    y_b, delta_b = _inner_no_out_proj(xz[:, :, flip], p("conv1d_b.weight"), p("conv1d_b.bias"), p("x_proj_b.weight"),
                             p("dt_proj_b.weight"), p("dt_proj_b.bias"), p("A_b_log"), p("D_b"))
    y = (y_f + y_b[:, :, flip]).transpose(1, 2)
    if divide_out:
        y = y / 2
    signals = {"delta": delta_f + delta_b[:, flip], "scan_backward": y_b[:, :, flip].transpose(1, 2)}
    return y @ p("out_proj.weight").t(), signals


def keep_tokens(sequence: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """Token pruning as ToP-ViM / R-MeeTo do it on Vim: take the class token out of the middle, keep the patch
    tokens `kept` (raster indices, in that order), put the class token back at the middle of the new list."""
    num_patches = sequence.shape[1] - 1
    mid = num_patches // 2
    patches = [i for i in range(num_patches + 1) if i != mid]
    chosen = [patches[k] for k in kept]
    order = chosen[: len(chosen) // 2] + [mid] + chosen[len(chosen) // 2:]
    return sequence[:, order]


def vim_reference(sd: dict, pixel_values: torch.Tensor, *, patch_size: int, stride: int, eps: float = 1e-5,
                  divide_out: bool = True, keep: dict[int, list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Official VisionMamba forward (eval). Returns float64 `logits`, `cls` feature, final `tokens` (B, M+1, C)
    and `signals` {layer: the signals of `bimamba_v2`}.

    `keep` ({layer: kept raster patch indices}) prunes both the mixer output and the residual after that
    layer's mixer with `keep_tokens` (the placement every Vim reduction method uses)."""
    x = F.conv2d(_d(pixel_values), _d(sd["patch_embed.proj.weight"]), _d(sd["patch_embed.proj.bias"]), stride=stride)
    assert x.shape[-1] == (pixel_values.shape[-1] - patch_size) // stride + 1
    batch, dim = x.shape[:2]
    patches = x.flatten(2).transpose(1, 2)  # raster order (row-major)
    num_patches = patches.shape[1]
    mid = num_patches // 2
    cls = _d(sd["cls_token"]).expand(batch, 1, dim)
    seq = torch.cat([patches[:, :mid], cls, patches[:, mid:]], dim=1)
    seq = seq + _d(sd["pos_embed"])

    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    residual, hidden = None, seq
    signals = {}
    for i in range(depth):
        residual = hidden if residual is None else residual + hidden
        normed = rms_norm(residual, _d(sd[f"layers.{i}.norm.weight"]), eps)
        hidden, signals[i] = bimamba_v2(sd, f"layers.{i}.mixer.", normed, divide_out)
        if keep and i in keep:
            residual, hidden = keep_tokens(residual, keep[i]), keep_tokens(hidden, keep[i])
    tokens = rms_norm(residual + hidden, _d(sd["norm_f.weight"]), eps)
    feature = tokens[:, (tokens.shape[1] - 1) // 2]
    logits = feature @ _d(sd["head.weight"]).t() + _d(sd["head.bias"])
    return {"logits": logits, "cls": feature, "tokens": tokens, "signals": signals}


def random_official_state_dict(*, dim: int, depth: int, d_state: int, expand: int = 2, d_conv: int = 4,
                               patch_size: int, num_patches: int, num_classes: int, in_chans: int = 3,
                               seed: int = 0) -> dict[str, torch.Tensor]:
    """A random fp32 state dict with the official Vim key names and shapes (B.6 of the notes).

    Scales are chosen so activations stay O(1) through a few layers; A_log/dt biases follow Mamba's init ranges.
    """
    g = torch.Generator().manual_seed(seed)
    inner = expand * dim
    rank = math.ceil(dim / 16)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "cls_token": rnd(1, 1, dim, scale=0.5),
        "pos_embed": rnd(1, num_patches + 1, dim, scale=0.5),
        "patch_embed.proj.weight": rnd(dim, in_chans, patch_size, patch_size, scale=1.0 / patch_size),
        "patch_embed.proj.bias": rnd(dim, scale=0.1),
    }
    for i in range(depth):
        p = f"layers.{i}."
        sd[p + "norm.weight"] = 1.0 + rnd(dim, scale=0.1)
        sd[p + "mixer.in_proj.weight"] = rnd(2 * inner, dim, scale=dim ** -0.5)
        for s in ("", "_b"):
            sd[p + f"mixer.conv1d{s}.weight"] = rnd(inner, 1, d_conv, scale=0.5)
            sd[p + f"mixer.conv1d{s}.bias"] = rnd(inner, scale=0.1)
            sd[p + f"mixer.x_proj{s}.weight"] = rnd(rank + 2 * d_state, inner, scale=inner ** -0.5)
            sd[p + f"mixer.dt_proj{s}.weight"] = rnd(inner, rank, scale=rank ** -0.5)
            dt = torch.exp(torch.rand(inner, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            sd[p + f"mixer.dt_proj{s}.bias"] = dt + torch.log(-torch.expm1(-dt))
            sd[p + ("mixer.A_log" if s == "" else "mixer.A_b_log")] = (
                torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1) + rnd(inner, d_state,
                                                                                                     scale=0.1))
            sd[p + f"mixer.D{s}"] = 1.0 + rnd(inner, scale=0.1)
        sd[p + "mixer.out_proj.weight"] = rnd(dim, inner, scale=inner ** -0.5)
    sd["norm_f.weight"] = 1.0 + rnd(dim, scale=0.1)
    sd["head.weight"] = rnd(num_classes, dim, scale=dim ** -0.5)
    sd["head.bias"] = rnd(num_classes, scale=0.1)
    return sd
