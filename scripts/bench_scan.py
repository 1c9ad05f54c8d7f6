"""Benchmark the Triton selective scan against the HBM floor and the PyTorch chunked path.

Prints one table and writes the full numbers as JSON. Run on a CUDA machine:

    PYTHONPATH=src python scripts/bench_scan.py --out results/           # main table
    PYTHONPATH=src python scripts/bench_scan.py --sweep --out results/   # also try tile configs

The floor is the time to move the bytes the scan cannot avoid (each input read once, each output
written once) at the bandwidth of a large device-to-device copy measured on the same GPU; "floor %"
is floor time / measured time. Inputs are random (never zeros), activations in bf16, parameters fp32.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

# name: (batch, channels, L, d_state, groups, has_z) — activations bf16, D and delta_bias present.
SHAPES = {
    "vmamba_t_s0": (128, 4 * 96, 56 * 56, 1, 4, False),
    "vmamba_t_s1": (128, 4 * 192, 28 * 28, 1, 4, False),
    "vmamba_t_s2": (128, 4 * 384, 14 * 14, 1, 4, False),
    "vmamba_t_s3": (128, 4 * 768, 7 * 7, 1, 4, False),
    "plainmamba_l2": (128, 768, 196, 16, 1, True),
    "vim_s": (128, 768, 197, 16, 1, True),
}
SWEEP_SHAPES = ("vmamba_t_s0", "vmamba_t_s2", "vmamba_t_s3", "vim_s")
DEVICE = "cuda"


def make_inputs(batch, channels, length, n_state, groups, has_z, dtype=torch.bfloat16):
    device = DEVICE
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    n_range = torch.arange(1, n_state + 1, device=device, dtype=torch.float32)
    dt_init = torch.exp(torch.rand(channels, generator=g, device=device) * math.log(100)) * 1e-3
    return {
        "u": rnd(batch, channels, length),
        "delta": rnd(batch, channels, length, scale=0.5),
        "A": -n_range.expand(channels, n_state).contiguous(),
        "B": rnd(batch, groups, n_state, length),
        "C": rnd(batch, groups, n_state, length),
        "D": torch.randn(channels, generator=g, device=device),
        "z": rnd(batch, channels, length) if has_z else None,
        "delta_bias": torch.log(torch.expm1(dt_init)),
    }


def nbytes(t):
    return 0 if t is None else t.numel() * t.element_size()


def fwd_bytes(x, out_dtype):
    ins = sum(nbytes(x[k]) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    return ins + x["u"].numel() * torch.empty((), dtype=out_dtype).element_size()


def bwd_bytes(x, out_dtype):
    """Read the inputs and dy once, write each input's gradient once."""
    reads = sum(nbytes(x[k]) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    dy = x["u"].numel() * torch.empty((), dtype=out_dtype).element_size()
    return reads + dy + reads  # gradients have their inputs' sizes


def copy_bandwidth(do_bench) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.randn(1 << 29, device=DEVICE, dtype=torch.float32)  # 2 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    bw = 2 * nbytes(src) / (ms * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    return bw


def time_fwd(fn, x, do_bench):
    with torch.no_grad():
        return do_bench(lambda: fn(**x), warmup=25, rep=200, return_mode="median")


def time_fwd_bwd(fn, x, do_bench):
    leaves = {k: (v.detach().requires_grad_(True) if v is not None else None) for k, v in x.items()}
    wrt = [v for v in leaves.values() if v is not None]
    dy = torch.randn(x["u"].shape, device=DEVICE).to(x["u"].dtype)

    def step():
        y = fn(**leaves)
        torch.autograd.grad(y, wrt, dy)

    return do_bench(step, warmup=25, rep=200, return_mode="median")


def newest_kernel_info(jit_fn):
    """Registers and spills of the most recently compiled variant of a Triton kernel (diagnostics)."""
    try:
        caches = [c[0] for c in jit_fn.device_caches.values()]
        kernel = list(caches[0].values())[-1]
        return {"regs": kernel.n_regs, "spills": kernel.n_spills}
    except Exception:  # noqa: BLE001 - only for the printout
        return {}


# (BLOCK_L, BLOCK_D, num_warps) candidates tried by --sweep, for the forward and the backward.
SWEEP_TILES = {
    1: [(16, 16, 1), (16, 32, 2), (16, 32, 4), (16, 64, 4), (32, 16, 2), (32, 32, 4), (32, 32, 8),
        (32, 64, 8), (64, 16, 4), (64, 32, 8), (64, 64, 8), (128, 16, 8)],
    16: [(8, 2, 2), (8, 4, 2), (8, 4, 4), (16, 2, 1), (16, 2, 2), (16, 4, 2), (16, 4, 4), (16, 8, 4),
         (32, 2, 2), (32, 4, 4)],
}


def sweep(name, x, bw, do_bench, sst, deadline):
    """Time forward and backward tile candidates for one shape (the backward's states come from a
    forward with the same BLOCK_L)."""
    batch, channels, length = x["u"].shape
    n_state, groups = x["A"].shape[1], x["B"].shape[1]
    base = sst.launch_config(n_state, length, channels // groups, x["u"].element_size())
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    dy = torch.randn(x["u"].shape, device=DEVICE).to(x["u"].dtype)
    fb, bb = fwd_bytes(x, x["u"].dtype), bwd_bytes(x, x["u"].dtype)
    rows = []
    for block_l, block_d, warps in SWEEP_TILES[base["N_PAD"]]:
        if time.monotonic() > deadline:
            break
        cfg = dict(base, INFER_BLOCK_L=block_l, INFER_BLOCK_D=block_d, INFER_WARPS=warps,
                   BLOCK_L=block_l, FWD_BLOCK_D=block_d, FWD_WARPS=warps,
                   BWD_BLOCK_D=block_d, BWD_WARPS=warps)
        row = {"shape": name, "BLOCK_L": block_l, "BLOCK_D": block_d, "warps": warps}
        try:
            ms_f = do_bench(lambda: sst._forward(*args, True, x["u"].dtype, False, cfg),
                            warmup=10, rep=60, return_mode="median")
            row.update(fwd_ms=ms_f, fwd_floor=fb / bw / (ms_f * 1e-3),
                       fwd_k=newest_kernel_info(sst._scan_fwd_kernel))
            _, states = sst._forward(*args, True, x["u"].dtype, True, cfg)
            ms_b = do_bench(lambda: sst._backward(dy, *args, True, states, cfg),
                            warmup=10, rep=60, return_mode="median")
            row.update(bwd_ms=ms_b, bwd_floor=bb / bw / (ms_b * 1e-3),
                       bwd_k=newest_kernel_info(sst._scan_bwd_kernel))
        except Exception as err:  # noqa: BLE001 - a config that fails to compile is reported
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="folder for bench_scan.json")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--no-chunked", action="store_true", help="skip the PyTorch chunked comparison")
    parser.add_argument("--sweep", action="store_true", help="also time tile configs (slow)")
    parser.add_argument("--sweep-seconds", type=float, default=240.0, help="stop sweeping after this long")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_scan.py needs a CUDA GPU", file=sys.stderr)
        return 2

    import triton
    from triton.testing import do_bench

    import storm_hf.selective_scan_triton as sst

    chunked = None
    if not args.no_chunked:
        try:
            from storm_hf.selective_scan import selective_scan_chunked as chunked
        except ImportError as err:
            print(f"(no chunked comparison: {err})")

    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth(do_bench)
    meta = {
        "date": datetime.date.today().isoformat(), "gpu": props.name, "sms": props.multi_processor_count,
        "torch": torch.__version__, "triton": triton.__version__, "copy_bandwidth_GBps": bw / 1e9,
        "command": " ".join(sys.argv),
    }
    print(json.dumps(meta), flush=True)

    results = []
    for name in args.shapes:
        batch, channels, length, n_state, groups, has_z = SHAPES[name]
        x = make_inputs(batch, channels, length, n_state, groups, has_z)
        fb, bb = fwd_bytes(x, x["u"].dtype), bwd_bytes(x, x["u"].dtype)
        row = {"shape": name, "batch": batch, "channels": channels, "L": length, "N": n_state,
               "G": groups, "z": has_z, "fwd_MB": fb / 1e6, "fwdbwd_MB": (fb + bb) / 1e6,
               "config": sst.launch_config(n_state, length, channels // groups)}
        row["fwd_ms"] = time_fwd(sst.selective_scan_triton, x, do_bench)
        row["fwdbwd_ms"] = time_fwd_bwd(sst.selective_scan_triton, x, do_bench)
        row["fwd_GBps"] = fb / (row["fwd_ms"] * 1e-3) / 1e9
        row["fwd_floor"] = fb / bw / (row["fwd_ms"] * 1e-3)
        row["fwdbwd_GBps"] = (fb + bb) / (row["fwdbwd_ms"] * 1e-3) / 1e9
        row["fwdbwd_floor"] = (fb + bb) / bw / (row["fwdbwd_ms"] * 1e-3)
        row["bwd_over_fwd"] = (row["fwdbwd_ms"] - row["fwd_ms"]) / row["fwd_ms"]
        if chunked is not None:
            try:
                row["chunked_fwd_ms"] = time_fwd(chunked, x, do_bench)
                row["chunked_fwdbwd_ms"] = time_fwd_bwd(chunked, x, do_bench)
            except Exception as err:  # noqa: BLE001 - e.g. out of memory; the table says so
                row["chunked_error"] = f"{type(err).__name__}: {str(err)[:200]}"
            torch.cuda.empty_cache()
        results.append(row)
        print(json.dumps(row), flush=True)
        del x
        torch.cuda.empty_cache()

    sweep_rows = []
    if args.sweep:
        deadline = time.monotonic() + args.sweep_seconds
        for name in SWEEP_SHAPES:
            batch, channels, length, n_state, groups, has_z = SHAPES[name]
            x = make_inputs(batch, channels, length, n_state, groups, has_z)
            sweep_rows += sweep(name, x, bw, do_bench, sst, deadline)
            del x
            torch.cuda.empty_cache()

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_scan.json"), "w") as f:
        json.dump({"meta": meta, "results": results, "sweep": sweep_rows}, f, indent=1)

    print(f"\n{meta['gpu']}, copy bandwidth {bw / 1e9:.0f} GB/s (read+write), bf16 activations, batch 128")
    head = (f"{'shape':<14} {'fwd ms':>8} {'GB/s':>6} {'floor':>6} {'chunk ms':>9} {'x':>6} | "
            f"{'f+b ms':>8} {'GB/s':>6} {'floor':>6} {'chunk ms':>9} {'x':>6} | {'bwd/fwd':>7}")
    print(head)
    print("-" * len(head))
    for r in results:
        cf, cfb = r.get("chunked_fwd_ms"), r.get("chunked_fwdbwd_ms")
        print(f"{r['shape']:<14} {r['fwd_ms']:8.3f} {r['fwd_GBps']:6.0f} {r['fwd_floor']:6.0%} "
              f"{cf if cf else float('nan'):9.2f} {(cf / r['fwd_ms']) if cf else float('nan'):6.1f} | "
              f"{r['fwdbwd_ms']:8.3f} {r['fwdbwd_GBps']:6.0f} {r['fwdbwd_floor']:6.0%} "
              f"{cfb if cfb else float('nan'):9.2f} {(cfb / r['fwdbwd_ms']) if cfb else float('nan'):6.1f} | "
              f"{r['bwd_over_fwd']:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
