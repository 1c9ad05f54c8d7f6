"""Convert official PlainMamba checkpoints (ChenhongyiYang/PlainMamba `l1.pth`, `l2.pth`, `l3.pth`).

The released files are mmcv checkpoints: `{"meta", "state_dict", ...}`; the lead's reader unwraps
`state_dict`. Keys are those of mmcls' `ImageClassifier`: `backbone.*` (the PlainMamba backbone) and
`head.fc.*` (LinearClsHead); the neck (token mean) has no parameters.

EMA (L2, L3 were trained with `EMACheckpointHook`): the hook registers buffers
`ema_<param path with '.' -> '_'>` and, at the end of every training epoch, *swaps* the EMA values into the
parameters before the checkpoint and evaluation hooks run (it swaps back before the next epoch). So in a saved
checkpoint the regular keys already hold the EMA weights that the official evaluation reports, and the `ema_*`
buffers hold the raw training weights. We therefore keep the regular keys and drop every `ema_*` key.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import torch

from ..configuration_plainmamba import PlainMambaConfig


class PlainMambaConversionError(ValueError):
    """The state dict is not a supported official PlainMamba checkpoint."""


_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_STEM_CONV_KEY = re.compile(r"^patch_embed\.convs\.(\d+)\.(.+)$")
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_MIXER_FIELDS = (
    "A_log", "D", "direction_Bs", "in_proj.weight", "in_proj.bias", "conv2d.weight", "conv2d.bias",
    "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "out_proj.weight", "out_proj.bias",
)


def _split(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(backbone keys without `backbone.`, head keys) after dropping `module.` and the `ema_*` buffers."""
    backbone, head = {}, {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith("ema_"):
            continue
        if key.startswith("backbone."):
            backbone[key[len("backbone."):]] = value
        elif key.startswith("head."):
            head[key[len("head."):]] = value
        else:
            backbone[key] = value  # a bare backbone state dict (no classifier wrapper)
    return backbone, head


def looks_like(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for an official PlainMamba state dict (classifier or bare backbone)."""
    backbone, _ = _split(state_dict)
    return (
        "patch_embed.stem.0.weight" in backbone
        and "pos_embed" in backbone
        and "layers.0.mamba.direction_Bs" in backbone
    )


def _require(sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise PlainMambaConversionError(f"The PlainMamba checkpoint has no `{key}`; the file is incomplete or corrupt.")
    return sd[key]


def infer_config(state_dict: Mapping[str, torch.Tensor], **overrides) -> PlainMambaConfig:
    """Every PlainMamba hyperparameter from tensor shapes (the position grid gives the training size)."""
    if not looks_like(state_dict):
        raise PlainMambaConversionError(
            "This is not an official PlainMamba state dict (expected `backbone.patch_embed.stem.0.weight`, "
            "`backbone.pos_embed` and `backbone.layers.0.mamba.direction_Bs`). Pick the converter of the right "
            "architecture."
        )
    sd, head = _split(state_dict)
    _reject_unsupported(sd, head)

    stem = _require(sd, "patch_embed.stem.0.weight")
    if stem.shape[-2:] != (7, 7):
        raise PlainMambaConversionError(f"Unexpected stem kernel {tuple(stem.shape[-2:])}; PlainMamba uses 7x7.")
    stem_channels, num_channels = stem.shape[0], stem.shape[1]
    num_stem_convs = 0
    while f"patch_embed.convs.{3 * num_stem_convs}.weight" in sd:
        num_stem_convs += 1
    projection = _require(sd, "patch_embed.projection.weight")
    hidden = projection.shape[0]
    patch_size = 2 * projection.shape[-1]

    pos = _require(sd, "pos_embed")
    side = math.isqrt(pos.shape[1])
    if pos.dim() != 3 or side * side != pos.shape[1] or pos.shape[2] != hidden:
        raise PlainMambaConversionError(
            f"pos_embed has shape {tuple(pos.shape)}; expected (1, n*n, {hidden}) for a square training grid. "
            "Build the PlainMambaConfig by hand (image_size) for a non-square one."
        )

    depth = 0
    while f"layers.{depth}.norm.weight" in sd:
        depth += 1
    a_log = _require(sd, "layers.0.mamba.A_log")
    inner, d_state = a_log.shape
    if inner % hidden:
        raise PlainMambaConversionError(f"Mixer width {inner} is not a multiple of the token width {hidden}.")
    conv = _require(sd, "layers.0.mamba.conv2d.weight")
    head_weight = head.get("fc.weight")
    config_kwargs = dict(
        num_channels=num_channels,
        image_size=side * patch_size,
        patch_size=patch_size,
        stem_channels=stem_channels,
        num_stem_convs=num_stem_convs,
        hidden_size=hidden,
        num_hidden_layers=depth,
        layers_with_dwconv=[i for i in range(depth) if f"layers.{i}.dw.0.weight" in sd],
        d_state=d_state,
        expand=inner // hidden,
        dt_rank=_require(sd, "layers.0.mamba.dt_proj.weight").shape[1],
        conv_size=conv.shape[-1],
        conv_bias="layers.0.mamba.conv2d.bias" in sd,
        proj_bias="layers.0.mamba.in_proj.bias" in sd,
        num_labels=head_weight.shape[0] if head_weight is not None else 0,
    )
    config_kwargs.update(overrides)
    return PlainMambaConfig(**config_kwargs)


def _reject_unsupported(sd: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor]) -> None:
    if "layers.0.norm.weight" in sd and "layers.0.norm.bias" not in sd:
        raise PlainMambaConversionError(
            "This PlainMamba uses RMSNorm (use_rms_norm=True); only the released LayerNorm models are supported."
        )
    if any(k.endswith("mamba.gamma") for k in sd):
        raise PlainMambaConversionError(
            "This PlainMamba uses layer scale (init_layer_scale); only the released models (no layer scale) are "
            "supported."
        )
    if "ln1.weight" not in sd:
        raise PlainMambaConversionError(
            "This PlainMamba has no final norm `ln1` (final_norm=False); only the released models are supported."
        )
    extra_norms = sorted(k for k in sd if k.startswith("norm_layer"))
    if extra_norms:
        raise PlainMambaConversionError(
            f"This is a dense-prediction PlainMamba with extra output norms ({extra_norms[:2]}...); only the "
            "ImageNet classifiers are supported."
        )
    if head and set(head) != {"fc.weight", "fc.bias"}:
        raise PlainMambaConversionError(
            f"Unexpected classifier keys {sorted(head)}; PlainMamba's LinearClsHead has only head.fc.weight/bias."
        )


def _rename(key: str) -> str:
    """Official backbone key (without `backbone.`) -> key under `PlainMambaModel`."""
    if key == "pos_embed":
        return "embeddings.position_embeddings"
    if key.startswith("patch_embed.stem."):
        index, field = key[len("patch_embed.stem."):].split(".", 1)
        if index == "0" and field == "weight":
            return "embeddings.stem.conv.weight"
        if index == "1" and field in _BN_FIELDS:
            return f"embeddings.stem.norm.{field}"
    if key.startswith("patch_embed.projection.") and key.rsplit(".", 1)[1] in ("weight", "bias"):
        return "embeddings." + key[len("patch_embed."):]
    match = _STEM_CONV_KEY.match(key)
    if match:
        index, field = int(match.group(1)), match.group(2)
        if index % 3 == 0 and field == "weight":
            return f"embeddings.convs.{index // 3}.conv.weight"
        if index % 3 == 1 and field in _BN_FIELDS:
            return f"embeddings.convs.{index // 3}.norm.{field}"
    match = _LAYER_KEY.match(key)
    if match:
        layer, rest = match.group(1), match.group(2)
        if rest in ("norm.weight", "norm.bias"):
            return f"layers.{layer}.{rest}"
        if rest == "dw.0.weight":
            return f"layers.{layer}.dwconv.conv.weight"
        if rest.startswith("dw.1.") and rest[len("dw.1."):] in _BN_FIELDS:
            return f"layers.{layer}.dwconv.norm.{rest[len('dw.1.'):]}"
        if rest.startswith("mamba.") and rest[len("mamba."):] in _MIXER_FIELDS:
            return f"layers.{layer}.mixer.{rest[len('mamba.'):]}"
    if key in ("ln1.weight", "ln1.bias"):
        return "norm." + key.split(".")[1]
    raise PlainMambaConversionError(
        f"Unexpected key `backbone.{key}` in the PlainMamba checkpoint; it is not part of the released "
        "architecture (a different variant, or not a PlainMamba checkpoint)."
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], config: PlainMambaConfig) -> dict[str, torch.Tensor]:
    """Official keys -> `PlainMambaForImageClassification` keys (drops `ema_*`; load it with strict=True)."""
    if not looks_like(state_dict):
        raise PlainMambaConversionError(
            "This is not an official PlainMamba state dict; pick the converter of the right architecture."
        )
    sd, head = _split(state_dict)
    _reject_unsupported(sd, head)
    out = {"plainmamba." + _rename(k): v for k, v in sd.items()}
    if config.num_labels > 0:
        if not head:
            raise PlainMambaConversionError(
                f"The config asks for a {config.num_labels}-way classifier but the checkpoint has no `head.fc` "
                "(a bare backbone); use num_labels=0 or a classifier checkpoint."
            )
        out["classifier.weight"] = head["fc.weight"]
        out["classifier.bias"] = head["fc.bias"]
    _check_against_config(out, config)
    return out


def _check_against_config(converted: Mapping[str, torch.Tensor], config: PlainMambaConfig) -> None:
    """Fail with every missing / unexpected / mis-shaped key instead of a bare load_state_dict error."""
    from ..modeling_plainmamba import PlainMambaForImageClassification

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in PlainMambaForImageClassification(config).state_dict().items()}
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs config {expected[k]}"
        for k, v in converted.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if missing or unexpected or mismatched:
        raise PlainMambaConversionError(
            f"The PlainMamba checkpoint does not match the config: missing {missing[:6]}, unexpected "
            f"{unexpected[:6]}, shape mismatches {mismatched[:4]}. Use infer_config(state_dict) to build a "
            "matching config, or check that the file is complete."
        )
