"""ToMe (Bolya et al., ICLR 2023, "Token Merging: Your ViT but Faster") on transformers' ViT: the attention
reference row of ``storm-hf sweep``.

The ViT is patched in place, not forked: each ``ViTLayer`` gets an instance-level ``forward`` that runs the
layer's own modules (norms, attention, MLP) and, between attention and MLP, merges ``r`` tokens by bipartite
soft matching on the attention keys (mean over heads, cosine similarity). Merged tokens are size-weighted
averages, sizes are tracked, and attention is proportional (``log(size)`` added to the logits through the
attention module's ``attention_mask``), so the stock eager/SDPA kernels do the work. ``unpatch_tome`` (or the
``tome`` context manager) restores the model exactly; with ``r = 0`` the patched forward runs the same
operations in the same order as transformers' and the logits are bit-identical.

FLOPs follow the count the project uses for ViT (``tools/training.py: model_gflops`` on GPU, where the
attention kernels are counted): 1 multiply-add = 1 FLOP for the patch convolution, every linear layer and the
two attention matmuls, plus ToMe's similarity matmul; norms, softmax, GELU and the merge's elementwise work
are free. Tooling only: model code never imports this.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..flops import FlopsReport, conv2d_flops, linear_flops
from .evaluation import evaluate_model

#: the method name of ToMe rows in sweeps.
TOME_METHOD = "vit_tome"
#: attention implementations that add a float ``attention_mask`` to the logits (proportional attention).
SUPPORTED_ATTENTION = ("eager", "sdpa")


# --------------------------------------------------------------------------------------------------
# bipartite soft matching and merging (batched)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MergePlan:
    """Which tokens of set A merge into which of set B (A = even positions, B = odd positions).

    ``src`` (B, r): A indices merged away; ``dst`` (B, r): their B partners; ``keep`` (B, |A| - r): A indices
    kept, ascending (so the CLS token stays first).
    """

    src: torch.Tensor
    dst: torch.Tensor
    keep: torch.Tensor


def bipartite_matching(metric: torch.Tensor, r: int, protect_first: bool = True) -> MergePlan:
    """ToMe's bipartite soft matching on ``metric`` (B, N, d): the ``r`` A tokens most similar to B go.

    Alternating A/B split, cosine similarity, each A token's best B match; the ``r`` A tokens with the
    highest best-match score merge. ``protect_first`` keeps token 0 (CLS) out of the merge.
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must be (batch, tokens, dim), got shape {tuple(metric.shape)}.")
    tokens = metric.shape[1]
    limit = max_merge(tokens, protect_first)
    if not 0 <= r <= limit:
        raise ValueError(f"r={r} merges are impossible with {tokens} tokens (at most {limit}).")
    with torch.autocast(metric.device.type, enabled=False):  # fp32 scores: merge choices not decided by bf16 ties
        unit = nn.functional.normalize(metric.float(), dim=-1)
        scores = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)  # (B, |A|, |B|)
    if protect_first:
        scores[:, 0, :] = -torch.inf
    best, best_dst = scores.max(dim=-1)
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    src = order[:, :r]
    return MergePlan(src=src, dst=best_dst.gather(1, src), keep=order[:, r:].sort(dim=-1).values)


