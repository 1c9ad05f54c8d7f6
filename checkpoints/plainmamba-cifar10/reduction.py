"""Token reduction for vision state space models: STORM and the spatially agnostic baselines.

A reduction step turns a dense ``(B, H, W, C)`` token map into a dense ``(B, H', W', C)`` map. Every
method first builds a :class:`ReductionPlan` -- the output slot of every input token -- from a detached
planning signal, then applies that one plan to the residual stream *and* to the mixer output ("branch"),
so both stay aligned (STORM's placement: ``x + drop_path(branch)`` on the reduced grid).

========== ============================== ===================================================================
method     planning signal                rule
========== ============================== ===================================================================
storm_tome residual                       STORM(ToMe): in every row merge the most similar local pairs
                                          (2j, 2j+1) inside windows of ``window`` pairs, then the same in every
                                          column of the result. Merged tokens are *summed* (public code).
storm_evit residual                       STORM(EViT): in every row keep the most important tokens inside
                                          windows of ``window`` tokens, then the same in every column.
evit       residual (signed channel mean) top-k over the flattened map, survivors in raster order, repacked.
tome       branch (cosine)                R-MeeTo's ordered bipartite merge over the flattened map (even/odd
                                          split, best match anywhere), repacked. Size-weighted mean.
random     cfg.seed                       uniform random keep, shared across the batch, repacked.
top        extras["branch"] or branch     ToP/HSA: top-k by the channel sum of the clipped SSM output.
mtr        extras["delta"] + residual     MTR: Δ-importance groups keep/target/source; each source is
                                          averaged into its most similar target; raster order kept.
none       --                             no reduction (no code path runs).
========== ============================== ===================================================================

Choices made where the public code left room (each reproduces STORM's code unless said otherwise):

* Windows: the row budget ``W - W'`` is spread over consecutive windows in proportion to their length
  (floor first, leftovers to the largest remainders, the earlier window on ties), in exact integers.
* Ties in scores go to the lower index (stable sorts); the public code's order on ties is unspecified.
* ``storm_tome`` plans its height pass on the width-merged residual, merged with the same arithmetic.
  One pass merges every token at most once, so a step needs ``W' >= ceil(W / 2)`` (and the same for H).
* ``merge_mode``: ``sum`` (STORM's code, default for ``storm_tome``), ``mean`` (size-weighted like ToMe;
  default for ``tome``/``mtr``; sizes travel in/out of :func:`reduce_tokens`) or ``drop`` (the source of a
  merge is discarded: STORM's ``if_prune=True``, which is how its VMamba scripts ran the ``tome`` baseline).
* ``tome``: STORM prepends a fake CLS (the token mean) to reuse R-MeeTo's code, but removes it before
  matching and re-inserts it at slot 0, so it has no effect and is not emulated. One bipartite round
  removes at most ``floor(H*W / 2)`` tokens.
* ``top``: the paper's clipped score ``sum_d max(0, y_d)``; STORM's "HSA" re-implementation omits the clip.
* ``mtr``: the group sizes are not public; sources are the ``r`` least important tokens, the rest is split
  in half: the more important half is kept untouched, the other half are targets.
* ``random``: one permutation from ``torch.Generator().manual_seed(cfg.seed)`` per step, shared across the
  batch (as STORM's code), so results are deterministic.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import types
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

METHODS = ("none", "storm_tome", "storm_evit", "evit", "tome", "random", "top", "mtr")
SIMILARITIES = ("l1", "cosine", "l2")
IMPORTANCES = ("abs_mean", "mean", "l2")
MERGE_MODES = ("sum", "mean", "drop")
#: how the ``flops_ratio`` solver places reductions (see :class:`StormMixin`); None = "even" on hierarchical
#: backbones at their default positions, "legacy" otherwise (explicit ``positions``, single-stage backbones).
PLACEMENTS = ("even", "legacy")

Position = tuple[int, int]
Grid = tuple[int, int]

#: STORM window per method when ``cfg.window`` is None (storm_tome: pairs, storm_evit: tokens). STORM's
#: VMamba/LocalMamba code uses 5 for both; its PlainMamba code uses 20 tokens for storm_evit -- a backbone
#: passes such overrides as ``window_defaults`` to :func:`reduce_tokens`.
DEFAULT_WINDOWS = {"storm_tome": 5, "storm_evit": 5}
#: importance score per method when ``cfg.importance`` is None (STORM's FixedWindowEViT2D / EViTTokenPruning).
DEFAULT_IMPORTANCE = {"storm_evit": "abs_mean", "evit": "mean"}
#: merge arithmetic per method when ``cfg.merge_mode`` is None.
DEFAULT_MERGE_MODE = {"storm_tome": "sum", "tome": "mean", "mtr": "mean"}
MERGING_METHODS = tuple(DEFAULT_MERGE_MODE)
#: the budget solver must match the requested FLOPs cut within this many (fractional) points.
FLOPS_TOLERANCE = 0.01


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StormConfig:
    """Which reduction runs, where, and how hard. Stored as a plain dict in every backbone config.

    ``importance`` and ``merge_mode`` left at None mean "the method's own default" (see
    ``DEFAULT_IMPORTANCE`` / ``DEFAULT_MERGE_MODE``), so a baseline is faithful without extra settings.
    """

    method: str = "none"
    schedule: Optional[list[dict[str, Any]]] = None
    flops_ratio: Optional[float] = None
    window: Optional[int] = None
    similarity: str = "l1"
    importance: Optional[str] = None
    merge_mode: Optional[str] = None
    positions: Optional[list[list[int]]] = None
    seed: int = 0
    placement: Optional[str] = None

    @classmethod
    def from_any(cls, value: "StormConfig | dict | None") -> "StormConfig":
        if value is None:
            return cls()
        if isinstance(value, StormConfig):
            cfg = dataclasses.replace(value)
            cfg.validate()
            return cfg
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(
                    f"Unknown StormConfig field(s) {sorted(unknown)}; valid fields are "
                    f"{[f.name for f in dataclasses.fields(cls)]}."
                )
            cfg = cls(**value)
            cfg.validate()
            return cfg
        raise TypeError(f"storm must be a StormConfig, a dict or None, got {type(value).__name__}.")

    def replace(self, **changes: Any) -> "StormConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def enabled(self) -> bool:
        return self.method != "none" and (self.schedule is not None or self.flops_ratio is not None)

    def resolved_merge_mode(self) -> str:
        return self.merge_mode or DEFAULT_MERGE_MODE.get(self.method, "sum")

    def resolved_importance(self) -> str:
        return self.importance or DEFAULT_IMPORTANCE.get(self.method, "abs_mean")

    def resolved_window(self, window_defaults: Optional[Mapping[str, int]] = None) -> int:
        if self.window is not None:
            return int(self.window)
        if window_defaults and self.method in window_defaults:
            return int(window_defaults[self.method])
        return DEFAULT_WINDOWS.get(self.method, 5)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown reduction method {self.method!r}; choose one of {METHODS}.")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"Unknown similarity {self.similarity!r}; choose one of {SIMILARITIES}.")
        if self.importance is not None and self.importance not in IMPORTANCES:
            raise ValueError(f"Unknown importance {self.importance!r}; choose one of {IMPORTANCES} (or None).")
        if self.merge_mode is not None and self.merge_mode not in MERGE_MODES:
            raise ValueError(f"Unknown merge_mode {self.merge_mode!r}; choose one of {MERGE_MODES} (or None).")
        if self.placement is not None and self.placement not in PLACEMENTS:
            raise ValueError(f"Unknown placement {self.placement!r}; choose one of {PLACEMENTS} (or None).")
        if self.schedule is not None and self.flops_ratio is not None:
            raise ValueError("Give either an explicit `schedule` or a `flops_ratio`, not both.")
        if self.flops_ratio is not None and not (0.0 <= float(self.flops_ratio) < 1.0):
            raise ValueError(f"flops_ratio must lie in [0, 1), got {self.flops_ratio}.")
        if self.window is not None and (isinstance(self.window, bool) or int(self.window) < 1):
            raise ValueError(f"window must be a positive integer, got {self.window}.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")
        if self.schedule is not None:
            if not isinstance(self.schedule, (list, tuple)):
                raise ValueError("schedule must be a list of {'stage': s, 'block': b, 'size': [H, W]} dicts.")
            for entry in self.schedule:
                _schedule_entry(entry)
        if self.positions is not None:
            for p in self.positions:
                if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_nonneg_int(v) for v in p)):
                    raise ValueError(f"positions must be a list of [stage, block] pairs of integers, got {p!r}.")


def _is_nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _as_grid(size: Any) -> Grid:
    """An int or a pair of ints -> (H, W)."""
    if isinstance(size, (list, tuple)) and len(size) == 2:
        h, w = size
    elif isinstance(size, int):
        h = w = size
    else:
        raise ValueError(f"Expected a size as an int or [height, width], got {size!r}.")
    if isinstance(h, bool) or isinstance(w, bool) or int(h) != h or int(w) != w:
        raise ValueError(f"Sizes must be integers, got {size!r}.")
    return int(h), int(w)


def _schedule_entry(entry: Any) -> tuple[Position, Grid]:
    if not isinstance(entry, dict) or set(entry) != {"stage", "block", "size"}:
        raise ValueError(
            f"Each schedule entry must be {{'stage': s, 'block': b, 'size': [H', W']}}, got {entry!r}."
        )
    if not (_is_nonneg_int(entry["stage"]) and _is_nonneg_int(entry["block"])):
        raise ValueError(f"Schedule stage and block must be non-negative integers, got {entry!r}.")
    grid = _as_grid(entry["size"])
    if min(grid) < 1:
        raise ValueError(f"Schedule entry {entry!r} asks for a grid below 1x1; sizes must be >= 1.")
    return (entry["stage"], entry["block"]), grid


def target_problem(method: str, in_hw: Grid, out_hw: Grid) -> Optional[str]:
    """Why one step of ``method`` cannot take an ``in_hw`` grid to ``out_hw`` (None if it can)."""
    (h, w), (h2, w2) = in_hw, out_hw
    if h2 < 1 or w2 < 1:
        return f"a {h2}x{w2} target is below 1x1"
    if h2 > h or w2 > w:
        return (f"the target {h2}x{w2} is larger than the current {h}x{w} grid (reductions only shrink; "
                f"was the schedule written for a larger input? `flops_ratio` adapts to any input size)")
    if method == "storm_tome" and (2 * h2 < h or 2 * w2 < w):
        return (f"storm_tome merges every token at most once per step, so {h}x{w} can shrink to at least "
                f"{-(-h // 2)}x{-(-w // 2)}, not {h2}x{w2}; spread the reduction over more blocks")
    if method == "tome" and 2 * h2 * w2 < h * w:
        return (f"one bipartite ToMe round removes at most half of the {h * w} tokens, so {h2}x{w2} "
                f"is too small; spread the reduction over more blocks")
    return None


# ----------------------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReductionPlan:
    """Where every input token goes: ``dest[b, h*W + w]`` is its slot in the row-major ``out_hw`` map.

    Slot ``H'*W'`` means "dropped". Several tokens sharing a slot are merged (summed, or averaged by size).
    ``merges`` is False when every slot receives exactly one token, which lets ``apply`` use a gather.
    """

    dest: torch.Tensor
    in_hw: Grid
    out_hw: Grid
    merges: bool
    #: optional (B, H'*W', K): the flat input indices each slot sums, ascending, -1 = none. Plans whose slots
    #: hold few tokens (STORM(ToMe): at most 4) set it, so a sum-merge is K gathers instead of a scatter-add.
    groups: Optional[torch.Tensor] = None

    @property
    def num_out(self) -> int:
        return self.out_hw[0] * self.out_hw[1]

    def apply(
        self, x: torch.Tensor, sizes: Optional[torch.Tensor] = None, mode: str = "sum"
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Reduce ``x`` (B, H, W, C) -> (B, H', W', C); ``sizes`` (B, H, W) are summed along."""
        b, h, w, c = x.shape
        n = self.num_out
        flat = x.reshape(b, h * w, c)
        if self.merges and self.groups is not None and mode == "sum" and sizes is None:
            return sum_groups(flat, self.groups).reshape(b, *self.out_hw, c), None
        if not self.merges:
            source = self._sources()
            kernels = _reduction_kernels(flat) if flat.numel() >= KERNEL_GATHER_MIN_ELEMENTS else None
            if kernels is not None:  # a one-source gather-sum: the same copy at 2x torch.gather's bandwidth
                out = kernels.sum_groups_triton(flat, source.unsqueeze(-1))
            else:
                out = flat.gather(1, source.unsqueeze(-1).expand(b, n, c))
            new_sizes = None if sizes is None else sizes.reshape(b, h * w).gather(1, source)
        else:
            index = self.dest.unsqueeze(-1)
            new_sizes = None
            if mode == "mean" or sizes is not None:
                weights = sizes.reshape(b, h * w, 1) if sizes is not None else flat.new_ones(b, h * w, 1)
                new_sizes = weights.new_zeros(b, n + 1, 1).scatter_add_(1, index, weights)[:, :n]
                if mode == "mean":
                    flat = flat * weights.to(flat.dtype)
            out = flat.new_zeros(b, n + 1, c).scatter_add_(1, index.expand(b, h * w, c), flat)[:, :n]
            if mode == "mean":
                out = out / new_sizes.to(out.dtype)
        out = out.reshape(b, *self.out_hw, c)
        if new_sizes is not None:
            new_sizes = new_sizes.reshape(b, *self.out_hw)
        return out, new_sizes

    def _sources(self) -> torch.Tensor:
        """(B, H'*W') index of the single input token of every output slot (drop-only plans)."""
        b, length = self.dest.shape
        source = self.dest.new_zeros(b, self.num_out + 1)
        arange = torch.arange(length, device=self.dest.device).expand(b, length)
        return source.scatter_(1, self.dest, arange)[:, : self.num_out]


