"""GroupMamba (Shaker et al., CVPR 2025) as a Transformers model, with STORM token reduction.

Numerically follows Amshaker/GroupMamba `classification/models/groupmamba.py` + `ss2d.py` (forward type
"v2") in eval mode. Token maps stay channels-last (B, H, W, C) between layers; hidden states handed to
users are (B, C, H, W).

The modulated group Mamba layer splits the normed input into four channel groups, scans each group in one
direction (row-major, column-major, and both reversed: VMamba's four cross-scan orders, one per group),
multiplies the concatenation by `skip_scale · normed input`, modulates channels with an SE-style affinity,
and re-applies the same LayerNorm before the output projection. The head runs one extra group-Mamba block
on a single "class token" (the mean of the last-stage tokens) and averages the `head` and `dist_head`
logits, as the official eval does.

Token reduction (STORM and baselines) sits where STORM puts it in VMamba: in a chosen block, the group
Mamba branch runs at full size, then the residual stream and the branch are reduced with one plan (from the
residual), then the FFN (whose depthwise conv needs the grid) and every later layer run on the smaller grid.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)

from .configuration_groupmamba import NUM_GROUPS, GroupMambaConfig
from .flops import (
    BlockFlops,
    FlopsReport,
    batch_norm_flops,
    conv2d_flops,
    conv_out_size,
    layer_norm_flops,
    linear_flops,
    scan_flops,
)
from .reduction import StormConfig, StormMixin, reduce_tokens
from .selective_scan import selective_scan

Grid = tuple[int, int]


# --------------------------------------------------------------------------------------------------
# scan orders: group g of the layer scans in direction g
# --------------------------------------------------------------------------------------------------


def scan_sequence(x: torch.Tensor, direction: int) -> torch.Tensor:
    """(B, D, H, W) -> (B, D, L) in direction 0 row-major, 1 column-major, 2 / 3 their reversals."""
    seq = x.flatten(2) if direction % 2 == 0 else x.transpose(2, 3).flatten(2)
    return seq.flip(-1) if direction >= 2 else seq


def merge_sequence(y: torch.Tensor, direction: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `scan_sequence`: (B, D, L) -> (B, D, H, W)."""
    if direction >= 2:
        y = y.flip(-1)
    if direction % 2 == 0:
        return y.unflatten(-1, (height, width))
    return y.unflatten(-1, (width, height)).transpose(2, 3)


