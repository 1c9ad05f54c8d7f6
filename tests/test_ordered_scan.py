"""Ordered scan (K scan orders read through an index, outputs summed in raster order).

CPU tests (always): the PyTorch reference of `ordered_selective_scan` against the materialised
computation built by hand (one permuted copy and one scan per direction, then a scatter-sum), and
both models' ordered code path (run on the PyTorch reference) against their materialised path.
Kernel tests (`gpu`): the Triton kernels against a float64 reference, on CUDA, or on the CPU
through Triton's interpreter (`TRITON_INTERPRET=1`, tiny shapes). Whole-model parity on CUDA.
"""
from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

from storm_hf import modeling_plainmamba, modeling_vmamba
from storm_hf.configuration_plainmamba import PlainMambaConfig
from storm_hf.configuration_vmamba import VMambaConfig
from storm_hf.modeling_plainmamba import PlainMambaForImageClassification
from storm_hf.modeling_vmamba import VMambaForImageClassification, cross_merge, cross_scan, cross_scan_order
from storm_hf.selective_scan import (
    ordered_scan_enabled,
    ordered_selective_scan,
    ordered_selective_scan_reference,
    selective_scan,
)
from tests.gpu_markers import DEVICE, gpu, needs_cuda, needs_kernel
from tests.tiny_configs import TINY_CONFIGS

# ‖out − ref‖ / ‖ref‖ bounds: fp32 arithmetic, and one rounding of each result to 16 bits.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
INPUTS = ("u", "delta", "A", "B", "C", "D", "delta_bias")
# The two flag sets the models use, and one with every input per direction and read by position.
FLAGS = {
    "vmamba": (("delta", "A", "B", "C", "D", "delta_bias"), ("delta", "B", "C")),
    "vmamba_by_position": (("delta", "A", "B", "C", "D", "delta_bias"), ()),
    "plainmamba": (("B",), ("delta", "B", "C")),
    "all_per_direction": (INPUTS, ()),
}


def make_inputs(batch, channels, length, n_state, n_dirs, per_direction, *, dtype=torch.float64,
                device="cpu", seed=0, random_orders=True):
    """Mamba-like values (A < 0, small Δ after softplus) with each input shaped as its flag says."""
    gen = torch.Generator().manual_seed(seed)

    def rows(name):
        return channels * (n_dirs if name in per_direction else 1)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    x = {
        "u": rnd(batch, rows("u"), length),
        "delta": rnd(batch, rows("delta"), length, scale=0.5),
        "A": -(torch.arange(1, n_state + 1, dtype=torch.float64) * torch.exp(rnd(rows("A"), n_state, scale=0.2))),
        "B": rnd(batch, n_dirs if "B" in per_direction else 1, n_state, length),
        "C": rnd(batch, n_dirs if "C" in per_direction else 1, n_state, length),
        "D": rnd(rows("D")),
        "delta_bias": rnd(rows("delta_bias"), scale=0.5) - 2.0,
    }
    if random_orders:
        order = torch.stack([torch.randperm(length, generator=gen) for _ in range(n_dirs)])
    else:
        order = torch.arange(length).flip(0).expand(n_dirs, length).contiguous()
    out = {k: v.to(torch.float32 if k in ("A", "D", "delta_bias") and dtype != torch.float64 else dtype).to(device)
           for k, v in x.items()}
    return out, order.to(device)


def materialised(x, order, per_direction, by_step):
    """By hand: each direction's permuted copies, its own scan, its output added at the raster positions."""
    n_dirs, length = order.shape
    channels = x["u"].shape[1] // (n_dirs if "u" in per_direction else 1)
    y = 0.0
    for k in range(n_dirs):
        def pick(name, t, rows):  # direction k's slice of an input
            return t[..., k * rows:(k + 1) * rows, :] if name in per_direction else t[..., :rows, :]

        def read(name, t):  # gathered through the order unless read by step
            return t if name in by_step else t[..., order[k]]

        u = read("u", pick("u", x["u"], channels))
        delta = read("delta", pick("delta", x["delta"], channels))
        B = read("B", x["B"][:, k if "B" in per_direction else 0])
        C = read("C", x["C"][:, k if "C" in per_direction else 0])
        A = x["A"][k * channels:(k + 1) * channels] if "A" in per_direction else x["A"]
        D = x["D"][k * channels:(k + 1) * channels] if "D" in per_direction else x["D"]
        bias = x["delta_bias"][k * channels:(k + 1) * channels] if "delta_bias" in per_direction else x["delta_bias"]
        y_k = selective_scan(u, delta, A, B, C, D=D, delta_bias=bias, backend="reference")
        back = torch.empty_like(y_k)
        back[..., order[k]] = y_k  # step l -> raster position order[k, l]
        y = y + back
    return y


