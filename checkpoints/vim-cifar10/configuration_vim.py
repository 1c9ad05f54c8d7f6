"""Configuration of Vision Mamba (Vim, Zhu et al., ICML 2024): the released "midclstok" bimamba-v2 models.

Defaults are Vim-Ti. Field names follow transformers (`hidden_size`, `num_hidden_layers`); the official
`VisionMamba` / `Mamba` argument names are given next to each field so a reader can map them back.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from transformers import PreTrainedConfig

from .reduction import StormConfig

AUTO_MAP = {
    "AutoConfig": "configuration_vim.VimConfig",
    "AutoModel": "modeling_vim.VimModel",
    "AutoModelForImageClassification": "modeling_vim.VimForImageClassification",
}


class VimConfig(PreTrainedConfig):
    """Hyperparameters of a Vim classifier.

    Every released model: patch conv, class token inserted in the middle of the patch sequence, absolute
    position embedding, `num_hidden_layers` blocks of add -> RMSNorm -> bidirectional Mamba ("bimamba v2")
    with the residual stream in fp32, a final RMSNorm and a linear head on the class token.

    Args:
        num_channels: input image channels (`channels`).
        image_size: the input size the position embedding was trained for, an int or (height, width)
            (`img_size`). The official model accepts only this size, and so does this one.
        patch_size: side of the square patch-embedding kernel (`patch_size`).
        stride: patch-embedding stride (`stride`; 16 for Ti/S/B, 8 for the fine-grained "+" models).
        hidden_size: token width C (`embed_dim`, the Mamba `d_model`).
        num_hidden_layers: number of Mamba blocks (`depth`).
        d_state: SSM state size N (`d_state`).
        expand: inner width E = expand * C (`expand`).
        d_conv: kernel of the causal depthwise conv1d (`d_conv`).
        dt_rank: rank of the Δ projection; `"auto"` means ceil(C / 16) as in the official code.
        norm_eps: RMSNorm epsilon of the blocks and the final norm (`norm_epsilon`).
        divide_output: divide the sum of the two scan directions by 2 (`if_divide_out`; on in every
            released model, Vim-B included: its registration's misspelt `if_devide_out` is swallowed by
            **kwargs and the default True applies).
        drop_path_rate: stochastic depth; layer i uses `[0] + linspace(0, rate, depth)`[i] and the last
            branch before the final norm uses `rate` (the official schedule). Identity in eval.
        initializer_range: std of the truncated-normal init of the class token, position embedding, head.
        storm: token-reduction settings, a `StormConfig` as a plain dict (reduction is off by default).
    """

    model_type = "storm_vim"

    def __init__(
        self,
        num_channels: int = 3,
        image_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        stride: int = 16,
        hidden_size: int = 192,
        num_hidden_layers: int = 24,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        dt_rank: int | str = "auto",
        norm_eps: float = 1e-5,
        divide_output: bool = True,
        drop_path_rate: float = 0.0,
        initializer_range: float = 0.02,
        storm: Optional[dict[str, Any]] = None,
        **kwargs: Any,
    ):
        self.num_channels = int(num_channels)
        self.image_size = _pair(image_size)
        self.patch_size = int(patch_size)
        self.stride = int(stride)
        self.hidden_size = int(hidden_size)
        self.num_hidden_layers = int(num_hidden_layers)
        self.d_state = int(d_state)
        self.expand = int(expand)
        self.d_conv = int(d_conv)
        self.dt_rank = math.ceil(self.hidden_size / 16) if dt_rank == "auto" else int(dt_rank)
        self.norm_eps = float(norm_eps)
        self.divide_output = bool(divide_output)
        self.drop_path_rate = float(drop_path_rate)
        self.initializer_range = float(initializer_range)
        self.storm = StormConfig.from_any(storm).to_dict()
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        self._validate()
        super().__init__(**kwargs)

    @property
    def intermediate_size(self) -> int:
        """Inner width E of the mixer."""
        return self.expand * self.hidden_size

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns) at `image_size`, as the official PatchEmbed computes it."""
        return tuple(token_grid(s, self.patch_size, self.stride) for s in self.image_size)  # type: ignore[return-value]

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols

    def _validate(self) -> None:
        positive = {
            "num_channels": self.num_channels,
            "patch_size": self.patch_size,
            "stride": self.stride,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "d_state": self.d_state,
            "expand": self.expand,
            "d_conv": self.d_conv,
            "dt_rank": self.dt_rank,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"VimConfig.{name} must be a positive integer, got {value}.")
        if min(self.image_size) < self.patch_size:
            raise ValueError(
                f"VimConfig.image_size {self.image_size} is smaller than patch_size {self.patch_size}: "
                "no patch fits. Use a larger image_size or a smaller patch_size."
            )
        if not self.norm_eps > 0:
            raise ValueError(f"VimConfig.norm_eps must be positive, got {self.norm_eps}.")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"VimConfig.drop_path_rate must lie in [0, 1), got {self.drop_path_rate}.")


def token_grid(pixels: int, patch_size: int, stride: int) -> int:
    """Patches along one side: a `patch_size` conv with `stride` and no padding."""
    return (int(pixels) - patch_size) // stride + 1


def _pair(value: int | Sequence[int]) -> list[int]:
    out = [value, value] if isinstance(value, int) else [int(v) for v in value]
    if len(out) != 2 or min(out) < 1:
        raise ValueError(f"VimConfig.image_size must be a positive int or a (height, width) pair, got {value!r}.")
    return out