class DropPath(nn.Module):
    """Stochastic depth per sample (training only)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


# --------------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------------


class GroupMambaStem(nn.Module):
    """conv7x7 s2 + BN + ReLU, 2x (conv3x3 + BN + ReLU), conv3x3 s2 + LayerNorm: image -> (B, H/4, W/4, C).

    With `config.patch_size=2` (not an official model) the 7x7 conv has stride 1: (B, ceil(H/2), ceil(W/2), C).
    """

    def __init__(self, config: GroupMambaConfig) -> None:
        super().__init__()
        hidden, eps = config.stem_hidden_dim, config.batch_norm_eps
        # Slot indices 0..8 match the official `patch_embed1.conv` Sequential.
        self.conv = nn.Sequential(
            nn.Conv2d(config.num_channels, hidden, kernel_size=7, stride=config.stem_stride, padding=3, bias=False),
            nn.BatchNorm2d(hidden, eps=eps),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(hidden, eps=eps),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(hidden, eps=eps),
            nn.ReLU(),
        )
        self.proj = nn.Conv2d(hidden, config.embed_dims[0], kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(config.embed_dims[0], eps=config.embed_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(self.conv(pixel_values)).permute(0, 2, 3, 1))


class GroupMambaDownsample(nn.Module):
    """conv3x3 s2 p1 + LayerNorm between stages (official `DownSamples`)."""

    def __init__(self, in_dim: int, out_dim: int, eps: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class GroupMambaDirectionalSS2D(nn.Module):
    """One channel group's SS2D: in_proj -> (x, z), dwconv + SiLU, one-direction scan, out_norm, gate, out_proj.

    The official per-group parameters `x_proj_weight` (1, R+2N, D), `dt_projs_weight` (1, D, R),
    `dt_projs_bias` (1, D), `A_logs`, `Ds` become `x_proj`, `dt_proj` (Linear modules, so FLOP hooks see
    them), `dt_bias`, `A_log`, `D`. The Δ bias is added inside the scan, as in the official kernel call.
    """

    def __init__(self, config: GroupMambaConfig, width: int, direction: int) -> None:
        super().__init__()
        d_model = config.group_dim(width)
        d_inner = config.group_inner(width)
        rank = config.group_dt_rank(width)
        self.direction = direction
        self.d_state = config.d_state
        self.rank = rank
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(
            d_inner, d_inner, kernel_size=config.d_conv, padding=(config.d_conv - 1) // 2, groups=d_inner, bias=True
        )
        self.x_proj = nn.Linear(d_inner, rank + 2 * config.d_state, bias=False)
        self.dt_proj = nn.Linear(rank, d_inner, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(d_inner))
        self.A_log = nn.Parameter(torch.empty(d_inner, config.d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_norm = nn.LayerNorm(d_inner, eps=config.mixer_norm_eps)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor, return_delta: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x: (B, H, W, d_model) -> (B, H, W, d_model), and softplus(Δ) channel-mean (B, H, W) if asked."""
        _, height, width, _ = x.shape
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv2d(u.permute(0, 3, 1, 2)))
        seq = scan_sequence(u, self.direction)  # (B, D, L)
        dbl = self.x_proj(seq.transpose(1, 2))  # (B, L, R + 2N)
        dt_low, b_ssm, c_ssm = torch.split(dbl, [self.rank, self.d_state, self.d_state], dim=-1)
        delta = self.dt_proj(dt_low).transpose(1, 2)  # (B, D, L)
        # Official forward type "v2" forces the scan inputs to fp32.
        y = selective_scan(
            seq.float(),
            delta.float(),
            -torch.exp(self.A_log.float()),
            b_ssm.transpose(1, 2).float(),
            c_ssm.transpose(1, 2).float(),
            D=self.D.float(),
            delta_bias=self.dt_bias.float(),
            delta_softplus=True,
        )
        y = merge_sequence(y, self.direction, height, width).permute(0, 2, 3, 1).to(x.dtype)
        out = self.out_proj(self.out_norm(y) * F.silu(z))
        step = None
        if return_delta:
            step = F.softplus(delta.float() + self.dt_bias.float()[:, None]).mean(dim=1, keepdim=True)  # (B, 1, L)
            step = merge_sequence(step, self.direction, height, width)[:, 0]
        return out, step


