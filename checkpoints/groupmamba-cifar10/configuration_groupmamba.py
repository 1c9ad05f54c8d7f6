"""Configuration of GroupMamba (Amshaker/GroupMamba: modulated group Mamba layers, class-token head)."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

from transformers import PreTrainedConfig

from .reduction import StormConfig

NUM_GROUPS = 4  # one channel group per scan direction; fixed by the architecture


class GroupMambaConfig(PreTrainedConfig):
    """Hyperparameters of a GroupMamba classifier.

    Defaults are GroupMamba-T. `patch_size` is the stem's total stride: 4 (every released model) gives the
    official stem, whose 7x7 conv and final 3x3 projection both have stride 2; 2 gives the 7x7 conv stride 1,
    for small inputs (a 16x16 first grid at 32x32, e.g. CIFAR). No official checkpoint uses 2, and the
    weights have the same shapes either way. Every width must split into four equal channel groups (one per scan
    direction). `dt_rank="auto"` means ceil(C / 4 / 16), computed from the group width as in the official
    SS2D. The official code uses three LayerNorm epsilons: `layer_norm_eps` (1e-6: block `norm2`, stage
    norms, class-token block, final norm), `mixer_norm_eps` (1e-5: the group layer's shared norm and SS2D
    `out_norm`) and `embed_norm_eps` (1e-5: stem and downsampling norms). `distillation` adds the DeiT-style
    `dist_head`; in eval the official logits are the mean of both heads. `storm` holds the token-reduction
    settings as a plain dict (see `StormConfig`).
    """

    model_type = "storm_groupmamba"

    def __init__(
        self,
        num_channels: int = 3,
        patch_size: int = 4,
        stem_hidden_dim: int = 32,
        embed_dims: Sequence[int] = (64, 128, 348, 448),
        depths: Sequence[int] = (3, 4, 9, 3),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        cls_mlp_ratio: Optional[float] = None,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: Union[int, str] = "auto",
        d_conv: int = 3,
        affinity_reduction: int = 16,
        layer_norm_eps: float = 1e-6,
        mixer_norm_eps: float = 1e-5,
        embed_norm_eps: float = 1e-5,
        batch_norm_eps: float = 1e-5,
        distillation: bool = True,
        drop_path_rate: float = 0.0,
        initializer_range: float = 0.02,
        image_size: int = 224,
        storm: Optional[dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(patch_size, bool) or patch_size not in (2, 4):
            raise ValueError(
                f"patch_size must be 4 (the official stem: stride-2 7x7 conv and stride-2 projection) or 2 (7x7 conv "
                f"stride 1, for small images such as CIFAR's 32x32), got {patch_size!r}."
            )
        embed_dims = [int(c) for c in embed_dims]
        depths = [int(d) for d in depths]
        mlp_ratios = [float(r) for r in mlp_ratios]
        if not depths or not (len(embed_dims) == len(depths) == len(mlp_ratios)):
            raise ValueError(
                f"embed_dims {embed_dims}, depths {depths} and mlp_ratios {mlp_ratios} must be non-empty lists of "
                "the same length (one entry per stage)."
            )
        if any(d < 1 for d in depths):
            raise ValueError(f"every stage needs at least one block, got depths={depths}.")
        bad = [c for c in embed_dims if c % NUM_GROUPS or c // int(affinity_reduction) < 1]
        if bad:
            raise ValueError(
                f"every width must be a multiple of {NUM_GROUPS} (four channel groups) and at least "
                f"affinity_reduction={affinity_reduction}; these are not: {bad}."
            )
        if any(r <= 0 for r in mlp_ratios) or (cls_mlp_ratio is not None and float(cls_mlp_ratio) <= 0):
            raise ValueError(f"MLP ratios must be positive, got {mlp_ratios} / cls_mlp_ratio={cls_mlp_ratio}.")
        if int(stem_hidden_dim) < 1 or int(d_state) < 1 or not float(ssm_ratio) > 0:
            raise ValueError("stem_hidden_dim, d_state and ssm_ratio must be positive.")
        if dt_rank != "auto" and (isinstance(dt_rank, bool) or int(dt_rank) < 1):
            raise ValueError(f'dt_rank must be "auto" or a positive integer, got {dt_rank!r}.')
        if int(d_conv) < 1 or int(d_conv) % 2 == 0:
            raise ValueError(f"d_conv must be a positive odd kernel size (same-size padding), got {d_conv}.")
        self.num_channels = int(num_channels)
        self.patch_size = int(patch_size)
        self.stem_hidden_dim = int(stem_hidden_dim)
        self.embed_dims = embed_dims
        self.depths = depths
        self.mlp_ratios = mlp_ratios
        self.cls_mlp_ratio = None if cls_mlp_ratio is None else float(cls_mlp_ratio)
        self.d_state = int(d_state)
        self.ssm_ratio = float(ssm_ratio)
        self.dt_rank = dt_rank if dt_rank == "auto" else int(dt_rank)
        self.d_conv = int(d_conv)
        self.affinity_reduction = int(affinity_reduction)
        self.layer_norm_eps = float(layer_norm_eps)
        self.mixer_norm_eps = float(mixer_norm_eps)
        self.embed_norm_eps = float(embed_norm_eps)
        self.batch_norm_eps = float(batch_norm_eps)
        self.distillation = bool(distillation)
        self.drop_path_rate = float(drop_path_rate)
        self.initializer_range = float(initializer_range)
        self.image_size = image_size
        self.storm = StormConfig.from_any(storm).to_dict()
        kwargs.setdefault(
            "auto_map",
            {
                "AutoConfig": "configuration_groupmamba.GroupMambaConfig",
                "AutoModel": "modeling_groupmamba.GroupMambaModel",
                "AutoModelForImageClassification": "modeling_groupmamba.GroupMambaForImageClassification",
            },
        )
        super().__init__(**kwargs)

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def stem_stride(self) -> int:
        """Stride of the stem's first (7x7) conv; the stem's final projection always has stride 2."""
        return self.patch_size // 2

    @property
    def hidden_size(self) -> int:
        """Width of the final feature (what the classifier sees)."""
        return self.embed_dims[-1]

    def group_dim(self, width: int) -> int:
        """Channels of one group (the SS2D's d_model) in a layer of the given width."""
        return width // NUM_GROUPS

    def group_inner(self, width: int) -> int:
        """SS2D inner width D of one group."""
        return int(self.ssm_ratio * self.group_dim(width))

    def group_dt_rank(self, width: int) -> int:
        """Low-rank width R of the Δ projection (ceil(group width / 16) when "auto")."""
        return math.ceil(self.group_dim(width) / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    def mlp_hidden(self, stage: int) -> int:
        return int(self.embed_dims[stage] * self.mlp_ratios[stage])

    @property
    def cls_mlp_hidden(self) -> int:
        """Hidden width of the class-token block's FFN (official: the last stage's ratio)."""
        ratio = self.mlp_ratios[-1] if self.cls_mlp_ratio is None else self.cls_mlp_ratio
        return int(self.hidden_size * ratio)
