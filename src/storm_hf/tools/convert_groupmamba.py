"""Convert official GroupMamba checkpoints (Amshaker/GroupMamba, `groupmamba_{tiny,small,base}`) to storm-hf.

The released files are bare state dicts (the official eval loads them directly). Official key layout:
`patch_embed1.conv.{0..8}` + `.proj` + `.norm` (stem), `patch_embed{2..4}.{proj,norm}` (downsampling),
`block{s}.{j}.{attn,norm2,mlp}`, `norm{s}`, `post_network.0` (class-token block), `head`, `dist_head`.
Per channel group `attn.mamba_g{1..4}` holds a one-direction SS2D whose stacked scan parameters
(`x_proj_weight` (1, R+2N, D), `dt_projs_weight` (1, D, R), `dt_projs_bias` (1, D)) become plain tensors.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import torch

from ..configuration_groupmamba import NUM_GROUPS, GroupMambaConfig
from .checkpoints import CheckpointError, strip_prefix

_PREFIXES = ("module.", "backbone.")
_SIGNATURE = ("patch_embed1.conv.0.weight", "post_network.0.attn.mamba_g1.x_proj_weight")

_MIXER_KEYS = {
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
    "fc1.weight": "affinity_fc1.weight",
    "fc1.bias": "affinity_fc1.bias",
    "fc2.weight": "affinity_fc2.weight",
    "fc2.bias": "affinity_fc2.bias",
    "proj.weight": "proj.weight",
    "proj.bias": "proj.bias",
    "skip_scale": "skip_scale",
}
# official SS2D name -> (ours, squeeze the leading K=1 axis)
_GROUP_KEYS = {
    "in_proj.weight": ("in_proj.weight", False),
    "conv2d.weight": ("conv2d.weight", False),
    "conv2d.bias": ("conv2d.bias", False),
    "x_proj_weight": ("x_proj.weight", True),
    "dt_projs_weight": ("dt_proj.weight", True),
    "dt_projs_bias": ("dt_bias", True),
    "A_logs": ("A_log", False),
    "Ds": ("D", False),
    "out_norm.weight": ("out_norm.weight", False),
    "out_norm.bias": ("out_norm.bias", False),
    "out_proj.weight": ("out_proj.weight", False),
}


def _clean(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = dict(state_dict)
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = strip_prefix(sd, prefix)
    return sd


def looks_like(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for an official GroupMamba state dict (stem conv + a group-Mamba class-token block)."""
    sd = _clean(state_dict)
    return all(k in sd for k in _SIGNATURE)