class GroupMambaMixer(nn.Module):
    """The modulated group Mamba layer (official `GroupMambaLayer`), C -> C on a (B, H, W, C) map."""

    def __init__(self, config: GroupMambaConfig, width: int) -> None:
        super().__init__()
        reduced = width // config.affinity_reduction
        self.norm = nn.LayerNorm(width, eps=config.mixer_norm_eps)
        self.affinity_fc1 = nn.Linear(width, reduced)
        self.affinity_fc2 = nn.Linear(reduced, width)
        self.groups = nn.ModuleList(GroupMambaDirectionalSS2D(config, width, g) for g in range(NUM_GROUPS))
        self.skip_scale = nn.Parameter(torch.empty(1))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, return_delta: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns the branch output and, if asked, softplus(Δ) channel-means summed over the 4 directions."""
        x = self.norm(x)
        affinity = torch.sigmoid(self.affinity_fc2(F.relu(self.affinity_fc1(x.mean(dim=(1, 2))))))
        outs, steps = [], []
        for group, chunk in zip(self.groups, x.chunk(NUM_GROUPS, dim=-1)):
            out, step = group(chunk, return_delta)
            outs.append(out)
            steps.append(step)
        y = torch.cat(outs, dim=-1) * self.skip_scale * x
        y = y * affinity[:, None, None, :]
        y = self.proj(self.norm(y))
        return y, (torch.stack(steps).sum(0) if return_delta else None)


class GroupMambaFFN(nn.Module):
    """fc1 -> depthwise conv3x3 on the grid -> GELU -> fc2 (official `PVT2FFN`); `dwconv=False` gives `FFN`."""

    def __init__(self, width: int, hidden: int, dwconv: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden) if dwconv else None
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.dwconv is not None:
            x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(self.act(x))


class GroupMambaBlock(nn.Module):
    """x += mixer(x); [reduce x and the branch]; x += FFN(LN(x)). The mixer normalises its own input."""

    def __init__(self, config: GroupMambaConfig, stage: int, drop_path: float) -> None:
        super().__init__()
        width = config.embed_dims[stage]
        self.mixer = GroupMambaMixer(config, width)
        self.mlp_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = GroupMambaFFN(width, config.mlp_hidden(stage))
        self.drop_path = DropPath(drop_path)

    def forward(
        self,
        x: torch.Tensor,
        target: Optional[Grid] = None,
        storm: Optional[StormConfig] = None,
        sizes: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        branch, delta = self.mixer(x, return_delta=target is not None and storm.method == "mtr")
        if target is not None:
            extras = {"branch": branch} if delta is None else {"branch": branch, "delta": delta}
            x, branch, sizes = reduce_tokens(storm, x, branch, target, sizes=sizes, extras=extras)
        x = x + self.drop_path(branch)
        x = x + self.drop_path(self.mlp(self.mlp_norm(x)))
        return x, sizes


class GroupMambaStage(nn.Module):
    """Downsampling (none for stage 0: the stem does it), the blocks, and the stage's output LayerNorm."""

    def __init__(self, config: GroupMambaConfig, stage: int, drop_paths: list[float]) -> None:
        super().__init__()
        self.downsample = (
            GroupMambaDownsample(config.embed_dims[stage - 1], config.embed_dims[stage], config.embed_norm_eps)
            if stage > 0
            else None
        )
        self.layers = nn.ModuleList(GroupMambaBlock(config, stage, p) for p in drop_paths)
        # The official last-stage norm (`norm4`) is applied after the class-token block; it lives in the pooler.
        last = stage == config.num_stages - 1
        self.norm = None if last else nn.LayerNorm(config.embed_dims[stage], eps=config.layer_norm_eps)


