"""The selective scan's PyTorch paths against the independent float64 loop, plus dispatch and errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import storm_hf.selective_scan as ss
from storm_hf.selective_scan import (
    ENV_VAR,
    resolve_backend,
    scan_backend,
    selective_scan,
    selective_scan_chunked,
    selective_scan_reference,
)
from tests.references.scan_reference import scan_loop

RTOL = 1e-5  # fp32 paths vs the float64 loop


def make_inputs(batch, channels, length, n_state, groups, *, seed=0, dtype=torch.float32, flat_bc=False,
                delta_scale=1.0, delta_shift=0.0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    bc_shape = (batch, n_state, length) if flat_bc else (batch, groups, n_state, length)
    return dict(
        u=randn(batch, channels, length),
        delta=delta_scale * randn(batch, channels, length) + delta_shift,
        A=-torch.rand(channels, n_state, generator=g, dtype=dtype) * 3 - 0.05,
        B=randn(*bc_shape),
        C=randn(*bc_shape),
        D=randn(channels),
        z=randn(batch, channels, length),
        delta_bias=randn(channels) * 0.5,
    )


def assert_matches(out: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """Relative agreement, with errors measured against the output's overall scale."""
    assert out.shape == expected.shape
    assert torch.isfinite(out).all()
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.double(), expected.double(), rtol=rtol, atol=rtol * max(scale, 1e-30))


def drop(inputs: dict, use_d: bool, use_z: bool, use_bias: bool) -> dict:
    out = dict(inputs)
    if not use_d:
        out["D"] = None
    if not use_z:
        out["z"] = None
    if not use_bias:
        out["delta_bias"] = None
    return out


# --------------------------------------------------------------------------------------------------
# exactness against the float64 per-element loop
# --------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 2),
    per_group=st.integers(1, 3),
    groups=st.sampled_from([1, 2, 4]),
    length=st.integers(1, 41),
    n_state=st.sampled_from([1, 2, 16]),
    use_d=st.booleans(),
    use_z=st.booleans(),
    use_bias=st.booleans(),
    softplus=st.booleans(),
    chunk=st.sampled_from([None, 1, 2, 3, 4, 16]),
    seed=st.integers(0, 2**16),
)
def test_both_paths_match_loop(batch, per_group, groups, length, n_state, use_d, use_z, use_bias, softplus,
                               chunk, seed):
    if batch * per_group * groups * length * n_state > 4000:
        n_state = 1  # keep the float64 loop cheap
    inputs = make_inputs(batch, per_group * groups, length, n_state, groups, seed=seed)
    if not softplus:
        inputs["delta"] = inputs["delta"].abs()  # Δ must be positive without softplus
    inputs = drop(inputs, use_d, use_z, use_bias)
    expected = scan_loop(**inputs, delta_softplus=softplus)
    assert_matches(selective_scan_reference(**inputs, delta_softplus=softplus), expected)
    assert_matches(selective_scan_chunked(**inputs, delta_softplus=softplus, chunk_size=chunk), expected)
    with torch.no_grad():  # the in-place path
        assert_matches(selective_scan_chunked(**inputs, delta_softplus=softplus, chunk_size=chunk), expected)


@pytest.mark.parametrize(
    "batch, channels, length, n_state, groups, chunk",
    [
        (1, 4, 1, 1, 1, None),  # a single token
        (2, 8, 37, 1, 4, 4),  # VMamba-like: N = 1, 4 groups, odd L, padding in the last chunk
        (1, 3, 65, 16, 1, 2),  # Vim-like N = 16; chunk 2 makes the carry recurse twice
        (1, 6, 97, 2, 3, 3),  # 3 groups, odd chunk, recursive carry with padding
    ],
)
def test_edge_shapes_match_loop(batch, channels, length, n_state, groups, chunk):
    inputs = make_inputs(batch, channels, length, n_state, groups, seed=length)
    expected = scan_loop(**inputs)
    assert_matches(selective_scan_reference(**inputs), expected)
    assert_matches(selective_scan_chunked(**inputs, chunk_size=chunk), expected)
    assert_matches(selective_scan(**inputs), expected)


def test_three_dim_b_c_means_one_group():
    inputs = make_inputs(2, 5, 19, 3, 1, flat_bc=True)
    expected = scan_loop(**inputs)
    assert_matches(selective_scan_chunked(**inputs), expected)
    assert_matches(selective_scan_reference(**inputs), expected)


def test_group_assignment_is_contiguous_channel_blocks():
    """Channel c uses group c // (channels // G): changing group 1's B moves only channels 2..3 of 4."""
    inputs = make_inputs(1, 4, 9, 2, 2)
    base = selective_scan_chunked(**inputs)
    inputs["B"] = inputs["B"].clone()
    inputs["B"][:, 1] += 1.0
    moved = selective_scan_chunked(**inputs)
    assert torch.equal(base[:, :2], moved[:, :2])
    assert not torch.allclose(base[:, 2:], moved[:, 2:])