def _require(sd: dict, key: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(
            f"Official GroupMamba checkpoint is missing {key!r}; the file is truncated or is a different "
            "GroupMamba variant than the released T/S/B models."
        )
    return sd[key]


def _exact_ratio(numerator: int, denominator: int, what: str) -> float:
    ratio = numerator / denominator
    if int(denominator * ratio) != numerator:
        raise CheckpointError(f"Cannot express {what} ({numerator} / {denominator}) as a ratio of the width.")
    return ratio


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> GroupMambaConfig:
    """Read every hyperparameter off the tensor shapes of an official GroupMamba state dict."""
    if not looks_like(state_dict):
        raise CheckpointError(
            "This is not an official GroupMamba state dict (expected keys "
            f"{list(_SIGNATURE)}). Check the file, or pick the converter of its architecture."
        )
    sd = _clean(state_dict)
    stem = _require(sd, "patch_embed1.conv.0.weight")
    num_stages = len({k.split(".")[0] for k in sd if re.match(r"patch_embed\d+\.proj\.weight$", k)})
    if num_stages < 1 or any(f"patch_embed{i}.proj.weight" not in sd for i in range(1, num_stages + 1)):
        raise CheckpointError("GroupMamba checkpoint has non-consecutive `patch_embed{i}` stages.")
    if any(k.startswith("post_network.1.") for k in sd):
        raise CheckpointError("Unsupported GroupMamba variant: more than one class-token block in `post_network`.")
    embed_dims, depths, mlp_ratios = [], [], []
    for s in range(1, num_stages + 1):
        width = int(_require(sd, f"patch_embed{s}.proj.weight").shape[0])
        blocks = {int(k.split(".")[1]) for k in sd if k.startswith(f"block{s}.")}
        if not blocks or blocks != set(range(len(blocks))):
            raise CheckpointError(f"GroupMamba checkpoint: stage {s} has no blocks or non-consecutive block indices.")
        hidden = int(_require(sd, f"block{s}.0.mlp.fc1.weight").shape[0])
        embed_dims.append(width)
        depths.append(len(blocks))
        mlp_ratios.append(_exact_ratio(hidden, width, f"stage {s} FFN width"))

    group = "block1.0.attn.mamba_g1."
    a_logs = _require(sd, group + "A_logs")
    d_inner, d_state = int(a_logs.shape[0]), int(a_logs.shape[1])
    d_model = embed_dims[0] // NUM_GROUPS
    in_rows = int(_require(sd, group + "in_proj.weight").shape[0])
    if in_rows != 2 * d_inner:
        raise CheckpointError(
            f"Unsupported GroupMamba SS2D: in_proj has {in_rows} rows, expected 2 x {d_inner} (x and the z gate)."
        )
    if group + "conv2d.bias" not in sd:
        raise CheckpointError("Unsupported GroupMamba SS2D variant without a depthwise-conv bias.")
    x_proj = _require(sd, group + "x_proj_weight")
    if x_proj.dim() != 3 or x_proj.shape[0] != 1:
        raise CheckpointError(f"Unsupported GroupMamba SS2D: x_proj_weight {tuple(x_proj.shape)} is not one direction.")

    ranks = [int(sd[f"block{s}.0.attn.mamba_g1.x_proj_weight"].shape[1]) - 2 * d_state
             for s in range(1, num_stages + 1)]
    auto = [math.ceil(c // NUM_GROUPS / 16) for c in embed_dims]
    if ranks == auto:
        dt_rank = "auto"
    elif len(set(ranks)) == 1:
        dt_rank = ranks[0]
    else:
        raise CheckpointError(f"Unsupported GroupMamba variant: per-stage Δ ranks {ranks} follow no single rule.")

    reduced = [int(sd[f"block{s}.0.attn.fc1.weight"].shape[0]) for s in range(1, num_stages + 1)]
    candidates = [r for r in range(1, max(embed_dims) + 1) if all(c // r == n for c, n in zip(embed_dims, reduced))]
    if not candidates:
        raise CheckpointError(f"Channel-affinity widths {reduced} match no single reduction of widths {embed_dims}.")
    affinity_reduction = 16 if 16 in candidates else candidates[0]

    cls_hidden = int(_require(sd, "post_network.0.mlp.fc1.weight").shape[0])
    cls_ratio = _exact_ratio(cls_hidden, embed_dims[-1], "class-token FFN width")
    head = _require(sd, "head.weight")
    return GroupMambaConfig(
        num_channels=int(stem.shape[1]),
        stem_hidden_dim=int(stem.shape[0]),
        embed_dims=embed_dims,
        depths=depths,
        mlp_ratios=mlp_ratios,
        cls_mlp_ratio=None if cls_ratio == mlp_ratios[-1] else cls_ratio,
        d_state=d_state,
        ssm_ratio=_exact_ratio(d_inner, d_model, "SS2D inner width"),
        dt_rank=dt_rank,
        d_conv=int(sd[group + "conv2d.weight"].shape[-1]),
        affinity_reduction=affinity_reduction,
        distillation="dist_head.weight" in sd,
        num_labels=int(head.shape[0]),
    )


def _map_mixer(rest: str, prefix: str) -> str | None:
    if rest in _MIXER_KEYS:
        return prefix + _MIXER_KEYS[rest]
    match = re.match(r"mamba_g([1-4])\.(.+)$", rest)
    if match and match.group(2) in _GROUP_KEYS:
        return f"{prefix}groups.{int(match.group(1)) - 1}.{_GROUP_KEYS[match.group(2)][0]}"
    return None


def _is_stacked(key: str) -> bool:
    """True for the per-direction stacked SS2D tensors whose leading K=1 axis is dropped."""
    match = re.search(r"\.mamba_g[1-4]\.(.+)$", key)
    return bool(match) and match.group(1) in _GROUP_KEYS and _GROUP_KEYS[match.group(1)][1]


def _map_key(key: str, num_stages: int) -> str | None:
    """Official key -> storm-hf key (without the classifier's `groupmamba.` prefix), or None if unknown."""
    m = re.match(r"patch_embed1\.(conv\.\d+\.\w+|proj\.\w+|norm\.\w+)$", key)
    if m:
        return "embeddings." + m.group(1)
    m = re.match(r"patch_embed(\d+)\.((?:proj|norm)\.\w+)$", key)
    if m:
        return f"stages.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
    m = re.match(r"block(\d+)\.(\d+)\.(.+)$", key)
    if m:
        layer = f"stages.{int(m.group(1)) - 1}.layers.{m.group(2)}."
        rest = m.group(3)
        if rest.startswith("attn."):
            return _map_mixer(rest[len("attn."):], layer + "mixer.")
        if rest.startswith("norm2."):
            return layer + "mlp_norm." + rest[len("norm2."):]
        m2 = re.match(r"mlp\.(fc1|fc2)\.(weight|bias)$", rest)
        if m2:
            return f"{layer}mlp.{m2.group(1)}.{m2.group(2)}"
        m2 = re.match(r"mlp\.dwconv\.dwconv\.(weight|bias)$", rest)
        if m2:
            return f"{layer}mlp.dwconv.{m2.group(1)}"
        return None
    m = re.match(r"norm(\d+)\.(weight|bias)$", key)
    if m:
        stage = int(m.group(1))
        return f"pooler.norm.{m.group(2)}" if stage == num_stages else f"stages.{stage - 1}.norm.{m.group(2)}"
    m = re.match(r"post_network\.0\.(.+)$", key)
    if m:
        rest = m.group(1)
        if rest.startswith("attn."):
            return _map_mixer(rest[len("attn."):], "pooler.mixer.")
        m2 = re.match(r"(norm1|norm2)\.(weight|bias)$", rest)
        if m2:
            return f"pooler.{'mixer_norm' if m2.group(1) == 'norm1' else 'mlp_norm'}.{m2.group(2)}"
        m2 = re.match(r"mlp\.(fc1|fc2)\.(weight|bias)$", rest)
        if m2:
            return f"pooler.mlp.{m2.group(1)}.{m2.group(2)}"
    return None


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], config: GroupMambaConfig) -> dict[str, torch.Tensor]:
    """Rename (and un-stack the K=1 scan tensors of) an official state dict for GroupMambaForImageClassification."""
    if not looks_like(state_dict):
        raise CheckpointError(
            "This is not an official GroupMamba state dict (expected keys "
            f"{list(_SIGNATURE)}); use the converter of its architecture."
        )
    sd = _clean(state_dict)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if key in ("head.weight", "head.bias"):
            out["classifier." + key.split(".")[1]] = value
            continue
        if key in ("dist_head.weight", "dist_head.bias"):
            out["distillation_classifier." + key.split(".")[1]] = value
            continue
        new = _map_key(key, config.num_stages)
        if new is None:
            unknown.append(key)
            continue
        if _is_stacked(key):
            if value.shape[0] != 1:
                raise CheckpointError(f"{key} has shape {tuple(value.shape)}; expected one scan direction (1, ...).")
            value = value[0]
        out["groupmamba." + new] = value
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} key(s) of the checkpoint are not part of GroupMamba T/S/B: {unknown[:8]}. "
            "The file may be a different model or a modified GroupMamba."
        )
    _check_against_config(out, config)
    return out


def _check_against_config(converted: Mapping[str, torch.Tensor], config: GroupMambaConfig) -> None:
    from ..modeling_groupmamba import GroupMambaForImageClassification

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GroupMambaForImageClassification(config).state_dict().items()}
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {expected[k]}"
             for k, v in converted.items() if k in expected and tuple(v.shape) != expected[k]]
    if missing or unexpected or wrong:
        raise CheckpointError(
            "The GroupMamba state dict does not match the config: "
            f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}, "
            f"shape mismatches {wrong[:4]}. Use infer_config(state_dict) or the preset that matches the checkpoint."
        )


__all__ = ["looks_like", "infer_config", "convert_state_dict"]