def rel_err(got, ref):
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(got).all(), "non-finite values"
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------
# the PyTorch reference (CPU)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("shape", [(2, 3, 13, 2, 4), (1, 5, 8, 1, 2), (2, 2, 1, 3, 4), (1, 4, 17, 16, 4)],
                         ids=lambda s: "b{}_c{}_L{}_N{}_K{}".format(*s))  # odd L, L = 1, K = 4 and 2
def test_reference_equals_materialised_directions(shape, flags):
    per_direction, by_step = FLAGS[flags]
    batch, channels, length, n_state, n_dirs = shape
    x, order = make_inputs(batch, channels, length, n_state, n_dirs, per_direction, seed=sum(shape))
    want = materialised(x, order, per_direction, by_step)
    for backend in ("reference", "chunked"):
        got = ordered_selective_scan(**x, order=order, per_direction=per_direction, by_step=by_step, backend=backend)
        assert got.shape == (batch, channels, length) and got.dtype == torch.float64
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), backend


def test_reference_gradients_match_materialised():
    per_direction, by_step = FLAGS["plainmamba"]
    x, order = make_inputs(2, 3, 11, 2, 4, per_direction, seed=1)
    a = {k: v.clone().requires_grad_() for k, v in x.items()}
    b = {k: v.clone().requires_grad_() for k, v in x.items()}
    dy = torch.randn(2, 3, 11, dtype=torch.float64)
    ordered_selective_scan(**a, order=order, per_direction=per_direction, by_step=by_step).backward(dy)
    materialised(b, order, per_direction, by_step).backward(dy)
    for name in INPUTS:
        assert torch.allclose(a[name].grad, b[name].grad, rtol=1e-10, atol=1e-12), name


def test_vmamba_cross_scan_order_is_cross_scan():
    """Reading u through `cross_scan_order` is `cross_scan`; summing at it is `cross_merge`."""
    batch, channels, height, width = 2, 3, 3, 5
    u = torch.randn(batch, channels, height, width, dtype=torch.float64)
    order = cross_scan_order(height, width, u.device)
    xs = cross_scan(u)
    assert torch.equal(xs, torch.stack([u.flatten(2)[..., order[k]] for k in range(4)], dim=1))
    ys = torch.randn_like(xs)
    merged = torch.zeros(batch, channels, height * width, dtype=torch.float64)
    for k in range(4):
        merged[..., order[k]] += ys[:, k]
    merged = merged.view(batch, channels, height, width).permute(0, 2, 3, 1)
    assert torch.allclose(cross_merge(ys, height, width), merged)


def test_bad_inputs_raise_clear_errors():
    per_direction, by_step = FLAGS["vmamba"]
    x, order = make_inputs(1, 2, 6, 1, 4, per_direction)
    call = dict(order=order, per_direction=per_direction, by_step=by_step)
    with pytest.raises(ValueError, match="permutation"):
        ordered_selective_scan(**x, **{**call, "order": torch.zeros_like(order)})
    with pytest.raises(ValueError, match="L = 6"):
        ordered_selective_scan(**x, **{**call, "order": order[:, :5]})
    with pytest.raises(ValueError, match="int32/int64"):
        ordered_selective_scan(**x, **{**call, "order": order.double()})
    with pytest.raises(ValueError, match="unknown inputs"):
        ordered_selective_scan(**x, **{**call, "by_step": ("A",)})
    with pytest.raises(ValueError, match="`delta` must have shape"):
        ordered_selective_scan(**{**x, "delta": x["delta"][:, :2]}, **call)
    with pytest.raises(ValueError, match="`B` must have shape"):
        ordered_selective_scan(**{**x, "B": x["B"][:, :1]}, **call)
    with pytest.raises(ValueError, match="`D` must have shape"):
        ordered_selective_scan(**{**x, "D": x["D"][:2]}, **call)


