"""Independent VMamba v2 (`v05_noz`) forward, written from the official equations, in float64.

Operates directly on an OFFICIAL-layout state dict (MzeroMiko/VMamba key names, e.g.
`layers.0.blocks.0.op.x_proj_weight`, `classifier.head.weight`) and does not import storm_hf.
Channels-first throughout (the official `ln2d` layout); scan orders are explicit index lists; the selective
scan is the per-element loop of `scan_reference.scan_loop`. Slow by design: tiny configs only.

Official semantics (classification/models/vmamba.py, csm_triton.py, csms6s.py):
- stem v2: conv3x3/s2/p1 (+bias) -> LN -> GELU(erf) -> conv3x3/s2/p1 (+bias) -> LN      (keys patch_embed.0/2/5/7)
- block: x += SS2D(LN(x)); x += fc2(GELU(fc1(LN(x))))                              (norm, op, norm2, mlp.fc1/fc2)
- SS2D: u = SiLU(dwconv(in_proj(x))); for k in 4 orders: dbl = x_proj_weight[k] @ u_k ->
  (dt_low R, B N, C N); dt = dt_projs_weight[k] @ dt_low; scan over channel k*D+d with
  delta_bias = dt_projs_bias[k, d], A = -exp(A_logs), D skip = Ds; y = sum of directions written back to
  their pixels; out_proj(out_norm(y))
- downsample v3 (end of stages 0..S-2): conv3x3/s2/p1 (+bias) -> LN                  (downsample.1/3)
- classifier: LN -> mean over pixels -> head                                            (classifier.norm/head)
All LayerNorms: biased variance, eps 1e-5, over channels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .scan_reference import scan_loop

EPS = 1e-5
K = 4


def _layer_norm_channels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LayerNorm over dim 1 of (B, C, H, W)."""
    mean = x.mean(dim=1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=1, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1.0 + torch.exp(-x))


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A "Linear2d" (1x1 conv with a Linear-shaped weight) on (B, C, H, W)."""
    y = torch.einsum("oc,bchw->bohw", weight.reshape(weight.shape[0], -1), x)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y


def scan_orders(height: int, width: int) -> list[list[int]]:
    """The 4 cross-scan orders as lists of raster indices (h * W + w) visited at t = 0, 1, ..."""
    row_major = [h * width + w for h in range(height) for w in range(width)]
    col_major = [h * width + w for w in range(width) for h in range(height)]
    return [row_major, col_major, row_major[::-1], col_major[::-1]]


def ss2d(sd: dict, prefix: str, x: torch.Tensor, d_state: int) -> torch.Tensor:
    """Official SS2D (v05_noz) on a normed (B, C, H, W) map."""
    sd = {k: v.double() for k, v in sd.items() if k.startswith(prefix)}
    x = x.double()
    batch, _, height, width = x.shape
    length = height * width
    u = _pointwise(x, sd[prefix + "in_proj.weight"])
    inner = u.shape[1]
    conv_w = sd.get(prefix + "conv2d.weight")
    if conv_w is not None:
        pad = (conv_w.shape[-1] - 1) // 2
        u = F.conv2d(u, conv_w, sd.get(prefix + "conv2d.bias"), padding=pad, groups=inner)
    u = _silu(u)
    flat = u.reshape(batch, inner, length)

    x_proj = sd[prefix + "x_proj_weight"]  # (K, R + 2N, D)
    dt_w = sd[prefix + "dt_projs_weight"]  # (K, D, R)
    rank = dt_w.shape[2]
    orders = scan_orders(height, width)
    us, deltas, bs, cs = [], [], [], []
    for k in range(K):
        seq = flat[:, :, orders[k]]  # (B, D, L) in order k
        dbl = torch.einsum("cd,bdl->bcl", x_proj[k], seq)
        dt_low, b_k, c_k = dbl[:, :rank], dbl[:, rank:rank + d_state], dbl[:, rank + d_state:]
        us.append(seq)
        deltas.append(torch.einsum("dr,brl->bdl", dt_w[k], dt_low))
        bs.append(b_k)
        cs.append(c_k)
    ys = scan_loop(
        torch.cat(us, dim=1),
        torch.cat(deltas, dim=1),
        -torch.exp(sd[prefix + "A_logs"]),
        torch.stack(bs, dim=1),
        torch.stack(cs, dim=1),
        D=sd[prefix + "Ds"],
        delta_bias=sd[prefix + "dt_projs_bias"].reshape(-1),
        delta_softplus=True,
    )  # (B, K*D, L)
    merged = torch.zeros(batch, inner, length, dtype=torch.float64)
    for k in range(K):
        y_k = ys[:, k * inner:(k + 1) * inner]
        for t, pixel in enumerate(orders[k]):
            merged[:, :, pixel] += y_k[:, :, t]
    y = merged.view(batch, inner, height, width)
    y = _layer_norm_channels(y, sd[prefix + "out_norm.weight"], sd[prefix + "out_norm.bias"])
    return _pointwise(y, sd[prefix + "out_proj.weight"])


def delta_map(sd: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """MTR's Δ signal of one SS2D on a normed (B, C, H, W) map: softplus(dt + bias) averaged over the D
    channels of each direction, written back to its pixel, summed over the 4 directions -> (B, H, W)."""
    sd = {k: v.double() for k, v in sd.items() if k.startswith(prefix)}
    x = x.double()
    batch, _, height, width = x.shape
    u = _pointwise(x, sd[prefix + "in_proj.weight"])
    inner = u.shape[1]
    conv_w = sd.get(prefix + "conv2d.weight")
    if conv_w is not None:
        u = F.conv2d(u, conv_w, sd.get(prefix + "conv2d.bias"), padding=(conv_w.shape[-1] - 1) // 2, groups=inner)
    flat = _silu(u).reshape(batch, inner, height * width)
    rank = sd[prefix + "dt_projs_weight"].shape[2]
    out = torch.zeros(batch, height * width, dtype=torch.float64)
    for k, order in enumerate(scan_orders(height, width)):
        dbl = torch.einsum("cd,bdl->bcl", sd[prefix + "x_proj_weight"][k], flat[:, :, order])
        dt = torch.einsum("dr,brl->bdl", sd[prefix + "dt_projs_weight"][k], dbl[:, :rank])
        dt = F.softplus(dt + sd[prefix + "dt_projs_bias"][k].view(1, -1, 1)).mean(dim=1)  # (B, L) in order k
        for t, pixel in enumerate(order):
            out[:, pixel] += dt[:, t]
    return out.view(batch, height, width)


def _depths(sd: dict) -> list[int]:
    depths = []
    while f"layers.{len(depths)}.blocks.0.norm.weight" in sd:
        s = len(depths)
        n = 0
        while f"layers.{s}.blocks.{n}.norm.weight" in sd:
            n += 1
        depths.append(n)
    return depths


def forward(state_dict: dict, pixel_values: torch.Tensor, return_stages: bool = False):
    """Logits (float64) of the official VMamba v2 for an official-layout state dict."""
    sd = {k: v.double() for k, v in state_dict.items()}
    depths = _depths(sd)
    x = pixel_values.double()
    x = F.conv2d(x, sd["patch_embed.0.weight"], sd["patch_embed.0.bias"], stride=2, padding=1)
    x = _layer_norm_channels(x, sd["patch_embed.2.weight"], sd["patch_embed.2.bias"])
    x = _gelu(x)
    x = F.conv2d(x, sd["patch_embed.5.weight"], sd["patch_embed.5.bias"], stride=2, padding=1)
    x = _layer_norm_channels(x, sd["patch_embed.7.weight"], sd["patch_embed.7.bias"])
    stages = []
    for s, depth in enumerate(depths):
        for b in range(depth):
            p = f"layers.{s}.blocks.{b}."
            d_state = sd[p + "op.A_logs"].shape[1]
            h = _layer_norm_channels(x, sd[p + "norm.weight"], sd[p + "norm.bias"])
            x = x + ss2d(sd, p + "op.", h, d_state)
            if p + "mlp.fc1.weight" in sd:
                h = _layer_norm_channels(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
                h = _gelu(_pointwise(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
                x = x + _pointwise(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        stages.append(x)
        if f"layers.{s}.downsample.1.weight" in sd:
            p = f"layers.{s}.downsample."
            x = F.conv2d(x, sd[p + "1.weight"], sd[p + "1.bias"], stride=2, padding=1)
            x = _layer_norm_channels(x, sd[p + "3.weight"], sd[p + "3.bias"])
    x = _layer_norm_channels(x, sd["classifier.norm.weight"], sd["classifier.norm.bias"])
    pooled = x.mean(dim=(2, 3))
    logits = pooled @ sd["classifier.head.weight"].T + sd["classifier.head.bias"]
    return (logits, stages) if return_stages else logits


def random_state_dict(
    dims=(8, 16, 32, 64),
    depths=(1, 1, 2, 1),
    ssm_ratio: float = 1.0,
    d_state: int = 1,
    dt_rank="auto",
    num_classes: int = 10,
    in_chans: int = 3,
    mlp_ratio: float = 4.0,
    ssm_conv: int = 3,
    conv_bias: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A random state dict with the official key names and shapes (MzeroMiko/VMamba VSSM, v05_noz, ln2d).

    Norm affines, A_logs, Ds and Δ biases are perturbed away from their init values, so a wrong index order
    (direction k vs channel d, H vs W) changes the logits.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def lin(out_f, in_f):
        return rnd(out_f, in_f, scale=1.0 / math.sqrt(in_f))

    sd: dict[str, torch.Tensor] = {}

    def norm(key, c):
        sd[key + ".weight"] = 1.0 + rnd(c, scale=0.2)
        sd[key + ".bias"] = rnd(c, scale=0.2)

    c0 = dims[0]
    sd["patch_embed.0.weight"] = rnd(c0 // 2, in_chans, 3, 3, scale=1.0 / math.sqrt(in_chans * 9))
    sd["patch_embed.0.bias"] = rnd(c0 // 2, scale=0.1)
    norm("patch_embed.2", c0 // 2)
    sd["patch_embed.5.weight"] = rnd(c0, c0 // 2, 3, 3, scale=1.0 / math.sqrt(c0 // 2 * 9))
    sd["patch_embed.5.bias"] = rnd(c0, scale=0.1)
    norm("patch_embed.7", c0)
    for s, (c, depth) in enumerate(zip(dims, depths)):
        d = int(ssm_ratio * c)
        r = math.ceil(c / 16) if dt_rank == "auto" else int(dt_rank)
        hidden = int(c * mlp_ratio)
        for b in range(depth):
            p = f"layers.{s}.blocks.{b}."
            norm(p + "norm", c)
            sd[p + "op.in_proj.weight"] = lin(d, c)
            if ssm_conv > 1:
                sd[p + "op.conv2d.weight"] = rnd(d, 1, ssm_conv, ssm_conv, scale=1.0 / ssm_conv)
                if conv_bias:
                    sd[p + "op.conv2d.bias"] = rnd(d, scale=0.1)
            sd[p + "op.x_proj_weight"] = rnd(K, r + 2 * d_state, d, scale=1.0 / math.sqrt(d))
            sd[p + "op.dt_projs_weight"] = rnd(K, d, r, scale=1.0 / math.sqrt(r))
            sd[p + "op.dt_projs_bias"] = rnd(K, d, scale=1.0) - 2.0
            a = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(K * d, 1)
            sd[p + "op.A_logs"] = a + rnd(K * d, d_state, scale=0.5)
            sd[p + "op.Ds"] = 1.0 + rnd(K * d, scale=0.5)
            norm(p + "op.out_norm", d)
            sd[p + "op.out_proj.weight"] = lin(c, d)
            if hidden > 0:
                norm(p + "norm2", c)
                sd[p + "mlp.fc1.weight"] = lin(hidden, c)
                sd[p + "mlp.fc1.bias"] = rnd(hidden, scale=0.1)
                sd[p + "mlp.fc2.weight"] = lin(c, hidden)
                sd[p + "mlp.fc2.bias"] = rnd(c, scale=0.1)
        if s < len(dims) - 1:
            p = f"layers.{s}.downsample."
            sd[p + "1.weight"] = rnd(dims[s + 1], c, 3, 3, scale=1.0 / math.sqrt(c * 9))
            sd[p + "1.bias"] = rnd(dims[s + 1], scale=0.1)
            norm(p + "3", dims[s + 1])
    norm("classifier.norm", dims[-1])
    sd["classifier.head.weight"] = lin(num_classes, dims[-1])
    sd["classifier.head.bias"] = rnd(num_classes, scale=0.1)
    return sd
