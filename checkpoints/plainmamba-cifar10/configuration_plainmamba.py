"""Configuration of PlainMamba (Yang et al., BMVC 2024), a non-hierarchical vision Mamba with zig-zag 2-D scans.

Defaults are PlainMamba-L1. Field names follow transformers (`hidden_size`, `num_hidden_layers`); the official
`arch_zoo` names are given next to each field so a reader can map them back.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from transformers import PreTrainedConfig

from .reduction import StormConfig

AUTO_MAP = {
    "AutoConfig": "configuration_plainmamba.PlainMambaConfig",
    "AutoModel": "modeling_plainmamba.PlainMambaModel",
    "AutoModelForImageClassification": "modeling_plainmamba.PlainMambaForImageClassification",
}


class PlainMambaConfig(PreTrainedConfig):
    """Hyperparameters of a PlainMamba backbone and its linear classifier.

    Args:
        num_channels: input image channels.
        image_size: training resolution; fixes the size of the learned position-embedding grid
            (other resolutions resize it bicubically, as the official code does).
        patch_size: total stride of the stem (official `patch_size`): a 7x7 stride-2 conv, then a
            `patch_size // 2` square projection with the same stride.
        stem_channels: width of the convolutional stem (64 in every released model).
        num_stem_convs: extra 3x3 conv-BN-ReLU blocks after the first stem conv (`num_convs_patch_embed`).
        hidden_size: token width C (`embed_dims`).
        num_hidden_layers: number of PlainMamba layers (`num_layers`).
        layers_with_dwconv: layers followed by a 3x3 depthwise conv-BN-GELU that replaces the stream
            (`layers_with_dwconv`; `[0]` for L1, empty for L2/L3).
        d_state: SSM state size N.
        expand: inner width E = expand * C.
        dt_rank: rank of the Δ projection; `"auto"` means ceil(C / 16) as in the official code.
        conv_size: kernel of the 2-D depthwise conv on the x branch (must be odd).
        conv_bias: whether that conv has a bias.
        proj_bias: whether in_proj and out_proj have biases (official `bias`).
        layer_norm_eps: epsilon of the per-layer LayerNorm (PyTorch default 1e-5 in the official code).
        final_layer_norm_eps: epsilon of the final LayerNorm (1e-6 in the official `norm_cfg`).
        drop_path_rate: stochastic depth, linearly increasing from 0 over the layers.
        initializer_range: std of the truncated-normal init of linear layers and embeddings.
        storm: token-reduction settings, a `StormConfig` as a plain dict (reduction is off by default).
    """

    model_type = "storm_plainmamba"

    def __init__(
        self,
        num_channels: int = 3,
        image_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        stem_channels: int = 64,
        num_stem_convs: int = 1,
        hidden_size: int = 192,
        num_hidden_layers: int = 24,
        layers_with_dwconv: Optional[Sequence[int]] = (0,),
        d_state: int = 16,
        expand: int = 2,
        dt_rank: int | str = "auto",
        conv_size: int = 7,
        conv_bias: bool = True,
        proj_bias: bool = True,
        layer_norm_eps: float = 1e-5,
        final_layer_norm_eps: float = 1e-6,
        drop_path_rate: float = 0.0,
        initializer_range: float = 0.02,
        storm: Optional[dict[str, Any]] = None,
        **kwargs: Any,
    ):
        self.num_channels = int(num_channels)
        self.image_size = _pair(image_size, "image_size")
        self.patch_size = int(patch_size)
        self.stem_channels = int(stem_channels)
        self.num_stem_convs = int(num_stem_convs)
        self.hidden_size = int(hidden_size)
        self.num_hidden_layers = int(num_hidden_layers)
        self.layers_with_dwconv = sorted(int(i) for i in (layers_with_dwconv or ()))
        self.d_state = int(d_state)
        self.expand = int(expand)
        self.dt_rank = math.ceil(self.hidden_size / 16) if dt_rank == "auto" else int(dt_rank)
        self.conv_size = int(conv_size)
        self.conv_bias = bool(conv_bias)
        self.proj_bias = bool(proj_bias)
        self.layer_norm_eps = float(layer_norm_eps)
        self.final_layer_norm_eps = float(final_layer_norm_eps)
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
    def position_grid(self) -> tuple[int, int]:
        """Token grid at `image_size`: the grid the learned position embedding is stored for."""
        return tuple(token_grid(s, self.patch_size) for s in self.image_size)  # type: ignore[return-value]

    def _validate(self) -> None:
        positive = {
            "num_channels": self.num_channels,
            "stem_channels": self.stem_channels,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "d_state": self.d_state,
            "expand": self.expand,
            "dt_rank": self.dt_rank,
            "conv_size": self.conv_size,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"PlainMambaConfig.{name} must be a positive integer, got {value}.")
        if self.num_stem_convs < 0:
            raise ValueError(f"PlainMambaConfig.num_stem_convs must be >= 0, got {self.num_stem_convs}.")
        if self.patch_size < 2 or self.patch_size % 2:
            raise ValueError(
                f"PlainMambaConfig.patch_size must be an even integer >= 2 (a stride-2 stem conv followed by a "
                f"patch_size/2 projection), got {self.patch_size}."
            )
        if self.conv_size % 2 == 0:
            raise ValueError(f"PlainMambaConfig.conv_size must be odd (same-size padding), got {self.conv_size}.")
        bad = [i for i in self.layers_with_dwconv if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"PlainMambaConfig.layers_with_dwconv has indices {bad} outside 0..{self.num_hidden_layers - 1}."
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"PlainMambaConfig.drop_path_rate must lie in [0, 1), got {self.drop_path_rate}.")


def token_grid(pixels: int, patch_size: int) -> int:
    """Tokens along one side: the stride-2 stem gives ceil(n/2), corner padding to the projection stride
    then gives ceil(ceil(n/2) / (patch_size/2))."""
    half = -(-int(pixels) // 2)
    return -(-half // (patch_size // 2))


def _pair(value: int | Sequence[int], name: str) -> list[int]:
    if isinstance(value, int):
        out = [value, value]
    else:
        out = [int(v) for v in value]
    if len(out) != 2 or min(out) < 1:
        raise ValueError(f"PlainMambaConfig.{name} must be a positive int or a (height, width) pair, got {value!r}.")
    return out