def test_models_use_the_ordered_path_only_with_triton(monkeypatch):
    assert not ordered_scan_enabled(torch.device("cpu"), 1, torch.float32)
    monkeypatch.setenv("STORM_HF_ORDERED_SCAN", "1")
    assert not ordered_scan_enabled(torch.device("cpu"), 1, torch.float32)  # forcing never leaves PyTorch on CPU
    monkeypatch.setenv("STORM_HF_ORDERED_SCAN", "0")
    assert not ordered_scan_enabled(torch.device("cuda"), 1, torch.float32)


def test_ordered_path_is_inference_only_and_follows_the_arch_default(monkeypatch):
    from storm_hf import selective_scan as scan_module

    monkeypatch.setattr(scan_module, "resolve_backend", lambda *a, **k: "triton")
    monkeypatch.setattr(scan_module, "_load_ordered_triton", lambda: object())
    monkeypatch.delenv("STORM_HF_ORDERED_SCAN", raising=False)
    cuda = torch.device("cuda")
    assert ordered_scan_enabled(cuda, 16, torch.bfloat16, default=True)
    assert not ordered_scan_enabled(cuda, 1, torch.bfloat16, default=False)
    assert not ordered_scan_enabled(cuda, 16, torch.bfloat16, default=True, needs_grad=True)
    monkeypatch.setenv("STORM_HF_ORDERED_SCAN", "1")
    assert ordered_scan_enabled(cuda, 1, torch.bfloat16, default=False)
    assert not ordered_scan_enabled(cuda, 1, torch.bfloat16, default=False, needs_grad=True)
    monkeypatch.setenv("STORM_HF_ORDERED_SCAN", "0")
    assert not ordered_scan_enabled(cuda, 16, torch.bfloat16, default=True)


@pytest.mark.parametrize("arch", ["vmamba", "plainmamba"])
def test_models_pick_the_ordered_path_for_inference_only(arch, monkeypatch):
    """The wiring: no_grad forwards ask for the ordered path with the arch's default, training forwards do not."""
    model, module = _tiny(arch)
    calls = []

    def spy(device, d_state, dtype=None, *, default=True, needs_grad=False):
        calls.append((default, needs_grad))
        return False

    monkeypatch.setattr(module, "ordered_scan_enabled", spy)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(pixel_values=pixels)
    assert calls and all(c == (arch == "plainmamba", False) for c in calls)
    calls.clear()
    model(pixel_values=pixels)
    assert calls and all(needs_grad for _, needs_grad in calls)


def _tiny(arch):
    torch.manual_seed(0)
    if arch == "vmamba":
        return VMambaForImageClassification(VMambaConfig(**TINY_CONFIGS["vmamba"])), modeling_vmamba
    return PlainMambaForImageClassification(PlainMambaConfig(**TINY_CONFIGS["plainmamba"])), modeling_plainmamba


@pytest.mark.parametrize("arch", ["vmamba", "plainmamba"])
def test_models_ordered_code_path_equals_materialised_on_cpu(arch, monkeypatch):
    """The ordered wiring (run on the PyTorch reference here) gives the materialised logits, grads and Δ map."""
    model, module = _tiny(arch)
    model = model.double().eval()  # eval: no stochastic depth; autograd still runs
    side = 32 if arch == "vmamba" else 64  # grids 8x8 (VMamba stage 0) and 4x4 (PlainMamba)
    pixels = torch.randn(2, 3, side, side - 3, dtype=torch.float64)
    target = [5, 4] if arch == "vmamba" else [3, 2]
    storm = {"method": "mtr", "schedule": [{"stage": 0, "block": 0, "size": target}]}
    model.set_storm(storm)  # mtr reads the mixer's Δ map: `return_delta` runs on both paths

    def run():
        model.zero_grad()
        logits = model(pixel_values=pixels).logits
        logits.square().sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want, want_grads = run()
    monkeypatch.setattr(module, "ordered_scan_enabled", lambda *a, **k: True)
    got, got_grads = run()
    # VMamba's scan returns fp32 (as the official code), so the paths agree to fp32 rounding only.
    tol = 1e-6 if arch == "vmamba" else 1e-10
    assert rel_err(got, want) < tol
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        if want_grads[name].any():
            assert rel_err(got_grads[name], want_grads[name]) < 10 * tol, name


