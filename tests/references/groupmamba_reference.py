"""Independent float64 forward of GroupMamba on an OFFICIAL-layout state dict.

Written from Amshaker/GroupMamba `classification/models/{groupmamba,ss2d,csms6s}.py` (HEAD c1800ed):
key names are the official module paths (`patch_embed1.conv.0.weight`, `block3.2.attn.mamba_g2.A_logs`, ...),
token maps are (B, N, C) as in the official code, scan orders are explicit index lists, and the
recurrence is the per-element loop of `scan_reference.scan_loop`. Nothing here imports storm_hf.
`stem_stride=1` (not an official model) runs the stem's 7x7 conv at stride 1, the small-image variant.

Official semantics reproduced (eval mode):
- Stem: conv7x7 s2 p3 (no bias) -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> ReLU
  -> conv3x3 s2 p1 (bias) -> tokens -> LayerNorm(eps 1e-5). Downsample: conv3x3 s2 p1 -> LayerNorm(1e-5).
- Block: x += GroupMambaLayer(x); x += PVT2FFN(LN_1e-6(x)) with fc1 -> dwconv3x3 -> GELU -> fc2.
- GroupMambaLayer: xn = LN_1e-5(x); s = sigmoid(fc2(relu(fc1(mean_tokens(xn))))); four channel chunks,
  chunk g through a one-direction SS2D (orders: row-major, column-major, reversed row, reversed column);
  y = cat * skip_scale * xn; y *= s; y = LN_1e-5(y) (same weights); proj.
- SS2D (expand 1, d_state 1): in_proj -> (x, z); z = silu(z); x = silu(dwconv3x3(x) + b); scan;
  out_norm LN_1e-5; y * z; out_proj.
- After stages 1-3: LN_1e-6 (`norm{i}`). Head: cls = mean of stage-4 tokens; ClassBlock:
  cls += LN_1e-6(GroupMambaLayer(cls, 1x1)); cls += FFN(LN_1e-6(cls)); LN_1e-6 (`norm4`);
  logits = (head + dist_head) / 2 in eval.
"""
from __future__ import annotations

import math

import torch

from .scan_reference import scan_loop

BN_EPS = 1e-5
MIXER_LN_EPS = 1e-5  # GroupMambaLayer.norm and SS2D.out_norm: nn.LayerNorm default
EMBED_LN_EPS = 1e-5  # Stem.norm / DownSamples.norm: nn.LayerNorm default
BLOCK_LN_EPS = 1e-6  # norm_layer = partial(nn.LayerNorm, eps=1e-6): norm2, norm{i}, ClassBlock norms


# ----------------------------------------------------------------------------- scan orders
def scan_order(direction: int, height: int, width: int) -> list[int]:
    """Raster indices (h*W + w) visited at sequence steps 0..L-1 by CrossScan_{direction+1}."""
    row_major = [h * width + w for h in range(height) for w in range(width)]
    col_major = [h * width + w for w in range(width) for h in range(height)]
    return [row_major, col_major, row_major[::-1], col_major[::-1]][direction]


# ----------------------------------------------------------------------------- primitives
def _layer_norm(x, weight, bias, eps):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.double() + bias.double()


def _linear(x, sd, prefix, bias=True):
    y = x @ sd[prefix + ".weight"].double().t()
    return y + sd[prefix + ".bias"].double() if bias else y


def _conv(x, weight, bias=None, stride=1, padding=0, groups=1):
    return torch.nn.functional.conv2d(
        x, weight.double(), None if bias is None else bias.double(), stride=stride, padding=padding, groups=groups
    )


def _batch_norm_eval(x, sd, prefix):
    mean = sd[prefix + ".running_mean"].double()[None, :, None, None]
    var = sd[prefix + ".running_var"].double()[None, :, None, None]
    w = sd[prefix + ".weight"].double()[None, :, None, None]
    b = sd[prefix + ".bias"].double()[None, :, None, None]
    return (x - mean) / torch.sqrt(var + BN_EPS) * w + b


def _silu(x):
    return x * torch.sigmoid(x)


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


