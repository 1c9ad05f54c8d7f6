"""FLOP primitives in the fvcore convention, and the report type every backbone returns.

VMamba, GroupMamba and PlainMamba publish fvcore counts, so the analytic counters here follow fvcore:
one multiply-add is one FLOP (convolutions and linear layers count MACs, biases are free),
LayerNorm costs 5 per element with an affine transform (4 without), BatchNorm in eval mode 2 per element
(1 without affine), adaptive average pooling 1 per input element, and elementwise activations, additions,
permutes and flips cost nothing. The selective scan follows state-spaces/mamba#110 (as VMamba's
`flops_selective_scan_fn`): 9·B·L·D·N for the recurrence, plus B·D·L for the D skip and B·D·L for a z gate.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence


def conv_out_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Output length of a convolution along one axis (PyTorch's floor formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv2d_flops(
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int],
    out_hw: Sequence[int],
    groups: int = 1,
    batch: int = 1,
) -> int:
    """MACs of a 2-D convolution: batch · out_channels · (in_channels / groups) · kh · kw · H_out · W_out."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"channels ({in_channels}, {out_channels}) must be divisible by groups={groups}.")
    return batch * out_channels * (in_channels // groups) * kh * kw * int(out_hw[0]) * int(out_hw[1])


def conv1d_flops(in_channels: int, out_channels: int, kernel_size: int, length: int, groups: int = 1, batch: int = 1) -> int:
    """MACs of a 1-D convolution."""
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"channels ({in_channels}, {out_channels}) must be divisible by groups={groups}.")
    return batch * out_channels * (in_channels // groups) * kernel_size * length


def linear_flops(in_features: int, out_features: int, tokens: int) -> int:
    """MACs of a linear layer applied to `tokens` vectors (the bias is not counted)."""
    return tokens * in_features * out_features


def layer_norm_flops(numel: int, affine: bool = True) -> int:
    """fvcore's LayerNorm/GroupNorm count: 5 per element with affine parameters, 4 without."""
    return numel * (5 if affine else 4)


def batch_norm_flops(numel: int, affine: bool = True, training: bool = False) -> int:
    """fvcore's BatchNorm count: in eval mode 2 per element (1 without affine); in training like LayerNorm."""
    if training:
        return layer_norm_flops(numel, affine)
    return numel * (2 if affine else 1)


def adaptive_avg_pool_flops(in_numel: int) -> int:
    """fvcore's adaptive average pooling count: one per input element."""
    return in_numel


def scan_flops(batch: int, length: int, channels: int, d_state: int, with_d: bool = True, with_z: bool = False) -> int:
    """Selective scan: 9·B·L·D·N for the recurrence, + B·D·L for the D skip, + B·D·L for a z gate."""
    flops = 9 * batch * length * channels * d_state
    if with_d:
        flops += batch * channels * length
    if with_z:
        flops += batch * channels * length
    return flops


@dataclasses.dataclass(frozen=True)
class BlockFlops:
    """FLOPs of one block, with the grid it received (before any reduction inside the block)."""

    stage: int
    block: int
    height: int
    width: int
    flops: int


@dataclasses.dataclass
class FlopsReport:
    """An analytic FLOP count: the total, a breakdown by part, and one row per block."""

    total: int
    parts: dict[str, int]
    blocks: list[BlockFlops]
    image_size: Optional[tuple[int, int]] = None

    @property
    def gflops(self) -> float:
        return self.total / 1e9

    @classmethod
    def from_parts(
        cls, parts: dict[str, int], blocks: list[BlockFlops], image_size: Optional[tuple[int, int]] = None
    ) -> "FlopsReport":
        """Build a report whose total is the sum of its parts (blocks must already be inside the parts)."""
        return cls(total=int(sum(parts.values())), parts=dict(parts), blocks=list(blocks), image_size=image_size)

    def ratio_to(self, other: "FlopsReport") -> float:
        """This count as a fraction of `other` (e.g. reduced / unreduced)."""
        return self.total / other.total if other.total else math.nan

    def table(self) -> str:
        """A plain-text table: parts, then blocks."""
        lines = [f"total: {self.gflops:.4f} GFLOPs" + (f" at {self.image_size}" if self.image_size else "")]
        width = max((len(k) for k in self.parts), default=4)
        for name, value in self.parts.items():
            share = 100.0 * value / self.total if self.total else 0.0
            lines.append(f"  {name:<{width}}  {value / 1e9:9.4f} G  {share:5.1f} %")
        if self.blocks:
            lines.append("  stage block   H x W    GFLOPs")
            for row in self.blocks:
                lines.append(f"  {row.stage:5d} {row.block:5d}  {row.height:3d} x {row.width:<3d} {row.flops / 1e9:9.4f}")
        return "\n".join(lines)