# --------------------------------------------------------------------------------------------------
# Triton kernels (CUDA, or the CPU interpreter)
# --------------------------------------------------------------------------------------------------


def _kernel_vs_reference(shape, flags, dtype, seed, device=DEVICE):
    """The forward-only kernel's output against a float64 reference on the CPU; with gradients, the
    dispatch (`ordered_selective_scan`, backend "triton") gives the reference's output and every input grad."""
    from storm_hf.selective_scan_triton import ordered_selective_scan_triton

    per_direction, by_step = FLAGS[flags]
    batch, channels, length, n_state, n_dirs = shape
    x, order = make_inputs(batch, channels, length, n_state, n_dirs, per_direction, dtype=dtype, device=device,
                           seed=seed)
    refs = {k: v.detach().double().cpu().requires_grad_() for k, v in x.items()}
    y_ref = ordered_selective_scan_reference(**refs, order=order.cpu(), per_direction=per_direction,
                                             by_step=by_step, backend="reference")
    with torch.no_grad():
        y = ordered_selective_scan_triton(**x, order=order, per_direction=per_direction, by_step=by_step)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) < TOL[dtype], f"output {rel_err(y, y_ref):.2e}"

    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    with pytest.raises(ValueError, match="no backward"):
        ordered_selective_scan_triton(**leaves, order=order, per_direction=per_direction, by_step=by_step)
    y = ordered_selective_scan(**leaves, order=order, per_direction=per_direction, by_step=by_step, backend="triton")
    assert rel_err(y, y_ref) < TOL[dtype], f"output with grad {rel_err(y, y_ref):.2e}"
    dy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(dy.to(dtype).to(y.device))
    y_ref.backward(dy.to(dtype).double())
    for name in INPUTS:
        got, ref = leaves[name].grad, refs[name].grad
        assert got is not None and got.dtype == x[name].dtype and got.shape == x[name].shape, name
        if not ref.any():  # dA with L = 1
            assert got.abs().max() < 1e-6, name
            continue
        # An input shared by the K directions gets the sum of K per-direction gradients, each rounded to the
        # input dtype by the scan: sqrt(K) roundings where a per-direction input has one.
        tol = TOL[dtype] * (math.sqrt(n_dirs) if name not in per_direction and dtype != torch.float32 else 1)
        assert rel_err(got, ref) < tol, f"grad of {name}: {rel_err(got, ref):.2e}"


INTERPRET_SHAPES = [(1, 3, 19, 2, 4), (2, 2, 9, 1, 2), (1, 2, 1, 3, 4)]


@gpu
@needs_kernel
@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("shape", INTERPRET_SHAPES, ids=lambda s: "b{}_c{}_L{}_N{}_K{}".format(*s))
def test_kernel_tiny_shapes(shape, flags):
    _kernel_vs_reference(shape, flags, torch.float32, seed=sum(shape))


@gpu
@needs_kernel
def test_kernel_bf16_output_accumulates_in_fp32():
    """A bf16 output is the fp32 sum rounded once (accumulating in bf16 would fail the bound)."""
    _kernel_vs_reference((1, 4, 21, 2, 4), "plainmamba", torch.bfloat16, seed=4)


@gpu
@needs_kernel
def test_kernel_dispatch_and_inference_forward():
    """`ordered_selective_scan` reaches the kernel; the no-grad forward (its own tiles) gives the same."""
    per_direction, by_step = FLAGS["vmamba"]
    x, order = make_inputs(2, 4, 37, 1, 4, per_direction, dtype=torch.float32, device=DEVICE, seed=9)
    with torch.no_grad():
        y = ordered_selective_scan(**x, order=order, per_direction=per_direction, by_step=by_step, backend="triton")
    y_ref = ordered_selective_scan(**{k: v.double().cpu() for k, v in x.items()}, order=order.cpu(),
                                   per_direction=per_direction, by_step=by_step, backend="reference")
    assert rel_err(y, y_ref) < TOL[torch.float32]


