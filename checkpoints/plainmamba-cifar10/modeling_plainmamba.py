"""PlainMamba (Yang et al., BMVC 2024) as Transformers models, with STORM token reduction between layers.

A faithful port of ChenhongyiYang/PlainMamba's classifier (mmcls `ImageClassifier` with the `PlainMamba`
backbone, `CustomAveragePooling` neck and `LinearClsHead`): the official checkpoints, converted by
`storm_hf.tools.convert_plainmamba`, give the official logits.

Token maps stay channels-last (B, H, W, C) between layers. Each layer is
`x = x + mixer(LayerNorm(x))`, where the mixer scans the grid along four continuous zig-zag paths
(row snake, column snake, and both reversed) with a learned "direction" vector added to B for the move
that reached each token. Two quirks of the released code are reproduced on purpose, because the released
weights were trained with them: only the scan input is reordered along each path (Δ, B and C stay in raster
order, so step t uses raster token t's Δ/B/C), and the dt bias is added twice (in `dt_proj` and again as the
scan's `delta_bias`).

STORM: in a reducing layer the mixer runs on the full grid, then residual and mixer output are reduced to
H'×W' with one plan (`reduce_tokens`), and everything grid-dependent (zig-zag paths, direction ids,
convolutions) is rebuilt for H'×W' in the following layers.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)

from .configuration_plainmamba import PlainMambaConfig, token_grid
from .flops import (
    BlockFlops,
    FlopsReport,
    batch_norm_flops,
    conv2d_flops,
    layer_norm_flops,
    linear_flops,
    scan_flops,
)
from .reduction import StormConfig, StormMixin, reduce_tokens
from .selective_scan import ordered_scan_enabled, ordered_selective_scan, selective_scan

# STORM's PlainMamba schedules (`scheduals.yml`) reduce after these layers, whatever the depth.
STORM_REDUCTION_LAYERS = (4, 10, 16, 22)
# STORM(EViT) keeps the top tokens inside windows of 20 tokens on PlainMamba (5 on VMamba); STORM(ToMe)
# keeps the common default of 5 pairs.
STORM_WINDOWS = {"storm_evit": 20}

# Direction ids of the learned direction table (official order).
START, RIGHT, LEFT, UP, DOWN = 0, 1, 2, 3, 4


# ----------------------------------------------------------------------------------------------------------
# zig-zag paths
# ----------------------------------------------------------------------------------------------------------


def zigzag_paths(height: int, width: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """The four continuous scan paths over an H×W grid (raster ids p = row·W + col).

    Returns `order` (4, L): the raster id visited at each step; `inverse` (4, L): the step at which each
    raster id is visited; `direction` (4, L): the move that reached each step (START at step 0, then
    RIGHT/LEFT/UP/DOWN). Paths: row snake from the top-left, its reverse, column snake from the top-left,
    its reverse — every step moves to a 4-neighbour, so the scan never jumps across the image.
    """
    cols = torch.arange(width).repeat(height, 1)
    cols[1::2] = cols[1::2].flip(1)
    row_snake = (torch.arange(height)[:, None] * width + cols).flatten()
    rows = torch.arange(height).repeat(width, 1)
    rows[1::2] = rows[1::2].flip(1)
    col_snake = (rows * width + torch.arange(width)[:, None]).flatten()
    order = torch.stack([row_snake, row_snake.flip(0), col_snake, col_snake.flip(0)])

    length = height * width
    inverse = torch.empty_like(order)
    inverse.scatter_(1, order, torch.arange(length).expand(4, length).contiguous())

    d_row = (order[:, 1:] // width) - (order[:, :-1] // width)
    d_col = (order[:, 1:] % width) - (order[:, :-1] % width)
    moves = torch.where(
        d_col == 1,
        RIGHT,
        torch.where(d_col == -1, LEFT, torch.where(d_row == -1, UP, DOWN)),
    )
    direction = torch.cat([torch.full((4, 1), START, dtype=moves.dtype), moves], dim=1)
    return order.to(device), inverse.to(device), direction.to(device)


# ----------------------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------------------


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (identity at eval or rate 0)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class PlainMambaDropPath(nn.Module):
    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.rate, self.training)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class PlainMambaConvBlock(nn.Module):
    """Conv (no bias) -> BatchNorm -> activation, the unit of the stem and of the L1 depthwise block."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, act: str = "relu"):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(out_ch)
        # GELU is the exact (erf) form, as nn.GELU() in the official code.
        self.act = nn.ReLU() if act == "relu" else nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class PlainMambaEmbeddings(nn.Module):
    """Conv stem + patch projection + learned position embedding -> channels-last tokens (B, H, W, C).

    7×7 stride-2 conv, `num_stem_convs` 3×3 convs, zero padding at the bottom/right to a multiple of the
    projection stride (mmcv AdaptivePadding "corner"), then a `patch_size/2` square projection with that stride.
    """

    def __init__(self, config: PlainMambaConfig):
        super().__init__()
        self.stem = PlainMambaConvBlock(config.num_channels, config.stem_channels, 7, stride=2)
        self.convs = nn.ModuleList(
            PlainMambaConvBlock(config.stem_channels, config.stem_channels, 3) for _ in range(config.num_stem_convs)
        )
        self.proj_stride = config.patch_size // 2
        self.projection = nn.Conv2d(
            config.stem_channels, config.hidden_size, self.proj_stride, stride=self.proj_stride, bias=True
        )
        self.position_grid = config.position_grid
        rows, cols = self.position_grid
        self.position_embeddings = nn.Parameter(torch.zeros(1, rows * cols, config.hidden_size))

    def interpolated_position_embeddings(self, height: int, width: int) -> torch.Tensor:
        """(1, H, W, C) position embedding; bicubic resize (align_corners=False) for other grids, as mmcls."""
        rows, cols = self.position_grid
        pos = self.position_embeddings.reshape(1, rows, cols, -1)
        if (height, width) == (rows, cols):
            return pos
        pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(height, width), mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixel_values)
        for block in self.convs:
            x = block(x)
        s = self.proj_stride
        pad_h, pad_w = (-x.shape[-2]) % s, (-x.shape[-1]) % s
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.projection(x).permute(0, 2, 3, 1)
        return x + self.interpolated_position_embeddings(x.shape[1], x.shape[2]).to(x.dtype)


