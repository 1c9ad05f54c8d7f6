"""PlainMamba classification forward, written from the official code's semantics, in float64.

Ground truth for the parity tests: it reads an OFFICIAL-layout state dict (mmcls key names `backbone.*`,
`head.fc.*`) and follows ChenhongyiYang/PlainMamba `plain_mamba.py` / `plain_mamba_layer.py` /
`patch_embed.py` step by step, with
- the four zig-zag orders built by walking the grid one token at a time (explicit index lists),
- the direction id of each step (0 start, 1 right, 2 left, 3 up, 4 down) taken from the walk,
- the per-element selective-scan loop of `scan_reference.scan_loop`,
- the released code's two quirks: only the scan input u is reordered (Δ, B, C stay in raster order:
  step t uses raster token t), and the dt bias is applied twice (inside dt_proj and again as delta_bias).

Slow by design (pure Python loops); tiny configs only. It never imports storm_hf.
An optional `reduce_fn` hook lets a test inject a token-reduction step at STORM's place (after the mixer,
applied to residual and mixer output, before the residual add and before the L1 depthwise block).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .scan_reference import scan_loop

START, RIGHT, LEFT, UP, DOWN = 0, 1, 2, 3, 4


def _walk_rows(height: int, width: int, reverse: bool) -> list[tuple[int, int]]:
    """Row snake: row 0 left->right, row 1 right->left, ... (or that path walked backwards)."""
    cells = []
    for i in range(height):
        cols = range(width) if i % 2 == 0 else range(width - 1, -1, -1)
        for j in cols:
            cells.append((i, j))
    return cells[::-1] if reverse else cells


def _walk_cols(height: int, width: int, reverse: bool) -> list[tuple[int, int]]:
    """Column snake: column 0 top->bottom, column 1 bottom->top, ... (or walked backwards)."""
    cells = []
    for j in range(width):
        rows = range(height) if j % 2 == 0 else range(height - 1, -1, -1)
        for i in rows:
            cells.append((i, j))
    return cells[::-1] if reverse else cells


def _move_id(prev: tuple[int, int], cur: tuple[int, int]) -> int:
    di, dj = cur[0] - prev[0], cur[1] - prev[1]
    if (di, dj) == (0, 1):
        return RIGHT
    if (di, dj) == (0, -1):
        return LEFT
    if (di, dj) == (-1, 0):
        return UP
    if (di, dj) == (1, 0):
        return DOWN
    raise AssertionError(f"non-adjacent step {prev} -> {cur}")


def zigzag_orders(height: int, width: int):
    """Return [(order, inverse, directions)] for the 4 official scans, as Python lists of ints."""
    out = []
    for cells in (
        _walk_rows(height, width, False),
        _walk_rows(height, width, True),
        _walk_cols(height, width, False),
        _walk_cols(height, width, True),
    ):
        order = [i * width + j for i, j in cells]
        inverse = [-1] * (height * width)
        for t, p in enumerate(order):
            inverse[p] = t
        dirs = [START] + [_move_id(cells[t - 1], cells[t]) for t in range(1, len(cells))]
        out.append((order, inverse, dirs))
    return out


def _batch_norm(x, sd, prefix, eps=1e-5):
    mean = sd[prefix + ".running_mean"].double()[None, :, None, None]
    var = sd[prefix + ".running_var"].double()[None, :, None, None]
    w = sd[prefix + ".weight"].double()[None, :, None, None]
    b = sd[prefix + ".bias"].double()[None, :, None, None]
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _layer_norm(x, w, b, eps):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w.double() + b.double()


def _silu(x):
    return x * torch.sigmoid(x)


def _gelu_erf(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _linear(x, sd, prefix):
    y = x @ sd[prefix + ".weight"].double().t()
    if prefix + ".bias" in sd:
        y = y + sd[prefix + ".bias"].double()
    return y


def patch_embed(sd, x):
    """Conv stem -> (B, L, C) raster tokens and (H, W)."""
    p = "backbone.patch_embed."
    x = F.conv2d(x, sd[p + "stem.0.weight"].double(), stride=2, padding=3)
    x = torch.relu(_batch_norm(x, sd, p + "stem.1"))
    k = 0
    while f"{p}convs.{3 * k}.weight" in sd:
        x = F.conv2d(x, sd[f"{p}convs.{3 * k}.weight"].double(), stride=1, padding=1)
        x = torch.relu(_batch_norm(x, sd, f"{p}convs.{3 * k + 1}"))
        k += 1
    w = sd[p + "projection.weight"].double()
    kernel = w.shape[-1]  # kernel == stride == patch_size / 2
    h, wd = x.shape[-2:]
    pad_h = (-(-h // kernel)) * kernel - h  # mmcv AdaptivePadding "corner": zeros at bottom / right
    pad_w = (-(-wd // kernel)) * kernel - wd
    x = F.pad(x, (0, pad_w, 0, pad_h))
    x = F.conv2d(x, w, sd[p + "projection.bias"].double(), stride=kernel)
    hh, ww = x.shape[-2:]
    return x.flatten(2).transpose(1, 2), (hh, ww)


def mixer(sd, prefix, u, hw):
    """PlainMamba2D on raster tokens u (B, L, C)."""
    bsz, length, _ = u.shape
    h, w = hw
    xz = _linear(u, sd, prefix + "in_proj")
    inner = xz.shape[-1] // 2
    x, z = xz[..., :inner], xz[..., inner:]
    conv_w = sd[prefix + "conv2d.weight"].double()
    conv_b = sd.get(prefix + "conv2d.bias")
    x2d = x.reshape(bsz, h, w, inner).permute(0, 3, 1, 2)
    x2d = F.conv2d(
        x2d, conv_w, None if conv_b is None else conv_b.double(), padding=conv_w.shape[-1] // 2, groups=inner
    )
    xc = _silu(x2d).permute(0, 2, 3, 1).reshape(bsz, length, inner)

    x_dbl = xc @ sd[prefix + "x_proj.weight"].double().t()
    rank = sd[prefix + "dt_proj.weight"].shape[1]
    n_state = sd[prefix + "A_log"].shape[1]
    dt_raw, b_raster, c_raster = x_dbl[..., :rank], x_dbl[..., rank : rank + n_state], x_dbl[..., rank + n_state :]
    dt = _linear(dt_raw, sd, prefix + "dt_proj")  # bias once here ...
    dt_bias = sd[prefix + "dt_proj.bias"].double()  # ... and once more inside the scan (quirk Q2)
    A = -torch.exp(sd[prefix + "A_log"].double())
    D = sd[prefix + "D"].double()
    dir_table = sd[prefix + "direction_Bs"].double()

    delta = dt.transpose(1, 2)  # (B, E, L), raster order (quirk Q1)
    C_scan = c_raster.transpose(1, 2)  # (B, N, L), raster order
    y_sum = torch.zeros(bsz, length, inner, dtype=torch.float64)
    for order, inverse, dirs in zigzag_orders(h, w):
        u_k = torch.empty(bsz, inner, length, dtype=torch.float64)
        B_k = torch.empty(bsz, n_state, length, dtype=torch.float64)
        for t in range(length):
            u_k[:, :, t] = xc[:, order[t], :]  # only the input follows the zig-zag order
            B_k[:, :, t] = b_raster[:, t, :] + dir_table[dirs[t]]
        y_k = scan_loop(u_k, delta, A, B_k, C_scan, D=D, z=None, delta_bias=dt_bias, delta_softplus=True)
        for p in range(length):
            y_sum[:, p, :] += y_k[:, :, inverse[p]]
    y = y_sum * _silu(z)
    return _linear(y, sd, prefix + "out_proj")


ReduceFn = Callable[[int, torch.Tensor, torch.Tensor, tuple], tuple]


def forward_logits(
    sd: dict,
    pixel_values: torch.Tensor,
    pos_grid: tuple[int, int],
    reduce_fn: Optional[ReduceFn] = None,
) -> torch.Tensor:
    """Logits of the official ImageClassifier(PlainMamba, CustomAveragePooling, LinearClsHead).

    `pos_grid` is the token grid the stored position embedding belongs to (14x14 for 224 images).
    `reduce_fn(layer, x, mixed, (H, W)) -> (x, mixed, (H', W'))` (tokens (B, L, C), raster) is optional.
    """
    x, hw = patch_embed(sd, pixel_values.double())
    pos = sd["backbone.pos_embed"].double()
    if tuple(hw) != tuple(pos_grid):
        grid = pos.reshape(1, pos_grid[0], pos_grid[1], -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=hw, mode="bicubic", align_corners=False)
        pos = grid.flatten(2).transpose(1, 2)
    x = x + pos

    layer = 0
    while f"backbone.layers.{layer}.norm.weight" in sd:
        p = f"backbone.layers.{layer}."
        normed = _layer_norm(x, sd[p + "norm.weight"], sd[p + "norm.bias"], 1e-5)
        mixed = mixer(sd, p + "mamba.", normed, hw)
        if reduce_fn is not None:
            x, mixed, hw = reduce_fn(layer, x, mixed, hw)
        x = mixed + x
        if p + "dw.0.weight" in sd:
            bsz, length, ch = x.shape
            x2d = x.reshape(bsz, hw[0], hw[1], ch).permute(0, 3, 1, 2)
            x2d = F.conv2d(x2d, sd[p + "dw.0.weight"].double(), padding=1, groups=ch)
            x2d = _gelu_erf(_batch_norm(x2d, sd, p + "dw.1"))
            x = x2d.reshape(bsz, ch, length).permute(0, 2, 1)
        layer += 1

    x = _layer_norm(x, sd["backbone.ln1.weight"], sd["backbone.ln1.bias"], 1e-6)
    pooled = x.mean(dim=1)
    return _linear(pooled, sd, "head.fc")


def random_official_state_dict(
    *,
    embed_dims: int,
    num_layers: int,
    num_convs: int,
    dwconv_layers: tuple[int, ...] = (),
    d_state: int = 4,
    expand: int = 2,
    conv_size: int = 7,
    patch_size: int = 16,
    pos_grid: tuple[int, int] = (2, 2),
    in_channels: int = 3,
    num_classes: int = 5,
    stem_channels: int = 64,
    with_ema: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A random state dict with the official mmcls key names and shapes (scales keep activations O(1))."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def bn(prefix, ch):
        sd[prefix + ".weight"] = 1.0 + rnd(ch, scale=0.1)
        sd[prefix + ".bias"] = rnd(ch, scale=0.1)
        sd[prefix + ".running_mean"] = rnd(ch, scale=0.1)
        sd[prefix + ".running_var"] = 0.5 + torch.rand(ch, generator=g)
        sd[prefix + ".num_batches_tracked"] = torch.tensor(100)

    C, E, N = embed_dims, expand * embed_dims, d_state
    R = math.ceil(C / 16)
    k = patch_size // 2
    sd: dict[str, torch.Tensor] = {}
    pe = "backbone.patch_embed."
    sd[pe + "stem.0.weight"] = rnd(stem_channels, in_channels, 7, 7, scale=(in_channels * 49) ** -0.5)
    bn(pe + "stem.1", stem_channels)
    for i in range(num_convs):
        sd[f"{pe}convs.{3 * i}.weight"] = rnd(stem_channels, stem_channels, 3, 3, scale=(stem_channels * 9) ** -0.5)
        bn(f"{pe}convs.{3 * i + 1}", stem_channels)
    sd[pe + "projection.weight"] = rnd(C, stem_channels, k, k, scale=(stem_channels * k * k) ** -0.5)
    sd[pe + "projection.bias"] = rnd(C, scale=0.1)
    sd["backbone.pos_embed"] = rnd(1, pos_grid[0] * pos_grid[1], C, scale=0.2)
    for i in range(num_layers):
        p = f"backbone.layers.{i}."
        sd[p + "norm.weight"] = 1.0 + rnd(C, scale=0.1)
        sd[p + "norm.bias"] = rnd(C, scale=0.1)
        if i in dwconv_layers:
            sd[p + "dw.0.weight"] = rnd(C, 1, 3, 3, scale=1 / 3)
            bn(p + "dw.1", C)
        m = p + "mamba."
        sd[m + "A_log"] = torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1) + rnd(E, N, scale=0.1)
        sd[m + "D"] = 1.0 + rnd(E, scale=0.1)
        sd[m + "direction_Bs"] = rnd(5, N, scale=0.3)
        sd[m + "in_proj.weight"] = rnd(2 * E, C, scale=C**-0.5)
        sd[m + "in_proj.bias"] = rnd(2 * E, scale=0.1)
        sd[m + "conv2d.weight"] = rnd(E, 1, conv_size, conv_size, scale=1.0 / conv_size)
        sd[m + "conv2d.bias"] = rnd(E, scale=0.1)
        sd[m + "x_proj.weight"] = rnd(R + 2 * N, E, scale=E**-0.5)
        sd[m + "dt_proj.weight"] = rnd(E, R, scale=R**-0.5)
        # softplus(dt + 2*bias) of order 0.1-1, so that errors in Δ (e.g. its order or bias) show up clearly
        sd[m + "dt_proj.bias"] = rnd(E, scale=0.5) - 0.5
        sd[m + "out_proj.weight"] = rnd(C, E, scale=E**-0.5)
        sd[m + "out_proj.bias"] = rnd(C, scale=0.1)
    sd["backbone.ln1.weight"] = 1.0 + rnd(C, scale=0.1)
    sd["backbone.ln1.bias"] = rnd(C, scale=0.1)
    sd["head.fc.weight"] = rnd(num_classes, C, scale=C**-0.5)
    sd["head.fc.bias"] = rnd(num_classes, scale=0.1)
    if with_ema:  # EMACheckpointHook buffers: `ema_` + parameter path with '.' -> '_'
        params = [k for k in sd if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        for name in params:
            sd["ema_" + name.replace(".", "_")] = sd[name] + rnd(*sd[name].shape, scale=0.5)
    return sd
