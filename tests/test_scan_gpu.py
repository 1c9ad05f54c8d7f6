"""Triton selective scan: outputs and every input gradient against a float64 reference.

The GPU tests skip without CUDA. `TRITON_INTERPRET=1` runs them on the CPU through Triton's
interpreter (slow; used to develop the kernels without a GPU).
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from tests.gpu_markers import DEVICE, HAS_CUDA, INTERPRET, gpu, needs_kernel
from tests.references.scan_reference import scan_loop


# ‖out − ref‖ / ‖ref‖ bounds (METHOD.md): fp32 arithmetic, and one rounding of each result to 16 bits.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def scan_autograd_f64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
    """The same recurrence as `scan_loop`, vectorised over (batch, channel, state) so autograd can run."""
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    per_group = u.shape[1] // B.shape[1]
    Bc = B.repeat_interleave(per_group, dim=1)  # (b, channels, n, l)
    Cc = C.repeat_interleave(per_group, dim=1)
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * Bc[..., t]
        ys.append((h * Cc[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y


def make_inputs(batch, channels, length, n_state, groups, *, dtype, device, has_d=True, has_z=False,
                has_bias=True, softplus=True, seed=0):
    """Mamba-style initialisation (A = -[1..N], Δ around 1e-3..1e-1) plus unit-scale noise."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    n_range = torch.arange(1, n_state + 1, dtype=torch.float64)
    A = -(n_range[None, :] * torch.exp(rnd(channels, n_state, scale=0.2)))
    t = {
        "u": rnd(batch, channels, length),
        "A": A,
        "B": rnd(batch, n_state, length) if groups == 1 else rnd(batch, groups, n_state, length),
        "C": rnd(batch, n_state, length) if groups == 1 else rnd(batch, groups, n_state, length),
        "D": rnd(channels) if has_d else None,
        "z": rnd(batch, channels, length) if has_z else None,
    }
    if softplus:
        dt_init = torch.exp(torch.rand(channels, generator=gen, dtype=torch.float64) * math.log(100)) * 1e-3
        t["delta"] = rnd(batch, channels, length, scale=0.5)
        t["delta_bias"] = torch.log(torch.expm1(dt_init)) if has_bias else None
    else:
        t["delta"] = torch.rand(batch, channels, length, generator=gen, dtype=torch.float64) * 0.2
        t["delta_bias"] = rnd(channels, scale=0.01).abs() if has_bias else None
    # Activations arrive in `dtype`; parameters (A, D, bias) stay fp32 as in the models.
    out = {}
    for name, v in t.items():
        if v is None:
            out[name] = None
        else:
            cast = torch.float32 if name in ("A", "D", "delta_bias") else dtype
            out[name] = v.to(cast).to(device)
    return out


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got = got.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert torch.isfinite(got).all(), "non-finite values in the kernel's result"
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def poison_allocator(numel: int) -> None:
    """Leave NaNs in the caching allocator's free blocks so an unwritten output element shows up."""
    if HAS_CUDA:
        junk = torch.full((numel * 8,), float("nan"), device="cuda")
        del junk


def run_kernel(inputs, softplus, out_dtype=None, grad=True):
    from storm_hf.selective_scan_triton import selective_scan_triton

    leaves = {k: (v.clone().requires_grad_(grad) if v is not None else None) for k, v in inputs.items()}
    poison_allocator(inputs["u"].numel())
    y = selective_scan_triton(
        leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"], leaves["z"],
        leaves["delta_bias"], delta_softplus=softplus, out_dtype=out_dtype,
    )
    return y, leaves


def run_reference(inputs, softplus):
    leaves = {k: (v.detach().double().cpu().requires_grad_(True) if v is not None else None)
              for k, v in inputs.items()}
    y = scan_autograd_f64(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"],
                          leaves["z"], leaves["delta_bias"], delta_softplus=softplus)
    return y, leaves


