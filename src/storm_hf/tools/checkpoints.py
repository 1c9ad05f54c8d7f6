"""Read official checkpoint files safely and unwrap the containers the upstream projects release.

Upstream checkpoints are pickles (`.pth`) holding a state dict directly or under a key such as
`"model"` (VMamba, GroupMamba, Vim) or `"state_dict"` (PlainMamba's mmcls). We only ever load them with
`weights_only=True`, so a malicious pickle cannot run code, and every failure names the file and says what
was expected.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

CONTAINER_KEYS = ("model", "state_dict", "model_state", "module")


class CheckpointError(ValueError):
    """The file is not a readable checkpoint of the expected kind."""


def load_checkpoint_file(path: str | os.PathLike) -> Mapping:
    """Load a `.pth`/`.pt`/`.bin`/`.safetensors` file into a Python mapping without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file {str(path)!r} does not exist (or is not a file).")
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint file {str(path)!r} is empty: re-download it.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises several error types
            raise CheckpointError(f"{str(path)!r} is not a valid safetensors file ({err}); re-download it.") from err
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"Could not read {str(path)!r} as a PyTorch checkpoint ({type(err).__name__}: {err}). "
            "The file may be truncated or corrupt (re-download it), or it needs objects that weights_only=True "
            "refuses to unpickle (re-save it as a plain state dict)."
        ) from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict or checkpoint dict.")
    return obj


def unwrap_state_dict(obj: Mapping, prefer: str | None = None) -> dict[str, torch.Tensor]:
    """Return the flat `name -> tensor` state dict inside an official checkpoint container.

    Accepts a bare state dict, or a dict holding one under `prefer` or one of CONTAINER_KEYS
    (the first present wins; `model_ema` is never chosen implicitly).
    """
    keys = ([prefer] if prefer else []) + [k for k in CONTAINER_KEYS if k != prefer]
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    else:
        for key in keys:
            if key in obj and isinstance(obj[key], Mapping):
                state = obj[key]
                break
        else:
            raise CheckpointError(
                f"No state dict found in the checkpoint: top-level keys are {sorted(map(str, obj))[:10]}; "
                f"expected a bare state dict or one under one of {list(keys)}."
            )
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError("The checkpoint's state dict holds no tensors.")
    return dict(tensors)


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop `prefix` (e.g. 'module.' from DDP) from every key that has it."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}