def test_inputs_are_not_modified():
    inputs = make_inputs(2, 4, 50, 2, 2)
    copies = {k: v.clone() for k, v in inputs.items()}
    with torch.inference_mode():
        selective_scan_chunked(**inputs, chunk_size=3)
    selective_scan_chunked(**inputs, chunk_size=3)
    for name, value in inputs.items():
        assert torch.equal(value, copies[name]), name


# --------------------------------------------------------------------------------------------------
# long sequences, large Δ
# --------------------------------------------------------------------------------------------------


def test_long_sequence_with_large_delta_stays_exact():
    """Cumulative Δ·A far below fp32's exp range (≈ -1e5 over the sequence) must neither overflow nor drift.

    Stretches of huge Δ (state forgotten), of tiny Δ (state kept over hundreds of steps) and ordinary ones.
    """
    length = 4001
    inputs = make_inputs(1, 4, length, 2, 2, seed=3, delta_scale=3.0, delta_shift=2.0)
    delta = inputs["delta"]
    delta[..., 500:900] = 60.0  # softplus(60 + bias) ≈ 60: exp(Δ·A) underflows to 0
    delta[..., 1000:1600] = -30.0  # softplus ≈ 1e-13: the state persists
    delta[..., 2000:2003] = 1e4  # one enormous step
    inputs["D"] = None
    total_decay = (torch.nn.functional.softplus(delta + inputs["delta_bias"][:, None]).sum(-1)[..., None]
                   * inputs["A"]).min()
    assert total_decay < -1e4  # far outside exp's range if formed as exp(Σ Δ·A)
    expected = scan_loop(**inputs)
    reference = selective_scan_reference(**inputs)
    chunked = selective_scan_chunked(**inputs)
    assert_matches(reference, expected)
    assert_matches(chunked, expected)
    torch.testing.assert_close(chunked, reference, rtol=RTOL, atol=RTOL * reference.abs().max().item())


# --------------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [2, 5])
def test_chunked_gradients_match_reference(chunk):
    base = make_inputs(2, 4, 23, 3, 2, seed=7)
    grads = {}
    for name, fn in (("reference", selective_scan_reference), ("chunked", selective_scan_chunked)):
        inputs = {k: v.clone().requires_grad_(True) for k, v in base.items()}
        kwargs = {"chunk_size": chunk} if name == "chunked" else {}
        out = fn(**inputs, **kwargs)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        (out * weights).sum().backward()
        grads[name] = {k: v.grad for k, v in inputs.items()}
    for key in base:
        ref = grads["reference"][key]
        torch.testing.assert_close(grads["chunked"][key], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(),
                                   msg=lambda m, key=key: f"grad of {key}: {m}")


def test_chunked_gradcheck_float64():
    """Finite differences in float64 (the chunked path keeps fp64 inputs in fp64)."""
    inputs = make_inputs(1, 2, 9, 2, 1, seed=11, dtype=torch.float64)
    names = list(inputs)
    tensors = tuple(inputs[k].requires_grad_(True) for k in names)

    def fn(*args):
        return selective_scan_chunked(**dict(zip(names, args)), chunk_size=2)

    assert torch.autograd.gradcheck(fn, tensors)