class GroupMambaClassTokenPooler(nn.Module):
    """Official `forward_cls` + final norm: the mean token goes through one ClassBlock, then LayerNorm."""

    def __init__(self, config: GroupMambaConfig) -> None:
        super().__init__()
        width, eps = config.hidden_size, config.layer_norm_eps
        self.mixer = GroupMambaMixer(config, width)
        self.mixer_norm = nn.LayerNorm(width, eps=eps)
        self.mlp_norm = nn.LayerNorm(width, eps=eps)
        self.mlp = GroupMambaFFN(width, config.cls_mlp_hidden, dwconv=False)
        self.norm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) last-stage map -> (B, C)."""
        cls = x.mean(dim=(1, 2), keepdim=True)  # a 1x1 "image"
        cls = cls + self.mixer_norm(self.mixer(cls)[0])
        cls = cls + self.mlp(self.mlp_norm(cls))
        return self.norm(cls[:, 0, 0])


# --------------------------------------------------------------------------------------------------
# sizes and FLOPs
# --------------------------------------------------------------------------------------------------


def _pair(image_size: Union[int, Grid, list]) -> Grid:
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def _check_image_size(height: int, width: int, patch_size: int) -> None:
    """The stem makes one token per patch_size x patch_size pixels; a thinner image gives a grid of padding."""
    if height < patch_size or width < patch_size:
        raise ValueError(
            f"Input image {height}x{width} is too small: GroupMamba's stem makes one token per {patch_size}x"
            f"{patch_size} pixels, so both sides must be at least {patch_size} pixels. Resize the image (the "
            "released models expect 224x224)."
        )


def _stem_grids(config: GroupMambaConfig, image_size: Grid) -> tuple[Grid, Grid]:
    """(grid after the 7x7 conv (stride `config.stem_stride`), grid after the stem's stride-2 projection)."""
    h1, w1 = (conv_out_size(s, 7, config.stem_stride, 3) for s in image_size)
    return (h1, w1), (conv_out_size(h1, 3, 2, 1), conv_out_size(w1, 3, 2, 1))


def _check_target(position: tuple[int, int], target: Grid, grid: Grid) -> None:
    th, tw = int(target[0]), int(target[1])
    if th < 1 or tw < 1 or th > grid[0] or tw > grid[1]:
        raise ValueError(
            f"The reduction schedule asks block {position} (stage, block) for a {th}x{tw} grid, but its input is "
            f"{grid[0]}x{grid[1]}: targets must lie between 1x1 and the input grid. Use a larger image or a "
            "schedule made for this input size (or `flops_ratio`, which is solved per size)."
        )


def walk_grids(config: GroupMambaConfig, image_size: Union[int, Grid], schedule: Optional[dict] = None):
    """Yield (stage, block, input grid, output grid) for every block, following reductions and downsampling.

    Validates the image size and every schedule entry (position exists, target inside the grid).
    """
    height, width = _pair(image_size)
    _check_image_size(height, width, config.patch_size)
    schedule = {tuple(pos): tuple(int(v) for v in hw) for pos, hw in (schedule or {}).items()}
    positions = {(s, b) for s, depth in enumerate(config.depths) for b in range(depth)}
    unknown = sorted(set(schedule) - positions)
    if unknown:
        raise ValueError(
            f"The reduction schedule names block(s) {unknown} that this GroupMamba does not have; "
            f"valid (stage, block) positions have stage < {config.num_stages} and block < depths {config.depths}."
        )
    _, grid = _stem_grids(config, (height, width))
    for stage, depth in enumerate(config.depths):
        if stage > 0:
            grid = (conv_out_size(grid[0], 3, 2, 1), conv_out_size(grid[1], 3, 2, 1))
        for block in range(depth):
            target = schedule.get((stage, block))
            out = grid
            if target is not None:
                _check_target((stage, block), target, grid)
                out = target
            yield stage, block, grid, out
            grid = out


def natural_grids(config: GroupMambaConfig, image_size: Union[int, Grid]) -> dict[tuple[int, int], Grid]:
    """{(stage, block): (H, W)} each block receives when nothing is reduced."""
    return {(s, b): grid for s, b, grid, _ in walk_grids(config, image_size)}


def _mixer_flops(config: GroupMambaConfig, width: int, tokens: int) -> int:
    """One modulated group Mamba layer on `tokens` tokens (batch 1, fvcore convention)."""
    d_model, d_inner = config.group_dim(width), config.group_inner(width)
    rank, n_state = config.group_dt_rank(width), config.d_state
    reduced = width // config.affinity_reduction
    per_group = (
        linear_flops(d_model, 2 * d_inner, tokens)  # in_proj
        + d_inner * config.d_conv**2 * tokens  # depthwise conv (fvcore counts the full kernel)
        + linear_flops(d_inner, rank + 2 * n_state, tokens)  # x_proj
        + linear_flops(rank, d_inner, tokens)  # dt_proj
        + scan_flops(1, tokens, d_inner, n_state, with_d=True)
        + layer_norm_flops(tokens * d_inner)  # out_norm
        + linear_flops(d_inner, d_model, tokens)  # out_proj
    )
    return (
        2 * layer_norm_flops(tokens * width)  # the shared norm, applied twice
        + linear_flops(width, reduced, 1)
        + linear_flops(reduced, width, 1)  # channel affinity on the pooled vector
        + NUM_GROUPS * per_group
        + linear_flops(width, width, tokens)  # proj
    )


def _ffn_flops(width: int, hidden: int, tokens: int, dwconv: bool = True) -> int:
    return (
        linear_flops(width, hidden, tokens)
        + (hidden * 9 * tokens if dwconv else 0)
        + linear_flops(hidden, width, tokens)
    )


def groupmamba_flops(
    config: GroupMambaConfig,
    image_size: Union[int, Grid],
    schedule: Optional[dict] = None,
    include_head: bool = True,
) -> FlopsReport:
    """Analytic fvcore-convention FLOPs of one image.

    `schedule` maps (stage, block) -> (H', W'): that block's mixer runs on the grid it receives, its FFN and
    everything after it on H' x W'. The reduction's own bookkeeping (similarities, sorting) is not counted.
    The class-token pooler is part of the backbone; `include_head` adds the linear classifier(s).
    """
    height, width = _pair(image_size)
    hidden = config.stem_hidden_dim
    (h1, w1), (h, w) = _stem_grids(config, (height, width))
    c0 = config.embed_dims[0]
    parts = {
        "stem": conv2d_flops(config.num_channels, hidden, 7, (h1, w1))
        + 2 * conv2d_flops(hidden, hidden, 3, (h1, w1))
        + 3 * batch_norm_flops(hidden * h1 * w1)
        + conv2d_flops(hidden, c0, 3, (h, w))
        + layer_norm_flops(c0 * h * w),
        "downsample": 0,
        "mixer": 0,
        "mlp": 0,
        "stage_norm": 0,
    }
    blocks: list[BlockFlops] = []
    last_grid = {}
    for stage, block, (h, w), (h2, w2) in walk_grids(config, (height, width), schedule):
        dim = config.embed_dims[stage]
        if stage > 0 and block == 0:
            parts["downsample"] += conv2d_flops(config.embed_dims[stage - 1], dim, 3, (h, w))
            parts["downsample"] += layer_norm_flops(dim * h * w)
        mixer = _mixer_flops(config, dim, h * w)
        mlp = layer_norm_flops(h2 * w2 * dim) + _ffn_flops(dim, config.mlp_hidden(stage), h2 * w2)
        parts["mixer"] += mixer
        parts["mlp"] += mlp
        blocks.append(BlockFlops(stage, block, h, w, mixer + mlp))
        last_grid[stage] = (h2, w2)
    for stage in range(config.num_stages - 1):
        parts["stage_norm"] += layer_norm_flops(config.embed_dims[stage] * last_grid[stage][0] * last_grid[stage][1])
    dim = config.hidden_size
    parts["pooler"] = (
        _mixer_flops(config, dim, 1)
        + 3 * layer_norm_flops(dim)  # norm1, norm2 and the final norm
        + _ffn_flops(dim, config.cls_mlp_hidden, 1, dwconv=False)
    )
    if include_head and config.num_labels > 0:
        heads = 2 if config.distillation else 1
        parts["head"] = heads * linear_flops(dim, config.num_labels, 1)
    return FlopsReport.from_parts(parts, blocks, image_size=(height, width))


def default_image_processor_kwargs(config: GroupMambaConfig) -> dict:
    """Official eval transform: resize short side to int(256/224 · size) bicubic, center-crop, ImageNet norm."""
    size = config.image_size[0] if isinstance(config.image_size, (list, tuple)) else config.image_size
    return {
        "size": {"shortest_edge": int(size)},
        "crop_pct": 224 / 256,
        "resample": 3,  # PIL bicubic
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }


# --------------------------------------------------------------------------------------------------
# Transformers classes
# --------------------------------------------------------------------------------------------------


class GroupMambaPreTrainedModel(StormMixin, PreTrainedModel):
    config_class = GroupMambaConfig
    base_model_prefix = "groupmamba"
    main_input_name = "pixel_values"
    _no_split_modules = ["GroupMambaBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The official init: trunc-normal linears, fan-out normal convs, S4D-real A, unit D, Mamba Δ bias."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
        if isinstance(module, GroupMambaMixer):
            init.ones_(module.skip_scale)
        if isinstance(module, GroupMambaDirectionalSS2D):
            d_inner, n_state = module.A_log.shape
            device = module.A_log.device
            a = torch.arange(1, n_state + 1, dtype=torch.float32, device=device).expand(d_inner, n_state)
            init.copy_(module.A_log, torch.log(a))
            init.ones_(module.D)
            init.uniform_(module.dt_proj.weight, -module.rank**-0.5, module.rank**-0.5)
            dt_min, dt_max = 1e-3, 1e-1
            dt = torch.exp(
                torch.rand(d_inner, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
            ).clamp(min=1e-4)
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    # ---- StormMixin hooks ------------------------------------------------------------------------

    def _natural_grids(self, image_size: Union[int, Grid]) -> dict[tuple[int, int], Grid]:
        return natural_grids(self.config, image_size)

    def _flops(self, image_size: Union[int, Grid], schedule: Optional[dict] = None) -> FlopsReport:
        return groupmamba_flops(self.config, image_size, schedule, include_head=hasattr(self, "classifier"))

    def _default_storm_positions(self) -> list[tuple[int, int]]:
        """Odd blocks of every stage but the last: STORM's pattern for VMamba (reduce after every other block,
        never in the cheap 7x7 last stage), so both hierarchical backbones are budgeted the same way."""
        depths = self.config.depths
        return [(s, b) for s in range(len(depths) - 1) for b in range(depths[s]) if b % 2 == 1]

    def _storm_channels(self, position: tuple[int, int]) -> int:
        return self.config.embed_dims[position[0]]

    def _downsample_grid(self, grid: Grid, stage: int) -> Grid:
        """The stride-2, padding-1 3x3 conv between stages: ceil(side / 2)."""
        return conv_out_size(grid[0], 3, 2, 1), conv_out_size(grid[1], 3, 2, 1)

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


class GroupMambaModel(GroupMambaPreTrainedModel):
    """The backbone: stem, four stages, and the class-token pooler (pooler_output feeds the classifier)."""

    def __init__(self, config: GroupMambaConfig) -> None:
        super().__init__(config)
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linspace(0, rate, total)
        self.embeddings = GroupMambaStem(config)
        stages, start = [], 0
        for stage, depth in enumerate(config.depths):
            stages.append(GroupMambaStage(config, stage, rates[start:start + depth]))
            start += depth
        self.stages = nn.ModuleList(stages)
        self.pooler = GroupMambaClassTokenPooler(config)
        self.post_init()

    def forward(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[tuple, BaseModelOutputWithPoolingAndNoAttention]:
        """hidden_states (if asked): the stem output and each stage's output (before its norm), as (B, C, H, W)."""
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_pixel_values(pixel_values)
        storm = StormConfig.from_any(self.config.storm)
        schedule = {}
        if storm.enabled:
            image_size = tuple(pixel_values.shape[2:])
            schedule = {tuple(p): tuple(hw) for p, hw in self.storm_schedule(image_size).items()}
            for _ in walk_grids(self.config, image_size, schedule):
                pass  # validates every position and target before any compute

        x = self.embeddings(pixel_values)
        hidden_states = [x.permute(0, 3, 1, 2)] if output_hidden_states else None
        for stage_idx, stage in enumerate(self.stages):
            if stage.downsample is not None:
                x = stage.downsample(x)
            sizes = None  # merge sizes do not survive a strided convolution
            for block_idx, block in enumerate(stage.layers):
                target = schedule.get((stage_idx, block_idx))
                if target is not None and tuple(target) == tuple(x.shape[1:3]):
                    target = None  # nothing to reduce here
                x, sizes = block(x, target, storm, sizes)
            if output_hidden_states:
                hidden_states.append(x.permute(0, 3, 1, 2))
            if stage.norm is not None:
                x = stage.norm(x)
        pooled = self.pooler(x)
        last = x.permute(0, 3, 1, 2)
        if not return_dict:
            return tuple(v for v in (last, pooled, hidden_states and tuple(hidden_states)) if v is not None)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=last,
            pooler_output=pooled,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
        )


class GroupMambaForImageClassification(GroupMambaPreTrainedModel):
    """GroupMamba with its classifier; with `distillation` the logits are (head + dist_head) / 2 (official eval)."""

    accepts_loss_kwargs = False

    def __init__(self, config: GroupMambaConfig) -> None:
        super().__init__(config)
        self.groupmamba = GroupMambaModel(config)
        width = config.hidden_size
        self.classifier = nn.Linear(width, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.distillation_classifier = None
        if config.distillation:
            self.distillation_classifier = (
                nn.Linear(width, config.num_labels) if config.num_labels > 0 else nn.Identity()
            )
        self.post_init()

    def forward(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[tuple, ImageClassifierOutputWithNoAttention]:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.groupmamba(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        pooled = outputs.pooler_output
        logits = self.classifier(pooled)
        if self.distillation_classifier is not None:
            logits = (logits + self.distillation_classifier(pooled)) / 2
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


GroupMambaConfig.register_for_auto_class()
GroupMambaModel.register_for_auto_class("AutoModel")
GroupMambaForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "GroupMambaPreTrainedModel",
    "GroupMambaModel",
    "GroupMambaForImageClassification",
    "groupmamba_flops",
    "natural_grids",
    "walk_grids",
    "default_image_processor_kwargs",
]