class PlainMambaMixer(nn.Module):
    """PlainMamba2D: the selective scan along four zig-zag paths of the 2-D grid, on (B, H, W, C) maps."""

    def __init__(self, config: PlainMambaConfig):
        super().__init__()
        hidden, inner, n_state = config.hidden_size, config.intermediate_size, config.d_state
        self.inner = inner
        self.d_state = n_state
        self.dt_rank = config.dt_rank
        self.in_proj = nn.Linear(hidden, 2 * inner, bias=config.proj_bias)
        self.conv2d = nn.Conv2d(
            inner, inner, config.conv_size, padding=config.conv_size // 2, groups=inner, bias=config.conv_bias
        )
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * n_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.zeros(inner, n_state))
        self.D = nn.Parameter(torch.ones(inner))
        self.direction_Bs = nn.Parameter(torch.zeros(5, n_state))
        self.out_proj = nn.Linear(inner, hidden, bias=config.proj_bias)

    def forward(
        self, hidden: torch.Tensor, paths: tuple[torch.Tensor, ...], return_delta: bool = False
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """hidden (B, H, W, C) -> (output (B, H, W, C), Δ map (B, H, W) if `return_delta`)."""
        bsz, height, width, _ = hidden.shape
        inner, n_state = self.inner, self.d_state
        order, inverse, direction = paths

        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2))).flatten(2)  # (B, E, L), raster order
        dt_raw, b_raster, c_raster = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, n_state, n_state], dim=-1)
        dt = self.dt_proj(dt_raw).transpose(1, 2)  # (B, E, L): the bias is in here once ...
        dt_bias = self.dt_proj.bias.float()  # ... and goes into the scan again (released-code quirk)
        A = -torch.exp(self.A_log.float())
        dir_b = self.direction_Bs[direction].transpose(1, 2).to(b_raster.dtype)  # (4, N, L) by step
        B = b_raster.transpose(1, 2).unsqueeze(1) + dir_b.unsqueeze(0)  # (B, 4, N, L)

        needs_grad = torch.is_grad_enabled() and x.requires_grad
        if ordered_scan_enabled(x.device, n_state, x.dtype, default=True, needs_grad=needs_grad):
            # Triton: the kernel reads u along each path and sums the 4 outputs in raster order itself.
            y = ordered_selective_scan(
                x, dt, A, B, c_raster.transpose(1, 2), order, D=self.D.float(), delta_bias=dt_bias,
                per_direction=("B",), by_step=("delta", "B", "C"), delta_softplus=True, check_order=False,
            )
        else:
            y = self._materialised_scan(x, dt, A, B, c_raster, order, inverse)
        y = y.transpose(1, 2).reshape(bsz, height, width, inner)
        out = self.out_proj(y * F.silu(z))

        delta_map = None
        if return_delta:
            # softplus(Δ) averaged over channels, summed over the 4 paths (they share the raster Δ).
            step = F.softplus(dt.float() + dt_bias[None, :, None])
            delta_map = (4.0 * step.mean(dim=1)).reshape(bsz, height, width)
        return out, delta_map

    def _materialised_scan(
        self, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, c_raster: torch.Tensor,
        order: torch.Tensor, inverse: torch.Tensor,
    ) -> torch.Tensor:
        """The 4 path copies of u, one scan over 4 channel groups, gathered back and summed: (B, E, L)."""
        bsz, inner, length = x.shape
        n_state = self.d_state
        dt_bias = self.dt_proj.bias.float()
        # The four scans run as one call with 4 channel groups: group k scans path k.
        # only u follows the path; index_select (not advanced indexing) keeps the backward a cheap index_add
        u = x.index_select(2, order.reshape(-1)).view(bsz, inner, 4, length).transpose(1, 2)
        u = u.reshape(bsz, 4 * inner, length)
        delta = dt.repeat(1, 4, 1)  # Δ, B, C stay in raster order (released-code quirk)
        C = c_raster.transpose(1, 2).unsqueeze(1).expand(bsz, 4, n_state, length)
        y = selective_scan(
            u,
            delta,
            A.repeat(4, 1),
            B,
            C,
            D=self.D.float().repeat(4),
            z=None,
            delta_bias=dt_bias.repeat(4),
            delta_softplus=True,
        )
        y = y.view(bsz, 4, inner, length).gather(3, inverse.view(1, 4, 1, length).expand(bsz, 4, inner, length))
        return y.sum(dim=1)


