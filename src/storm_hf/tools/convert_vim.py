"""Convert official Vim checkpoints (hustvl/Vim "midclstok" bimamba-v2 models) to storm-hf's layout.

The released `.pth` files hold the weights under `"model"` (and an EMA copy under `"model_ema"`; R-MeeTo
reports Vim-B's 81.9 for the EMA weights, so convert that one with `container_key="model_ema"`).
Official keys (`cls_token`, `pos_embed`, `patch_embed.proj`, `layers.{i}.norm`, `layers.{i}.mixer.*` with
`*_b` backward-direction twins, `norm_f`, `head`) map one-to-one onto `VimForImageClassification`.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

import torch

from ..configuration_vim import VimConfig, token_grid

RELEASED_IMAGE_SIZE = 224  # every released Vim model (Ti/S/B and the stride-8 "+" fine-tunes)

_SIGNATURE = ("cls_token", "pos_embed", "patch_embed.proj.weight", "layers.0.mixer.in_proj.weight", "norm_f.weight")

_TOP_LEVEL = {
    "cls_token": "vim.embeddings.cls_token",
    "pos_embed": "vim.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vim.embeddings.projection.weight",
    "patch_embed.proj.bias": "vim.embeddings.projection.bias",
    "norm_f.weight": "vim.final_norm.weight",
    "head.weight": "classifier.weight",
    "head.bias": "classifier.bias",
}

# official mixer parameter -> (direction module, parameter) ; in/out projections are shared
_MIXER = {
    "in_proj.weight": "in_proj.weight",
    "out_proj.weight": "out_proj.weight",
    "conv1d.weight": "scan_forward.conv1d.weight",
    "conv1d.bias": "scan_forward.conv1d.bias",
    "x_proj.weight": "scan_forward.x_proj.weight",
    "dt_proj.weight": "scan_forward.dt_proj.weight",
    "dt_proj.bias": "scan_forward.dt_proj.bias",
    "A_log": "scan_forward.A_log",
    "D": "scan_forward.D",
    "conv1d_b.weight": "scan_backward.conv1d.weight",
    "conv1d_b.bias": "scan_backward.conv1d.bias",
    "x_proj_b.weight": "scan_backward.x_proj.weight",
    "dt_proj_b.weight": "scan_backward.dt_proj.weight",
    "dt_proj_b.bias": "scan_backward.dt_proj.bias",
    "A_b_log": "scan_backward.A_log",
    "D_b": "scan_backward.D",
}

_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(norm\.weight|mixer\.(.+))$")


class VimConversionError(ValueError):
    """The state dict is not a supported official Vim checkpoint."""


def _strip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a DDP `module.` prefix if every key has it."""
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def looks_like(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for an official Vim (VisionMamba) state dict."""
    sd = _strip(state_dict)
    return all(k in sd for k in _SIGNATURE)


def _unsupported(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Why this VisionMamba variant cannot be converted, or None."""
    if "cls_token_head" in sd or "cls_token_tail" in sd:
        return "it uses two class tokens (use_double_cls_token=True)"
    if "layers.0.mixer.conv1d_b.weight" not in sd:
        return ("it has no backward-direction parameters (`mixer.conv1d_b`): a unidirectional or bimamba-v1 model; "
                "only bimamba v2 (the released midclstok models) is supported")
    if "layers.0.norm.bias" in sd or "norm_f.bias" in sd:
        return "it uses LayerNorm (rms_norm=False); the released models use RMSNorm"
    if "layers.0.mixer.in_proj.bias" in sd or "layers.0.mixer.out_proj.bias" in sd:
        return "its in/out projections have biases (bias=True); the released models have none"
    if any(k.endswith("mixer.gamma") for k in sd):
        return "it uses layer scale (init_layer_scale set); the released models do not"
    if any(k.startswith("rope.") for k in sd):
        return "it uses rotary position embeddings (if_rope=True); the released models do not"
    if "head.weight" not in sd:
        return "it has no classification head (`head.weight`); storm-hf converts the ImageNet classifiers"
    return None


def _require(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = _strip(state_dict)
    if not looks_like(sd):
        missing = [k for k in _SIGNATURE if k not in sd]
        raise VimConversionError(
            f"Not an official Vim checkpoint: keys {missing} are missing (first keys: {sorted(sd)[:5]}). "
            "Pass the state dict of a hustvl/Vim VisionMamba model, or use the converter of its architecture."
        )
    reason = _unsupported(sd)
    if reason:
        raise VimConversionError(f"Unsupported Vim variant: {reason}.")
    return sd


def _infer_stride(image_size: Sequence[int], patch_size: int, num_patches: int) -> int:
    """The patch stride that gives `num_patches` at `image_size`: stride = patch if it fits, else the unique
    stride that tiles the image exactly (8 for the 27x27 "+" models)."""
    fits = [s for s in range(1, 2 * patch_size + 1)
            if token_grid(image_size[0], patch_size, s) * token_grid(image_size[1], patch_size, s) == num_patches]
    if patch_size in fits:
        return patch_size
    exact = [s for s in fits if all((size - patch_size) % s == 0 for size in image_size)]
    if len(exact) == 1:
        return exact[0]
    raise VimConversionError(
        f"Cannot tell the patch stride: the position embedding has {num_patches} patches, which at image_size "
        f"{list(image_size)} and patch_size {patch_size} fits strides {fits or 'none'}. Pass image_size= and stride= "
        "explicitly (the released models are 224x224 with stride 16, or 8 for the '+' models)."
    )


def infer_config(
    state_dict: Mapping[str, torch.Tensor],
    image_size: Optional[int | Sequence[int]] = None,
    stride: Optional[int] = None,
    **config_kwargs,
) -> VimConfig:
    """Every hyperparameter from tensor shapes. The input size is not stored in a checkpoint: it defaults to
    224 (all released models); pass `image_size` (and `stride` if ambiguous) for anything else."""
    sd = _require(state_dict)
    hidden, channels, kh, kw = sd["patch_embed.proj.weight"].shape
    if kh != kw:
        raise VimConversionError(f"Non-square patch kernels ({kh}x{kw}) are not supported.")
    layers = sorted({int(m.group(1)) for k in sd if (m := _LAYER_KEY.match(k))})
    if layers != list(range(len(layers))):
        raise VimConversionError(f"Layer indices must run 0..N-1 without gaps, got {layers[:6]}...")
    mixer = "layers.0.mixer."
    inner, n_state = sd[mixer + "A_log"].shape
    if inner % hidden:
        raise VimConversionError(f"Inner width {inner} is not a multiple of the width {hidden}.")
    num_patches = sd["pos_embed"].shape[1] - 1
    if image_size is None:
        side = int(round(num_patches ** 0.5))
        if side * side != num_patches:
            raise VimConversionError(
                f"The position embedding has {num_patches} patches, not a square grid: pass image_size=(H, W)."
            )
        image_size = RELEASED_IMAGE_SIZE
    size = [image_size, image_size] if isinstance(image_size, int) else [int(s) for s in image_size]
    if stride is None:
        stride = _infer_stride(size, kh, num_patches)
    config = VimConfig(
        num_channels=channels,
        image_size=size,
        patch_size=kh,
        stride=stride,
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        d_state=n_state,
        expand=inner // hidden,
        d_conv=sd[mixer + "conv1d.weight"].shape[-1],
        dt_rank=sd[mixer + "dt_proj.weight"].shape[1],
        num_labels=sd["head.weight"].shape[0],
        **config_kwargs,
    )
    if config.num_patches != num_patches:
        raise VimConversionError(
            f"image_size {size} with patch {kh} / stride {stride} gives {config.grid_size} = {config.num_patches} "
            f"patches, but the position embedding has {num_patches}."
        )
    return config


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], config: VimConfig) -> dict[str, torch.Tensor]:
    """Rename official keys to `VimForImageClassification` keys (tensors unchanged). Unknown keys are errors."""
    sd = _require(state_dict)
    if sd["pos_embed"].shape[1] != config.num_patches + 1:
        raise VimConversionError(
            f"The checkpoint's position embedding has {sd['pos_embed'].shape[1] - 1} patches but the config's "
            f"image_size {config.image_size} / stride {config.stride} gives {config.num_patches}: use infer_config "
            "or the matching preset (stride-8 '+' models have 729)."
        )
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if key in _TOP_LEVEL:
            out[_TOP_LEVEL[key]] = value
            continue
        match = _LAYER_KEY.match(key)
        if match and match.group(2) == "norm.weight":
            out[f"vim.layers.{match.group(1)}.norm.weight"] = value
        elif match and match.group(3) in _MIXER:
            out[f"vim.layers.{match.group(1)}.mixer.{_MIXER[match.group(3)]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise VimConversionError(f"Unexpected keys for an official Vim checkpoint: {unknown[:8]}.")
    return out
