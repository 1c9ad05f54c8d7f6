"""The Mamba-1 selective scan shared by every backbone, and the one place that picks how it runs.

Recurrence per (batch b, channel c, state n), with h₋₁ = 0:

    Δ_t = softplus(δ_t + bias)          (if ``delta_softplus``; threshold 20 like torch)
    h_t = exp(Δ_t·A) · h_{t-1} + Δ_t·B_t·u_t
    y_t = Σ_n C_t·h_t + D·u_t,  then  y_t ← y_t · silu(z_t)

Three implementations:

- :func:`selective_scan_reference` — sequential over L, vectorised over (batch, channel, state).
  The "plain sequential scan" every speed-up is measured against.
- :func:`selective_scan_chunked` — the fast CPU path. The sequence is cut into chunks of T steps and
  laid out time-major as (T, n_chunks, ...), so one Python step advances *every* chunk at once:
  T steps build each chunk's local prefix (running decay product and state), the chunk-end states are
  carried across chunks by the same scheme recursively, and one fused multiply-add adds the carried
  state. Decays are only ever *multiplied* (each factor exp(Δ·A) ≤ 1), never formed as exp of
  differences of cumulative sums, so no overflow, no cancellation, and any L or Δ is safe; the
  arithmetic is the reference's up to the order of fp32 rounding.
- ``selective_scan_triton`` (CUDA, in ``selective_scan_triton.py``), imported lazily.

:func:`selective_scan` dispatches: an explicit ``backend`` argument wins, then :func:`scan_backend`
(a context manager), then the ``STORM_HF_SCAN_BACKEND`` environment variable, then the automatic
choice (Triton for CUDA tensors when it imports, else chunked).

:func:`ordered_selective_scan` runs K scan orders (VMamba's cross-scan, PlainMamba's zig-zag paths)
over one raster-ordered input and returns their sum in raster order. On Triton the kernel reads
each direction's order by index and accumulates the merged output itself (no permuted copies); the
other backends run :func:`ordered_selective_scan_reference` (gather, :func:`selective_scan`,
scatter-sum). Models take that path only for inference, only where it resolves to Triton and where it
measured faster (:func:`ordered_scan_enabled`: PlainMamba yes, VMamba no; ``STORM_HF_ORDERED_SCAN=1``/``0``
overrides), so CPU results and training stay those of the materialised code.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

BACKENDS = ("reference", "chunked", "triton")
ENV_VAR = "STORM_HF_SCAN_BACKEND"

_state = threading.local()
_triton_fn = None
_triton_max_state: Optional[int] = None
_triton_error: Optional[BaseException] = None
_triton_tried = False


# --------------------------------------------------------------------------------------------------
# input checking and the parts shared by both PyTorch paths
# --------------------------------------------------------------------------------------------------


def _shape_error(name: str, expected: str, got: torch.Tensor) -> ValueError:
    return ValueError(f"selective_scan: `{name}` must have shape {expected}, got {tuple(got.shape)}.")


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> tuple[int, int, int, int, int]:
    """Validate shapes, dtypes and devices; return (batch, channels, L, N, groups)."""
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"selective_scan: `{name}` must be a torch.Tensor, got {type(t).__name__}.")
        if not t.is_floating_point():
            raise TypeError(
                f"selective_scan: `{name}` must be a floating-point tensor (float32/float16/bfloat16/float64), "
                f"got {t.dtype}."
            )
        if t.device != u.device:
            raise ValueError(
                f"selective_scan: all inputs must be on one device; `u` is on {u.device} but `{name}` is on "
                f"{t.device}. Move them with .to(u.device)."
            )
    if u.dim() != 3:
        raise _shape_error("u", "(batch, channels, L)", u)
    batch, channels, length = u.shape
    if length < 1:
        raise ValueError("selective_scan: the sequence is empty (L = 0); there is nothing to scan.")
    if delta.shape != u.shape:
        raise _shape_error("delta", f"(batch, channels, L) = {tuple(u.shape)} like `u`", delta)
    if A.dim() != 2 or A.shape[0] != channels:
        raise _shape_error("A", f"(channels, N) with channels = {channels}", A)
    n_state = A.shape[1]
    if B.dim() not in (3, 4):
        raise _shape_error("B", f"(batch, G, N, L) = ({batch}, G, {n_state}, {length}) or (batch, N, L)", B)
    groups = 1 if B.dim() == 3 else B.shape[1]
    expected_bc = (batch, n_state, length) if B.dim() == 3 else (batch, groups, n_state, length)
    if tuple(B.shape) != expected_bc or groups < 1:
        raise _shape_error("B", f"(batch, G, N, L) = ({batch}, G, {n_state}, {length}) or (batch, N, L)", B)
    if channels % groups != 0:
        raise ValueError(
            f"selective_scan: channels ({channels}) must be divisible by the number of B/C groups G ({groups}); "
            f"channel c uses group c // (channels // G)."
        )
    if tuple(C.shape) != tuple(B.shape):
        raise _shape_error("C", f"{tuple(B.shape)}, the same as `B`", C)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (channels,):
            raise _shape_error(name, f"(channels,) = ({channels},)", t)
    if z is not None and z.shape != u.shape:
        raise _shape_error("z", f"(batch, channels, L) = {tuple(u.shape)} like `u`", z)
    return batch, channels, length, n_state, groups


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 inputs (half precision is upcast); fp64 stays fp64."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _discretised_delta(delta, delta_bias, delta_softplus, dtype) -> torch.Tensor:
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)  # beta 1, threshold 20: identical to the official kernels
    return delta


def _finish(y, u, D, z, out_dtype, inplace: bool = False) -> torch.Tensor:
    """Add the D skip, apply the silu(z) gate, cast to the output dtype (in place on ``y`` if allowed)."""
    if D is not None:
        skip = D.to(y.dtype)[:, None]
        y = y.addcmul_(skip, u) if inplace else y + skip * u.to(y.dtype)
    if z is not None:
        gate = F.silu(z.to(y.dtype))
        y = y.mul_(gate) if inplace else y * gate
    return y.to(out_dtype or u.dtype)


def _groups_view(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, G, N, L) or (batch, N, L) → (batch, G, N, L)."""
    return x.unsqueeze(1) if x.dim() == 3 else x