# ----------------------------------------------------------------------------- SS2D (one direction)
def ss2d_one_direction(x, sd, prefix, direction, return_delta=False):
    """x: (B, H, W, Dm) float64 -> (B, H, W, Dm). `prefix` e.g. 'block1.0.attn.mamba_g1'.

    With `return_delta`, also the step size softplus(Δ + bias) averaged over channels, put back at each
    token's pixel: (B, H, W) (the signal MTR-style reduction reads).
    """
    batch, height, width, _ = x.shape
    xz = _linear(x, sd, prefix + ".in_proj", bias=False)
    d_inner = xz.shape[-1] // 2
    u, z = xz[..., :d_inner], _silu(xz[..., d_inner:])
    conv_w = sd[prefix + ".conv2d.weight"]
    u = _conv(u.permute(0, 3, 1, 2), conv_w, sd.get(prefix + ".conv2d.bias"),
              padding=(conv_w.shape[-1] - 1) // 2, groups=d_inner)
    u = _silu(u).reshape(batch, d_inner, height * width)

    order = scan_order(direction, height, width)
    seq = u[:, :, order]  # (B, D, L): step t holds raster pixel order[t]
    x_proj = sd[prefix + ".x_proj_weight"].double()[0]  # (R + 2N, D)
    dt_proj = sd[prefix + ".dt_projs_weight"].double()[0]  # (D, R)
    n_state = sd[prefix + ".A_logs"].shape[1]
    rank = dt_proj.shape[1]
    dbl = torch.einsum("cd,bdl->bcl", x_proj, seq)
    dt_low, b_ssm, c_ssm = dbl[:, :rank], dbl[:, rank:rank + n_state], dbl[:, rank + n_state:]
    delta = torch.einsum("dr,brl->bdl", dt_proj, dt_low)
    A = -torch.exp(sd[prefix + ".A_logs"].double())
    y_seq = scan_loop(seq, delta, A, b_ssm, c_ssm, D=sd[prefix + ".Ds"].double(),
                      delta_bias=sd[prefix + ".dt_projs_bias"].double()[0], delta_softplus=True)

    y = torch.zeros_like(y_seq)
    for t, pixel in enumerate(order):  # CrossMerge_k: put step t back at its pixel
        y[:, :, pixel] = y_seq[:, :, t]
    y = y.reshape(batch, d_inner, height, width).permute(0, 2, 3, 1)
    y = _layer_norm(y, sd[prefix + ".out_norm.weight"], sd[prefix + ".out_norm.bias"], MIXER_LN_EPS)
    out = _linear(y * z, sd, prefix + ".out_proj", bias=False)
    if not return_delta:
        return out
    bias = sd[prefix + ".dt_projs_bias"].double()[0]
    step = torch.zeros(batch, height * width, dtype=torch.float64)
    for t, pixel in enumerate(order):
        v = delta[:, :, t] + bias
        step[:, pixel] = torch.where(v > 20, v, torch.log1p(torch.exp(v))).mean(dim=1)
    return out, step.reshape(batch, height, width)


# ----------------------------------------------------------------------------- GroupMamba layer
def group_mamba_layer(x, sd, prefix, height, width, return_delta=False):
    """x: (B, N, C) tokens in raster order -> (B, N, C). `prefix` e.g. 'block2.1.attn'.

    With `return_delta`, also the four groups' step-size maps summed: (B, H, W).
    """
    batch, n_tokens, channels = x.shape
    norm_w, norm_b = sd[prefix + ".norm.weight"], sd[prefix + ".norm.bias"]
    xn = _layer_norm(x, norm_w, norm_b, MIXER_LN_EPS)
    pooled = xn.mean(dim=1)
    affinity = torch.sigmoid(_linear(torch.relu(_linear(pooled, sd, prefix + ".fc1")), sd, prefix + ".fc2"))

    grid = xn.reshape(batch, height, width, channels)
    quarter = channels // 4
    results = [
        ss2d_one_direction(grid[..., g * quarter:(g + 1) * quarter], sd, f"{prefix}.mamba_g{g + 1}", g, return_delta)
        for g in range(4)
    ]
    outs = [r[0] for r in results] if return_delta else results
    y = torch.cat(outs, dim=-1) * sd[prefix + ".skip_scale"].double() * grid
    y = y.reshape(batch, n_tokens, channels) * affinity[:, None, :]
    y = _layer_norm(y, norm_w, norm_b, MIXER_LN_EPS)
    out = _linear(y, sd, prefix + ".proj")
    if not return_delta:
        return out
    return out, sum(r[1] for r in results)


def _pvt2_ffn(x, sd, prefix, height, width):
    batch, n_tokens, _ = x.shape
    h = _linear(x, sd, prefix + ".fc1")
    hidden = h.shape[-1]
    h = h.transpose(1, 2).reshape(batch, hidden, height, width)
    h = _conv(h, sd[prefix + ".dwconv.dwconv.weight"], sd[prefix + ".dwconv.dwconv.bias"], padding=1, groups=hidden)
    h = _gelu(h.flatten(2).transpose(1, 2))
    return _linear(h, sd, prefix + ".fc2")


def block_mamba(x, sd, prefix, height, width):
    x = x + group_mamba_layer(x, sd, prefix + ".attn", height, width)
    y = _layer_norm(x, sd[prefix + ".norm2.weight"], sd[prefix + ".norm2.bias"], BLOCK_LN_EPS)
    return x + _pvt2_ffn(y, sd, prefix + ".mlp", height, width)


# ----------------------------------------------------------------------------- whole network
def _stem(image, sd, stem_stride=2):
    """`stem_stride`: stride of the 7x7 conv (2 officially; 1 for a stem of total stride 2)."""
    x = image
    for conv_idx, stride, pad in ((0, stem_stride, 3), (3, 1, 1), (6, 1, 1)):
        x = _conv(x, sd[f"patch_embed1.conv.{conv_idx}.weight"], stride=stride, padding=pad)
        x = torch.relu(_batch_norm_eval(x, sd, f"patch_embed1.conv.{conv_idx + 1}"))
    return x


def _embed(x, sd, prefix):
    x = _conv(x, sd[prefix + ".proj.weight"], sd[prefix + ".proj.bias"], stride=2, padding=1)
    _, _, height, width = x.shape
    tokens = x.flatten(2).transpose(1, 2)
    tokens = _layer_norm(tokens, sd[prefix + ".norm.weight"], sd[prefix + ".norm.bias"], EMBED_LN_EPS)
    return tokens, height, width


def num_stages(sd) -> int:
    return max(int(k.split(".")[0][len("patch_embed"):]) for k in sd if k.startswith("patch_embed"))


def depth_of(sd, stage: int) -> int:
    prefix = f"block{stage}."
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith(prefix))


