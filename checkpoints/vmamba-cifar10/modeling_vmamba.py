"""VMamba v2 (Liu et al., NeurIPS 2024) as Transformers models, with STORM token reduction hooks.

This is the `v05_noz` network of MzeroMiko/VMamba, the forward type of all six released v2 checkpoints:
a two-conv stem, four stages of VSS blocks (SS2D + MLP) with 3x3 stride-2 downsampling between them, and
LayerNorm -> average pool -> linear head. Token maps stay channels-last (B, H, W, C) between blocks, the
official `channel_first=False` layout, so every module path and parameter shape equals the official one:
an official state dict loads after moving `classifier.norm.*` to `vmamba.norm.*`, `classifier.head.*` to
`classifier.*` and prefixing the rest with `vmamba.` (`tools/convert_vmamba.py` does this).

SS2D (per block, C = width, D = ssm_ratio * C, N = d_state, R = dt rank, K = 4 directions):
in_proj (C -> D) -> depthwise conv -> SiLU -> cross-scan into 4 token orders (row-major, column-major,
and both reversed) -> per-direction x_proj giving (Δ_low, B, C) -> per-direction dt_proj (Δ bias is added
inside the scan, with softplus) -> selective scan over K*D channels (B and C shared per direction) ->
cross-merge (sum of the 4 directions back in raster order) -> out_norm -> out_proj (D -> C).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)

from .configuration_vmamba import VMambaConfig
from .flops import (
    BlockFlops,
    FlopsReport,
    adaptive_avg_pool_flops,
    conv1d_flops,
    conv2d_flops,
    conv_out_size,
    layer_norm_flops,
    linear_flops,
    scan_flops,
)
from .reduction import StormConfig, StormMixin, reduce_tokens
from .selective_scan import ordered_scan_enabled, ordered_selective_scan, selective_scan

NUM_DIRECTIONS = 4
# The v2 stem is two 3x3 convolutions of total stride `patch_size` (4 officially: one token per 4x4 pixels).
# Images narrower than one patch would give a token grid made of padding only, so they are rejected.
MIN_IMAGE_SIDE = 4

Grid = tuple[int, int]
Schedule = dict[tuple[int, int], Grid]


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth per sample (identity at inference)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep_prob)
    return x * mask / keep_prob


class VMambaDropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class VMambaPermute(nn.Module):
    """A parameter-free layout switch; it also keeps the official Sequential slot indices (state-dict keys)."""

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class VMambaPatchEmbeddings(nn.Sequential):
    """Stem "v2": conv3x3/s2 -> LN -> GELU -> conv3x3/s2 -> LN; (B, 3, H, W) -> (B, ceil(H/4), ceil(W/4), C).

    Slots 0..7 mirror the official channels-last Sequential, so keys are `patch_embed.{0,2,5,7}.*`.
    With `config.patch_size=2` (not an official model) the first conv has stride 1: ceil(H/2) x ceil(W/2).
    """

    def __init__(self, config: VMambaConfig) -> None:
        width = config.dims[0]
        eps = config.layer_norm_eps
        first_stride, second_stride = config.stem_strides
        super().__init__(
            nn.Conv2d(config.num_channels, width // 2, kernel_size=3, stride=first_stride, padding=1),
            VMambaPermute(0, 2, 3, 1),
            nn.LayerNorm(width // 2, eps=eps),
            VMambaPermute(0, 3, 1, 2),
            nn.GELU(),
            nn.Conv2d(width // 2, width, kernel_size=3, stride=second_stride, padding=1),
            VMambaPermute(0, 2, 3, 1),
            nn.LayerNorm(width, eps=eps),
        )


class VMambaDownsample(nn.Sequential):
    """Downsample "v3": conv3x3/s2 -> LN, channels-last in and out; keys `downsample.{1,3}.*`."""

    def __init__(self, in_width: int, out_width: int, eps: float) -> None:
        super().__init__(
            VMambaPermute(0, 3, 1, 2),
            nn.Conv2d(in_width, out_width, kernel_size=3, stride=2, padding=1),
            VMambaPermute(0, 2, 3, 1),
            nn.LayerNorm(out_width, eps=eps),
        )


class VMambaMlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (B, 4, D, H*W): row-major, column-major, and the two reversed."""
    batch, channels, height, width = x.shape
    xs = x.new_empty(batch, NUM_DIRECTIONS, channels, height * width)
    xs[:, 0].view(batch, channels, height, width).copy_(x)
    xs[:, 1].view(batch, channels, width, height).copy_(x.transpose(2, 3))
    xs[:, 2:] = xs[:, :2].flip(-1)
    return xs