class PlainMambaLayer(nn.Module):
    """Pre-norm residual mixer layer; optional STORM reduction after the mixer; optional L1 depthwise block."""

    def __init__(self, config: PlainMambaConfig, index: int, drop_path_rate: float):
        super().__init__()
        self.index = index
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mixer = PlainMambaMixer(config)
        self.drop_path = PlainMambaDropPath(drop_path_rate)
        self.dwconv = None
        if index in config.layers_with_dwconv:
            # Replaces the stream (no residual), as the official `dw` block.
            hidden = config.hidden_size
            self.dwconv = PlainMambaConvBlock(hidden, hidden, 3, groups=hidden, act="gelu")

    def forward(
        self,
        hidden: torch.Tensor,
        paths: tuple[torch.Tensor, ...],
        storm: Optional[StormConfig] = None,
        reduce_to: Optional[tuple[int, int]] = None,
        sizes: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One layer on (B, H, W, C); with `reduce_to`, residual and mixer output shrink to that grid first."""
        want_delta = reduce_to is not None and storm is not None and storm.method == "mtr"
        branch, delta_map = self.mixer(self.norm(hidden), paths, return_delta=want_delta)
        if reduce_to is not None:
            extras: dict[str, torch.Tensor] = {}
            if delta_map is not None:
                extras["delta"] = delta_map
            if storm.method == "top":
                extras["branch"] = branch
            hidden, branch, sizes = reduce_tokens(
                storm, hidden, branch, reduce_to, sizes=sizes, extras=extras, window_defaults=STORM_WINDOWS
            )
        hidden = hidden + self.drop_path(branch)
        if self.dwconv is not None:
            hidden = self.dwconv(hidden.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return hidden, sizes


# ----------------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------------


def _layer_grid_plan(
    config: PlainMambaConfig, grid: tuple[int, int], schedule: Optional[dict] = None
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(grid in, grid out) of every layer under a reduction schedule {(0, layer): (H', W')}."""
    schedule = dict(schedule or {})
    plan = []
    for i in range(config.num_hidden_layers):
        target = schedule.pop((0, i), None)
        out = grid if target is None else (int(target[0]), int(target[1]))
        if not (1 <= out[0] <= grid[0] and 1 <= out[1] <= grid[1]):
            raise ValueError(
                f"The reduction schedule asks layer {i} to go from a {grid[0]}x{grid[1]} grid to "
                f"{out[0]}x{out[1]}; targets must be between 1x1 and the current grid. Use larger images or a "
                f"milder schedule."
            )
        plan.append((grid, out))
        grid = out
    if schedule:
        raise ValueError(
            f"The reduction schedule names positions {sorted(schedule)} that PlainMamba does not have: positions "
            f"are (0, layer) with layer in 0..{config.num_hidden_layers - 1}."
        )
    return plan


def plainmamba_flops(
    config: PlainMambaConfig,
    image_size: Optional[tuple[int, int]] = None,
    schedule: Optional[dict] = None,
    convention: str = "fvcore",
    with_head: bool = True,
) -> FlopsReport:
    """Analytic FLOPs of one image, optionally under a reduction schedule {(0, layer): (H', W')}.

    `convention="fvcore"` (the project's, see flops.py): conv/linear MACs, LayerNorm 5/element, eval BatchNorm
    2/element, each of the 4 scans 9·L·E·N plus L·E for the D skip, and the classifier head; the mean pool
    (`torch.mean`) and the position-embedding resize cost nothing, as in fvcore.
    `convention="plainmamba"` reproduces the paper's 3.0 / 8.1 / 14.4 G (L1/L2/L3): conv and linear MACs of the
    backbone and 9·L·E·N per scan path only — no norms, no D skip, no head.
    """
    if convention not in ("fvcore", "plainmamba"):
        raise ValueError(f"Unknown FLOPs convention {convention!r}; choose 'fvcore' or 'plainmamba'.")
    full = convention == "fvcore"
    height, width = (int(s) for s in (image_size or config.image_size))
    hidden, inner, n_state, rank = config.hidden_size, config.intermediate_size, config.d_state, config.dt_rank
    stem_ch, k = config.stem_channels, config.conv_size

    half = (-(-height // 2), -(-width // 2))
    grid = (token_grid(height, config.patch_size), token_grid(width, config.patch_size))
    half_px = half[0] * half[1]
    parts: dict[str, int] = {}
    parts["stem"] = (
        conv2d_flops(config.num_channels, stem_ch, 7, half)
        + config.num_stem_convs * conv2d_flops(stem_ch, stem_ch, 3, half)
        + conv2d_flops(stem_ch, hidden, config.patch_size // 2, grid)
    )
    if full:
        parts["stem_norm"] = (1 + config.num_stem_convs) * batch_norm_flops(stem_ch * half_px)
    for name in ("norm", "mixer", "scan", "scan_skip", "dwconv"):
        if full or name in ("mixer", "scan", "dwconv"):
            parts[name] = 0

    blocks = []
    for i, ((h, w), (h_out, w_out)) in enumerate(_layer_grid_plan(config, grid, schedule)):
        tokens = h * w
        cost = {
            "norm": layer_norm_flops(tokens * hidden),
            "mixer": (
                linear_flops(hidden, 2 * inner, tokens)
                + conv2d_flops(inner, inner, k, (h, w), groups=inner)
                + linear_flops(inner, rank + 2 * n_state, tokens)
                + linear_flops(rank, inner, tokens)
                + linear_flops(inner, hidden, tokens)
            ),
            "scan": 4 * scan_flops(1, tokens, inner, n_state, with_d=False),
            "scan_skip": 4 * tokens * inner,
            "dwconv": 0,
        }
        if i in config.layers_with_dwconv:
            cost["dwconv"] = conv2d_flops(hidden, hidden, 3, (h_out, w_out), groups=hidden)
            if full:
                cost["dwconv"] += batch_norm_flops(h_out * w_out * hidden)
        block_total = 0
        for name, value in cost.items():
            if name in parts:
                parts[name] += value
                block_total += value
        blocks.append(BlockFlops(stage=0, block=i, height=h, width=w, flops=block_total))
        grid = (h_out, w_out)

    if full:
        parts["norm"] += layer_norm_flops(grid[0] * grid[1] * hidden)  # final LayerNorm
        if with_head and config.num_labels > 0:
            parts["head"] = linear_flops(hidden, config.num_labels, 1)
    return FlopsReport.from_parts(parts, blocks, image_size=(height, width))


def default_image_processor_kwargs(config: PlainMambaConfig) -> dict[str, Any]:
    """PlainMamba's mmcls eval pipeline: resize the short side to 256 (PIL bicubic), center-crop 224, RGB,
    normalise with mean (123.675, 116.28, 103.53) / std (58.395, 57.12, 57.375) on the 0-255 scale — i.e.
    ImageNet mean/std after rescaling by 1/255, and crop_pct = 224/256: kwargs for ConvNextImageProcessor(Pil)."""
    size = int(config.image_size[0])
    return {
        "size": {"shortest_edge": size},
        "crop_pct": 224 / 256,
        "resample": 3,  # PIL bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [123.675 / 255, 116.28 / 255, 103.53 / 255],
        "image_std": [58.395 / 255, 57.12 / 255, 57.375 / 255],
    }


# ----------------------------------------------------------------------------------------------------------
# Transformers classes
# ----------------------------------------------------------------------------------------------------------


class PlainMambaPreTrainedModel(StormMixin, PreTrainedModel):
    config_class = PlainMambaConfig
    config: PlainMambaConfig
    base_model_prefix = "plainmamba"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["PlainMambaLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Official init where it matters for training: trunc-normal linears and position embedding,
        Mamba's S4D-real A, unit D, and a dt bias whose softplus lies in [1e-3, 0.1]."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, PlainMambaEmbeddings):
            init.trunc_normal_(module.position_embeddings, std=std)
        elif isinstance(module, PlainMambaMixer):
            inner, n_state = module.A_log.shape
            a = torch.arange(1, n_state + 1, dtype=torch.float32, device=module.A_log.device)
            init.copy_(module.A_log, torch.log(a).expand(inner, n_state))
            init.ones_(module.D)
            init.trunc_normal_(module.direction_Bs, std=std)
            bound = module.dt_rank**-0.5
            init.uniform_(module.dt_proj.weight, -bound, bound)
            dt = torch.exp(
                torch.rand(inner, device=module.dt_proj.bias.device) * (math.log(0.1) - math.log(1e-3))
                + math.log(1e-3)
            ).clamp(min=1e-4)
            init.copy_(module.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))

    # --- STORM hooks -------------------------------------------------------------------------------------

    def _natural_grids(self, image_size: tuple[int, int]) -> dict[tuple[int, int], tuple[int, int]]:
        """Unreduced token grid at every layer: one grid for the whole (non-hierarchical) model."""
        grid = tuple(token_grid(int(s), self.config.patch_size) for s in image_size)
        return {(0, i): grid for i in range(self.config.num_hidden_layers)}

    def _flops(self, image_size: tuple[int, int], schedule: Optional[dict] = None) -> FlopsReport:
        with_head = getattr(self, "classifier", None) is not None and not isinstance(self.classifier, nn.Identity)
        return plainmamba_flops(self.config, image_size, schedule, with_head=with_head)

    def _default_storm_positions(self) -> list[tuple[int, int]]:
        """Where the budget solver may reduce by default: STORM's PlainMamba layers 4, 10, 16 and 22
        (those that exist). Models shallower than 5 layers may reduce after any layer but the last."""
        depth = self.config.num_hidden_layers
        layers = [i for i in STORM_REDUCTION_LAYERS if i < depth]
        if not layers:
            layers = list(range(max(depth - 1, 1)))
        return [(0, i) for i in layers]

    _storm_window_defaults = STORM_WINDOWS


class PlainMambaModel(PlainMambaPreTrainedModel):
    """PlainMamba backbone: stem, layers, final LayerNorm, mean pooling."""

    def __init__(self, config: PlainMambaConfig):
        super().__init__(config)
        self.embeddings = PlainMambaEmbeddings(config)
        depth = config.num_hidden_layers
        rates = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # np.linspace(0, rate, depth)
        self.layers = nn.ModuleList(PlainMambaLayer(config, i, rates[i]) for i in range(depth))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.final_layer_norm_eps)
        self._path_cache: dict[tuple[int, int, str], tuple[torch.Tensor, ...]] = {}
        self.post_init()

    def scan_paths(self, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Zig-zag paths for an H×W grid, built once per grid size and device."""
        key = (height, width, str(device))
        if key not in self._path_cache:
            self._path_cache[key] = zigzag_paths(height, width, device)
        return self._path_cache[key]

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(
                f"PlainMamba expects pixel_values of shape (batch, channels, height, width), got {shape}; "
                f"add a batch dimension with pixel_values[None] for a single image."
            )
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"PlainMamba was configured for {self.config.num_channels} input channels but pixel_values has "
                f"{pixel_values.shape[1]} (shape {tuple(pixel_values.shape)}); convert the images (e.g. to RGB) or "
                f"set num_channels in the config."
            )
        height, width = pixel_values.shape[-2:]
        if min(height, width) < self.config.patch_size:
            raise ValueError(
                f"The image is {height}x{width} pixels, smaller than one {self.config.patch_size}-pixel patch; "
                f"PlainMamba needs images of at least {self.config.patch_size}x{self.config.patch_size} "
                f"(it was trained at {self.config.image_size[0]}x{self.config.image_size[1]}). Resize the images."
            )

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_pixel_values(pixel_values)

        storm: Optional[StormConfig] = StormConfig.from_any(self.config.storm)
        schedule: dict = {}
        if storm.enabled:
            schedule = dict(self.storm_schedule(tuple(int(s) for s in pixel_values.shape[-2:])))
        else:
            storm = None

        hidden = self.embeddings(pixel_values)
        plan = _layer_grid_plan(self.config, (hidden.shape[1], hidden.shape[2]), schedule)
        states = [hidden] if output_hidden_states else None
        sizes = None
        for layer, (grid_in, grid_out) in zip(self.layers, plan):
            paths = self.scan_paths(grid_in[0], grid_in[1], hidden.device)
            reduce_to = grid_out if grid_out != grid_in else None
            hidden, sizes = layer(hidden, paths, storm, reduce_to, sizes)
            if states is not None:
                states.append(hidden)

        hidden = self.norm(hidden)
        pooled = hidden.flatten(1, 2).mean(dim=1)
        last = hidden.permute(0, 3, 1, 2)
        all_states = tuple(s.permute(0, 3, 1, 2) for s in states) if states is not None else None
        if not return_dict:
            return tuple(v for v in (last, pooled, all_states) if v is not None)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=last, pooler_output=pooled, hidden_states=all_states
        )


class PlainMambaForImageClassification(PlainMambaPreTrainedModel):
    """PlainMamba with the official linear head on the mean-pooled final tokens."""

    def __init__(self, config: PlainMambaConfig):
        super().__init__(config)
        self.plainmamba = PlainMambaModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> ImageClassifierOutputWithNoAttention | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.plainmamba(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        if not return_dict:
            out = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + out) if loss is not None else out
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


PlainMambaConfig.register_for_auto_class()
PlainMambaModel.register_for_auto_class("AutoModel")
PlainMambaForImageClassification.register_for_auto_class("AutoModelForImageClassification")