# ------------------------------------------------------------------------------------------------
# the float64 autograd reference itself (CPU, always runs)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups,has_z,softplus", [(1, True, True), (2, False, False)])
def test_autograd_reference_matches_loop(groups, has_z, softplus):
    x = make_inputs(2, 4, 9, 3, groups, dtype=torch.float64, device="cpu", has_z=has_z, softplus=softplus, seed=3)
    ours = scan_autograd_f64(**{k: x[k].double() if x[k] is not None else None for k in x}, delta_softplus=softplus)
    loop = scan_loop(**{k: x[k] for k in x}, delta_softplus=softplus)
    assert torch.allclose(ours, loop, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# kernel parity
# ------------------------------------------------------------------------------------------------

# (batch, channels, L, d_state, groups, has_d, has_z, has_bias, softplus)
CASES = {
    "vmamba_like": (2, 96, 301, 1, 4, True, False, True, True),  # 3 chunks, 2 channel blocks per group
    "vim_like": (2, 48, 197, 16, 1, True, True, True, True),  # 3-D B/C, 7 chunks
    "odd_state_no_softplus": (2, 20, 67, 5, 2, False, True, False, False),
    "single_step": (3, 6, 1, 3, 3, True, False, True, True),
}
INTERPRET_CASES = {
    "vmamba_like": (2, 24, 150, 1, 4, True, False, True, True),
    "vim_like": (1, 6, 37, 16, 1, True, True, True, True),
    "odd_state_no_softplus": (2, 8, 21, 5, 2, False, True, False, False),
    "single_step": (3, 6, 1, 3, 3, True, False, True, True),
}


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_all_grads_match_reference(case, dtype):
    batch, channels, length, n_state, groups, has_d, has_z, has_bias, softplus = (
        INTERPRET_CASES if INTERPRET and not HAS_CUDA else CASES)[case]
    x = make_inputs(batch, channels, length, n_state, groups, dtype=dtype, device=DEVICE, has_d=has_d,
                    has_z=has_z, has_bias=has_bias, softplus=softplus, seed=zlib.crc32(case.encode()) % 1000)
    y, leaves = run_kernel(x, softplus)
    y_ref, ref_leaves = run_reference(x, softplus)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) < TOL[dtype]

    dy = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    y.backward(dy.to(y.device))
    y_ref.backward(dy.double())
    for name in GRAD_NAMES:
        if x[name] is None:
            continue
        got, ref = leaves[name].grad, ref_leaves[name].grad
        assert got is not None and got.dtype == x[name].dtype and got.shape == x[name].shape, name
        if not ref.any():  # e.g. dA with L = 1 (h_{-1} = 0): no relative error exists, only rounding
            assert got.abs().max() < 1e-6, f"grad of {name} should be 0"
            continue
        assert rel_err(got, ref) < TOL[dtype], f"grad of {name}: {rel_err(got, ref):.2e}"


@gpu
@needs_kernel
def test_out_dtype_and_non_contiguous_group_views():
    """VMamba slices B and C out of one x_proj output: strided views, fp32 output from bf16 inputs."""
    batch, channels, length, n_state, groups = 2, 16, 45, 2, 4
    x = make_inputs(batch, channels, length, n_state, groups, dtype=torch.bfloat16, device=DEVICE, seed=7)
    packed = torch.cat([x["B"], torch.randn_like(x["B"]), x["C"]], dim=2)  # (b, g, 3N, L)
    x["B"], x["C"] = packed[:, :, :n_state], packed[:, :, 2 * n_state:]
    assert not x["B"].is_contiguous()
    y, leaves = run_kernel(x, True, out_dtype=torch.float32)
    y_ref, ref_leaves = run_reference(x, True)
    assert y.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-4  # only fp32 arithmetic on the bf16 values
    dy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(dy.float().to(y.device))
    y_ref.backward(dy)
    for name in ("B", "C", "delta"):
        assert rel_err(leaves[name].grad, ref_leaves[name].grad) < TOL[torch.bfloat16], name