# --------------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", [selective_scan_reference, selective_scan_chunked])
def test_half_precision_inputs_are_computed_in_fp32(path, half):
    inputs = make_inputs(1, 4, 30, 2, 2, seed=5)
    for key in ("u", "delta", "B", "C", "z"):
        inputs[key] = inputs[key].to(half)
    upcast = {k: (v.float() if v is not None else None) for k, v in inputs.items()}
    expected = scan_loop(**upcast)
    out_half = path(**inputs)
    assert out_half.dtype == half
    out_fp32 = path(**inputs, out_dtype=torch.float32)
    assert out_fp32.dtype == torch.float32
    assert_matches(out_fp32, expected)  # fp32 accuracy: nothing was computed in half precision
    torch.testing.assert_close(out_half, out_fp32.to(half), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------


def _bad(**changes):
    inputs = make_inputs(2, 4, 6, 3, 2)
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(u=torch.randn(4, 6)), r"`u` must have shape \(batch, channels, L\)"),
        (dict(delta=torch.randn(2, 4, 5)), r"`delta` must have shape .*\(2, 4, 6\)"),
        (dict(A=torch.randn(3, 3)), r"`A` must have shape \(channels, N\) with channels = 4"),
        (dict(B=torch.randn(2, 2, 3, 5)), r"`B` must have shape \(batch, G, N, L\) = \(2, G, 3, 6\)"),
        (dict(B=torch.randn(2, 3, 3, 6), C=torch.randn(2, 3, 3, 6)), r"divisible by the number of B/C groups"),
        (dict(C=torch.randn(2, 1, 3, 6)), r"`C` must have shape \(2, 2, 3, 6\), the same as `B`"),
        (dict(D=torch.randn(5)), r"`D` must have shape \(channels,\) = \(4,\)"),
        (dict(delta_bias=torch.randn(4, 1)), r"`delta_bias` must have shape"),
        (dict(z=torch.randn(2, 4)), r"`z` must have shape"),
        (dict(u=torch.zeros(2, 4, 0), delta=torch.zeros(2, 4, 0), B=torch.zeros(2, 2, 3, 0),
              C=torch.zeros(2, 2, 3, 0), z=None), r"L = 0"),
        (dict(u=torch.randn(2, 4, 6, device="meta")), r"one device"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_bad_shapes_raise_clear_errors(changes, message, backend):
    with pytest.raises(ValueError, match=message):
        selective_scan(**_bad(**changes), backend=backend)


def test_integer_inputs_raise_type_error():
    with pytest.raises(TypeError, match=r"`u` must be a floating-point tensor"):
        selective_scan(**_bad(u=torch.ones(2, 4, 6, dtype=torch.int64)))


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_chunked(**_bad(), chunk_size=0)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"Unknown selective-scan backend 'fast'.*reference"):
        selective_scan(**_bad(), backend="fast")
    with pytest.raises(ValueError, match="Unknown selective-scan backend"):
        with scan_backend("fast"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only failure")
def test_triton_on_cpu_is_a_clear_error():
    with pytest.raises((RuntimeError, ValueError), match=r"(?s)triton.*chunked"):
        selective_scan(**_bad(), backend="triton")


# --------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def spies(monkeypatch):
    """Record which implementation `selective_scan` calls (each still runs for real)."""
    calls = []
    for name in ("selective_scan_reference", "selective_scan_chunked"):
        real = getattr(ss, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name.rsplit("_", 1)[1])
            return _real(*args, **kwargs)

        monkeypatch.setattr(ss, name, spy)
    return calls


def test_auto_on_cpu_is_chunked(spies, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    selective_scan(**_bad())
    assert spies == ["chunked"]
    assert resolve_backend(None, torch.device("cpu")) == "chunked"


def test_env_var_overrides_automatic_choice(spies, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")
    inputs = _bad()
    out = selective_scan(**inputs)
    assert spies == ["reference"]
    assert_matches(out, scan_loop(**inputs))
    selective_scan(**inputs, backend="chunked")  # an explicit argument still wins
    assert spies == ["reference", "chunked"]


def test_invalid_env_var_names_the_variable(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=ENV_VAR):
        selective_scan(**_bad())


def test_context_manager_beats_env_and_restores(spies, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "chunked")
    with scan_backend("reference"):
        selective_scan(**_bad())
        with scan_backend(None):  # back to env / automatic inside
            selective_scan(**_bad())
    selective_scan(**_bad())
    assert spies == ["reference", "chunked", "chunked"]
    monkeypatch.delenv(ENV_VAR)
    with scan_backend("reference"):
        assert resolve_backend(None, torch.device("cpu")) == "reference"
    assert resolve_backend(None, torch.device("cpu")) == "chunked"


def test_non_contiguous_inputs():
    """Transposed / sliced views (as backbones produce them) give the same result as contiguous copies."""
    inputs = make_inputs(2, 4, 15, 3, 2, seed=13)
    strided = {}
    for key, value in inputs.items():
        if value.dim() >= 2:  # same values, transposed memory
            strided[key] = value.transpose(-1, -2).contiguous().transpose(-1, -2)
        else:  # every other element of a longer vector
            strided[key] = torch.stack([value, torch.full_like(value, float("nan"))], -1)[..., 0]
        assert not strided[key].is_contiguous()
    expected = scan_loop(**inputs)
    assert_matches(selective_scan_reference(**strided), expected)
    assert_matches(selective_scan_chunked(**strided, chunk_size=4), expected)


@pytest.mark.parametrize(
    "shape, flat_bc, with_z",
    [((3, 12, 37, 16, 4), False, True), ((2, 6, 50, 1, 2), False, False), ((5, 8, 19, 4, 1), True, True)],
)
def test_cpu_inference_scan_in_cache_sized_blocks_is_the_same_scan(shape, flat_bc, with_z, monkeypatch):
    """Blocking over (batch rows, channels within a group) changes the memory traffic, not the result."""
    batch, channels, length, n_state, groups = shape
    x = make_inputs(batch, channels, length, n_state, groups, seed=3, flat_bc=flat_bc)
    if not with_z:
        x["z"], x["D"] = None, None
    with torch.inference_mode():
        whole = ss.selective_scan_chunked(**x)
        monkeypatch.setattr(ss, "CPU_BLOCK_ELEMENTS", 2 * n_state * length)  # forces several blocks
        rows, width = ss._cache_block(batch, channels // groups, n_state, length)
        assert rows * width <= 2 and (channels // groups) % width == 0
        blocked = ss.selective_scan_chunked(**x)
    assert_matches(blocked, whole, rtol=1e-6)
    assert_matches(blocked, scan_loop(**{k: (v.double() if v is not None else None) for k, v in x.items()}))


def test_blocking_is_only_for_large_cpu_inference_calls():
    assert ss._cache_block(1, 64, 1, 256) is None  # small enough for one pass
    rows, width = ss._cache_block(16, 256, 16, 256)  # the CIFAR PlainMamba scan
    assert rows * width * 16 * 256 <= ss.CPU_BLOCK_ELEMENTS and 256 % width == 0