# --------------------------------------------------------------------------------------------------
# reference: sequential over L
# --------------------------------------------------------------------------------------------------


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = True,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """The plain sequential scan: one step per token, vectorised over (batch, channel, state)."""
    batch, channels, length, n_state, groups = _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype = _compute_dtype(u)
    per_group = channels // groups
    dt = _discretised_delta(delta, delta_bias, delta_softplus, dtype)
    dt5 = dt.reshape(batch, groups, per_group, 1, length)
    decay = torch.exp(dt5 * A.to(dtype).reshape(groups, per_group, n_state, 1))  # (b, G, Cg, N, L)
    B5 = _groups_view(B, groups).to(dtype).unsqueeze(2)  # (b, G, 1, N, L)
    C5 = _groups_view(C, groups).to(dtype).unsqueeze(2)
    drive = (dt * u.to(dtype)).reshape(batch, groups, per_group, 1, length) * B5  # (b, G, Cg, N, L)
    h = torch.zeros(batch, groups, per_group, n_state, dtype=dtype, device=u.device)
    ys = []
    for t in range(length):
        h = decay[..., t] * h + drive[..., t]
        ys.append((h * C5[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1).reshape(batch, channels, length)
    return _finish(y, u, D, z, out_dtype)


# --------------------------------------------------------------------------------------------------
# chunked: time-major blocked scan
# --------------------------------------------------------------------------------------------------


def default_chunk_size(length: int, n_state: int) -> int:
    """Chunk length T for a sequence of ``length`` tokens (tuned on 2 CPU cores, see scripts/bench_scan_cpu.py).

    The cost is about T Python steps on slices of L/T steps plus the (recursively chunked) carry; with
    the carry recursive, T = 8 was within noise of the best choice at every VMamba-T, PlainMamba and Vim
    shape (N = 1 and 16), and tiny sequences run as one chunk.
    """
    del n_state  # the optimum did not depend on it
    return max(1, min(length, 8))


def _scan_steps_time_major(decay: torch.Tensor, drive: torch.Tensor, inplace: bool):
    """Sequential prefix over dim 0 of (T, ...) tensors: returns (running decay product, state) per step.

    ``inplace`` (no autograd) overwrites ``decay`` and ``drive`` and allocates nothing.
    """
    if inplace:
        for t in range(1, decay.shape[0]):
            drive[t].addcmul_(decay[t], drive[t - 1])  # uses decay[t] before it becomes cumulative
            decay[t].mul_(decay[t - 1])
        return decay, drive
    prods, states = [decay[0]], [drive[0]]
    for t in range(1, decay.shape[0]):
        states.append(torch.addcmul(drive[t], decay[t], states[-1]))
        prods.append(decay[t] * prods[-1])
    return torch.stack(prods), torch.stack(states)


def _blocked_scan(decay: torch.Tensor, drive: torch.Tensor, chunk: int, inplace: bool) -> torch.Tensor:
    """States h for chunked inputs laid out (T, n_chunks, ...), where [j, k] is step k·T + j."""
    prods, states = _scan_steps_time_major(decay, drive, inplace)
    n_chunks = decay.shape[1]
    if n_chunks == 1:
        return states
    # state at the end of every chunk, then the state each chunk starts from (exclusive)
    ends = _linear_scan(prods[-1], states[-1], chunk, inplace)
    starts = torch.cat([torch.zeros_like(ends[:1]), ends[:-1]])
    if inplace:
        return states.addcmul_(prods, starts)
    return torch.addcmul(states, prods, starts)


def _linear_scan(decay: torch.Tensor, drive: torch.Tensor, chunk: int, inplace: bool) -> torch.Tensor:
    """h_t = decay_t·h_{t-1} + drive_t along dim 0 (h₋₁ = 0), for the small carry sequences.

    Never modifies its inputs (the caller still needs them); ``inplace`` lets it reuse its own copies.
    """
    length = decay.shape[0]
    chunk = max(chunk, 2)  # chunks of one step would never shorten the carry
    if length <= 2 * chunk:
        _, states = _scan_steps_time_major(decay, drive, inplace=False)
        return states
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    rest = decay.shape[1:]

    def to_chunks(x: torch.Tensor, fill: float) -> torch.Tensor:
        if pad:
            x = torch.cat([x, x.new_full((pad, *rest), fill)])
        return x.reshape(n_chunks, chunk, *rest).transpose(0, 1).contiguous()

    h = _blocked_scan(to_chunks(decay, 1.0), to_chunks(drive, 0.0), chunk, inplace)
    return h.transpose(0, 1).reshape(n_chunks * chunk, *rest)[:length]


def _to_time_major(x: torch.Tensor, chunk: int, n_chunks: int, dtype: torch.dtype) -> torch.Tensor:
    """(batch, X, Y, L) → a new contiguous (T, n_chunks, batch, X, Y) tensor; steps past L are zeros."""
    length = x.shape[-1]
    out = x.new_empty(chunk, n_chunks, *x.shape[:-1], dtype=dtype)
    full = length // chunk
    if full:
        out[:, :full].copy_(x[..., : full * chunk].unflatten(-1, (full, chunk)).permute(4, 3, 0, 1, 2))
    tail = length - full * chunk
    if tail:
        out[:tail, full].copy_(x[..., full * chunk :].permute(3, 0, 1, 2))
        out[tail:, full].zero_()
    return out


def _from_time_major(y: torch.Tensor, length: int) -> torch.Tensor:
    """(T, n_chunks, batch, X, Y) → a new contiguous (batch, X, Y, L), dropping the padded steps."""
    chunk = y.shape[0]
    out = y.new_empty(*y.shape[2:], length)
    full = length // chunk
    if full:
        out[..., : full * chunk].unflatten(-1, (full, chunk)).permute(4, 3, 0, 1, 2).copy_(y[:, :full])
    tail = length - full * chunk
    if tail:
        out[..., full * chunk :].permute(3, 0, 1, 2).copy_(y[:tail, full])
    return out


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = True,
    out_dtype: Optional[torch.dtype] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Fast exact CPU scan (any device works): chunks advanced in lock-step, state carried between them.

    Differentiable by autograd. Without autograd every step after the layout change runs in place on
    the function's own buffers: on CPU, fresh multi-megabyte allocations (page faults) cost as much as
    the arithmetic. ``chunk_size`` overrides :func:`default_chunk_size` (for tuning).
    """
    batch, channels, length, n_state, groups = _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"selective_scan_chunked: chunk_size must be a positive integer, got {chunk_size}.")
    chunk = min(int(chunk_size) if chunk_size is not None else default_chunk_size(length, n_state), length)
    n_chunks = -(-length // chunk)
    dtype = _compute_dtype(u)
    per_group = channels // groups
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    inplace = not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
    if inplace and u.device.type == "cpu":
        block = _cache_block(batch, per_group, n_state, length)
        if block is not None:
            return _scan_in_blocks(block, u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_dtype, chunk)

    def time_major(x: torch.Tensor) -> torch.Tensor:
        return _to_time_major(x, chunk, n_chunks, dtype)

    def mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.mul_(b) if inplace else a * b

    # Δ and Δ·u, time-major: (T, K, b, G, Cg). Padded steps (u = B = 0, so drive 0) come after every
    # real step of their chunk and the last chunk's end state is never carried, so they change nothing.
    dt = time_major(delta.reshape(batch, groups, per_group, length))
    if delta_bias is not None:
        bias = delta_bias.to(dtype).reshape(groups, per_group)
        dt = dt.add_(bias) if inplace else dt + bias
    if delta_softplus:
        dt = F.softplus(dt)  # beta 1, threshold 20: identical to the official kernels
    du = mul(time_major(u.reshape(batch, groups, per_group, length)), dt)

    B_tm = time_major(_groups_view(B, groups)).unsqueeze(-2)  # (T, K, b, G, 1, N)
    C_tm = time_major(_groups_view(C, groups)).unsqueeze(-2)
    decay = dt.unsqueeze(-1) * A.to(dtype).reshape(groups, per_group, n_state)  # (T, K, b, G, Cg, N)
    decay = decay.exp_() if inplace else decay.exp()
    if n_state == 1 and inplace:
        drive = du.unsqueeze(-1).mul_(B_tm)
    else:
        drive = du.unsqueeze(-1) * B_tm

    h = _blocked_scan(decay, drive, chunk, inplace)
    if n_state == 1:
        y = mul(h, C_tm).squeeze(-1)
    else:
        y = torch.matmul(h, C_tm.transpose(-1, -2)).squeeze(-1)  # Σ_n h·C per channel
    y = _from_time_major(y, length).view(batch, channels, length)
    return _finish(y, u, D, z, out_dtype, inplace)


#: state elements (batch x channels x N x L) one CPU inference call works on at a time: the chunked scan
#: streams several tensors of that size, so keeping them cache-sized beats one pass over everything (3.7x at
#: the CIFAR PlainMamba scan, batch 16; neutral at N = 1), measured on 2 cores.
CPU_BLOCK_ELEMENTS = 1 << 20


def _cache_block(batch: int, per_group: int, n_state: int, length: int) -> Optional[tuple[int, int]]:
    """(batch rows, channels) per block for a blocked CPU inference scan, or None when one pass is small enough.

    Channel blocks divide the channels of one group, so every block reads one B/C group.
    """
    per_channel = n_state * length
    if batch * per_group * per_channel <= CPU_BLOCK_ELEMENTS:
        return None
    channels = max(1, min(per_group, CPU_BLOCK_ELEMENTS // per_channel))
    while per_group % channels:
        channels -= 1
    rows = max(1, min(batch, CPU_BLOCK_ELEMENTS // (channels * per_channel)))
    return rows, channels


def _scan_in_blocks(block, u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_dtype, chunk) -> torch.Tensor:
    """The chunked scan on (batch rows x channel) blocks: per element the same arithmetic as one call."""
    rows, width = block
    batch, channels, length = u.shape
    groups = 1 if B.dim() == 3 else B.shape[1]
    per_group = channels // groups
    out = None
    for b0 in range(0, batch, rows):
        b1 = min(batch, b0 + rows)
        for c0 in range(0, channels, width):
            c1, g = c0 + width, c0 // per_group
            part = selective_scan_chunked(
                u[b0:b1, c0:c1], delta[b0:b1, c0:c1], A[c0:c1],
                B[b0:b1] if B.dim() == 3 else B[b0:b1, g:g + 1], C[b0:b1] if C.dim() == 3 else C[b0:b1, g:g + 1],
                D=None if D is None else D[c0:c1], z=None if z is None else z[b0:b1, c0:c1],
                delta_bias=None if delta_bias is None else delta_bias[c0:c1], delta_softplus=delta_softplus,
                out_dtype=out_dtype, chunk_size=chunk,
            )
            if out is None:
                out = part.new_empty(batch, channels, length)
            out[b0:b1, c0:c1] = part
    return out


# --------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------


def _triton_interpreting() -> bool:
    """Triton's CPU interpreter (``TRITON_INTERPRET=1``) runs the kernels on CPU tensors (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load_triton():
    """Import the Triton kernel once; remember why it failed so errors can say so."""
    global _triton_fn, _triton_max_state, _triton_error, _triton_tried
    if not _triton_tried:
        _triton_tried = True
        try:
            from .selective_scan_triton import selective_scan_triton

            _triton_fn = selective_scan_triton
        except Exception as err:  # ImportError, or triton present but broken
            _triton_error = err
        else:
            try:  # the largest state size the kernel handles, if it says
                from .selective_scan_triton import MAX_D_STATE

                _triton_max_state = int(MAX_D_STATE)
            except (ImportError, TypeError, ValueError):
                _triton_max_state = None
    return _triton_fn


def _check_backend_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"Unknown selective-scan backend {name!r} (from {source}); choose one of {BACKENDS}.")
    return name


@contextlib.contextmanager
def scan_backend(name: Optional[str]) -> Iterator[None]:
    """Force one backend for every :func:`selective_scan` call inside the block (``None`` = automatic)."""
    if name is not None:
        _check_backend_name(name, "scan_backend()")
    previous = getattr(_state, "backend", None)
    _state.backend = name
    try:
        yield
    finally:
        _state.backend = previous


def resolve_backend(
    backend: Optional[str], device: torch.device, d_state: int = 1, dtype: Optional[torch.dtype] = None
) -> str:
    """The backend a call on ``device`` would use: argument > scan_backend() > env var > automatic.

    The automatic choice is Triton for CUDA tensors when the kernel imports and supports ``d_state``;
    float64 stays on the chunked path, which keeps its precision (the kernel computes in fp32).
    """
    if backend is not None:
        return _check_backend_name(backend, "the `backend` argument")
    forced = getattr(_state, "backend", None)
    if forced is not None:
        return forced
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env:
        return _check_backend_name(env, f"environment variable {ENV_VAR}")
    if torch.device(device).type == "cuda" and dtype != torch.float64 and _load_triton() is not None:
        if _triton_max_state is None or d_state <= _triton_max_state:
            return "triton"
    return "chunked"


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = True,
    backend: Optional[str] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Mamba-1 selective scan; shapes and recurrence in the module docstring and ARCHITECTURE.md.

    u, delta, z: (batch, channels, L); A: (channels, N), already negative; B, C: (batch, G, N, L) or
    (batch, N, L); D, delta_bias: (channels,). Computes in fp32 (fp64 inputs stay fp64) and returns
    ``out_dtype`` (default ``u.dtype``).
    """
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"selective_scan: `u` must be a torch.Tensor, got {type(u).__name__}.")
    d_state = A.shape[-1] if isinstance(A, torch.Tensor) and A.dim() == 2 else 1
    name = resolve_backend(backend, u.device, d_state, u.dtype)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if name == "reference":
        return selective_scan_reference(*args, out_dtype=out_dtype)
    if name == "chunked":
        return selective_scan_chunked(*args, out_dtype=out_dtype)
    fn = _load_triton()
    if fn is None:
        raise RuntimeError(
            "selective_scan: backend 'triton' was requested but the Triton kernel could not be imported "
            f"({type(_triton_error).__name__}: {_triton_error}). Install triton and use a CUDA device, or choose "
            "backend 'chunked'."
        )
    if u.device.type != "cuda" and not _triton_interpreting():
        raise ValueError(
            f"selective_scan: backend 'triton' needs CUDA tensors, got tensors on {u.device}; "
            "move the inputs to a GPU or choose backend 'chunked'."
        )
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    return fn(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, out_dtype=out_dtype
    )


# --------------------------------------------------------------------------------------------------
# ordered scan: K scan orders over one raster-ordered input, outputs summed back in raster order
# --------------------------------------------------------------------------------------------------

ORDERED_ENV_VAR = "STORM_HF_ORDERED_SCAN"
ORDERED_INPUTS = ("u", "delta", "A", "B", "C", "D", "delta_bias")
ORDERED_INDEXED = ("u", "delta", "B", "C")


def _flag_set(names, allowed: tuple[str, ...], what: str) -> frozenset:
    """Validate a per-input flag list (``per_direction`` or ``by_step``)."""
    if isinstance(names, str):
        names = (names,)
    names = frozenset(names)
    unknown = sorted(names - set(allowed))
    if unknown:
        raise ValueError(f"ordered_selective_scan: `{what}` names unknown inputs {unknown}; allowed: {allowed}.")
    return names


def _check_order(order: torch.Tensor, length: int, device: torch.device, check_permutation: bool) -> None:
    """order must be (K, L) integers on the inputs' device, each row a permutation of 0..L-1."""
    if not isinstance(order, torch.Tensor) or order.dim() != 2 or order.dtype not in (torch.int32, torch.int64):
        got = tuple(order.shape) if isinstance(order, torch.Tensor) else type(order).__name__
        raise ValueError(f"ordered_selective_scan: `order` must be a (K, L) int32/int64 tensor, got {got}.")
    if order.shape[1] != length:
        raise ValueError(
            f"ordered_selective_scan: `order` has {order.shape[1]} steps per direction but the sequence has "
            f"L = {length}."
        )
    if order.device != device:
        raise ValueError(f"ordered_selective_scan: `order` is on {order.device}, the inputs on {device}.")
    if check_permutation:
        expected = torch.arange(length, device=order.device, dtype=order.dtype).expand_as(order)
        if not torch.equal(order.sort(dim=1).values, expected):
            raise ValueError(
                "ordered_selective_scan: every row of `order` must be a permutation of 0..L-1 (each raster position "
                "visited exactly once per direction)."
            )


def _check_ordered_shapes(u, delta, A, B, C, D, delta_bias, n_dirs: int, per_direction: frozenset) -> None:
    """Every input's shape follows from u's (shared inputs have `channels` rows, per-direction K·channels)."""
    batch, rows, length = u.shape
    channels = rows // n_dirs if "u" in per_direction else rows

    def want(name: str) -> int:
        return channels * (n_dirs if name in per_direction else 1)

    for name, t in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("delta_bias", delta_bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"ordered_selective_scan: `{name}` must be a torch.Tensor, got {type(t).__name__}.")
    if tuple(delta.shape) != (batch, want("delta"), length):
        raise _shape_error("delta", str((batch, want("delta"), length)), delta)
    if A.dim() != 2 or A.shape[0] != want("A"):
        raise _shape_error("A", f"({want('A')}, N)", A)
    n_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        k = n_dirs if name in per_direction else 1
        ok = tuple(t.shape) == (batch, k, n_state, length) or (k == 1 and tuple(t.shape) == (batch, n_state, length))
        if not ok:
            raise _shape_error(name, str((batch, k, n_state, length)) + ("" if k > 1 else " or (batch, N, L)"), t)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (want(name),):
            raise _shape_error(name, f"({want(name)},)", t)


def _per_direction_view(x: torch.Tensor, n_dirs: int, shared: bool, gather: Optional[torch.Tensor]) -> torch.Tensor:
    """(batch, R, L) with R = X (shared) or K·X → (batch, K, X, L) in each direction's step order."""
    batch, rows, length = x.shape
    x = x.unsqueeze(1).expand(batch, n_dirs, rows, length) if shared else x.view(batch, n_dirs, -1, length)
    if gather is not None:
        x = x.gather(3, gather.view(1, n_dirs, 1, length).expand(x.shape))
    return x


def ordered_selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    order: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    per_direction=(),
    by_step=(),
    delta_softplus: bool = True,
    backend: Optional[str] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """The ordered scan built from materialised ops: gather each direction's copy, one scan, scatter-sum.

    ``backend`` picks the PyTorch scan that runs the K directions (see :func:`selective_scan`).
    """
    per_direction = _flag_set(per_direction, ORDERED_INPUTS, "per_direction")
    by_step = _flag_set(by_step, ORDERED_INDEXED, "by_step")
    n_dirs, length = order.shape
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    idx = order.long()

    def steps(x: torch.Tensor, name: str) -> torch.Tensor:  # (batch, K, X, L) in step order
        return _per_direction_view(x, n_dirs, name not in per_direction, None if name in by_step else idx)

    def bc(x: torch.Tensor, name: str) -> torch.Tensor:  # (batch, K, N, L)
        flat = x.flatten(1, 2) if name in per_direction else x[:, 0]
        return steps(flat, name)

    def param(x: Optional[torch.Tensor], name: str) -> Optional[torch.Tensor]:
        if x is None or name in per_direction:
            return x
        return x.repeat(n_dirs, *([1] * (x.dim() - 1)))

    batch = u.shape[0]
    us = steps(u, "u")
    channels = us.shape[2]
    ys = selective_scan(
        us.reshape(batch, n_dirs * channels, length),
        steps(delta, "delta").reshape(batch, n_dirs * channels, length),
        param(A, "A"),
        bc(B, "B"),
        bc(C, "C"),
        D=param(D, "D"),
        delta_bias=param(delta_bias, "delta_bias"),
        delta_softplus=delta_softplus,
        backend=backend,
        out_dtype=_compute_dtype(u),
    ).view(batch, n_dirs, channels, length)
    y = ys.new_zeros(batch, channels, length)
    for k in range(n_dirs):
        y = y.index_add(2, idx[k], ys[:, k])  # step l of direction k lands on raster position order[k, l]
    return y.to(out_dtype or u.dtype)


def _load_ordered_triton():
    """The ordered kernel, from the module :func:`_load_triton` imports (None when that import failed)."""
    if _load_triton() is None:
        return None
    from .selective_scan_triton import ordered_selective_scan_triton

    return ordered_selective_scan_triton


def ordered_scan_enabled(
    device: torch.device,
    d_state: int,
    dtype: Optional[torch.dtype] = None,
    *,
    default: bool = True,
    needs_grad: bool = False,
) -> bool:
    """Whether a model should run its scan orders through the fused ordered kernel.

    Only for inference (``needs_grad`` False) and only where the scan resolves to Triton. Measured on an
    H100 (BENCHMARKS.md): the ordered forward is 1.1-1.2x faster for PlainMamba but 0.3-0.7x for VMamba at
    224 px (its column-major directions read with a stride of W); the kernel is forward-only (a fused
    backward measured 0.54-0.70x), so training always uses the materialised path.
    ``default`` is the architecture's choice; ``STORM_HF_ORDERED_SCAN=1`` / ``=0`` overrides it.
    """
    if needs_grad:
        return False
    setting = os.environ.get(ORDERED_ENV_VAR, "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting not in ("1", "true", "yes", "on") and not default:
        return False
    if resolve_backend(None, device, d_state, dtype) != "triton":
        return False
    return _load_ordered_triton() is not None


def ordered_selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    order: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    per_direction=(),
    by_step=(),
    delta_softplus: bool = True,
    backend: Optional[str] = None,
    out_dtype: Optional[torch.dtype] = None,
    check_order: bool = True,
) -> torch.Tensor:
    """K selective scans over one raster-ordered input, their outputs summed back in raster order.

    Direction k visits raster position ``order[k, l]`` at step l (``order``: (K, L) int32/int64, every
    row a permutation). Each input is either shared by the directions or per direction (named in
    ``per_direction``): u, delta (batch, X, L) with X = channels or K·channels; A (X, N); B, C
    (batch, N, L) / (batch, 1, N, L) shared or (batch, K, N, L); D, delta_bias (X,). Row k·channels + c
    of a per-direction input belongs to direction k. u, delta, B, C are read at the raster position
    ``order[k, l]`` unless named in ``by_step`` (then at l). Returns
    ``y[b, c, p] = Σ_k y_k[b, c, l]`` over the step l with ``order[k, l] = p``, where ``y_k`` is
    :func:`selective_scan` of direction k's inputs — ``(batch, channels, L)`` in ``out_dtype``
    (default ``u.dtype``), accumulated in fp32.

    Backends as :func:`selective_scan`: ``"triton"`` runs the fused kernel (no permuted copies, the
    merge accumulated inside it) when no gradient is needed; calls that need gradients, and the other
    backends, run :func:`ordered_selective_scan_reference` (with the chosen backend's scan).
    ``check_order=False`` skips the permutation check (a sort: callers with fixed orders skip it).
    """
    if not isinstance(u, torch.Tensor) or u.dim() != 3:
        raise ValueError("ordered_selective_scan: `u` must be a (batch, channels, L) tensor.")
    per_direction = _flag_set(per_direction, ORDERED_INPUTS, "per_direction")
    by_step = _flag_set(by_step, ORDERED_INDEXED, "by_step")
    _check_order(order, u.shape[2], u.device, check_order)
    n_dirs = order.shape[0]
    if "u" in per_direction and u.shape[1] % n_dirs:
        raise ValueError(
            f"ordered_selective_scan: `u` is per direction, so its {u.shape[1]} rows must be a multiple of "
            f"K = {n_dirs}."
        )
    _check_ordered_shapes(u, delta, A, B, C, D, delta_bias, n_dirs, per_direction)
    name = resolve_backend(backend, u.device, A.shape[1], u.dtype)
    args = (u, delta, A, B, C, order, D, delta_bias, per_direction, by_step, delta_softplus)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, delta_bias))
    if name != "triton" or needs_grad:  # the fused kernel is forward-only: gradients take the materialised path
        return ordered_selective_scan_reference(*args, backend=name, out_dtype=out_dtype)
    fn = _load_ordered_triton()
    if fn is None:
        raise RuntimeError(
            "ordered_selective_scan: backend 'triton' was requested but the Triton kernel could not be imported "
            f"({type(_triton_error).__name__}: {_triton_error}). Install triton and use a CUDA device, or choose "
            "backend 'chunked'."
        )
    if u.device.type != "cuda" and not _triton_interpreting():
        raise ValueError(
            f"ordered_selective_scan: backend 'triton' needs CUDA tensors, got tensors on {u.device}; "
            "move the inputs to a GPU or choose backend 'chunked'."
        )
    return fn(u, delta, A, B, C, order, D=D, delta_bias=delta_bias, per_direction=tuple(per_direction),
              by_step=tuple(by_step), delta_softplus=delta_softplus, out_dtype=out_dtype)