@gpu
@needs_kernel
@pytest.mark.parametrize(
    "tile",
    [dict(BLOCK_L=32, FWD_BLOCK_D=16, BWD_BLOCK_D=8),
     dict(BLOCK_L=16, FWD_BLOCK_D=64, BWD_BLOCK_D=64, FWD_WARPS=4, BWD_WARPS=4)],
    ids=["long_chunks", "blocks_wider_than_group"],
)
def test_other_tile_shapes_compute_the_same_function(tile):
    """Tiles other than the tuned defaults (chunk carry, masked channel blocks)."""
    import storm_hf.selective_scan_triton as sst

    batch, channels, length, n_state, groups = (2, 96, 77, 1, 4) if not INTERPRET else (1, 24, 40, 1, 4)
    x = make_inputs(batch, channels, length, n_state, groups, dtype=torch.float32, device=DEVICE, seed=5)
    cfg = dict(sst.launch_config(n_state, length, channels // groups, 4), **tile)
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    y, states = sst._forward(*args, True, torch.float32, True, cfg)
    y_ref, ref_leaves = run_reference(x, True)
    assert rel_err(y, y_ref) < TOL[torch.float32]
    dy = torch.randn(y.shape, dtype=torch.float64)
    y_ref.backward(dy)
    grads = sst._backward(dy.float().to(y.device), *args, True, states, cfg)
    for name in ("u", "delta", "A", "B", "C", "D", "delta_bias"):
        ref = ref_leaves[name].grad
        got = grads[name].reshape(ref.shape) if name in ("B", "C") else grads[name]
        assert rel_err(got, ref) < TOL[torch.float32], name


@gpu
@needs_kernel
@pytest.mark.parametrize(
    "shape", [(2, 96, 256, 1, 4, False), (2, 32, 130, 4, 2, True)], ids=["aligned_rows", "gated_n4"]
)
def test_inference_forward_matches_reference_and_training_forward(shape):
    """Without autograd the forward uses its own (longer) chunks; same function either way."""
    from storm_hf.selective_scan_triton import selective_scan_triton

    batch, channels, length, n_state, groups, has_z = shape
    if INTERPRET and not HAS_CUDA:
        batch, channels, length = 1, channels // 4, length // 2
    x = make_inputs(batch, channels, length, n_state, groups, dtype=torch.float32, device=DEVICE,
                    has_z=has_z, seed=11)
    with torch.no_grad():
        y_inf = selective_scan_triton(**x)
    y_train, _ = run_kernel(x, True)
    y_ref, _ = run_reference(x, True)
    assert rel_err(y_inf, y_ref) < TOL[torch.float32]
    assert rel_err(y_inf, y_train) < 1e-6  # chunking only changes fp32 rounding


@gpu
@needs_kernel
@pytest.mark.parametrize(
    "change,message",
    [
        (lambda x: x.update(A=x["A"][:-1]), "A must be"),
        (lambda x: x.update(B=x["B"][..., :-1]), "B must be"),
        (lambda x: x.update(delta=x["delta"][:, :, :-1]), "u and delta"),
        (lambda x: x.update(D=x["D"][:-1]), "D must be"),
        (lambda x: x.update(A=torch.zeros(x["A"].shape[0], 17, device=x["A"].device)), "d_state 1..16"),
        (lambda x: x.update(B=torch.cat([x["B"], x["B"][:, :1]], 1), C=torch.cat([x["C"], x["C"][:, :1]], 1)),
         "divisible"),
    ],
    ids=["A", "B", "delta", "D", "d_state", "groups"],
)
def test_bad_inputs_raise_clear_errors(change, message):
    from storm_hf.selective_scan_triton import selective_scan_triton

    x = make_inputs(1, 8, 5, 2, 2, dtype=torch.float32, device=DEVICE)
    change(x)
    with pytest.raises(ValueError, match=message):
        selective_scan_triton(**x)