def merge_tokens(x: torch.Tensor, sizes: torch.Tensor, plan: MergePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``plan``: size-weighted averages into the B tokens; returns ``[kept A, B]`` tokens and their sizes.

    ``x`` (B, N, C), ``sizes`` (B, N) float32 patch counts; the output has N - r tokens and the same total size.
    """
    channels = x.shape[-1]
    weighted = x * sizes.unsqueeze(-1)  # promoted to float32 with the sizes: averages do not lose bits
    a, b = weighted[:, ::2], weighted[:, 1::2]
    size_a, size_b = sizes[:, ::2], sizes[:, 1::2]
    b = b.scatter_add(1, _expand(plan.dst, channels), a.gather(1, _expand(plan.src, channels)))
    size_b = size_b.scatter_add(1, plan.dst, size_a.gather(1, plan.src))
    kept = a.gather(1, _expand(plan.keep, channels))
    merged_sizes = torch.cat([size_a.gather(1, plan.keep), size_b], dim=1)
    merged = torch.cat([kept, b], dim=1) / merged_sizes.unsqueeze(-1)
    return merged.to(x.dtype), merged_sizes


def _expand(index: torch.Tensor, channels: int) -> torch.Tensor:
    return index.unsqueeze(-1).expand(-1, -1, channels)


def max_merge(tokens: int, protect_first: bool = True) -> int:
    """The most tokens one matching step can remove: every A token but a protected CLS."""
    return (tokens - 1) // 2 if protect_first else tokens // 2


# --------------------------------------------------------------------------------------------------
# patching transformers' ViT
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ToMeState:
    """What the patched layers share during one forward (reset at layer 0)."""

    r: list[int]
    proportional_attention: bool = True
    sizes: Optional[torch.Tensor] = None  # (B, N) float32, None while no token has merged
    keys: Optional[torch.Tensor] = None  # the current layer's key projection output (B, N, C)
    token_counts: list[int] = dataclasses.field(default_factory=list)  # tokens after each layer's merge
    handles: list[Any] = dataclasses.field(default_factory=list)


def vit_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder layers of a transformers ViT (``ViTForImageClassification`` or ``ViTModel``), checked."""
    vit = getattr(model, "vit", model)
    layers = getattr(vit, "layers", None)
    if layers is None:
        if hasattr(getattr(vit, "encoder", None), "layer"):
            raise ValueError("This ViT has the transformers 4.x layout (vit.encoder.layer); ToMe here needs "
                             "transformers >= 5 (vit.layers with q_proj/k_proj/v_proj/o_proj).")
        raise ValueError(f"{type(model).__name__} is not a transformers ViT (no .vit.layers).")
    for layer in layers:
        missing = [name for name in ("layernorm_before", "attention", "layernorm_after", "mlp", "dropout")
                   if not hasattr(layer, name)]
        if missing or not hasattr(layer.attention, "k_proj"):
            raise ValueError(f"Unexpected ViT layer structure ({type(layer).__name__} lacks "
                             f"{missing or ['attention.k_proj']}); is this transformers' ViTLayer?")
    return layers


def _per_layer_r(r: int | Sequence[int], num_layers: int) -> list[int]:
    values = [r] * num_layers if isinstance(r, int) else list(r)
    if len(values) != num_layers or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ValueError(f"r must be a non-negative int or {num_layers} of them (one per layer), got {r!r}.")
    return values


def _attention_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the attention logits will have (autocast's, if on): SDPA wants the mask in it."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _tome_layer_forward(layer: nn.Module, state: ToMeState, index: int) -> Callable[..., torch.Tensor]:
    """``ViTLayer.forward`` with a merge between the attention and the MLP residual branches."""

    def forward(hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs: Any) -> torch.Tensor:
        if index == 0:
            state.sizes, state.token_counts = None, []
        mask = attention_mask
        if state.sizes is not None and state.proportional_attention:
            bias = state.sizes.log()[:, None, None, :].to(_attention_dtype(hidden_states))
            mask = bias if mask is None else mask + bias
        residual = hidden_states
        hidden = layer.layernorm_before(hidden_states)
        hidden, _ = layer.attention(hidden, mask, **kwargs)
        hidden = layer.dropout(hidden)
        hidden_states = hidden + residual

        r = min(state.r[index], max_merge(hidden_states.shape[1]))
        if r > 0:
            batch, tokens, _ = state.keys.shape
            heads = layer.attention.config.num_attention_heads
            metric = state.keys.view(batch, tokens, heads, -1).mean(dim=2)
            if state.sizes is None:
                state.sizes = hidden_states.new_ones(batch, tokens, dtype=torch.float32)
            hidden_states, state.sizes = merge_tokens(hidden_states, state.sizes, bipartite_matching(metric, r))
        state.keys = None
        state.token_counts.append(hidden_states.shape[1])

        residual = hidden_states
        hidden = layer.mlp(layer.layernorm_after(hidden_states))
        hidden = layer.dropout(hidden)
        return hidden + residual

    return forward


def patch_tome(model: nn.Module, r: int | Sequence[int], *, proportional_attention: bool = True) -> ToMeState:
    """Patch a transformers ViT in place to merge ``r`` tokens per layer (an int, or one per layer).

    Returns the shared state (its ``token_counts`` and ``sizes`` describe the last forward). Patching an
    already patched model just changes ``r``. Undo with ``unpatch_tome``.
    """
    layers = vit_layers(model)
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(f"ToMe's proportional attention needs an attention that adds a float mask "
                         f"({', '.join(SUPPORTED_ATTENTION)}); this model uses {implementation!r}. Load it with "
                         "attn_implementation='sdpa'.")
    per_layer = _per_layer_r(r, len(layers))
    state = getattr(model, "_tome_state", None)
    if state is not None:
        state.r, state.proportional_attention = per_layer, proportional_attention
        return state
    state = ToMeState(r=per_layer, proportional_attention=proportional_attention)

    def keep_keys(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        state.keys = output

    for index, layer in enumerate(layers):
        layer.forward = _tome_layer_forward(layer, state, index)
        state.handles.append(layer.attention.k_proj.register_forward_hook(keep_keys))
    model._tome_state = state
    return state


def unpatch_tome(model: nn.Module) -> None:
    """Restore the ViT's own layer forwards and drop the key hooks (no-op if not patched)."""
    state = getattr(model, "_tome_state", None)
    if state is None:
        return
    for layer in vit_layers(model):
        layer.__dict__.pop("forward", None)
    for handle in state.handles:
        handle.remove()
    del model._tome_state


@contextlib.contextmanager
def tome(model: nn.Module, r: int | Sequence[int], *, proportional_attention: bool = True) -> Iterator[ToMeState]:
    """``with tome(vit, r=8): ...`` runs the ViT with ToMe and restores it afterwards (even on errors)."""
    was_patched = hasattr(model, "_tome_state")
    previous = (list(model._tome_state.r), model._tome_state.proportional_attention) if was_patched else None
    state = patch_tome(model, r, proportional_attention=proportional_attention)
    try:
        yield state
    finally:
        if previous is None:
            unpatch_tome(model)
        else:
            state.r, state.proportional_attention = previous


# --------------------------------------------------------------------------------------------------
# FLOPs and the r solver
# --------------------------------------------------------------------------------------------------


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def tome_token_counts(num_tokens: int, r: Sequence[int]) -> list[tuple[int, int]]:
    """(tokens into the layer's attention, tokens after its merge) per layer, ToMe's clamping included."""
    counts = []
    for layer_r in r:
        after = num_tokens - min(layer_r, max_merge(num_tokens))
        counts.append((num_tokens, after))
        num_tokens = after
    return counts


def vit_tome_flops(config: Any, r: int | Sequence[int] = 0,
                   image_size: Optional[int | Sequence[int]] = None) -> FlopsReport:
    """Analytic FLOPs per image of ``ViTForImageClassification`` with ToMe merging ``r`` tokens per layer.

    Per layer with N tokens in and M after the merge: q/k/v/o projections 4·N·C², QKᵀ and AV 2·N²·C, the
    matching matmul |A|·|B|·C/heads when it merges, the MLP 2·M·C·I; plus the patch convolution and the head.
    ``r = 0`` equals ``model_gflops`` with counted attention (GPU, or eager attention on CPU).
    """
    height, width = _pair(image_size if image_size is not None else config.image_size)
    patch_h, patch_w = _pair(config.patch_size)
    grid = (height // patch_h, width // patch_w)
    hidden, inter, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    per_layer = _per_layer_r(r, config.num_hidden_layers)
    parts = {"patch_embed": conv2d_flops(config.num_channels, hidden, (patch_h, patch_w), grid),
             "qkvo": 0, "attention": 0, "tome_matching": 0, "mlp": 0,
             "head": linear_flops(hidden, config.num_labels, 1)}
    for tokens, after in tome_token_counts(grid[0] * grid[1] + 1, per_layer):
        parts["qkvo"] += 4 * linear_flops(hidden, hidden, tokens)
        parts["attention"] += 2 * tokens * tokens * hidden
        if after < tokens:
            parts["tome_matching"] += ((tokens + 1) // 2) * (tokens // 2) * (hidden // heads)
        parts["mlp"] += linear_flops(hidden, inter, after) + linear_flops(inter, hidden, after)
    return FlopsReport.from_parts(parts, [], image_size=(height, width))


def solve_tome_r(config: Any, flops_ratio: float, *, tolerance: float = 0.01,
                 image_size: Optional[int | Sequence[int]] = None) -> int:
    """The constant per-layer r whose FLOPs cut is closest to ``flops_ratio`` (ties: the smaller r).

    Raises ValueError when even that r misses by more than ``tolerance`` (absolute, in cut fraction).
    """
    if isinstance(flops_ratio, bool) or not 0.0 <= float(flops_ratio) < 1.0:
        raise ValueError(f"flops_ratio must be in [0, 1), got {flops_ratio!r}.")
    full = vit_tome_flops(config, 0, image_size).total
    height, width = _pair(image_size if image_size is not None else config.image_size)
    tokens = (height // _pair(config.patch_size)[0]) * (width // _pair(config.patch_size)[1]) + 1
    cuts = {r: 1.0 - vit_tome_flops(config, r, image_size).total / full for r in range(max_merge(tokens) + 1)}
    best = min(cuts, key=lambda r: (abs(cuts[r] - flops_ratio), r))
    if abs(cuts[best] - flops_ratio) > tolerance:
        raise ValueError(
            f"ToMe with a constant r cannot cut this ViT's FLOPs by {flops_ratio:.1%}: the nearest, r={best}, "
            f"cuts {cuts[best]:.1%} (tolerance {tolerance:.1%}; reachable cuts span {min(cuts.values()):.1%} "
            f"to {max(cuts.values()):.1%})."
        )
    return best


# --------------------------------------------------------------------------------------------------
# the sweep reference
# --------------------------------------------------------------------------------------------------


def load_vit(source: str | Path) -> nn.Module:
    """A saved transformers ViT classifier, in float32 eval mode (checkpoints may be stored in fp16)."""
    from transformers import AutoConfig, AutoModelForImageClassification

    if not (Path(source) / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a saved model folder (no config.json).")
    model_type = AutoConfig.from_pretrained(source).model_type
    if model_type != "vit":
        raise ValueError(f"{source} holds a {model_type!r} model; the ToMe reference needs a transformers ViT.")
    model = AutoModelForImageClassification.from_pretrained(source, dtype=torch.float32).eval()
    vit_layers(model)
    return model


def tome_reference(vit_model: nn.Module, dataset: Any, batch_size: int = 64, accelerator: Any = None, *,
                   tolerance: float = 0.01, source: Optional[str] = None, progress: bool = True,
                   proportional_attention: bool = True,
                   evaluate_fn: Callable[..., dict] = evaluate_model) -> Callable[[float], dict]:
    """A sweep reference ``fn(ratio) -> row``: the ViT with ToMe at the constant r closest to that FLOPs cut.

    ``ratio = 0`` is the unreduced ViT. Rows look like ``evaluate_model``'s (method ``vit_tome``, gflops,
    flops_cut, top1, top5, img_per_s, ...) plus ``tome_r`` and ``reference_model``. An unreachable ratio
    raises ValueError (the sweep records it as infeasible).
    """
    vit_layers(vit_model)
    image_size = tuple(int(s) for s in dataset[0]["pixel_values"].shape[-2:])
    full = vit_tome_flops(vit_model.config, 0, image_size).total

    def run(ratio: float) -> dict:
        r = solve_tome_r(vit_model.config, ratio, tolerance=tolerance, image_size=image_size) if ratio else 0
        reduced = vit_tome_flops(vit_model.config, r, image_size).total
        summary = {"method": TOME_METHOD, "ratio": float(ratio), "gflops": reduced / 1e9,
                   "gflops_unreduced": full / 1e9, "flops_cut": 1.0 - reduced / full, "tome_r": r,
                   "tome": {"r": r, "proportional_attention": proportional_attention},
                   "reference_model": source}
        with tome(vit_model, r, proportional_attention=proportional_attention):
            return evaluate_fn(vit_model, dataset, batch_size, accelerator, summary=summary, progress=progress,
                               description=f"{TOME_METHOD}@{ratio:g}")

    return run
