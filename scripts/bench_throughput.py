"""Throughput of every preset, unreduced and reduced, in one run so that ratios are comparable.

For each preset and each (method, flops_ratio) it measures img/s of the forward pass (batch, dtype, input size
fixed; weights cast to the dtype; CUDA events around `iters` forwards after `warmup`), peak memory, GFLOPs from
the analytic counter, and prints the measured speedup next to the ideal 1 / (1 - r) where r is the FLOPs cut
actually achieved. Random weights: throughput does not depend on them.

    python scripts/bench_throughput.py --out $OUT/throughput.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from storm_hf.tools.archs import get_arch  # noqa: E402
from storm_hf.tools.presets import find_model_preset  # noqa: E402

DEFAULT_PRESETS = [
    "vmamba_tiny_s1l8", "vmamba_small_s2l15", "vmamba_base_s2l15",
    "plainmamba_l1", "plainmamba_l2", "plainmamba_l3",
    "vim_tiny", "vim_small", "groupmamba_tiny",
]
DEFAULT_METHODS = ["storm_tome", "storm_evit", "tome", "evit"]
DEFAULT_RATIOS = [0.2, 0.3, 0.4]


def build(preset: str, dtype: torch.dtype, device: str):
    arch, kwargs = find_model_preset(preset)
    spec = get_arch(arch)
    model = spec.classifier_cls(spec.config_cls(**kwargs)).eval()
    return model.to(device=device, dtype=dtype)


@torch.inference_mode()
def time_forward(model, batch: torch.Tensor, warmup: int, iters: int) -> tuple[float, float]:
    """(img/s, peak GiB) of `iters` forwards after `warmup` ones."""
    for _ in range(warmup):
        model(batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        model(batch)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000.0
    return batch.shape[0] * iters / seconds, torch.cuda.max_memory_allocated() / 2**30


def write(args: argparse.Namespace, gpu: str, rows: list[dict]) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(gpu=gpu, torch=torch.__version__, args=vars(args), rows=rows), indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--ratios", nargs="+", type=float, default=DEFAULT_RATIOS)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "throughput.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_throughput needs a CUDA device.", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    dtype = getattr(torch, args.dtype)
    device = "cuda"
    gpu = torch.cuda.get_device_name()
    rows = []
    header = ("| preset | method | target r | GFLOPs | achieved r | img/s | speedup | ideal 1/(1-r) | "
              "speedup/ideal | peak GiB |")
    print(f"# throughput on {gpu}, batch {args.batch}, {args.dtype}, {args.size}x{args.size}, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n")
    print(header)
    print("|" + "---|" * 10)
    for preset in args.presets:
        model = build(preset, dtype, device)
        batch = torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=dtype)
        size = (args.size, args.size)
        model.set_storm(method="none", flops_ratio=None, schedule=None)
        base_flops = model.count_flops(size).total
        base_ips, base_mem = time_forward(model, batch, args.warmup, args.iters)
        settings = [("none", 0.0)] + [(m, r) for m in args.methods for r in args.ratios]
        for method, ratio in settings:
            if method == "none":
                ips, mem, flops = base_ips, base_mem, base_flops
            else:
                try:
                    model.set_storm(method=method, flops_ratio=ratio)
                    flops = model.count_flops(size).total
                except ValueError as err:
                    rows.append(dict(preset=preset, method=method, ratio=ratio, error=str(err)))
                    print(f"| {preset} | {method} | {ratio} | infeasible: {err} |")
                    continue
                ips, mem = time_forward(model, batch, args.warmup, args.iters)
            achieved = 1.0 - flops / base_flops
            speedup = ips / base_ips
            ideal = 1.0 / (1.0 - achieved)
            row = dict(preset=preset, method=method, ratio=ratio, gflops=flops / 1e9, achieved_ratio=achieved,
                       img_s=ips, speedup=speedup, ideal=ideal, speedup_over_ideal=speedup / ideal,
                       peak_gib=mem, batch=args.batch, dtype=args.dtype, gpu=gpu)
            rows.append(row)
            print(f"| {preset} | {method} | {ratio:.1f} | {flops / 1e9:.2f} | {achieved:.3f} | {ips:.0f} | "
                  f"{speedup:.3f} | {ideal:.3f} | {speedup / ideal:.3f} | {mem:.2f} |", flush=True)
        del model, batch
        torch.cuda.empty_cache()
        write(args, gpu, rows)  # after every preset: a run cut short keeps what it measured
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
