"""Official VMamba v2 checkpoints (MzeroMiko/VMamba, forward type v05_noz) -> storm-hf state dicts.

Key mapping (official -> `VMambaForImageClassification`):
    classifier.norm.*  -> vmamba.norm.*
    classifier.head.*  -> classifier.*
    everything else    -> vmamba.<same key>
Before that, the renames of the official loaders are applied (legacy training-code names):
    patch_embed.proj -> patch_embed.0, patch_embed.norm -> patch_embed.2,
    layers.i.blocks.j.ln_1 -> ...norm, layers.i.blocks.j.self_attention -> ...op,
    norm -> classifier.norm, head -> classifier.head,
and the one-file `vmamba.py` layout is folded back: `op.x_proj.weight` (4(R+2N), D[,1]) -> `op.x_proj_weight`,
`op.dt_projs.weight` (4D, R[,1]) -> `op.dt_projs_weight`, `op.dt_projs.bias` (4D) -> `op.dt_projs_bias`, and
1x1-conv shaped linear weights (out, in, 1, 1) are squeezed to (out, in).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch

from ..configuration_vmamba import VMambaConfig
from .checkpoints import CheckpointError

K = 4
_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_LEGACY_PREFIXES = (
    ("patch_embed.proj.", "patch_embed.0."),
    ("patch_embed.norm.", "patch_embed.2."),
    ("norm.", "classifier.norm."),
    ("head.", "classifier.head."),
)
_LEGACY_BLOCK_PARTS = ((".ln_1.", ".norm."), (".self_attention.", ".op."))
_POINTWISE = ("op.in_proj.weight", "op.out_proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")


class UnsupportedCheckpointError(CheckpointError):
    """The state dict is a VMamba variant this port does not implement, or not VMamba at all."""


def _strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def rename_legacy_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply the official loaders' renames and fold the one-file layout back to the classification layout."""
    out: dict[str, torch.Tensor] = {}
    for key, value in _strip_module_prefix(state_dict).items():
        for old, new in _LEGACY_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        if _BLOCK.match(key):
            for old, new in _LEGACY_BLOCK_PARTS:
                key = key.replace(old, new, 1)
        out[key] = value
    for key in list(out):
        prefix = key.rsplit("op.", 1)[0] + "op."
        if key.endswith("op.x_proj.weight"):
            weight = out.pop(key)
            inner = weight.shape[1]
            out[prefix + "x_proj_weight"] = weight.reshape(K, -1, inner)
        elif key.endswith("op.dt_projs.weight"):
            weight = out.pop(key)
            out[prefix + "dt_projs_weight"] = weight.reshape(K, weight.shape[0] // K, -1)
        elif key.endswith("op.dt_projs.bias"):
            out[prefix + "dt_projs_bias"] = out.pop(key).reshape(K, -1)
        elif key.endswith("op.x_proj.bias"):
            out[prefix + "x_proj_bias"] = out.pop(key)
    for key, value in out.items():
        if key.endswith(_POINTWISE) and value.dim() == 4 and value.shape[2:] == (1, 1):
            out[key] = value.reshape(value.shape[0], value.shape[1])
    return out


def looks_like(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for any official VMamba classification state dict (v0 or v2, current or legacy key names)."""
    keys = rename_legacy_keys({k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}).keys()
    has_ss2d = any(re.match(r"^layers\.\d+\.blocks\.\d+\.op\.(x_proj_weight|A_logs)$", k) for k in keys)
    return has_ss2d and any(k.startswith("patch_embed.") for k in keys)


def _fail(reason: str) -> UnsupportedCheckpointError:
    return UnsupportedCheckpointError(
        f"Unsupported VMamba checkpoint: {reason}. storm-hf implements the VMamba v2 network with SS2D forward "
        "type 'v05_noz' (the six released v2 models: vmamba_{tiny_s1l8,tiny_s2l5,small_s2l15,small_s1l20,"
        "base_s2l15,base_s1l20}); vanilla v0 checkpoints and forward types with a z gate are not supported."
    )


def infer_config(state_dict: Mapping[str, torch.Tensor], **overrides: Any) -> VMambaConfig:
    """Read the hyperparameters of an official VMamba v2 state dict from its tensor shapes."""
    sd = rename_legacy_keys(state_dict)
    if not looks_like(sd):
        raise _fail("no SS2D parameters (layers.i.blocks.j.op.x_proj_weight / A_logs) or stem (patch_embed.*) found; "
                    "this is not a VMamba classification state dict")
    stem = sd.get("patch_embed.0.weight")
    if stem is None or stem.dim() != 4 or stem.shape[-2:] != (3, 3) or "patch_embed.5.weight" not in sd:
        shape = None if stem is None else tuple(stem.shape)
        raise _fail(f"the stem is not the v2 two-conv stem (patch_embed.0.weight {shape}; vanilla v0 uses a 4x4 patch conv)")
    if "pos_embed" in sd:
        raise _fail("it has a position embedding (posembed=True)")
    if any(".downsample.reduction." in k or k.endswith("downsample.norm.weight") for k in sd):
        raise _fail("it uses PatchMerging downsampling (v1), as vanilla v0 models do")
    if any(k.endswith("op.x_proj_bias") for k in sd):
        raise _fail("its x_proj has a bias (not a released v2 configuration)")

    depths: list[int] = []
    while f"layers.{len(depths)}.blocks.0.norm.weight" in sd:
        stage, n = len(depths), 0
        while f"layers.{stage}.blocks.{n}.norm.weight" in sd:
            n += 1
        depths.append(n)
    if not depths:
        raise _fail("no blocks found under layers.0.blocks.0")
    dims = [int(sd[f"layers.{s}.blocks.0.norm.weight"].shape[0]) for s in range(len(depths))]

    ratios, ranks, states, mlp_ratios, convs, conv_biases = set(), [], set(), set(), set(), set()
    for s, depth in enumerate(depths):
        for b in range(depth):
            p = f"layers.{s}.blocks.{b}.op."
            for name in ("in_proj.weight", "x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds",
                         "out_norm.weight", "out_proj.weight"):
                if p + name not in sd:
                    raise _fail(f"{p + name} is missing (a different SS2D forward type)")
            x_proj = sd[p + "x_proj_weight"]
            inner = int(x_proj.shape[2])
            in_out = int(sd[p + "in_proj.weight"].shape[0])
            if in_out == 2 * inner:
                raise _fail(f"{p}in_proj produces 2*D = {in_out} channels (an x/z split: a forward type with a z gate)")
            if in_out != inner or x_proj.shape[0] != K:
                raise _fail(f"{p}in_proj.weight {tuple(sd[p + 'in_proj.weight'].shape)} does not match "
                            f"x_proj_weight {tuple(x_proj.shape)} (expected {K} directions of width D)")
            rank = int(sd[p + "dt_projs_weight"].shape[2])
            state = int(sd[p + "A_logs"].shape[1])
            if x_proj.shape[1] != rank + 2 * state:
                raise _fail(f"{p}x_proj_weight has {x_proj.shape[1]} rows, expected R + 2N = {rank + 2 * state}")
            ratios.add(inner / dims[s])
            ranks.append((s, rank))
            states.add(state)
            conv = sd.get(p + "conv2d.weight")
            convs.add(int(conv.shape[-1]) if conv is not None else 1)
            conv_biases.add(p + "conv2d.bias" in sd)
            fc1 = sd.get(f"layers.{s}.blocks.{b}.mlp.fc1.weight")
            mlp_ratios.add(0.0 if fc1 is None else fc1.shape[0] / dims[s])
    for name, values in (("ssm_ratio", ratios), ("d_state", states), ("ssm_conv", convs),
                         ("ssm_conv_bias", conv_biases), ("mlp_ratio", mlp_ratios)):
        if len(values) != 1:
            raise _fail(f"{name} differs between blocks ({sorted(values)})")
    stage_ranks = {s: r for s, r in ranks}
    if all(r == math.ceil(dims[s] / 16) for s, r in ranks):
        dt_rank: Any = "auto"
    elif len(set(stage_ranks.values())) == 1:
        dt_rank = next(iter(stage_ranks.values()))
    else:
        raise _fail(f"dt ranks per stage {stage_ranks} are neither ceil(C/16) nor one constant")

    head = sd.get("classifier.head.weight")
    if head is None:
        raise _fail("classifier.head.weight is missing (a backbone-only checkpoint)")
    kwargs: dict[str, Any] = dict(
        num_channels=int(stem.shape[1]),
        dims=dims,
        depths=depths,
        ssm_ratio=ratios.pop(),
        d_state=states.pop(),
        dt_rank=dt_rank,
        ssm_conv=convs.pop(),
        ssm_conv_bias=conv_biases.pop(),
        mlp_ratio=mlp_ratios.pop(),
        num_labels=int(head.shape[0]),
    )
    kwargs.update(overrides)
    return VMambaConfig(**kwargs)


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], config: VMambaConfig) -> dict[str, torch.Tensor]:
    """Official (or legacy) keys -> `VMambaForImageClassification` keys; checked against `config`'s shapes."""
    sd = rename_legacy_keys(state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith("classifier.norm."):
            new = "vmamba.norm." + key[len("classifier.norm."):]
        elif key.startswith("classifier.head."):
            new = "classifier." + key[len("classifier.head."):]
        else:
            new = "vmamba." + key
        out[new] = value
    _check_against_config(out, config)
    return out


def _check_against_config(converted: Mapping[str, torch.Tensor], config: VMambaConfig) -> None:
    from ..modeling_vmamba import VMambaForImageClassification

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in VMambaForImageClassification(config).state_dict().items()}
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {expected[k]}"
             for k, v in converted.items() if k in expected and tuple(v.shape) != expected[k]]
    if missing or unexpected or wrong:
        raise UnsupportedCheckpointError(
            "The VMamba state dict does not match the config: "
            f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}, "
            f"shape mismatches {wrong[:4]}. Use infer_config(state_dict) or the preset that matches the checkpoint."
        )
