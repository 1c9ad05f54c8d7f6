"""Ordered scan (K scan orders read inside the Triton kernel) against the materialised path.

"before" = the materialised path (VMamba: cross_scan copies -> per-direction x_proj -> scan over K*D
channels -> cross_merge; PlainMamba: index_select copies of u -> scan -> gather back and sum), "after"
= the ordered kernel (`ordered_selective_scan`), switched with STORM_HF_ORDERED_SCAN=0/1. Times are
`triton.testing.do_bench` medians (L2 flushed between repeats) of the whole mixer module
(VMambaSS2D / PlainMambaMixer, bf16 weights and activations): forward under no_grad, and
forward + backward (grads of the input and every parameter). Peak memory is of one forward + backward
above what the inputs and weights hold. Also: scan-only rows (VMamba flags: Δ/B/C read by step, as
the model does, vs by position) and the whole model forward (bf16, batch 128, 224x224).

    PYTHONPATH=src python scripts/bench_ordered_scan.py --out $OUT
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from storm_hf.configuration_plainmamba import PlainMambaConfig  # noqa: E402
from storm_hf.configuration_vmamba import VMambaConfig  # noqa: E402
from storm_hf.modeling_plainmamba import PlainMambaMixer, zigzag_paths  # noqa: E402
from storm_hf.modeling_vmamba import VMambaSS2D, cross_merge, cross_scan, cross_scan_order  # noqa: E402
from storm_hf.selective_scan import ORDERED_ENV_VAR, ordered_selective_scan, selective_scan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda"
DTYPE = torch.bfloat16


def _preset(name: str) -> dict:
    from storm_hf.tools.presets import find_model_preset

    return find_model_preset(name)[1]


# name: (arch, config kwargs, stage, batch, (H, W))
MIXERS = {
    "VMamba-T s2l5 stage 0 (56x56, D 192)": ("vmamba", _preset("vmamba_tiny_s2l5"), 0, 128, (56, 56)),
    "VMamba-T s2l5 stage 1 (28x28, D 384)": ("vmamba", _preset("vmamba_tiny_s2l5"), 1, 128, (28, 28)),
    "VMamba-T s1l8 stage 0 (56x56, D 96)": ("vmamba", _preset("vmamba_tiny_s1l8"), 0, 128, (56, 56)),
    "CIFAR VMamba stage 0 (B 512, 16x16, D 64)": ("vmamba", _preset("cifar10/vmamba"), 0, 512, (16, 16)),
    "PlainMamba-L2 (14x14, D 768, N 16)": ("plainmamba", _preset("plainmamba_l2"), 0, 128, (14, 14)),
    "CIFAR PlainMamba (B 512, 16x16, D 256, N 16)": ("plainmamba", _preset("cifar10/plainmamba"), 0, 512,
                                                     (16, 16)),
}
MODELS = ("vmamba_tiny_s1l8", "plainmamba_l2")


@contextlib.contextmanager
def ordered(on: bool):
    old = os.environ.get(ORDERED_ENV_VAR)
    os.environ[ORDERED_ENV_VAR] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ORDERED_ENV_VAR, None)
        else:
            os.environ[ORDERED_ENV_VAR] = old


def build_mixer(arch: str, kwargs: dict, stage: int, hw: tuple[int, int]):
    """A mixer with random (initialised) bf16 weights and a call taking the (B, H, W, C) input."""
    torch.manual_seed(0)
    if arch == "vmamba":
        config = VMambaConfig(**kwargs)
        module = VMambaSS2D(config, stage)
        width = config.dims[stage]
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn_like(p) * 0.02)
            module.A_logs.copy_(torch.log(torch.arange(1, config.d_state + 1).float()).expand_as(module.A_logs))
            module.Ds.fill_(1.0)
            module.out_norm.weight.fill_(1.0)
        module = module.to(DEVICE, DTYPE)
        return module, width, lambda x: module(x)[0]
    config = PlainMambaConfig(**kwargs)
    module = PlainMambaMixer(config)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
        module.A_log.copy_(torch.log(torch.arange(1, config.d_state + 1).float()).expand_as(module.A_log))
        module.D.fill_(1.0)
    module = module.to(DEVICE, DTYPE)
    paths = zigzag_paths(*hw, device=DEVICE)
    return module, config.hidden_size, lambda x: module(x, paths)[0]


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_mixer(name, spec, do_bench) -> dict:
    arch, kwargs, stage, batch, hw = spec
    module, width, call = build_mixer(arch, kwargs, stage, hw)
    x = torch.randn(batch, *hw, width, device=DEVICE, dtype=DTYPE)
    x_grad = x.clone().requires_grad_()
    dy = torch.randn(batch, *hw, width, device=DEVICE, dtype=DTYPE)

    def fwd():
        with torch.no_grad():
            call(x)

    def fwd_bwd():
        module.zero_grad(set_to_none=True)
        call(x_grad).backward(dy)

    row = {"name": name, "batch": batch, "grid": list(hw)}
    outs = {}
    for label, on in (("before", False), ("after", True)):
        with ordered(on):
            with torch.no_grad():
                outs[label] = call(x).float()
            row[f"{label}_fwd_ms"] = do_bench(fwd, warmup=25, rep=100, return_mode="median")
            row[f"{label}_fb_ms"] = do_bench(fwd_bwd, warmup=25, rep=100, return_mode="median")
            row[f"{label}_fb_peak_mib"] = peak_mib(fwd_bwd)
    row["max_rel_diff"] = float((outs["after"] - outs["before"]).norm() / outs["before"].norm())
    torch.cuda.empty_cache()
    return row


def bench_vmamba_scan(do_bench, batch=128, hw=(56, 56), inner=192) -> dict:
    """Scan only at VMamba shapes: materialised (cross_scan + scan + cross_merge) vs ordered (two flag sets)."""
    k, length = 4, hw[0] * hw[1]
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=DEVICE) * scale).to(DTYPE)

    u = rnd(batch, inner, *hw)
    dts, bs, cs = rnd(batch, k * inner, length, scale=0.5), rnd(batch, k, 1, length), rnd(batch, k, 1, length)
    A = -torch.ones(k * inner, 1, device=DEVICE)
    D, bias = torch.ones(k * inner, device=DEVICE), torch.full((k * inner,), -4.0, device=DEVICE)
    order = cross_scan_order(*hw, DEVICE)
    per_dir = ("delta", "A", "B", "C", "D", "delta_bias")

    @torch.no_grad()
    def materialised():
        xs = cross_scan(u)
        ys = selective_scan(xs.view(batch, k * inner, length), dts, A, bs, cs, D=D, delta_bias=bias,
                            out_dtype=torch.float32, backend="triton")
        return cross_merge(ys.view(batch, k, inner, length), *hw)

    @torch.no_grad()
    def fused(by_step):
        return ordered_selective_scan(u.view(batch, inner, length), dts, A, bs, cs, order, D=D, delta_bias=bias,
                                      per_direction=per_dir, by_step=by_step, out_dtype=torch.float32,
                                      backend="triton", check_order=False)

    return {
        "name": f"scan only, VMamba {hw[0]}x{hw[1]} D {inner} (B {batch})",
        "materialised_ms": do_bench(materialised, warmup=25, rep=100, return_mode="median"),
        "ordered_by_step_ms": do_bench(lambda: fused(("delta", "B", "C")), warmup=25, rep=100, return_mode="median"),
        "ordered_by_position_ms": do_bench(lambda: fused(()), warmup=25, rep=100, return_mode="median"),
    }


def bench_models(do_bench) -> list[dict]:
    from storm_hf.tools.archs import get_arch
    from storm_hf.tools.presets import find_model_preset

    rows = []
    for preset in MODELS:
        arch, kwargs = find_model_preset(preset)
        spec = get_arch(arch)
        model = spec.classifier_cls(spec.config_cls(**kwargs)).eval().to(DEVICE, DTYPE)
        pixels = torch.randn(128, 3, 224, 224, device=DEVICE, dtype=DTYPE)
        row = {"name": preset}
        for label, on in (("before", False), ("after", True)):
            with ordered(on), torch.inference_mode():
                row[f"{label}_ms"] = do_bench(lambda: model(pixels), warmup=5, rep=50, return_mode="median")
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".", help="directory for bench_ordered_scan.json")
    parser.add_argument("--skip-models", action="store_true", help="only the mixer and scan rows")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 1
    from triton.testing import do_bench

    torch.backends.cuda.matmul.allow_tf32 = True
    mixers = [bench_mixer(name, spec, do_bench) for name, spec in MIXERS.items()]
    scans = [bench_vmamba_scan(do_bench), bench_vmamba_scan(do_bench, hw=(28, 28), inner=384)]
    models = [] if args.skip_models else bench_models(do_bench)

    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16\n")
    print("| mixer | fwd before ms | fwd after ms | × | f+b before ms | f+b after ms | × | "
          "f+b peak MiB before → after | rel diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in mixers:
        print(f"| {r['name']} | {r['before_fwd_ms']:.3f} | {r['after_fwd_ms']:.3f} | "
              f"{r['before_fwd_ms'] / r['after_fwd_ms']:.2f} | {r['before_fb_ms']:.3f} | {r['after_fb_ms']:.3f} | "
              f"{r['before_fb_ms'] / r['after_fb_ms']:.2f} | {r['before_fb_peak_mib']:.0f} → "
              f"{r['after_fb_peak_mib']:.0f} | {r['max_rel_diff']:.1e} |")
    print("\n| scan only (fwd, no grad) | materialised ms | ordered, Δ/B/C by step ms | ordered, by position ms |")
    print("|---|---|---|---|")
    for r in scans:
        print(f"| {r['name']} | {r['materialised_ms']:.3f} | {r['ordered_by_step_ms']:.3f} | "
              f"{r['ordered_by_position_ms']:.3f} |")
    if models:
        print("\n| model forward (bf16, B 128, 224²) | before ms | after ms | × |")
        print("|---|---|---|---|")
        for r in models:
            speedup = r["before_ms"] / r["after_ms"]
            print(f"| {r['name']} | {r['before_ms']:.2f} | {r['after_ms']:.2f} | {speedup:.2f} |")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "mixers": mixers, "scans": scans, "models": models,
    }
    (out / "bench_ordered_scan.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
