"""Configuration of VMamba v2 (the `v05_noz` SS2D of MzeroMiko/VMamba's released checkpoints)."""
from __future__ import annotations

import math
from typing import Any

from transformers import PreTrainedConfig

from .reduction import StormConfig


class VMambaConfig(PreTrainedConfig):
    r"""Hyperparameters of a VMamba v2 classifier (defaults: VMamba-T[s1l8]) plus the STORM reduction settings.

    Args:
        num_channels: input image channels.
        patch_size: total stride of the two-conv stem. 4 (every released model): both 3x3 convs have stride 2.
            2: the first conv has stride 1, for small inputs (a 16x16 first grid at 32x32, e.g. CIFAR); no
            official checkpoint uses it, and the weights have the same shapes either way.
        embed_dim: stage-0 width; stage i gets `embed_dim * 2**i` unless `dims` is given.
        dims: per-stage widths C_i (wins over `embed_dim`).
        depths: VSS blocks per stage.
        ssm_ratio: SS2D inner width D = ssm_ratio * C.
        d_state: SSM state size N (1 in every released v2 model; any N >= 1 works).
        dt_rank: rank R of the Δ projection; "auto" = ceil(C / 16) from the block width C, as officially.
        ssm_conv: depthwise conv kernel inside SS2D (odd; < 2 = no conv).
        ssm_conv_bias: whether that conv has a bias (False in the released models).
        mlp_ratio: MLP hidden width = mlp_ratio * C (0 drops the MLP half of the block).
        drop_path_rate: stochastic depth at the last block, linear from 0 (training only).
        layer_norm_eps: epsilon of every LayerNorm (PyTorch's default 1e-5, as officially).
        initializer_range: std of the truncated-normal init of linear layers.
        image_size: nominal input size (the model accepts any size; this is what FLOPs default to).
        storm: `StormConfig` as a dict; the default switches reduction off.
    """

    model_type = "storm_vmamba"

    num_channels: int = 3
    patch_size: int = 4
    embed_dim: int = 96
    dims: Any = None
    depths: Any = (2, 2, 8, 2)
    ssm_ratio: float = 1.0
    d_state: int = 1
    dt_rank: Any = "auto"
    ssm_conv: int = 3
    ssm_conv_bias: bool = False
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    image_size: Any = 224
    storm: Any = None

    def __post_init__(self, **kwargs):
        self.patch_size = int(self.patch_size)
        self.depths = [int(d) for d in self.depths]
        if self.dims is None:
            self.dims = [int(self.embed_dim) * 2**i for i in range(len(self.depths))]
        self.dims = [int(d) for d in self.dims]
        self.embed_dim = self.dims[0] if self.dims else int(self.embed_dim)
        self.ssm_ratio = float(self.ssm_ratio)
        self.mlp_ratio = float(self.mlp_ratio)
        if self.dt_rank != "auto":
            self.dt_rank = int(self.dt_rank)
        self.storm = StormConfig.from_any(self.storm).to_dict()
        if getattr(self, "auto_map", None) is None:
            self.auto_map = {
                "AutoConfig": "configuration_vmamba.VMambaConfig",
                "AutoModel": "modeling_vmamba.VMambaModel",
                "AutoModelForImageClassification": "modeling_vmamba.VMambaForImageClassification",
            }
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        dims, depths = self.dims, self.depths
        if self.patch_size not in (2, 4):
            raise ValueError(
                f"patch_size must be 4 (the official stem: two stride-2 convs) or 2 (first conv stride 1, for small "
                f"images such as CIFAR's 32x32), got {self.patch_size}."
            )
        if not depths or len(dims) != len(depths):
            raise ValueError(f"dims {dims} and depths {depths} must be non-empty lists of the same length.")
        if min(depths) < 1 or min(dims) < 2:
            raise ValueError(f"every depth must be >= 1 and every width >= 2, got depths={depths}, dims={dims}.")
        if dims[0] % 2:
            raise ValueError(f"the stem halves the first width, so dims[0] must be even, got {dims[0]}.")
        if min(self.d_inner(i) for i in range(len(dims))) < 1:
            raise ValueError(f"ssm_ratio={self.ssm_ratio} gives an empty SS2D inner width; it must be positive.")
        if self.d_state < 1:
            raise ValueError(f"d_state must be >= 1, got {self.d_state}.")
        if self.dt_rank != "auto" and self.dt_rank < 1:
            raise ValueError(f'dt_rank must be "auto" or a positive integer, got {self.dt_rank!r}.')
        if self.mlp_ratio < 0:
            raise ValueError(f"mlp_ratio must be >= 0 (0 drops the MLP), got {self.mlp_ratio}.")
        if self.ssm_conv >= 2 and self.ssm_conv % 2 == 0:
            raise ValueError(f"ssm_conv must be odd (same-size padding) or < 2 (no conv), got {self.ssm_conv}.")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def hidden_size(self) -> int:
        """Width of the final feature map (what the classifier sees)."""
        return self.dims[-1]

    def d_inner(self, stage: int) -> int:
        """SS2D inner width D of a stage."""
        return int(self.ssm_ratio * self.dims[stage])

    @property
    def stem_strides(self) -> tuple[int, int]:
        """Strides of the stem's two 3x3 convs."""
        return (2, 2) if self.patch_size == 4 else (1, 2)

    def stage_dt_rank(self, stage: int) -> int:
        """Rank R of a stage's Δ projection: ceil(C / 16) from the block width when "auto"."""
        return math.ceil(self.dims[stage] / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    def mlp_hidden(self, stage: int) -> int:
        """MLP hidden width of a stage (0 = no MLP)."""
        return int(self.dims[stage] * self.mlp_ratio)