def groupmamba_reference(sd: dict, pixel_values: torch.Tensor, stem_stride: int = 2) -> dict:
    """Official eval forward. Returns {'logits', 'stages' (list of (B, C, H, W)), 'pooled'} in float64.

    `stem_stride` is the stride of the stem's 7x7 conv: 2 is the official network; 1 is the only change
    a small-image variant makes (same weights, one token per 2x2 pixels).
    """
    x = _stem(pixel_values.double(), sd, stem_stride)
    batch = x.shape[0]
    stages_out = []
    n_stages = num_stages(sd)
    for stage in range(1, n_stages + 1):
        x, height, width = _embed(x, sd, f"patch_embed{stage}")
        for j in range(depth_of(sd, stage)):
            x = block_mamba(x, sd, f"block{stage}.{j}", height, width)
        stages_out.append(x.transpose(1, 2).reshape(batch, -1, height, width))
        if stage != n_stages:
            x = _layer_norm(x, sd[f"norm{stage}.weight"], sd[f"norm{stage}.bias"], BLOCK_LN_EPS)
            x = x.reshape(batch, height, width, -1).permute(0, 3, 1, 2)

    # forward_cls: mean token prepended, ClassBlock on it (H = W = 1), keep the class token.
    cls = x.mean(dim=1, keepdim=True)
    p = "post_network.0"
    attn = group_mamba_layer(cls, sd, p + ".attn", 1, 1)
    cls = cls + _layer_norm(attn, sd[p + ".norm1.weight"], sd[p + ".norm1.bias"], BLOCK_LN_EPS)
    h = _layer_norm(cls, sd[p + ".norm2.weight"], sd[p + ".norm2.bias"], BLOCK_LN_EPS)
    cls = cls + _linear(_gelu(_linear(h, sd, p + ".mlp.fc1")), sd, p + ".mlp.fc2")
    pooled = _layer_norm(cls[:, 0], sd[f"norm{n_stages}.weight"], sd[f"norm{n_stages}.bias"], BLOCK_LN_EPS)

    logits = _linear(pooled, sd, "head")
    if "dist_head.weight" in sd:
        logits = (logits + _linear(pooled, sd, "dist_head")) / 2
    return {"logits": logits, "stages": stages_out, "pooled": pooled}


