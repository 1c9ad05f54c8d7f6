"""Vision Mamba (Vim, hustvl/Vim) as Transformers models, with STORM token reduction.

Faithful to the official `VisionMamba` of the released "midclstok" checkpoints (fast path):

    tokens = patch_conv(x) in raster order; cls inserted at index M // 2; + pos_embed
    block i:  r = r + h  (r = tokens at i = 0, kept in fp32);  h = Mixer_i(RMSNorm_i(r))
    final:    f = RMSNorm_f(r + h);  logits = head(f[:, cls index])

Mixer = bimamba v2: a shared in_proj gives (x, z); the forward direction runs causal conv1d -> SiLU ->
x_proj -> Δ/B/C -> selective scan (gated by z) on the sequence, the backward direction does the same with
its own conv/x_proj/dt_proj/A/D on the L-flipped (x, z); out = out_proj((y_f + flip(y_b)) / 2).
The official *slow* path (`use_fast_path=False`) silently skips the backward direction; the released
checkpoints were evaluated with the fast path, which is what is implemented here.

Token reduction. Vim's block output is the pair (h = mixer output, r = residual stream before h is added),
and the addition happens at the start of the next block. So in a reducing layer i the plan's "residual" is
r_i (the block input stream) and its "branch" is h_i = Mixer_i(RMSNorm_i(r_i)) computed at full size —
exactly STORM's `x`, `branch = mixer(norm(x))`, reduced with one plan before `x + drop_path(branch)`.
The class token takes no part: it is taken out of both tensors, the other tokens are reduced as an H x W
grid (so STORM's 2-D plans apply), and the class token goes back at the middle (index H'W' // 2) of the
new sequence, where the official code puts it for a fresh sequence of H'W' patches.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention, ImageClassifierOutputWithNoAttention

from .configuration_vim import VimConfig, token_grid
from .flops import BlockFlops, FlopsReport, conv1d_flops, conv2d_flops, linear_flops, scan_flops
from .reduction import StormConfig, StormMixin, reduce_tokens
from .selective_scan import selective_scan

Grid = tuple[int, int]

# STORM never published Vim schedules; Vim is, like PlainMamba, a plain 24-layer model on a 14x14 grid, so it
# uses STORM's PlainMamba choices: reduce after layers 4, 10, 16 and 22, and STORM(EViT) windows of 20 tokens.
STORM_REDUCTION_LAYERS = (4, 10, 16, 22)
STORM_WINDOW_DEFAULTS = {"storm_evit": 20}


# --------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth per sample (timm's DropPath), identity in eval."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class VimDropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class VimRMSNorm(nn.Module):
    """RMSNorm without bias, computed in fp32 (mamba-ssm's Triton `rms_norm_fn`), output in the weight dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class VimDeltaProjection(nn.Linear):
    """Δ projection whose bias is NOT added here: the scan adds it in fp32 (`delta_bias`), as the official
    `mamba_inner_fn_no_out_proj` does. Same parameters and state-dict keys as an `nn.Linear` with bias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class VimScanDirection(nn.Module):
    """One direction of the bimamba-v2 mixer: causal depthwise conv1d + SiLU, input-dependent Δ, B, C from
    `x_proj`/`dt_proj`, and the selective scan gated by SiLU(z) (`mamba_inner_fn_no_out_proj`)."""

    def __init__(self, config: VimConfig) -> None:
        super().__init__()
        inner, rank, n_state = config.intermediate_size, config.dt_rank, config.d_state
        self.rank, self.n_state = rank, n_state
        # Causal: the input is left-padded by d_conv - 1 in forward (official: pad both sides, keep first L).
        self.conv1d = nn.Conv1d(inner, inner, kernel_size=config.d_conv, groups=inner, bias=True)
        self.x_proj = nn.Linear(inner, rank + 2 * n_state, bias=False)
        self.dt_proj = VimDeltaProjection(rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.zeros(inner, n_state))
        self.D = nn.Parameter(torch.ones(inner))

    def forward(
        self, x: torch.Tensor, z: torch.Tensor, return_delta: bool = False
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x, z: (B, E, L) in this direction's order -> y (B, E, L) and, on request, mean_c softplus(Δ) (B, L)."""
        kernel = self.conv1d.kernel_size[0]
        xc = F.silu(self.conv1d(F.pad(x, (kernel - 1, 0))))
        x_dbl = self.x_proj(xc.transpose(1, 2))  # (B, L, R + 2N)
        dt, b_in, c_in = torch.split(x_dbl, [self.rank, self.n_state, self.n_state], dim=-1)
        delta = self.dt_proj(dt).transpose(1, 2)  # (B, E, L), bias added inside the scan
        A = -torch.exp(self.A_log.float())
        y = selective_scan(
            xc,
            delta,
            A,
            b_in.transpose(1, 2).contiguous(),
            c_in.transpose(1, 2).contiguous(),
            D=self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )
        mean_delta = None
        if return_delta:
            mean_delta = F.softplus(delta.float() + self.dt_proj.bias.float()[:, None]).mean(1)
        return y, mean_delta


# What a reducing layer can ask its mixer for, besides the output (see VimMixer.forward), and which method
# plans from which: MTR from Δ; ToP ("top") from the backward direction's SSM output, as ToP-ViM does on Vim
# (its code forgets to flip that output back to image order; here it is flipped back, as the paper describes).
SIGNALS = ("delta", "scan_backward")
METHOD_SIGNALS = {"mtr": "delta", "top": "scan_backward"}


class VimMixer(nn.Module):
    """Bidirectional Mamba ("bimamba v2"): shared in/out projections, one `VimScanDirection` per direction."""

    def __init__(self, config: VimConfig) -> None:
        super().__init__()
        inner = config.intermediate_size
        self.divide_output = config.divide_output
        self.in_proj = nn.Linear(config.hidden_size, 2 * inner, bias=False)
        self.scan_forward = VimScanDirection(config)
        self.scan_backward = VimScanDirection(config)
        self.out_proj = nn.Linear(inner, config.hidden_size, bias=False)

    def forward(
        self, hidden: torch.Tensor, signal: Optional[str] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """hidden (B, L, C) -> (B, L, C), plus on request a per-token signal for a reduction method, in sequence
        order: `"delta"` (B, L), softplus(Δ) averaged over channels and summed over both directions (MTR's
        score); `"scan_backward"` (B, L, E), the backward direction's gated scan output flipped back (ToP-ViM's
        score input on Vim)."""
        xz = self.in_proj(hidden).transpose(1, 2)  # (B, 2E, L)
        x, z = xz.chunk(2, dim=1)
        y_f, delta_f = self.scan_forward(x, z, signal == "delta")
        y_b, delta_b = self.scan_backward(x.flip(-1), z.flip(-1), signal == "delta")
        y = (y_f + y_b.flip(-1)).transpose(1, 2)
        if self.divide_output:
            y = y / 2
        extra = None
        if signal == "delta":
            extra = delta_f + delta_b.flip(-1)
        elif signal == "scan_backward":
            extra = y_b.flip(-1).transpose(1, 2)
        elif signal is not None:
            raise ValueError(f"Unknown mixer signal {signal!r}; choose one of {SIGNALS}.")
        return self.out_proj(y), extra


class VimLayer(nn.Module):
    """Add -> RMSNorm -> mixer (the official fused add-norm order); returns (mixer output, fp32 residual)."""

    def __init__(self, config: VimConfig, drop_path_rate: float) -> None:
        super().__init__()
        self.norm = VimRMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mixer = VimMixer(config)
        self.drop_path = VimDropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(
        self, hidden: torch.Tensor, residual: Optional[torch.Tensor], signal: Optional[str] = None
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        if residual is None:
            residual = hidden.float()
        else:
            residual = residual + self.drop_path(hidden).float()
        hidden, extra = self.mixer(self.norm(residual), signal)
        return hidden, residual, extra


class VimEmbeddings(nn.Module):
    """Patch conv (raster order), class token inserted at index M // 2, absolute position embedding."""

    def __init__(self, config: VimConfig) -> None:
        super().__init__()
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.stride
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        patches = self.projection(pixel_values)
        grid = (patches.shape[2], patches.shape[3])
        tokens = patches.flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        return insert_cls(cls, tokens) + self.position_embeddings, grid


def cls_index(num_patches: int) -> int:
    """Where the official code puts the class token in a sequence of `num_patches` patches."""
    return num_patches // 2


def insert_cls(cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """(B, 1, C) + (B, M, C) raster patches -> (B, M + 1, C) with the class token at M // 2."""
    mid = cls_index(patches.shape[1])
    return torch.cat([patches[:, :mid], cls, patches[:, mid:]], dim=1)


def split_cls(sequence: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H*W + 1, C) -> class token (B, 1, C) and the patch tokens as a (B, H, W, C) map."""
    mid = cls_index(grid[0] * grid[1])
    cls = sequence[:, mid : mid + 1]
    patches = torch.cat([sequence[:, :mid], sequence[:, mid + 1 :]], dim=1)
    return cls, patches.reshape(sequence.shape[0], grid[0], grid[1], sequence.shape[-1])


def patch_map(sequence: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The patch tokens of a sequence as a channels-first (B, C, H, W) map (for returned hidden states)."""
    return split_cls(sequence, grid)[1].permute(0, 3, 1, 2)


def default_image_processor_kwargs(config: VimConfig) -> dict:
    """Vim's official eval transform (`vim/datasets.py::build_transform`, `--eval-crop-ratio 0.875`) as
    ConvNeXt-image-processor kwargs: resize the short side to int(224 / 0.875) = 256 (PIL bicubic),
    center-crop 224, ImageNet default mean/std. The same for the stride-8 "+" models (also 224).
    The crop is square; a non-square `image_size` uses its shorter side."""
    return {
        "size": {"shortest_edge": int(min(config.image_size))},
        "crop_pct": 0.875,
        "resample": 3,  # PIL bicubic (torchvision interpolation=3)
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class VimFlopsReport(FlopsReport):
    """A Vim FLOP count. `total` counts both scan directions of every mixer (what the model computes);
    `total_one_direction` counts the mixer's per-direction work (conv1d, x_proj, dt_proj, scan) once, the
    convention of R-MeeTo's `calc_flops.py` behind the 1.45 / 5.08 / 18.87 G quoted for Vim-Ti/S/B."""

    total_one_direction: int = 0

    @property
    def gflops_one_direction(self) -> float:
        return self.total_one_direction / 1e9

    def table(self) -> str:
        note = f"one scan direction counted (as later papers quote): {self.gflops_one_direction:.4f} GFLOPs"
        return super().table() + "\n" + note


def _layer_flops(config: VimConfig, length: int) -> tuple[dict[str, int], dict[str, int]]:
    """(shared parts, per-direction parts) of one block on a sequence of `length` tokens (batch 1).

    RMSNorm, the flips, the /2 and the additions are not counted: fvcore has no RMSNorm handler and counts
    no elementwise ops, and the published one-direction counts leave them out.
    """
    c, e, n, r = config.hidden_size, config.intermediate_size, config.d_state, config.dt_rank
    shared = {"in_proj": linear_flops(c, 2 * e, length), "out_proj": linear_flops(e, c, length)}
    direction = {
        "conv1d": conv1d_flops(e, e, config.d_conv, length, groups=e),
        "x_proj": linear_flops(e, r + 2 * n, length),
        "dt_proj": linear_flops(r, e, length),
        "scan": scan_flops(1, length, e, n, with_d=True, with_z=True),
    }
    return shared, direction


def vim_flops(
    config: VimConfig,
    image_size: Optional[Grid] = None,
    schedule: Optional[dict] = None,
    include_head: bool = True,
) -> VimFlopsReport:
    """Analytic FLOPs (fvcore convention, batch 1) at `image_size` (pixels), optionally with a reduction schedule
    `{(0, layer): (H', W')}` applied after that layer's mixer (later layers run on the smaller grid)."""
    image_size = _size_pair(config.image_size if image_size is None else image_size)
    grid = tuple(token_grid(s, config.patch_size, config.stride) for s in image_size)
    schedule = _check_schedule(config, schedule or {}, grid)
    parts = {
        "patch_embed": conv2d_flops(config.num_channels, config.hidden_size, config.patch_size, grid),
        "in_proj": 0, "conv1d": 0, "x_proj": 0, "dt_proj": 0, "scan": 0, "out_proj": 0,
        "head": linear_flops(config.hidden_size, config.num_labels, 1) if include_head else 0,
    }
    one_direction = parts["patch_embed"] + parts["head"]
    blocks = []
    for layer in range(config.num_hidden_layers):
        shared, direction = _layer_flops(config, grid[0] * grid[1] + 1)
        for name, value in shared.items():
            parts[name] += value
        for name, value in direction.items():
            parts[name] += 2 * value
        block_total = sum(shared.values()) + 2 * sum(direction.values())
        one_direction += sum(shared.values()) + sum(direction.values())
        blocks.append(BlockFlops(stage=0, block=layer, height=grid[0], width=grid[1], flops=block_total))
        grid = schedule.get((0, layer), grid)
    return VimFlopsReport(
        total=sum(parts.values()), parts=parts, blocks=blocks, image_size=image_size, total_one_direction=one_direction
    )


def _size_pair(size: int | Grid) -> Grid:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _check_schedule(config: VimConfig, schedule: dict, grid: Grid) -> dict[tuple[int, int], Grid]:
    """Validate `{(0, layer): (H', W')}` against the model depth and the shrinking grid."""
    out = {}
    current = tuple(grid)
    for key in sorted(schedule):
        stage, layer = (int(k) for k in key)
        target = tuple(int(s) for s in schedule[key])
        if stage != 0 or not 0 <= layer < config.num_hidden_layers:
            raise ValueError(
                f"Vim is not hierarchical: reduction positions are (0, layer) with layer in "
                f"0..{config.num_hidden_layers - 1}, got {key}."
            )
        if len(target) != 2 or min(target) < 1 or target[0] > current[0] or target[1] > current[1]:
            raise ValueError(
                f"Reduction at layer {layer} asks for a {target} grid but the layer sees {current}: every target "
                "must be a positive (H', W') no larger than the grid it reduces. Write the schedule for this input "
                "size, or use flops_ratio."
            )
        out[(0, layer)] = target
        current = target
    return out


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------


class VimPreTrainedModel(StormMixin, PreTrainedModel):
    config_class = VimConfig
    config: VimConfig
    base_model_prefix = "vim"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["VimLayer"]
    _storm_window_defaults = STORM_WINDOW_DEFAULTS

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The official init: trunc-normal(0.02) tokens and head, LeCun-normal patch conv, Mamba's S4D-real A,
        D = 1, Δ bias = softplus⁻¹(U[1e-3, 1e-1] log-uniform), out_proj scaled by 1/sqrt(depth)."""
        std = self.config.initializer_range
        if isinstance(module, VimEmbeddings):
            init.trunc_normal_(module.cls_token, std=std)
            init.trunc_normal_(module.position_embeddings, std=std)
            init.lecun_normal_(module.projection.weight)
            init.zeros_(module.projection.bias)
        elif isinstance(module, VimScanDirection):
            inner, n_state = module.A_log.shape
            a = torch.arange(1, n_state + 1, dtype=torch.float32, device="cpu").repeat(inner, 1)
            init.copy_(module.A_log, torch.log(a))
            init.ones_(module.D)
            bound = module.rank ** -0.5
            init.uniform_(module.dt_proj.weight, -bound, bound)
            dt_min, dt_max = math.log(1e-3), math.log(0.1)
            dt = torch.exp(torch.rand(inner, device="cpu") * (dt_max - dt_min) + dt_min).clamp(min=1e-4)
            init.copy_(module.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # softplus^-1
            init.kaiming_uniform_(module.x_proj.weight, a=math.sqrt(5))
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            conv_bound = module.conv1d.kernel_size[0] ** -0.5  # PyTorch's default for a depthwise conv
            init.uniform_(module.conv1d.bias, -conv_bound, conv_bound)
        elif isinstance(module, VimMixer):
            init.kaiming_uniform_(module.in_proj.weight, a=math.sqrt(5))
            bound = module.out_proj.in_features ** -0.5 / math.sqrt(self.config.num_hidden_layers)
            init.uniform_(module.out_proj.weight, -bound, bound)
        elif isinstance(module, VimRMSNorm):
            init.ones_(module.weight)
        elif module is getattr(self, "classifier", None) and isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            init.zeros_(module.bias)

    # -- StormMixin hooks --------------------------------------------------------------------------

    def _natural_grids(self, image_size: Grid) -> dict[tuple[int, int], Grid]:
        """{(0, layer): patch grid} without reduction: every layer sees the patch-embedding grid."""
        config = self.config
        grid = tuple(token_grid(s, config.patch_size, config.stride) for s in _size_pair(image_size))
        return {(0, layer): grid for layer in range(config.num_hidden_layers)}

    def _flops(self, image_size: Grid, schedule: Optional[dict] = None) -> VimFlopsReport:
        return vim_flops(self.config, image_size, schedule, include_head=hasattr(self, "classifier"))

    def _default_storm_positions(self) -> list[tuple[int, int]]:
        """Where the budget solver may reduce by default: after layers 4, 10, 16 and 22 (STORM's PlainMamba
        layers; those that exist). Models shallower than 5 layers may reduce after any layer but the last."""
        depth = self.config.num_hidden_layers
        layers = [i for i in STORM_REDUCTION_LAYERS if i < depth] or list(range(max(depth - 1, 1)))
        return [(0, i) for i in layers]


class VimModel(VimPreTrainedModel):
    """Vim backbone. `last_hidden_state` is the final-normed patch map (B, C, H, W) (class token excluded);
    `pooler_output` is the final-normed class token (B, C), the feature the official head reads."""

    def __init__(self, config: VimConfig) -> None:
        super().__init__(config)
        self.embeddings = VimEmbeddings(config)
        rates = [0.0] + torch.linspace(0, config.drop_path_rate, config.num_hidden_layers, device="cpu").tolist()
        self.layers = nn.ModuleList(VimLayer(config, rates[i]) for i in range(config.num_hidden_layers))
        self.final_drop_path = VimDropPath(config.drop_path_rate) if config.drop_path_rate > 0 else nn.Identity()
        self.final_norm = VimRMSNorm(config.hidden_size, eps=config.norm_eps)
        self.post_init()

    def _check_input(self, pixel_values: Optional[torch.Tensor]) -> None:
        if pixel_values is None:
            raise ValueError("pixel_values is required: a (batch, channels, height, width) image tensor.")
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must be 4-D (batch, channels, height, width), got shape {tuple(pixel_values.shape)}."
            )
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels but the model expects "
                f"{self.config.num_channels}; convert the images (e.g. to RGB) first."
            )
        size = list(pixel_values.shape[2:])
        if size != list(self.config.image_size):
            raise ValueError(
                f"Vim's position embedding covers {self.config.grid_size} patches, i.e. {self.config.image_size[0]}x"
                f"{self.config.image_size[1]} inputs, and the official model accepts only that size (its PatchEmbed "
                f"asserts it); got {size[0]}x{size[1]}. Resize/crop the images to {self.config.image_size} "
                "(the image processor does)."
            )

    def forward(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_input(pixel_values)
        storm = StormConfig.from_any(self.config.storm)
        schedule = {}
        if storm.enabled:
            schedule = _check_schedule(
                self.config, self.storm_schedule(tuple(pixel_values.shape[2:])), self.config.grid_size
            )

        hidden, grid = self.embeddings(pixel_values)
        all_hidden = (patch_map(hidden, grid),) if output_hidden_states else None
        residual, sizes = None, None
        for index, layer in enumerate(self.layers):
            target = schedule.get((0, index))
            signal = METHOD_SIGNALS.get(storm.method) if target is not None else None
            hidden, residual, extra = layer(hidden, residual, signal)
            if target is not None:
                hidden, residual, sizes = self._reduce(storm, hidden, residual, grid, target, sizes, extra)
                grid = target
            if output_hidden_states:
                all_hidden += (patch_map(residual + hidden.float(), grid),)

        final = self.final_norm(residual + self.final_drop_path(hidden).float())
        pooled = final[:, cls_index(grid[0] * grid[1])]
        last = patch_map(final, grid)
        if not return_dict:
            return tuple(v for v in (last, pooled, all_hidden) if v is not None)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=last, pooler_output=pooled, hidden_states=all_hidden
        )

    @staticmethod
    def _reduce(
        storm: StormConfig,
        hidden: torch.Tensor,
        residual: torch.Tensor,
        grid: Grid,
        target: Grid,
        sizes: Optional[torch.Tensor],
        signal: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Reduce the patch tokens of residual (plan source) and branch with one plan; the class token is kept
        and re-inserted at the middle of the shorter sequence. `signal` is the mixer's METHOD_SIGNALS output."""
        cls_r, grid_r = split_cls(residual, grid)
        cls_h, grid_h = split_cls(hidden, grid)
        extras: dict[str, torch.Tensor] = {}
        if storm.method == "mtr":
            extras["delta"] = split_cls(signal.unsqueeze(-1), grid)[1].squeeze(-1)
        elif storm.method == "top":
            extras["branch"] = split_cls(signal, grid)[1]
        grid_r, grid_h, sizes = reduce_tokens(
            storm, grid_r, grid_h, target, sizes=sizes, extras=extras or None, window_defaults=STORM_WINDOW_DEFAULTS
        )
        batch = residual.shape[0]
        residual = insert_cls(cls_r, grid_r.reshape(batch, -1, grid_r.shape[-1]))
        hidden = insert_cls(cls_h, grid_h.reshape(batch, -1, grid_h.shape[-1]))
        return hidden, residual, sizes


class VimForImageClassification(VimPreTrainedModel):
    """Vim with the official linear head on the class token."""

    def __init__(self, config: VimConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vim = VimModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> ImageClassifierOutputWithNoAttention | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.vim(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        if not return_dict:
            out = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + out) if loss is not None else out
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


VimConfig.register_for_auto_class()
VimModel.register_for_auto_class("AutoModel")
VimForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "VimPreTrainedModel",
    "VimModel",
    "VimForImageClassification",
    "VimFlopsReport",
    "vim_flops",
    "default_image_processor_kwargs",
]