def cross_merge(ys: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 4, D, H*W) in the 4 scan orders -> (B, H, W, D): the sum of the directions, back in raster order."""
    batch, _, channels, _ = ys.shape
    rows = ys[:, 0] + ys[:, 2].flip(-1)
    cols = ys[:, 1] + ys[:, 3].flip(-1)
    y = rows.view(batch, channels, height, width) + cols.view(batch, channels, width, height).transpose(2, 3)
    return y.permute(0, 2, 3, 1)


_ORDER_CACHE: dict[tuple[int, int, str], torch.Tensor] = {}


def cross_scan_order(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(4, H*W) int64: the raster position each of `cross_scan`'s directions visits at each step (cached)."""
    key = (height, width, str(device))
    order = _ORDER_CACHE.get(key)
    if order is None:
        raster = torch.arange(height * width)
        cols = raster.view(height, width).t().reshape(-1)
        order = torch.stack([raster, cols, raster.flip(0), cols.flip(0)]).to(device)
        if len(_ORDER_CACHE) > 64:  # many input sizes: keep the cache bounded
            _ORDER_CACHE.clear()
        _ORDER_CACHE[key] = order
    return order


class VMambaSS2D(nn.Module):
    """The 2-D selective scan mixer (`op` in the official block), forward type `v05_noz`.

    Parameter names and shapes equal the official ones: `x_proj_weight` (K, R+2N, D),
    `dt_projs_weight` (K, D, R), `dt_projs_bias` (K, D), `A_logs` (K*D, N), `Ds` (K*D); row k*D + d of the
    flattened tensors belongs to direction k, channel d.
    """

    def __init__(self, config: VMambaConfig, stage: int) -> None:
        super().__init__()
        width = config.dims[stage]
        self.d_inner = inner = config.d_inner(stage)
        self.d_state = state = config.d_state
        self.dt_rank = rank = config.stage_dt_rank(stage)
        k = NUM_DIRECTIONS
        self.in_proj = nn.Linear(width, inner, bias=False)
        self.act = nn.SiLU()
        if config.ssm_conv > 1:
            self.conv2d = nn.Conv2d(
                inner, inner, kernel_size=config.ssm_conv, padding=(config.ssm_conv - 1) // 2,
                groups=inner, bias=config.ssm_conv_bias,
            )
        else:
            self.conv2d = None
        self.x_proj_weight = nn.Parameter(torch.empty(k, rank + 2 * state, inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, inner, rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, inner))
        self.A_logs = nn.Parameter(torch.empty(k * inner, state))
        self.Ds = nn.Parameter(torch.empty(k * inner))
        self.out_norm = nn.LayerNorm(inner, eps=config.layer_norm_eps)
        self.out_proj = nn.Linear(inner, width, bias=False)

    def forward(self, x: torch.Tensor, return_delta: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x: (B, H, W, C) normed tokens -> (B, H, W, C), and optionally the Δ map (B, H, W) used by `mtr`."""
        batch, height, width, _ = x.shape
        inner, state = self.d_inner, self.d_state

        u = self.in_proj(x).permute(0, 3, 1, 2).contiguous()
        if self.conv2d is not None:
            u = self.conv2d(u)
        u = self.act(u)

        # the ordered kernel measured slower for VMamba (strided column-major reads): opt-in only
        needs_grad = torch.is_grad_enabled() and u.requires_grad
        if ordered_scan_enabled(u.device, state, u.dtype, default=False, needs_grad=needs_grad):
            y, dts = self._ordered_scan(u)
            y = y.view(batch, inner, height, width).permute(0, 2, 3, 1)
        else:
            y, dts = self._materialised_scan(u)
        y = self.out_norm(y.to(self.out_norm.weight.dtype))
        out = self.out_proj(y.to(x.dtype))

        delta = None
        if return_delta:
            delta = self._delta_map(dts, height, width)
        return out, delta

    def _materialised_scan(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-scan copies, one scan over K*D channels, cross-merge: (B, H, W, D) fp32 and Δ (B, K, D, L)."""
        batch, _, height, width = u.shape
        k, inner, state, rank = NUM_DIRECTIONS, self.d_inner, self.d_state, self.dt_rank
        length = height * width
        xs = cross_scan(u)  # (B, K, D, L)
        proj = torch.matmul(self.x_proj_weight, xs)  # (B, K, R + 2N, L): one projection per direction
        dts, bs, cs = torch.split(proj, [rank, state, state], dim=2)
        dts = torch.matmul(self.dt_projs_weight, dts)  # (B, K, D, L)

        ys = selective_scan(
            xs.view(batch, k * inner, length),
            dts.reshape(batch, k * inner, length),
            -torch.exp(self.A_logs.float()),
            bs.contiguous(),
            cs.contiguous(),
            D=self.Ds.float(),
            delta_bias=self.dt_projs_bias.reshape(-1).float(),
            delta_softplus=True,
            out_dtype=torch.float32,
        )
        return cross_merge(ys.view(batch, k, inner, length), height, width), dts

    def _ordered_scan(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same math without the K copies of u (Triton only): (B, D, L) fp32 raster and Δ (B, K, D, L).

        x_proj is position-wise, so it runs once on the raster u (all K weights stacked); only its small
        (R + 2N)-row output is permuted into each direction's step order, so that dt_projs writes Δ in
        step order and the kernel reads Δ, B, C contiguously; u is read through the order inside the
        kernel, and the 4 outputs are summed there in raster order.
        """
        batch, _, height, width = u.shape
        k, inner, state, rank = NUM_DIRECTIONS, self.d_inner, self.d_state, self.dt_rank
        length = height * width
        order = cross_scan_order(height, width, u.device)
        u = u.reshape(batch, inner, length)
        proj = torch.matmul(self.x_proj_weight.reshape(k * (rank + 2 * state), inner), u)
        proj = proj.view(batch, k, rank + 2 * state, length)
        proj = proj.gather(3, order.view(1, k, 1, length).expand_as(proj))  # raster -> step order
        dts, bs, cs = torch.split(proj, [rank, state, state], dim=2)
        dts = torch.matmul(self.dt_projs_weight, dts)  # (B, K, D, L), step order
        y = ordered_selective_scan(
            u,
            dts.reshape(batch, k * inner, length),
            -torch.exp(self.A_logs.float()),
            bs,
            cs,
            order,
            D=self.Ds.float(),
            delta_bias=self.dt_projs_bias.reshape(-1).float(),
            per_direction=("delta", "A", "B", "C", "D", "delta_bias"),
            by_step=("delta", "B", "C"),
            delta_softplus=True,
            out_dtype=torch.float32,
            check_order=False,
        )
        return y, dts

    def _delta_map(self, dts: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """softplus(Δ + bias) averaged over channels, summed over the 4 directions, in raster order (B, H, W)."""
        bias = self.dt_projs_bias.float().view(1, NUM_DIRECTIONS, -1, 1)
        delta = F.softplus(dts.detach().float() + bias.detach()).mean(dim=2)  # (B, K, L)
        batch = delta.shape[0]
        rows = (delta[:, 0] + delta[:, 2].flip(-1)).view(batch, height, width)
        cols = (delta[:, 1] + delta[:, 3].flip(-1)).view(batch, width, height).transpose(1, 2)
        return rows + cols


class VMambaBlock(nn.Module):
    """VSS block: x + DropPath(SS2D(LN(x))), then x + DropPath(MLP(LN(x))), on (B, H, W, C).

    With a target grid, STORM's placement: the SS2D branch runs at full size, then the residual and the
    branch are reduced with one plan before they are added; the MLP half runs on the smaller grid.
    """

    def __init__(self, config: VMambaConfig, stage: int, drop_path_rate: float) -> None:
        super().__init__()
        width = config.dims[stage]
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.op = VMambaSS2D(config, stage)
        self.drop_path = VMambaDropPath(drop_path_rate)
        hidden = config.mlp_hidden(stage)
        if hidden > 0:
            self.norm2 = nn.LayerNorm(width, eps=config.layer_norm_eps)
            self.mlp = VMambaMlp(width, hidden)
        else:
            self.norm2 = None
            self.mlp = None

    def forward(
        self,
        x: torch.Tensor,
        target_hw: Optional[Grid] = None,
        storm: Optional[StormConfig] = None,
        sizes: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        reduce = target_hw is not None
        branch, delta = self.op(self.norm(x), return_delta=reduce and storm.method == "mtr")
        if reduce:
            extras: dict[str, torch.Tensor] = {}
            if storm.method == "mtr":
                extras["delta"] = delta
            elif storm.method == "top":
                extras["branch"] = branch
            x, branch, sizes = reduce_tokens(storm, x, branch, tuple(target_hw), sizes=sizes, extras=extras or None)
        x = x + self.drop_path(branch)
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, sizes


class VMambaStage(nn.Module):
    """Blocks of one width, then the downsample to the next stage (Identity after the last stage)."""

    def __init__(self, config: VMambaConfig, stage: int, drop_path_rates: list[float]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(VMambaBlock(config, stage, rate) for rate in drop_path_rates)
        if stage < config.num_stages - 1:
            self.downsample = VMambaDownsample(config.dims[stage], config.dims[stage + 1], config.layer_norm_eps)
        else:
            self.downsample = nn.Identity()


# --------------------------------------------------------------------------------------------------
# Grids and FLOPs
# --------------------------------------------------------------------------------------------------


def _pair(image_size: Union[int, tuple[int, int], list[int]]) -> Grid:
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def _check_image_size(height: int, width: int, patch_size: int = MIN_IMAGE_SIDE) -> None:
    if height < patch_size or width < patch_size:
        raise ValueError(
            f"Input image {height}x{width} is too small: VMamba's stem makes one token per {patch_size}x{patch_size} "
            f"pixels, so both sides must be at least {patch_size} pixels. Resize the image (the released models "
            "expect 224x224)."
        )


def _stem_grids(config: VMambaConfig, height: int, width: int) -> tuple[Grid, Grid]:
    """Grids after the stem's first conv and after the whole stem."""
    first, second = config.stem_strides
    mid = conv_out_size(height, 3, first, 1), conv_out_size(width, 3, first, 1)
    return mid, (conv_out_size(mid[0], 3, second, 1), conv_out_size(mid[1], 3, second, 1))


def _check_target(position: tuple[int, int], target: Grid, grid: Grid) -> None:
    th, tw = int(target[0]), int(target[1])
    if th < 1 or tw < 1 or th > grid[0] or tw > grid[1]:
        raise ValueError(
            f"The reduction schedule asks block {position} (stage, block) for a {th}x{tw} grid, but its input is "
            f"{grid[0]}x{grid[1]}: targets must lie between 1x1 and the input grid. Use a larger image or a "
            "schedule made for this input size (or `flops_ratio`, which is solved per size)."
        )


def walk_grids(config: VMambaConfig, image_size: Union[int, Grid], schedule: Optional[Schedule] = None):
    """Yield (stage, block, input grid, output grid) for every block, following reductions and downsampling."""
    height, width = _pair(image_size)
    _check_image_size(height, width, config.patch_size)
    schedule = {tuple(pos): tuple(hw) for pos, hw in (schedule or {}).items()}
    positions = {(s, b) for s, depth in enumerate(config.depths) for b in range(depth)}
    unknown = sorted(set(schedule) - positions)
    if unknown:
        raise ValueError(
            f"The reduction schedule names block(s) {unknown} that this VMamba does not have; "
            f"valid (stage, block) positions have stage < {config.num_stages} and block < depths {config.depths}."
        )
    _, grid = _stem_grids(config, height, width)
    for stage, depth in enumerate(config.depths):
        for block in range(depth):
            target = schedule.get((stage, block))
            out = grid
            if target is not None:
                _check_target((stage, block), target, grid)
                out = (int(target[0]), int(target[1]))
            yield stage, block, grid, out
            grid = out
        if stage < config.num_stages - 1:
            grid = conv_out_size(grid[0], 3, 2, 1), conv_out_size(grid[1], 3, 2, 1)


def natural_grids(config: VMambaConfig, image_size: Union[int, Grid]) -> dict[tuple[int, int], Grid]:
    """(stage, block) -> the unreduced (H, W) token grid each block receives."""
    return {(s, b): grid for s, b, grid, _ in walk_grids(config, image_size)}


def vmamba_flops(
    config: VMambaConfig,
    image_size: Union[int, Grid, None] = None,
    schedule: Optional[Schedule] = None,
    include_head: bool = True,
    batch: int = 1,
) -> FlopsReport:
    """Analytic fvcore-convention FLOPs of one forward, walking the real (possibly reduced) grids.

    A block reduced to (H', W') runs its SS2D on its input grid and its MLP on H'xW'; later blocks and the
    downsample see the reduced grid. Reduction bookkeeping itself is not counted.
    """
    image_size = config.image_size if image_size is None else image_size
    height, width = _pair(image_size)
    dims, n_state, k = config.dims, config.d_state, NUM_DIRECTIONS
    parts = dict.fromkeys(
        ["stem", "norm", "in_proj", "dwconv", "x_proj", "dt_proj", "scan", "out_norm", "out_proj", "mlp",
         "downsample", "classifier_norm", "pool", "head"], 0)

    mid, grid = _stem_grids(config, height, width)
    half = dims[0] // 2
    parts["stem"] = batch * (
        conv2d_flops(config.num_channels, half, 3, mid) + layer_norm_flops(half * mid[0] * mid[1])
        + conv2d_flops(half, dims[0], 3, grid) + layer_norm_flops(dims[0] * grid[0] * grid[1])
    )

    rows: list[BlockFlops] = []
    last_grid = grid
    for stage, block, (h, w), (oh, ow) in walk_grids(config, (height, width), schedule):
        if block == 0 and stage > 0:
            parts["downsample"] += batch * (
                conv2d_flops(dims[stage - 1], dims[stage], 3, (h, w)) + layer_norm_flops(dims[stage] * h * w)
            )
        c, d, r = dims[stage], config.d_inner(stage), config.stage_dt_rank(stage)
        tokens, kept = batch * h * w, batch * oh * ow
        block_parts = {
            "norm": layer_norm_flops(c * tokens),
            "in_proj": linear_flops(c, d, tokens),
            "dwconv": conv2d_flops(d, d, config.ssm_conv, (h, w), groups=d, batch=batch) if config.ssm_conv > 1 else 0,
            "x_proj": conv1d_flops(k * d, k * (r + 2 * n_state), 1, h * w, groups=k, batch=batch),
            "dt_proj": conv1d_flops(k * r, k * d, 1, h * w, groups=k, batch=batch),
            "scan": scan_flops(batch, h * w, k * d, n_state),
            "out_norm": layer_norm_flops(d * tokens),
            "out_proj": linear_flops(d, c, tokens),
            "mlp": 0,
        }
        hidden = config.mlp_hidden(stage)
        if hidden > 0:
            block_parts["norm"] += layer_norm_flops(c * kept)
            block_parts["mlp"] = linear_flops(c, hidden, kept) + linear_flops(hidden, c, kept)
        for name, value in block_parts.items():
            parts[name] += value
        rows.append(BlockFlops(stage, block, h, w, sum(block_parts.values())))
        last_grid = (oh, ow)

    final = batch * dims[-1] * last_grid[0] * last_grid[1]
    parts["classifier_norm"] = layer_norm_flops(final)
    parts["pool"] = adaptive_avg_pool_flops(final)
    if include_head and config.num_labels > 0:
        parts["head"] = batch * linear_flops(dims[-1], config.num_labels, 1)
    return FlopsReport.from_parts(parts, rows, image_size=(height, width))


# --------------------------------------------------------------------------------------------------
# Transformers classes
# --------------------------------------------------------------------------------------------------


class VMambaPreTrainedModel(StormMixin, PreTrainedModel):
    config_class = VMambaConfig
    config: VMambaConfig
    base_model_prefix = "vmamba"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["VMambaBlock"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Official VMamba init: trunc-normal linears, PyTorch-default convs, Mamba's S4D-real A, D = 1,
        Δ projection uniform(±R^-0.5) with a bias that puts softplus(bias) log-uniformly in [1e-3, 1e-1]."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(fan_in)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, VMambaSS2D):
            inner, rank, state = module.d_inner, module.dt_rank, module.d_state
            bound = 1.0 / math.sqrt(inner)  # nn.Linear's default, as the official per-direction x_proj
            init.uniform_(module.x_proj_weight, -bound, bound)
            init.uniform_(module.dt_projs_weight, -(rank**-0.5), rank**-0.5)
            device = module.dt_projs_bias.device
            dt_min, dt_max, dt_floor = 1e-3, 1e-1, 1e-4
            dt = torch.exp(
                torch.rand(module.dt_projs_bias.shape, device=device) * (math.log(dt_max) - math.log(dt_min))
                + math.log(dt_min)
            ).clamp(min=dt_floor)
            init.copy_(module.dt_projs_bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            a = torch.arange(1, state + 1, dtype=torch.float32, device=module.A_logs.device)
            init.copy_(module.A_logs, torch.log(a).expand_as(module.A_logs))
            init.ones_(module.Ds)

    # StormMixin hooks ----------------------------------------------------------------------------
    def _natural_grids(self, image_size: Union[int, Grid]) -> dict[tuple[int, int], Grid]:
        return natural_grids(self.config, image_size)

    def _downsample_grid(self, grid: Grid, stage: int) -> Grid:
        """The grid entering stage + 1: a 3x3 stride-2 conv with padding 1 gives ceil(H / 2)."""
        return conv_out_size(grid[0], 3, 2, 1), conv_out_size(grid[1], 3, 2, 1)

    def _flops(self, image_size: Union[int, Grid], schedule: Optional[Schedule] = None) -> FlopsReport:
        return vmamba_flops(self.config, image_size, schedule, include_head=hasattr(self, "classifier"))


class VMambaModel(VMambaPreTrainedModel):
    """Stem + stages. `pooler_output` = avg-pool(LN(last map)); `last_hidden_state` = the last map before that
    LN, (B, C, H, W); `hidden_states` = stem output and each stage's output before its downsample."""

    def __init__(self, config: VMambaConfig) -> None:
        super().__init__(config)
        self.patch_embed = VMambaPatchEmbeddings(config)
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        start = 0
        for stage, depth in enumerate(config.depths):
            self.layers.append(VMambaStage(config, stage, rates[start:start + depth]))
            start += depth
        self.norm = nn.LayerNorm(config.dims[-1], eps=config.layer_norm_eps)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.post_init()

    def _check_pixel_values(self, pixel_values: Optional[torch.Tensor]) -> None:
        if pixel_values is None:
            raise ValueError("pixel_values is required: a (batch, channels, height, width) image tensor.")
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must be 4-D (batch, channels, height, width), got shape {tuple(pixel_values.shape)}; "
                "add a batch dimension with `.unsqueeze(0)` for a single image."
            )
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels but the model expects "
                f"{self.config.num_channels} (config.num_channels); pass channels-first images (B, C, H, W)."
            )
        _check_image_size(pixel_values.shape[2], pixel_values.shape[3], self.config.patch_size)

    def forward(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> Union[tuple, BaseModelOutputWithPoolingAndNoAttention]:
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_pixel_values(pixel_values)

        storm = StormConfig.from_any(self.config.storm)
        schedule = None
        if storm.enabled:
            schedule = {tuple(p): tuple(hw) for p, hw in self.storm_schedule(tuple(pixel_values.shape[2:])).items()}
            for _ in walk_grids(self.config, tuple(pixel_values.shape[2:]), schedule):
                pass  # validates every position and target before any compute

        x = self.patch_embed(pixel_values)
        hidden_states = [x.permute(0, 3, 1, 2)] if output_hidden_states else None
        for stage_index, stage in enumerate(self.layers):
            sizes = None  # merge sizes do not survive a strided conv
            for block_index, block in enumerate(stage.blocks):
                target = schedule.get((stage_index, block_index)) if schedule else None
                if target is not None:
                    grid = (x.shape[1], x.shape[2])
                    _check_target((stage_index, block_index), target, grid)
                    if tuple(target) == grid:
                        target = None
                x, sizes = block(x, target, storm, sizes)
            if output_hidden_states:
                hidden_states.append(x.permute(0, 3, 1, 2))
            x = stage.downsample(x)

        pooled = self.pool(self.norm(x).permute(0, 3, 1, 2)).flatten(1)
        last = x.permute(0, 3, 1, 2)
        if not return_dict:
            return tuple(v for v in (last, pooled, hidden_states and tuple(hidden_states)) if v is not None)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=last,
            pooler_output=pooled,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
        )


class VMambaForImageClassification(VMambaPreTrainedModel):
    """VMambaModel + a linear head on the pooled feature (the official `classifier.head`)."""

    accepts_loss_kwargs = False

    def __init__(self, config: VMambaConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vmamba = VMambaModel(config)
        self.classifier = nn.Linear(config.dims[-1], config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> Union[tuple, ImageClassifierOutputWithNoAttention]:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.vmamba(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        if not return_dict:
            rest = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + rest) if loss is not None else rest
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


VMambaConfig.register_for_auto_class()
VMambaModel.register_for_auto_class("AutoModel")
VMambaForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "VMambaPreTrainedModel",
    "VMambaModel",
    "VMambaForImageClassification",
    "vmamba_flops",
    "natural_grids",
]