def sum_groups(flat: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(B, L, C) -> (B, N, C): every slot's sum of ``flat[b, groups[b, n, k]]`` over its valid k (index >= 0).

    Half-precision inputs accumulate in fp32 and round once. On CUDA the fused Triton kernel of
    ``reduction_triton.py`` does it in one pass when Triton is available; this is its reference.
    """
    kernels = _reduction_kernels(flat)
    if kernels is not None:
        return kernels.sum_groups_triton(flat, groups)
    b, _, c = flat.shape
    acc_dtype = _accumulation_dtype(flat.dtype)
    out = None
    for k in range(groups.shape[-1]):  # ascending sources: the order a sequential scatter-add sums in
        index = groups[..., k]
        taken = flat.gather(1, index.clamp(min=0).unsqueeze(-1).expand(b, index.shape[1], c)).to(acc_dtype)
        taken = torch.where((index >= 0).unsqueeze(-1), taken, taken.new_zeros(()))
        out = taken if out is None else out + taken
    return out.to(flat.dtype)


_kernels: Any = None
_kernels_tried = False
#: drop plans use the Triton gather only on maps this large: on small ones its Python launch (tens of us) costs
#: more than the GPU time it saves over one torch.gather launch (bench_reduction.py, H100).
KERNEL_GATHER_MIN_ELEMENTS = 1 << 24


def _reduction_kernels(x: torch.Tensor) -> Any:
    """The Triton module ``reduction_triton`` when ``x`` is a CUDA fp32/fp16/bf16 tensor and Triton imports;
    None otherwise, or with ``STORM_HF_REDUCTION_KERNEL=0`` (then the PyTorch references run)."""
    global _kernels, _kernels_tried
    if not x.is_cuda or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    if os.environ.get("STORM_HF_REDUCTION_KERNEL", "").strip().lower() in ("0", "false", "no", "off"):
        return None
    if not _kernels_tried:
        _kernels_tried = True
        try:  # named imports from the sibling module: how transformers finds the files a checkpoint needs
            from .reduction_triton import column_pair_scores, row_pair_scores, sum_groups_triton

            _kernels = types.SimpleNamespace(row_pair_scores=row_pair_scores, column_pair_scores=column_pair_scores,
                                             sum_groups_triton=sum_groups_triton)
        except Exception:  # ImportError, or triton present but broken: the references still work
            _kernels = None
    return _kernels


def _identity_plan(batch: int, hw: Grid, device: torch.device) -> ReductionPlan:
    dest = torch.arange(hw[0] * hw[1], device=device).expand(batch, -1)
    return ReductionPlan(dest, hw, hw, merges=False)


def _slots_from_mask(removed: torch.Tensor, drop_slot: Optional[int]) -> torch.Tensor:
    """Output slot of each token along the last axis: survivors keep their order and take consecutive
    slots; a removed token gets the slot of the next survivor (merged into it) or ``drop_slot``."""
    kept = (~removed).long()
    slots = kept.cumsum(-1) - kept
    return slots if drop_slot is None else slots.masked_fill(removed, drop_slot)


# ----------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------


def pair_similarity(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Similarity of matching rows of ``a`` and ``b`` (..., C) -> (...); larger = more alike.

    ``l1``/``l2`` are negative distances (l2 without the square root: same order); ``cosine`` uses STORM's
    ``x / (|x| + 1e-6)`` normalisation.
    """
    if kind == "l1":
        return -(a - b).abs_().sum(-1)
    if kind == "l2":
        return -(a - b).square_().sum(-1)
    if kind == "cosine":
        a = a / (a.norm(dim=-1, keepdim=True) + 1e-6)
        b = b / (b.norm(dim=-1, keepdim=True) + 1e-6)
        return (a * b).sum(-1)
    raise ValueError(f"Unknown similarity {kind!r}; choose one of {SIMILARITIES}.")


def token_importance(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token importance (..., C) -> (...) (EViT-style proxies: a vision SSM has no CLS attention)."""
    acc = _accumulation_dtype(x.dtype)  # the reductions upcast as they go: no fp32 copy of the map
    if kind == "abs_mean":
        return torch.linalg.vector_norm(x, 1, dim=-1, dtype=acc) / x.shape[-1]
    if kind == "mean":
        return x.mean(-1, dtype=acc)
    if kind == "l2":
        return torch.linalg.vector_norm(x, 2, dim=-1, dtype=acc) / math.sqrt(x.shape[-1])
    raise ValueError(f"Unknown importance {kind!r}; choose one of {IMPORTANCES}.")


# ----------------------------------------------------------------------------------------------------------
# STORM: windowed passes along rows, then columns
# ----------------------------------------------------------------------------------------------------------


def window_lengths(n: int, window: int) -> tuple[int, ...]:
    """Lengths of the consecutive non-overlapping windows covering ``n`` units (the last may be shorter)."""
    w = min(max(int(window), 1), n) if n else 1
    return tuple(min(w, n - start) for start in range(0, n, w))


@functools.lru_cache(maxsize=4096)
def window_budgets(n: int, budget: int, window: int) -> tuple[int, ...]:
    """Spread ``budget`` over the windows of ``n`` units in proportion to their length.

    Floor of ``budget * len / n`` first; the leftover units go one each to the windows with the largest
    remainders, the earlier window first on ties (STORM's ``_distribute_merges``, in exact integers).
    """
    if not 0 <= budget <= n:
        raise ValueError(f"Cannot take {budget} of {n} units.")
    lengths = window_lengths(n, window)
    counts = [budget * length // n for length in lengths]
    remainders = [budget * length % n for length in lengths]
    leftover = budget - sum(counts)
    for i in sorted(range(len(lengths)), key=lambda i: -remainders[i])[:leftover]:
        counts[i] += 1
    return tuple(counts)


def _select_in_windows(scores: torch.Tensor, quotas: Sequence[int], window: int) -> torch.Tensor:
    """(N, n) bool: the ``quotas[k]`` highest-scoring units of window k (ties: lower index first)."""
    rows, n = scores.shape
    w = min(window, n)
    num_windows = -(-n // w)
    pad = num_windows * w - n
    padded = F.pad(scores, (0, pad), value=float("-inf")) if pad else scores
    windows = padded.view(rows, num_windows, w)
    if w <= RANK_BY_COMPARISON:
        # rank = how many units of the window beat this one (higher score, or equal and earlier): one
        # broadcast comparison instead of a segmented sort, whose GPU radix sort dominated a whole step.
        a, b = windows.unsqueeze(-1), windows.unsqueeze(-2)
        rank = ((b > a) | ((b == a) & _earlier(w, scores.device))).sum(-1).view(rows, -1)[:, :n]
    else:
        order = windows.argsort(dim=-1, descending=True, stable=True)
        arange = torch.arange(w, device=scores.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(-1, order, arange).view(rows, -1)[:, :n]
    return rank < _unit_quotas(n, tuple(quotas), w, scores.device)


#: windows up to this many units are ranked by pairwise comparison (w*w work per window), longer ones sorted.
RANK_BY_COMPARISON = 32


@functools.lru_cache(maxsize=64)
def _earlier(w: int, device: torch.device) -> torch.Tensor:
    """(w, w) bool: [i, j] is True when unit j precedes unit i (the tie-break of a stable sort)."""
    return torch.ones(w, w, dtype=torch.bool).tril(-1).to(device)


@functools.lru_cache(maxsize=1024)
def _unit_quotas(n: int, quotas: tuple[int, ...], w: int, device: torch.device) -> torch.Tensor:
    """Each unit's window quota, cached per device: a fresh host-to-device copy per step would block."""
    return torch.tensor(quotas, device=device).repeat_interleave(w)[:n]


def pair_merge_slots(
    seq: torch.Tensor, budget: int, window: int, similarity: str, drop: bool
) -> torch.Tensor:
    """One STORM(ToMe) pass over sequences (N, L, C): slots (N, L) into L - ``budget`` outputs.

    Local pairs (2j, 2j+1); an odd last token has no partner. In each window of ``window`` pairs the
    window's share of ``budget`` most similar pairs merge: the even token joins its odd partner's slot.
    """
    rows, length, _ = seq.shape
    pairs = length // 2
    if budget == 0:
        return torch.arange(length, device=seq.device).expand(rows, length)
    scores = pair_similarity(seq[:, 0 : 2 * pairs : 2], seq[:, 1 : 2 * pairs : 2], similarity)
    return _pair_merge_slots_from_scores(scores, length, budget, window, drop)


def _pair_merge_slots_from_scores(scores: torch.Tensor, length: int, budget: int, window: int,
                                  drop: bool) -> torch.Tensor:
    """:func:`pair_merge_slots` given the similarity (N, L // 2) of every local pair."""
    rows, pairs = scores.shape
    if budget > pairs:
        raise ValueError(f"storm_tome can merge at most {pairs} pairs of a length-{length} line, not {budget}.")
    if budget == 0:
        return torch.arange(length, device=scores.device).expand(rows, length)
    merged = _select_in_windows(scores, window_budgets(pairs, budget, window), window)
    removed = torch.zeros(rows, length, dtype=torch.bool, device=scores.device)
    removed[:, 0 : 2 * pairs : 2] = merged
    return _slots_from_mask(removed, length - budget if drop else None)


def window_keep_slots(importance: torch.Tensor, budget: int, window: int) -> torch.Tensor:
    """One STORM(EViT) pass over scores (N, L): each window of ``window`` tokens drops its share of
    ``budget`` least important tokens; survivors keep their order. Slots (N, L); L - budget = dropped."""
    rows, length = importance.shape
    if not 0 <= budget < length:
        raise ValueError(f"storm_evit can drop at most {length - 1} tokens of a length-{length} line, not {budget}.")
    if budget == 0:
        return torch.arange(length, device=importance.device).expand(rows, length)
    drops = window_budgets(length, budget, window)
    keeps = [n - d for n, d in zip(window_lengths(length, window), drops)]
    kept = _select_in_windows(importance, keeps, window)
    return _slots_from_mask(~kept, length - budget)


def _width_plan(slots: torch.Tensor, in_hw: Grid, out_w: int, merges: bool) -> ReductionPlan:
    """Row slots (B, H, W) in [0, W'] (W' = dropped) -> a plan on the whole map."""
    h, w = in_hw
    rows = torch.arange(h, device=slots.device).view(1, h, 1)
    dest = torch.where(slots < out_w, rows * out_w + slots, h * out_w)
    return ReductionPlan(dest.reshape(slots.shape[0], h * w), in_hw, (h, out_w), merges)


def _compose(width_slots: torch.Tensor, height_slots: torch.Tensor, out_hw: Grid, merges: bool,
             in_hw: Grid) -> ReductionPlan:
    """Chain a row pass (slots (B, H, W) in [0, W']) and a column pass on its result (slots (B, W', H)
    in [0, H']) into one plan: token (h, w) -> row slot w' -> column slot h' of column w'."""
    out_h, out_w = out_hw
    alive = width_slots < out_w
    col = width_slots.clamp(max=out_w - 1)
    row = height_slots.transpose(1, 2).gather(2, col)  # (B, H, W): row slot of (h, w) in its column
    alive &= row < out_h
    dest = torch.where(alive, row * out_w + col, out_h * out_w)
    return ReductionPlan(dest.reshape(dest.shape[0], -1), in_hw, out_hw, merges)


def storm_plan(
    metric: torch.Tensor,
    out_hw: Grid,
    *,
    kind: str = "tome",
    window: int = 5,
    similarity: str = "l1",
    importance: str = "abs_mean",
    merge_mode: str = "sum",
    sizes: Optional[torch.Tensor] = None,
) -> tuple[ReductionPlan, torch.Tensor, torch.Tensor]:
    """STORM's two passes planned on ``metric`` (B, H, W, C): rows to W', then columns to H'.

    Returns the composed plan and the per-pass slots: rows (B, H, W) in [0, W'] and columns of the
    row-reduced map (B, W', H) in [0, H'] (the value W' / H' means dropped).
    """
    b, h, w, c = metric.shape
    out_h, out_w = out_hw
    metric = metric.detach()
    # On CUDA the pair similarities of both passes come from Triton kernels that read the 16-bit map directly
    kernels = _reduction_kernels(metric) if kind == "tome" and merge_mode != "mean" else None
    if kind == "evit":
        metric = token_importance(metric, importance).unsqueeze(-1)  # scores survive pure drops unchanged
    elif kernels is None:
        metric = _planning(metric)

    def line_slots(lines: torch.Tensor, budget: int) -> torch.Tensor:
        if kind == "tome":
            return pair_merge_slots(lines, budget, window, similarity, drop=merge_mode == "drop")
        return window_keep_slots(lines[..., 0], budget, window)

    merges = kind == "tome" and merge_mode != "drop"
    if kernels is not None and out_w < w:
        scores = kernels.row_pair_scores(metric, similarity).view(b * h, w // 2)
        width_slots = _pair_merge_slots_from_scores(scores, w, w - out_w, window, drop=not merges).view(b, h, w)
    else:
        width_slots = line_slots(metric.reshape(b * h, w, -1), w - out_w).view(b, h, w)
    last_w, count_w = _slot_runs(width_slots.view(b * h, w), out_w)
    if out_h == h:
        height_slots = torch.arange(h, device=metric.device).expand(b, out_w, h)
    elif merges and merge_mode == "mean":  # size-weighted means: the general plan arithmetic
        row_plan = _width_plan(width_slots, (h, w), out_w, merges)
        reduced, _ = row_plan.apply(metric, sizes, "mean")
        height_slots = line_slots(reduced.transpose(1, 2).reshape(b * out_w, h, -1), h - out_h).view(b, out_w, h)
    elif kind == "tome":
        # Column pairs (rows 2i, 2i+1) of the row-reduced map, whose slots each hold a run of <= 2 tokens: the
        # kernel sums the runs on the fly; the reference builds the map with two gathers and scores the pairs
        # where they lie (no transposed copy).
        if kernels is not None:
            scores = kernels.column_pair_scores(metric, last_w.view(b, h, out_w), count_w.view(b, h, out_w),
                                                similarity)
        else:
            reduced = _sum_runs(metric.reshape(b * h, w, -1), last_w, count_w).view(b, h, out_w, -1)
            pairs = h // 2
            scores = pair_similarity(reduced[:, 0 : 2 * pairs : 2], reduced[:, 1 : 2 * pairs : 2], similarity)
        height_slots = _pair_merge_slots_from_scores(scores.transpose(1, 2).reshape(b * out_w, h // 2), h, h - out_h,
                                                     window, drop=not merges).view(b, out_w, h)
    else:  # storm_evit: the row pass only drops, so the reduced scores are one gather
        reduced = _sum_runs(metric.reshape(b * h, w, -1), last_w, count_w).view(b, h, out_w, -1)
        height_slots = line_slots(reduced.transpose(1, 2).reshape(b * out_w, h, -1), h - out_h).view(b, out_w, h)
    plan = _compose(width_slots, height_slots, out_hw, merges, (h, w))
    if merges:
        plan = dataclasses.replace(plan, groups=_storm_groups(last_w, count_w, height_slots, (h, w), out_hw))
    return plan, width_slots, height_slots


def _slot_runs(slots: torch.Tensor, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass's slots (N, L) in [0, n_out] (n_out = dropped; a slot's tokens are consecutive) -> the last
    token of every slot (N, n_out) and how many tokens it holds (1, or 2 for a merged pair)."""
    rows, length = slots.shape
    position = torch.arange(length, device=slots.device).expand(rows, length)
    last = slots.new_full((rows, n_out + 1), -1).scatter_reduce_(1, slots, position, "amax")
    count = slots.new_zeros(rows, n_out + 1).scatter_add_(1, slots, torch.ones_like(position))
    return last[:, :n_out], count[:, :n_out]


def _sum_runs(seq: torch.Tensor, last: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(N, L, C) -> (N, n, C): each slot's run of 1-2 tokens summed (earlier token first, as a scatter-add)."""
    rows, n = last.shape
    c = seq.shape[-1]
    tail = seq.gather(1, last.unsqueeze(-1).expand(rows, n, c))
    head = seq.gather(1, (last - 1).clamp(min=0).unsqueeze(-1).expand(rows, n, c))
    return torch.where((count == 2).unsqueeze(-1), head + tail, tail)


def _storm_groups(last_w: torch.Tensor, count_w: torch.Tensor, height_slots: torch.Tensor, in_hw: Grid,
                  out_hw: Grid) -> torch.Tensor:
    """The (B, H'*W', 4) source groups of a composed STORM(ToMe) plan: slot (h', w') sums a run of <= 2 rows
    of its column, each row slot a run of <= 2 tokens; -1 marks an absent source. Ascending flat indices."""
    (h, w), (out_h, out_w) = in_hw, out_hw
    b = height_slots.shape[0]
    last_h, count_h = _slot_runs(height_slots.reshape(b * out_w, h), out_h)
    last_h = last_h.view(b, out_w, out_h).transpose(1, 2)  # (B, H', W'): last source row of each slot
    count_h = count_h.view(b, out_w, out_h).transpose(1, 2)
    last_w, count_w = last_w.view(b, h, out_w), count_w.view(b, h, out_w)
    sources = []
    for row, row_present in ((last_h - 1, count_h == 2), (last_h, None)):
        row = row.clamp(min=0)
        tail = row * w + last_w.gather(1, row)
        present = torch.ones_like(tail, dtype=torch.bool) if row_present is None else row_present
        sources += [torch.where(present & (count_w.gather(1, row) == 2), tail - 1, -1),
                    torch.where(present, tail, -1)]
    return torch.stack(sources, -1).reshape(b, out_h * out_w, 4)


# ----------------------------------------------------------------------------------------------------------
# Baselines over the flattened map (survivors stay in raster order and are repacked into H' x W')
# ----------------------------------------------------------------------------------------------------------


def _keep_top_plan(score: torch.Tensor, in_hw: Grid, out_hw: Grid) -> ReductionPlan:
    """Keep the H'*W' highest scores of (B, L) (ties: lower index), in raster order."""
    n = out_hw[0] * out_hw[1]
    order = score.argsort(dim=1, descending=True, stable=True)
    removed = torch.ones_like(score, dtype=torch.bool).scatter_(1, order[:, :n], False)
    return ReductionPlan(_slots_from_mask(removed, n), in_hw, out_hw, merges=False)


def _merge_into(removed: torch.Tensor, target: torch.Tensor, drop: bool, n_out: int) -> torch.Tensor:
    """Slots for a flattened map where each removed token joins the slot of ``target`` (B, L) or drops."""
    slots = _slots_from_mask(removed, n_out)
    if drop:
        return slots
    return torch.where(removed, slots.gather(1, target), slots)


def tome_plan(metric: torch.Tensor, in_hw: Grid, out_hw: Grid, drop: bool) -> ReductionPlan:
    """R-MeeTo's ordered bipartite merge on (B, L, C): even tokens find their most similar (cosine) odd
    token anywhere; the r best-matched even tokens merge into (or, with ``drop``, are replaced by) it."""
    b, length, _ = metric.shape
    n_out = out_hw[0] * out_hw[1]
    r = length - n_out
    if r > length // 2:
        raise ValueError(f"tome removes at most {length // 2} of {length} tokens per step, not {r}.")
    m = F.normalize(metric, dim=-1)
    scores = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)
    best = scores.argmax(-1)  # first maximum on ties
    best_score = scores.gather(-1, best.unsqueeze(-1)).squeeze(-1)
    sources = best_score.argsort(dim=-1, descending=True, stable=True)[:, :r]
    even_removed = torch.zeros_like(best_score, dtype=torch.bool).scatter_(1, sources, True)
    removed = torch.zeros(b, length, dtype=torch.bool, device=metric.device)
    removed[:, 0::2] = even_removed
    target = torch.zeros(b, length, dtype=torch.long, device=metric.device)
    target[:, 0::2] = 2 * best + 1
    return ReductionPlan(_merge_into(removed, target, drop, n_out), in_hw, out_hw, merges=not drop)


def mtr_plan(delta: torch.Tensor, metric: torch.Tensor, in_hw: Grid, out_hw: Grid, drop: bool) -> ReductionPlan:
    """MTR: rank tokens by Δ (B, L); the r least important are sources, the rest is split into a kept
    half (most important) and targets; each source joins its most similar (cosine on ``metric``) target."""
    b, length, c = metric.shape
    n_out = out_hw[0] * out_hw[1]
    r = length - n_out
    order = delta.argsort(dim=1, descending=True, stable=True)
    n_keep = n_out // 2
    targets, sources = order[:, n_keep:n_out], order[:, n_out:]
    m = F.normalize(metric, dim=-1)
    gather = lambda idx: m.gather(1, idx.unsqueeze(-1).expand(-1, -1, c))  # noqa: E731
    best = (gather(sources) @ gather(targets).transpose(1, 2)).argmax(-1)
    removed = torch.zeros(b, length, dtype=torch.bool, device=metric.device).scatter_(1, sources, True)
    target = torch.zeros(b, length, dtype=torch.long, device=metric.device)
    target.scatter_(1, sources, targets.gather(1, best))
    return ReductionPlan(_merge_into(removed, target, drop, n_out), in_hw, out_hw, merges=not drop and r > 0)


def random_plan(batch: int, in_hw: Grid, out_hw: Grid, seed: int, device: torch.device) -> ReductionPlan:
    """Uniform random keep of H'*W' tokens, the same for every sample, from a generator seeded by ``seed``."""
    slots = _random_slots(in_hw[0] * in_hw[1], out_hw[0] * out_hw[1], seed, device)
    return ReductionPlan(slots.expand(batch, -1), in_hw, out_hw, merges=False)


@functools.lru_cache(maxsize=256)
def _random_slots(length: int, n_out: int, seed: int, device: torch.device) -> torch.Tensor:
    perm = torch.randperm(length, generator=torch.Generator().manual_seed(seed))
    removed = torch.ones(length, dtype=torch.bool).index_fill_(0, perm[:n_out], False)
    return _slots_from_mask(removed, n_out).to(device)


# ----------------------------------------------------------------------------------------------------------
# The reduction step
# ----------------------------------------------------------------------------------------------------------


def _planning(signal: torch.Tensor) -> torch.Tensor:
    """A detached planning signal in at least fp32, so half-precision ties do not decide the plan."""
    return signal.detach().to(_accumulation_dtype(signal.dtype))


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit floats, else ``dtype``: what sums and scores of a map accumulate in."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_step(cfg: StormConfig, residual: torch.Tensor, branch: torch.Tensor, out_hw: Grid) -> None:
    if residual.dim() != 4:
        raise ValueError(f"reduce_tokens expects channels-last maps (B, H, W, C), got shape {tuple(residual.shape)}.")
    if branch.shape != residual.shape:
        raise ValueError(
            f"residual {tuple(residual.shape)} and branch {tuple(branch.shape)} must have the same shape: "
            "reduce them at the block where the mixer output is added to the residual."
        )
    problem = target_problem(cfg.method, tuple(residual.shape[1:3]), out_hw)
    if problem:
        raise ValueError(f"Cannot reduce with {cfg.method}: {problem}.")


def plan_reduction(
    cfg: StormConfig,
    residual: torch.Tensor,
    branch: torch.Tensor,
    out_hw: Grid,
    *,
    sizes: Optional[torch.Tensor] = None,
    extras: Optional[Mapping[str, torch.Tensor]] = None,
    window_defaults: Optional[Mapping[str, int]] = None,
) -> ReductionPlan:
    """The plan of one step of ``cfg.method`` (see the module docstring for each method's signal)."""
    out_hw = _as_grid(out_hw)
    _check_step(cfg, residual, branch, out_hw)
    b, h, w, c = residual.shape
    in_hw = (h, w)
    if cfg.method == "none" or out_hw == in_hw:
        return _identity_plan(b, in_hw, residual.device)
    extras = extras or {}
    method = cfg.method
    # importance scores reduce in fp32 themselves; similarities need an fp32 copy of the map (only those)
    metric = _planning(residual) if method == "mtr" else residual.detach()  # storm_plan upcasts where it must
    if method in ("storm_tome", "storm_evit"):
        return storm_plan(
            metric, out_hw, kind=method[6:], window=cfg.resolved_window(window_defaults),
            similarity=cfg.similarity, importance=cfg.resolved_importance(),
            merge_mode=cfg.resolved_merge_mode(), sizes=sizes,
        )[0]
    if method == "evit":
        return _keep_top_plan(token_importance(metric, cfg.resolved_importance()).view(b, -1), in_hw, out_hw)
    if method == "random":
        return random_plan(b, in_hw, out_hw, cfg.seed, residual.device)
    if method == "top":
        signal = extras.get("branch", branch).detach()
        if signal.shape[:3] != residual.shape[:3]:
            raise ValueError(f"extras['branch'] must be (B, H, W, D) like the residual, got {tuple(signal.shape)}.")
        score = signal.clamp(min=0).sum(-1, dtype=_accumulation_dtype(signal.dtype))  # no fp32 copy of the map
        return _keep_top_plan(score.reshape(b, -1), in_hw, out_hw)
    drop = cfg.resolved_merge_mode() == "drop"
    if method == "tome":
        return tome_plan(_planning(branch).reshape(b, h * w, c), in_hw, out_hw, drop)
    if method == "mtr":
        delta = extras.get("delta")
        if delta is None or tuple(delta.shape) != (b, h, w):
            raise ValueError(
                f"mtr needs extras['delta'] of shape {(b, h, w)} (the scan's Δ averaged over channels and "
                f"summed over scan directions); got {None if delta is None else tuple(delta.shape)}."
            )
        return mtr_plan(_planning(delta).reshape(b, -1), metric.reshape(b, h * w, c), in_hw, out_hw, drop)
    raise ValueError(f"Unknown reduction method {method!r}; choose one of {METHODS}.")


def reduce_tokens(
    cfg: StormConfig,
    residual: torch.Tensor,
    branch: torch.Tensor,
    out_hw: Grid,
    *,
    sizes: Optional[torch.Tensor] = None,
    extras: Optional[dict[str, torch.Tensor]] = None,
    window_defaults: Optional[Mapping[str, int]] = None,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Reduce residual and branch (B, H, W, C) to (B, H', W', C) with one plan computed from the residual.

    ``sizes`` (B, H, W): how many original tokens each token stands for; returned reduced whenever given
    or when merging by ``mean`` (then None in means all ones). ``window_defaults`` lets a backbone set its
    own STORM window per method (PlainMamba: ``{"storm_evit": 20}``); ``cfg.window`` wins over it.
    """
    out_hw = _as_grid(out_hw)
    _check_step(cfg, residual, branch, out_hw)
    if tuple(residual.shape[1:3]) == out_hw:
        return residual, branch, sizes
    if cfg.method == "none":
        raise ValueError(f"Reduction is off (method 'none') but a {out_hw[0]}x{out_hw[1]} grid was requested.")
    plan = plan_reduction(cfg, residual, branch, out_hw, sizes=sizes, extras=extras, window_defaults=window_defaults)
    mode = "mean" if cfg.resolved_merge_mode() == "mean" else "sum"
    new_residual, new_sizes = plan.apply(residual, sizes, mode)
    new_branch, _ = plan.apply(branch, sizes, mode)
    return new_residual, new_branch, new_sizes


def reduction_overhead_flops(cfg: StormConfig, in_hw: Grid, out_hw: Grid, channels: int) -> int:
    """Multiply-adds spent *planning* one step (fvcore style; gathers, adds and sorts are free).

    storm_tome: one similarity per local pair of each pass (x2 for cosine norms); storm_evit, evit, top:
    one score per token; tome: normalisation + the even x odd cosine matrix; mtr: normalisation + the
    source x target matrix; random: nothing.
    """
    (h, w), (h2, w2) = in_hw, out_hw
    if cfg.method == "none" or (h, w) == (h2, w2):
        return 0
    c, length, n_out = channels, h * w, h2 * w2
    if cfg.method == "storm_tome":
        pairs = (h * (w // 2) if w2 < w else 0) + (w2 * (h // 2) if h2 < h else 0)
        return pairs * c * (2 if cfg.similarity == "cosine" else 1)
    if cfg.method in ("storm_evit", "evit", "top"):
        return length * c
    if cfg.method == "tome":
        return length * c + ((length + 1) // 2) * (length // 2) * c
    if cfg.method == "mtr":
        return length * c + (length - n_out) * (n_out - n_out // 2) * c
    return 0


# ----------------------------------------------------------------------------------------------------------
# Schedules, the FLOPs budget solver and the model mixin
# ----------------------------------------------------------------------------------------------------------


def _scaled(grid: Grid, factor: float) -> Grid:
    return tuple(max(1, math.floor(side * factor + 0.5)) for side in grid)  # type: ignore[return-value]


def _feasible(method: str, incoming: Grid, target: Grid) -> Grid:
    """The nearest target at or above ``target`` that one step of ``method`` can reach from ``incoming``."""
    h, w = (min(max(t, 1), i) for t, i in zip(target, incoming))
    if method == "storm_tome":
        h, w = max(h, -(-incoming[0] // 2)), max(w, -(-incoming[1] // 2))
    if method == "tome":  # at least half the tokens survive; square grids stay square
        square = incoming[0] == incoming[1]
        while 2 * h * w < incoming[0] * incoming[1]:
            if square:
                h = w = max(h, w) + 1
            elif (h <= w or w == incoming[1]) and h < incoming[0]:
                h += 1
            else:
                w += 1
    return h, w


#: "even" placement: (least fraction of a side one step keeps, proportional rows/columns only), tried in order.
EVEN_LEVELS = ((0.75, True), (0.5, False))
#: "even" placement: harm weight of a step by role (before a downsampling, inside a stage, in the last stage).
EVEN_WEIGHTS = {"exit": 1.0, "inner": 2.0, "last": 3.0}
#: "even" placement: search nodes per level before the best schedule found so far is taken (keeps 224-px
#: backbones with 15-20-block stages fast; the search order is fixed, so the result stays deterministic).
EVEN_NODE_LIMIT = 20000


def resolved_placement(cfg: StormConfig, natural: Mapping[Position, Grid]) -> str:
    """``cfg.placement``, or the default: "even" for a hierarchical backbone at its default positions, else
    "legacy" (explicit ``positions`` -- e.g. the investigation's solver rows -- and single-stage backbones,
    whose default layers are STORM's own, keep the original solver)."""
    if cfg.placement is not None:
        return cfg.placement
    if cfg.positions is not None or len({s for s, _ in natural}) < 2:
        return "legacy"
    return "even"


def even_roles(natural: Mapping[Position, Grid], positions: Optional[Sequence[Position]] = None) -> dict[Position, str]:
    """Where the "even" placement may reduce, and each position's role.

    Default positions: per stage but the last, its odd blocks before the last one ("inner") and its last
    block ("exit": its output feeds the downsampling); in the last stage, which no downsampling follows, only
    block 0 ("last": a hard cut there is what hurt most, and its first block saves the most per token).
    Given ``positions``, each keeps the role its place implies.
    """
    stages = sorted({s for s, _ in natural})
    last_block = {s: max(b for t, b in natural if t == s) for s in stages}

    def role(pos: Position) -> str:
        if pos[0] == stages[-1]:
            return "last"
        return "exit" if pos[1] == last_block[pos[0]] else "inner"

    if positions is None:
        positions = [(s, b) for s in stages[:-1] for b in range(last_block[s] + 1)
                     if b == last_block[s] or b % 2 == 1]
        if len(stages) > 1:
            positions.append((stages[-1], 0))
    return {tuple(p): role(tuple(p)) for p in sorted(set(map(tuple, positions)))}  # type: ignore[misc]


def even_weights(natural: Mapping[Position, Grid], roles: Mapping[Position, str]) -> dict[Position, float]:
    """Harm weight of a step at each position: its role's ``EVEN_WEIGHTS`` times how many times coarser its
    stage's natural grid is than the first stage's (per side), since a token there stands for more image."""
    first = natural[min(natural)]
    return {p: EVEN_WEIGHTS[r] * max(1.0, math.sqrt((first[0] * first[1]) / (natural[p][0] * natural[p][1])))
            for p, r in roles.items()}


def _side_options(side: int, multiple: int, keep: float) -> list[int]:
    """Reduced lengths for one side, mildest first: multiples of ``multiple`` keeping >= ``keep`` of it."""
    lowest = max(1, math.ceil(keep * side - 1e-9))
    return [v for v in range(side - 1, lowest - 1, -1) if v % multiple == 0]


def even_targets(method: str, incoming: Grid, multiple: Grid, role: str, keep: float,
                 proportional: bool) -> list[Grid]:
    """Targets one "even" step may take ``incoming`` to, mildest first (see :class:`StormMixin`).

    Each side either stays or becomes a multiple of ``multiple`` keeping at least ``keep`` of it; an inner
    step moves each side by at most one such unit; ``proportional`` pairs the i-th option of both sides (a
    square grid stays square). Targets one step of ``method`` cannot reach are left out.
    """
    if role == "last":  # no downsampling follows: never a hard cut there
        keep = max(keep, 0.75)
    rows, cols = (_side_options(n, k, keep) for n, k in zip(incoming, multiple))
    if role == "inner":
        rows, cols = rows[:1], cols[:1]
    h, w = incoming
    if proportional:
        depth = max(len(rows), len(cols))
        pairs = [(rows[i] if i < len(rows) else (rows[-1] if rows else h),
                  cols[i] if i < len(cols) else (cols[-1] if cols else w)) for i in range(depth)]
    else:
        pairs = [(a, b) for a in [h, *rows] for b in [w, *cols] if (a, b) != (h, w)]
    return [t for t in dict.fromkeys(pairs) if target_problem(method, incoming, t) is None]


def _least_harm_schedule(
    roles: Mapping[Position, str],
    weights: Mapping[Position, float],
    ratio: float,
    cut: Callable[[Mapping[Position, Grid]], float],
    grids_for: Callable[[Mapping[Position, Grid]], Mapping[Position, Grid]],
    targets: Callable[[Position, Grid, str], list[Grid]],
) -> tuple[Optional[dict[Position, Grid]], Optional[float]]:
    """Depth-first search over the positions in order (no step first, then mildest targets first).

    Returns the least-harm schedule whose cut lies within ``FLOPS_TOLERANCE`` of ``ratio`` (ties: nearer cut,
    then the smaller sorted schedule) and the cut of the nearest complete schedule seen. Branches whose cut
    already exceeds the band are cut off (later steps only add to it), as are those already more harmful
    than the best found.
    """
    order = sorted(roles)
    best: Optional[tuple[float, float, tuple, dict[Position, Grid]]] = None
    nearest: Optional[float] = None
    nodes = 0

    def visit(i: int, schedule: dict[Position, Grid], harm: float) -> None:
        nonlocal best, nearest, nodes
        nodes += 1
        achieved = cut(schedule)
        if achieved > ratio + FLOPS_TOLERANCE or nodes > EVEN_NODE_LIMIT:
            if nearest is None or abs(achieved - ratio) < abs(nearest - ratio):
                nearest = achieved
            return
        if best is not None and harm > best[0] + 1e-12:
            return
        if i == len(order):
            if nearest is None or abs(achieved - ratio) < abs(nearest - ratio):
                nearest = achieved
            if abs(achieved - ratio) <= FLOPS_TOLERANCE:
                key = (round(harm, 12), abs(achieved - ratio), tuple(sorted(schedule.items())), schedule)
                if best is None or key[:3] < best[:3]:
                    best = key
            return
        pos = order[i]
        visit(i + 1, schedule, harm)
        incoming = grids_for(schedule)[pos]
        for target in targets(pos, incoming, roles[pos]):
            removed = 1.0 - (target[0] * target[1]) / (incoming[0] * incoming[1])
            visit(i + 1, {**schedule, pos: target}, harm + weights[pos] * removed ** 2)

    visit(0, {}, 0.0)
    return (None if best is None else dict(best[3])), nearest


class StormMixin:
    """Reduction controls shared by every backbone's PreTrainedModel.

    A backbone implements ``_natural_grids(image_size) -> {(stage, block): (H, W)}`` (the unreduced grid at
    every block input, for an ``(H, W)`` image) and ``_flops(image_size, schedule) -> FlopsReport`` (needs
    ``.total``). Optional hooks:

    * ``_default_storm_positions() -> list[(stage, block)]``: where ``flops_ratio`` may reduce when
      ``cfg.positions`` is None. Without it: odd blocks of every stage but the last (STORM's "auto" rule);
      for single-stage backbones, odd blocks but the last one.
    * ``_downsample_grid(grid, stage) -> grid``: the grid entering ``stage + 1`` given the grid leaving
      ``stage``. Without it the stride is read off the natural grids and sides round up (``ceil(H / s)``,
      a stride-s convolution with padding, as VMamba/GroupMamba downsample).
    * ``_storm_channels((stage, block)) -> int``: channels at a block, for the overhead FLOPs. Without it:
      ``config.dims[stage]`` / ``config.hidden_sizes[stage]`` / ``config.hidden_size`` / ``config.embed_dim``.
    * ``_storm_window_defaults``: a dict passed to :func:`reduce_tokens` as ``window_defaults``.

    Budget solver (``flops_ratio = r``), two placements (``cfg.placement``; None picks "even" for a
    hierarchical backbone at its default positions, "legacy" for explicit ``positions`` or a single stage):

    * ``"even"`` (downsampling-aware; see :func:`even_roles` and ``docs/storm_cifar10_investigation.md``):
      reductions go at the last block of every stage but the last ("exit", right before a downsampling),
      at the odd blocks before it ("inner") and at the last stage's first block ("last"). A step in a stage
      followed by a stride-k downsampling targets multiples of k (when the natural grid there is one), so
      the downsampling stays exact; an inner step removes at most one such unit per side; every step keeps at
      least 3/4 of each side (1/2 if nothing else reaches r). Among the schedules within one point of r, the
      one with the least "harm" sum(w * removed_token_fraction^2) wins (w = 1 exit, 2 inner, 3 last stage,
      times how much coarser the stage's grid is than the first stage's, per side: mild steps spread out,
      spent first where they feed a downsampling and where the grid is finest), then the nearest cut, then the
      smallest schedule in sorted order -- deterministic. Square (proportional) steps are tried before
      independent row/column steps, mild caps before hard ones; no schedule within a point is an error.
    * ``"legacy"`` (the original rule): for a common factor f = 1, 0.9975, ..., 0.5, every position shrinks
      its incoming grid to ``round(f * side)`` (clamped to what one step of the method can do); the schedule
      whose FLOPs cut is closest to r wins (largest f on ties). If it misses r by more than half a point,
      single positions are nudged by one row/column at a time (greedy, positions in order, best move first)
      while that brings it closer; more than one point off at the end is an error.
    """

    def set_storm(self, storm: "StormConfig | dict | None" = None, **overrides: Any):
        base = StormConfig.from_any(storm if storm is not None else self.config.storm)
        self.config.storm = base.replace(**overrides).to_dict()
        return self

    @property
    def storm_config(self) -> StormConfig:
        return StormConfig.from_any(self.config.storm)

    def storm_schedule(self, image_size: Grid) -> dict[Position, Grid]:
        """``{(stage, block): (H', W')}``: the grid after each reducing block's mixer, for this input size.

        A task model (classifier) asks its backbone, which solves and caches the schedule its forward runs:
        solving here with the head's FLOPs counted could pick another schedule than the one that runs.
        """
        backbone = getattr(self, "base_model", self)
        if backbone is not self and isinstance(backbone, StormMixin):
            return backbone.storm_schedule(image_size)
        cfg = self.storm_config
        size = _as_grid(image_size)
        if not cfg.enabled:
            return {}
        key = (json.dumps(cfg.to_dict(), sort_keys=True), size)
        cache = self.__dict__.setdefault("_storm_schedule_cache", {})
        if key not in cache:
            self._check_propagation(size)
            if cfg.schedule is not None:
                cache[key] = self._explicit_schedule(cfg, size)
            else:
                cache[key] = self._solve_schedule(cfg, size)
        return dict(cache[key])

    def count_flops(self, image_size: Optional[Grid] = None):
        """The backbone's FLOPs report at ``image_size`` (default ``config.image_size``) under the schedule."""
        size = self._storm_image_size(image_size)
        return self._flops(size, self.storm_schedule(size))

    def storm_overhead_flops(self, image_size: Optional[Grid] = None) -> int:
        """FLOPs the reduction itself spends planning (similarities/scores), not in ``count_flops``."""
        size = self._storm_image_size(image_size)
        cfg = self.storm_config
        schedule = self.storm_schedule(size)
        grids = self.storm_grids(size, schedule)
        return sum(reduction_overhead_flops(cfg, grids[p], t, self._channels_at(p)) for p, t in schedule.items())

    def storm_grids(self, image_size: Grid, schedule: Optional[Mapping[Position, Grid]] = None) -> dict[Position, Grid]:
        """The grid at every block input when ``schedule`` (default: the configured one) runs."""
        size = _as_grid(image_size)
        schedule = self.storm_schedule(size) if schedule is None else schedule
        return self._propagate(size, lambda pos, incoming: schedule.get(pos))[0]

    # -- internals ------------------------------------------------------------------------------------------

    def _storm_image_size(self, image_size: Optional[Grid]) -> Grid:
        if image_size is None:
            image_size = getattr(self.config, "image_size", None)
            if image_size is None:
                raise ValueError("Pass image_size: the config has no `image_size`.")
        return _as_grid(image_size)

    def _channels_at(self, position: Position) -> int:
        hook = getattr(self, "_storm_channels", None)
        if hook is not None:
            return int(hook(position))
        for name in ("dims", "hidden_sizes"):
            value = getattr(self.config, name, None)
            if isinstance(value, (list, tuple)):
                return int(value[position[0]])
        for name in ("hidden_size", "embed_dim"):
            value = getattr(self.config, name, None)
            if isinstance(value, int):
                return value
        raise NotImplementedError("Implement `_storm_channels(position)` to count the reduction's overhead FLOPs.")

    def _propagate(
        self, size: Grid, rule: Callable[[Position, Grid], Optional[Grid]]
    ) -> tuple[dict[Position, Grid], dict[Position, Grid]]:
        """Walk the blocks in order; ``rule(position, incoming)`` gives the target grid there (or None).

        Returns the grid at every block input and the effective schedule (targets that change the grid).
        Reductions carry to later blocks of the stage and through the downsampling into later stages.
        """
        natural = self._natural_grids(size)
        grids: dict[Position, Grid] = {}
        schedule: dict[Position, Grid] = {}
        current: Optional[Grid] = None
        stage: Optional[int] = None
        last_natural: Optional[Grid] = None
        for pos in sorted(natural):
            if pos[0] != stage:
                current = natural[pos] if stage is None else self._next_stage_grid(current, stage, last_natural, natural[pos])
                stage = pos[0]
            grids[pos] = current
            target = rule(pos, current)
            if target is not None and tuple(target) != current:
                schedule[pos] = current = tuple(target)  # type: ignore[assignment]
            last_natural = natural[pos]
        return grids, schedule

    def _next_stage_grid(self, grid: Grid, stage: int, natural_out: Grid, natural_in: Grid) -> Grid:
        hook = getattr(self, "_downsample_grid", None)
        if hook is not None:
            return tuple(hook(grid, stage))  # type: ignore[return-value]
        strides = [max(1, round(o / i)) for o, i in zip(natural_out, natural_in)]
        return tuple(-(-g // s) for g, s in zip(grid, strides))  # type: ignore[return-value]

    def _check_propagation(self, size: Grid) -> None:
        natural = self._natural_grids(size)
        grids, _ = self._propagate(size, lambda pos, incoming: None)
        if grids != natural:
            raise NotImplementedError(
                f"{type(self).__name__}: the grids between stages could not be inferred from _natural_grids "
                f"(got {grids}, expected {natural}); implement `_downsample_grid(grid, stage)`."
            )

    def _explicit_schedule(self, cfg: StormConfig, size: Grid) -> dict[Position, Grid]:
        natural = self._natural_grids(size)
        wanted: dict[Position, Grid] = {}
        for entry in cfg.schedule or []:
            pos, grid = _schedule_entry(entry)
            if pos not in natural:
                raise ValueError(f"Schedule position {pos} does not exist; valid (stage, block): {sorted(natural)}.")
            if pos in wanted:
                raise ValueError(f"Schedule position {pos} appears twice.")
            wanted[pos] = grid

        def rule(pos: Position, incoming: Grid) -> Optional[Grid]:
            if pos not in wanted:
                return None
            problem = target_problem(cfg.method, incoming, wanted[pos])
            if problem:
                raise ValueError(f"Schedule entry {pos} for a {size[0]}x{size[1]} input: {problem}.")
            return wanted[pos]

        return self._propagate(size, rule)[1]

    def _storm_positions(self, cfg: StormConfig, natural: Mapping[Position, Grid]) -> list[Position]:
        if cfg.positions is not None:
            positions = [tuple(p) for p in cfg.positions]
        elif hasattr(self, "_default_storm_positions"):
            positions = [tuple(p) for p in self._default_storm_positions()]
        else:
            stages = sorted({s for s, _ in natural})
            last = {s: max(b for t, b in natural if t == s) for s in stages}
            reducible = stages[:-1] if len(stages) > 1 else stages
            positions = [(s, b) for s, b in sorted(natural) if s in reducible and b % 2 == 1
                         and (len(stages) > 1 or b != last[s])]
        for p in positions:
            if p not in natural:
                raise ValueError(f"Position {p} is beyond the model's depth; valid (stage, block): {sorted(natural)}.")
        return sorted(set(positions))  # type: ignore[arg-type]

    def _solve_schedule(self, cfg: StormConfig, size: Grid) -> dict[Position, Grid]:
        ratio = float(cfg.flops_ratio or 0.0)
        if ratio == 0.0:
            return {}
        natural = self._natural_grids(size)
        if resolved_placement(cfg, natural) == "even":
            return self._solve_even(cfg, size, natural, ratio)
        return self._solve_legacy(cfg, size, natural, ratio)

    def _flops_cut(self, size: Grid) -> Callable[[Mapping[Position, Grid]], float]:
        """A memoised ``schedule -> fractional FLOPs cut`` for one input size."""
        base = _total(self._flops(size, {}))
        seen: dict[tuple, float] = {}

        def cut(schedule: Mapping[Position, Grid]) -> float:
            key = tuple(sorted(schedule.items()))
            if key not in seen:
                seen[key] = 1.0 - _total(self._flops(size, dict(schedule))) / base
            return seen[key]

        return cut

    def _solve_even(self, cfg: StormConfig, size: Grid, natural: Mapping[Position, Grid],
                    ratio: float) -> dict[Position, Grid]:
        """The "even" placement: least-harm schedule within one point of ``ratio`` (see the class docstring)."""
        if cfg.positions is not None or len({s for s, _ in natural}) < 2:
            roles = even_roles(natural, self._storm_positions(cfg, natural))
        else:
            roles = even_roles(natural)
        if not roles:
            raise ValueError("No positions to reduce at: set `positions` in the storm config.")
        multiples = self._stage_multiples(size, natural)
        weights = even_weights(natural, roles)
        cut = self._flops_cut(size)
        closest: Optional[float] = None
        for keep, proportional in EVEN_LEVELS:
            found, nearest = _least_harm_schedule(
                roles, weights, ratio, cut, lambda sched: self.storm_grids(size, sched),
                lambda pos, incoming, role: even_targets(cfg.method, incoming, multiples[pos[0]], role, keep,
                                                         proportional))
            if found is not None:
                return found
            if nearest is not None and (closest is None or abs(nearest - ratio) < abs(closest - ratio)):
                closest = nearest
        where = ", ".join(f"{p}:{r}" for p, r in sorted(roles.items()))
        raise ValueError(
            f"Cannot cut FLOPs by {ratio:.1%} (within +-{FLOPS_TOLERANCE:.0%}) with {cfg.method} under the 'even' "
            f"placement ({where}) for a {size[0]}x{size[1]} input; the closest schedule cuts "
            f"{(closest or 0.0):.1%}. Choose a ratio nearer to that, set `positions`, or use placement='legacy'."
        )

    def _stage_multiples(self, size: Grid, natural: Mapping[Position, Grid]) -> dict[int, Grid]:
        """Per stage, what every reduced side must be a multiple of so that the following downsampling stays
        exact: its stride, where the stage's natural side is itself a multiple of it; 1 otherwise."""
        stages = sorted({s for s, _ in natural})
        out: dict[int, Grid] = {s: (1, 1) for s in stages}
        for s, nxt in zip(stages, stages[1:]):
            last = natural[(s, max(b for t, b in natural if t == s))]
            first = natural[(nxt, min(b for t, b in natural if t == nxt))]
            strides = [max(1, round(o / i)) for o, i in zip(last, first)]
            out[s] = tuple(k if side % k == 0 else 1 for k, side in zip(strides, last))  # type: ignore[assignment]
        return out

    def _solve_legacy(self, cfg: StormConfig, size: Grid, natural: Mapping[Position, Grid],
                      ratio: float) -> dict[Position, Grid]:
        """The original common-factor solver (``placement="legacy"``), unchanged."""
        positions = self._storm_positions(cfg, natural)
        if not positions:
            raise ValueError("No positions to reduce at: set `positions` in the storm config.")
        cut = self._flops_cut(size)

        def build(targets: Callable[[Position, Grid], Optional[Grid]]) -> dict[Position, Grid]:
            def rule(pos: Position, incoming: Grid) -> Optional[Grid]:
                t = targets(pos, incoming) if pos in positions else None
                return None if t is None else _feasible(cfg.method, incoming, t)
            return self._propagate(size, rule)[1]

        best: Optional[dict[Position, Grid]] = None
        for k in range(201):
            candidate = build(lambda pos, incoming, f=1.0 - k / 400: _scaled(incoming, f))
            if best is None or abs(cut(candidate) - ratio) < abs(cut(best) - ratio):
                best = candidate
        assert best is not None
        for _ in range(4 * len(positions) + 16):
            if abs(cut(best) - ratio) <= FLOPS_TOLERANCE / 2:  # aim for half a point, require one
                break
            current = best
            moves = []
            for p in positions:
                for step in (-1, 1):
                    def targets(pos, incoming, p=p, step=step, current=current):
                        if pos == p:
                            base_grid = current.get(p, incoming)
                            return (base_grid[0] + step, base_grid[1] + step)
                        old = current.get(pos)
                        return None if old is None else (min(old[0], incoming[0]), min(old[1], incoming[1]))
                    moves.append(build(targets))
            nearest = min(moves, key=lambda s: abs(cut(s) - ratio))
            if abs(cut(nearest) - ratio) >= abs(cut(best) - ratio):
                break
            best = nearest
        achieved = cut(best)
        if abs(achieved - ratio) > FLOPS_TOLERANCE:
            raise ValueError(
                f"Cannot cut FLOPs by {ratio:.1%} (within +-{FLOPS_TOLERANCE:.0%}) with {cfg.method} at positions "
                f"{positions} for a {size[0]}x{size[1]} input; the closest schedule cuts {achieved:.1%}. "
                "Choose a ratio nearer to that, or add positions (`positions`)."
            )
        return best


def _total(report: Any) -> float:
    return float(getattr(report, "total", report))