# --------------------------------------------------------------------------------------------------
# CUDA only: realistic shapes and whole models
# --------------------------------------------------------------------------------------------------

GPU_SHAPES = [(2, 96, 301, 1, 4), (3, 40, 197, 16, 4), (2, 24, 77, 5, 2), (2, 64, 1, 16, 4), (1, 48, 1023, 1, 4)]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "b{}_c{}_L{}_N{}_K{}".format(*s))
def test_kernel_matches_reference_on_cuda(shape, flags, dtype):
    _kernel_vs_reference(shape, flags, dtype, seed=zlib.crc32(repr((shape, flags)).encode()) % 1000)


@gpu
@needs_cuda
def test_kernel_random_orders_and_shapes_on_cuda():
    gen = torch.Generator().manual_seed(0)
    for trial in range(6):
        n_state = [1, 16, 4][trial % 3]
        length = int(torch.randint(2, 700, (1,), generator=gen)) | 1  # odd
        channels = int(torch.randint(1, 70, (1,), generator=gen))
        flags = list(FLAGS)[trial % len(FLAGS)]
        _kernel_vs_reference((2, channels, length, n_state, 4), flags, torch.float32, seed=trial)


@gpu
@needs_cuda
@pytest.mark.parametrize("arch", ["vmamba", "plainmamba"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_models_ordered_inference_matches_materialised_on_cuda(arch, dtype, monkeypatch):
    """The path models take (inference): forced on for both archs, logits equal the materialised ones."""
    model, _ = _tiny(arch)
    model = model.to("cuda", dtype).eval()
    pixels = torch.randn(4, 3, 32, 29, device="cuda", dtype=dtype)
    monkeypatch.setenv("STORM_HF_ORDERED_SCAN", "1")
    assert ordered_scan_enabled(torch.device("cuda"), model.config.d_state, dtype)
    with torch.no_grad():
        got = model(pixel_values=pixels).logits
    monkeypatch.setenv("STORM_HF_ORDERED_SCAN", "0")
    with torch.no_grad():
        want = model(pixel_values=pixels).logits
    assert rel_err(got, want) < (1e-4 if dtype == torch.float32 else 3e-2)


@gpu
@needs_cuda
@pytest.mark.parametrize("arch", ["vmamba", "plainmamba"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_models_ordered_backward_matches_materialised_on_cuda(arch, dtype, monkeypatch):
    """Forced onto the ordered path while training, a model's grads are the materialised ones (the dispatch
    sends calls that need gradients through the materialised path, the kernel being forward-only)."""
    model, module = _tiny(arch)
    model = model.to("cuda", dtype).eval()
    pixels = torch.randn(4, 3, 32, 29, device="cuda", dtype=dtype)
    monkeypatch.setattr(module, "ordered_scan_enabled", lambda *a, needs_grad=False, **k:
                        os.environ.get("STORM_HF_ORDERED_SCAN") != "0")

    def run():
        model.zero_grad()
        logits = model(pixel_values=pixels).logits
        logits.float().square().sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    got, got_grads = run()
    monkeypatch.setenv("STORM_HF_ORDERED_SCAN", "0")
    want, want_grads = run()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert rel_err(got, want) < tol
    # A gradient far below the model's gradient scale (e.g. A_logs of a random-init last stage, ~1e-20) is
    # the residue of cancelling sums, whose rounding depends on the summation order; measure every error
    # against max(its own norm, 1e-6 x the largest gradient norm) instead of its own norm alone.
    largest = max(float(g.norm()) for g in want_grads.values())
    for name, ref in want_grads.items():
        scale = max(float(ref.norm()), 1e-6 * largest)
        err = float((got_grads[name].double() - ref.double()).norm()) / scale
        assert err < 10 * tol, f"{name}: {err:.2e} (grad norm {float(ref.norm()):.2e}, largest {largest:.2e})"