# ----------------------------------------------------------------------------- random official weights
def random_official_state_dict(
    embed_dims=(16, 24, 32, 40),
    depths=(1, 2, 1, 1),
    mlp_ratios=(2, 2, 2, 2),
    stem_hidden_dim=8,
    num_classes=10,
    d_state=1,
    ssm_ratio=1.0,
    cls_mlp_ratio=None,
    in_chans=3,
    distillation=True,
    seed=0,
) -> dict[str, torch.Tensor]:
    """A state dict with the official keys and shapes (groupmamba.py), every tensor randomised.

    Norm affines, BN statistics, A_logs, Ds, dt biases and skip_scale are perturbed away from their
    init values so that index-order or eps mistakes show up in the logits.
    """
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2, offset=0.0):
        return torch.randn(*shape, generator=gen) * scale + offset

    sd: dict[str, torch.Tensor] = {}

    def linear(prefix, out_f, in_f, bias=True, scale=None):
        sd[prefix + ".weight"] = rnd(out_f, in_f, scale=scale or in_f ** -0.5)
        if bias:
            sd[prefix + ".bias"] = rnd(out_f, scale=0.1)

    def layer_norm(prefix, dim):
        sd[prefix + ".weight"] = rnd(dim, scale=0.2, offset=1.0)
        sd[prefix + ".bias"] = rnd(dim, scale=0.1)

    def batch_norm(prefix, dim):
        layer_norm(prefix, dim)
        sd[prefix + ".running_mean"] = rnd(dim, scale=0.1)
        sd[prefix + ".running_var"] = torch.rand(dim, generator=gen) + 0.5
        sd[prefix + ".num_batches_tracked"] = torch.tensor(7)

    def group_layer(prefix, dim):
        reduced = dim // 16
        linear(prefix + ".fc1", reduced, dim)
        linear(prefix + ".fc2", dim, reduced)
        layer_norm(prefix + ".norm", dim)
        linear(prefix + ".proj", dim, dim)
        sd[prefix + ".skip_scale"] = rnd(1, scale=0.2, offset=1.0)
        d_model = dim // 4
        d_inner = int(ssm_ratio * d_model)
        rank = math.ceil(d_model / 16)
        for g in range(1, 5):
            q = f"{prefix}.mamba_g{g}"
            sd[q + ".in_proj.weight"] = rnd(2 * d_inner, d_model, scale=d_model ** -0.5)
            sd[q + ".conv2d.weight"] = rnd(d_inner, 1, 3, 3, scale=0.3)
            sd[q + ".conv2d.bias"] = rnd(d_inner, scale=0.1)
            sd[q + ".x_proj_weight"] = rnd(1, rank + 2 * d_state, d_inner, scale=d_inner ** -0.5)
            sd[q + ".dt_projs_weight"] = rnd(1, d_inner, rank, scale=rank ** -0.5)
            sd[q + ".dt_projs_bias"] = rnd(1, d_inner, scale=0.5, offset=-1.0)
            sd[q + ".A_logs"] = rnd(d_inner, d_state, scale=0.5)
            sd[q + ".Ds"] = rnd(d_inner, scale=0.3, offset=1.0)
            layer_norm(q + ".out_norm", d_inner)
            sd[q + ".out_proj.weight"] = rnd(d_model, d_inner, scale=d_inner ** -0.5)

    h = stem_hidden_dim
    sd["patch_embed1.conv.0.weight"] = rnd(h, in_chans, 7, 7, scale=(in_chans * 49) ** -0.5)
    batch_norm("patch_embed1.conv.1", h)
    sd["patch_embed1.conv.3.weight"] = rnd(h, h, 3, 3, scale=(9 * h) ** -0.5)
    batch_norm("patch_embed1.conv.4", h)
    sd["patch_embed1.conv.6.weight"] = rnd(h, h, 3, 3, scale=(9 * h) ** -0.5)
    batch_norm("patch_embed1.conv.7", h)
    prev = h
    for i, (dim, depth, ratio) in enumerate(zip(embed_dims, depths, mlp_ratios), start=1):
        sd[f"patch_embed{i}.proj.weight"] = rnd(dim, prev, 3, 3, scale=(9 * prev) ** -0.5)
        sd[f"patch_embed{i}.proj.bias"] = rnd(dim, scale=0.1)
        layer_norm(f"patch_embed{i}.norm", dim)
        hidden = int(dim * ratio)
        for j in range(depth):
            p = f"block{i}.{j}"
            layer_norm(p + ".norm2", dim)
            group_layer(p + ".attn", dim)
            linear(p + ".mlp.fc1", hidden, dim)
            sd[p + ".mlp.dwconv.dwconv.weight"] = rnd(hidden, 1, 3, 3, scale=0.3)
            sd[p + ".mlp.dwconv.dwconv.bias"] = rnd(hidden, scale=0.1)
            linear(p + ".mlp.fc2", dim, hidden)
        layer_norm(f"norm{i}", dim)
        prev = dim
    last = embed_dims[-1]
    p = "post_network.0"
    layer_norm(p + ".norm1", last)
    layer_norm(p + ".norm2", last)
    group_layer(p + ".attn", last)
    cls_hidden = int(last * (mlp_ratios[-1] if cls_mlp_ratio is None else cls_mlp_ratio))
    linear(p + ".mlp.fc1", cls_hidden, last)
    linear(p + ".mlp.fc2", last, cls_hidden)
    linear("head", num_classes, last)
    if distillation:
        linear("dist_head", num_classes, last)
    return sd
