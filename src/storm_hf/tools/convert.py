"""Turn an official checkpoint into a storm-hf Transformers model (any supported architecture)."""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

from .archs import ARCHS, get_arch
from .checkpoints import CheckpointError, load_checkpoint_file, unwrap_state_dict
from .presets import find_model_preset


def detect_arch(state_dict: dict[str, torch.Tensor]) -> Optional[str]:
    """Name of the first architecture whose converter recognises this state dict, else None."""
    for name, spec in ARCHS.items():
        try:
            converter = spec.converter
        except ImportError:
            continue
        if converter.looks_like(state_dict):
            return name
    return None


def convert_state_dict_to_model(
    arch: str, state_dict: dict[str, torch.Tensor], preset: Optional[str] = None
) -> Any:
    """Build the storm-hf model for `arch` and load the official weights strictly."""
    spec = get_arch(arch)
    converter = spec.converter
    if not converter.looks_like(state_dict):
        other = detect_arch(state_dict)
        hint = f" It looks like a {other} checkpoint: use --arch {other}." if other else ""
        raise CheckpointError(f"This checkpoint is not an official {arch} checkpoint.{hint}")
    if preset is not None:
        preset_arch, kwargs = find_model_preset(preset)
        if preset_arch != arch:
            raise ValueError(f"Preset {preset!r} is a {preset_arch} preset, not {arch}.")
        config = spec.config_cls(**kwargs)
    else:
        config = converter.infer_config(state_dict)
    converted = converter.convert_state_dict(state_dict, config)
    model = spec.classifier_cls(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong_shape = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in converted.items() if k in expected and expected[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        source = f"preset {preset!r}" if preset else "the hyperparameters inferred from the checkpoint"
        raise CheckpointError(
            f"The checkpoint does not match {source}: missing {missing[:8]}, unexpected {unexpected[:8]}, "
            f"shape mismatches {wrong_shape[:4]}."
        )
    model.load_state_dict(converted, strict=True)
    model.eval()
    return model


def convert_checkpoint(arch: str, checkpoint: str | os.PathLike, preset: Optional[str] = None,
                       container_key: Optional[str] = None) -> Any:
    """Read an official checkpoint file and return the converted model (eval mode)."""
    state_dict = unwrap_state_dict(load_checkpoint_file(checkpoint), prefer=container_key)
    return convert_state_dict_to_model(arch, state_dict, preset)
