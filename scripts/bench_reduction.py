"""What does one reduction step cost on the GPU? Planning vs applying the plan, per method and shape.

The speedup of a reduced model is the time its smaller blocks save minus the time its reduction steps
spend; this measures the second term at the shapes where VMamba's steps run (stage 0/1 at 224 px, bf16),
next to the time of the block it shortens, so the overhead can be read as a fraction of what it saves.

    python scripts/bench_reduction.py --out $OUT          # table + bench_reduction.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from storm_hf.reduction import StormConfig, plan_reduction, reduce_tokens  # noqa: E402

#: (label, batch, in grid, out grid, channels): VMamba-T s1l8 stage-0 exit and stage-1 exit steps at 224 px.
SHAPES = (
    ("VMamba-T s0 56x56 -> 48x48, C 96", 128, (56, 56), (48, 48), 96),
    ("VMamba-T s1 28x28 -> 22x22, C 192", 128, (28, 28), (22, 22), 192),
    ("VMamba-B s0 56x56 -> 48x48, C 128", 128, (56, 56), (48, 48), 128),
)
METHODS = ("storm_tome", "storm_evit", "tome", "evit")


def cuda_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def profile_step(fn):
    """One call under the profiler (after a warm-up call): its events, summed GPU kernel time (ms), kernel count.

    The CUDA-event timings above include host time whenever the GPU outruns the Python launching its small
    kernels; inside a model the GPU is busy with the blocks meanwhile, so the kernel time is what a step costs.
    """
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    cuda = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    return events, sum(e.self_device_time_total for e in cuda) / 1e3, sum(e.count for e in cuda)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--profile", type=int, default=0, help="also print the top N CUDA kernels of each step")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows, profiles = [], []
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, {args.iters} iterations per cell (CUDA events)")
    print("| shape | method | plan ms | apply ms (residual + branch) | whole step ms | step GPU-kernel ms | "
          "kernels | copy-floor ms |")
    print("|---|---|---|---|---|---|---|---|")
    for label, batch, in_hw, out_hw, channels in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(batch, *in_hw, channels, device="cuda", dtype=dtype, generator=gen)
        branch = torch.randn(batch, *in_hw, channels, device="cuda", dtype=dtype, generator=gen)
        floor = cuda_ms(lambda: (x.clone(), branch.clone()), args.iters)  # read + write both maps once
        for method in METHODS:
            cfg = StormConfig(method=method, flops_ratio=0.3)
            plan = plan_reduction(cfg, x, branch, out_hw)
            mode = "mean" if cfg.resolved_merge_mode() == "mean" else "sum"
            plan_ms = cuda_ms(lambda: plan_reduction(cfg, x, branch, out_hw), args.iters)
            apply_ms = cuda_ms(lambda: (plan.apply(x, None, mode), plan.apply(branch, None, mode)), args.iters)
            step_ms = cuda_ms(lambda: reduce_tokens(cfg, x, branch, out_hw), args.iters)
            events, kernel_ms, kernels = profile_step(lambda: reduce_tokens(cfg, x, branch, out_hw))
            rows.append({"shape": label, "batch": batch, "in_hw": in_hw, "out_hw": out_hw, "channels": channels,
                         "method": method, "plan_ms": plan_ms, "apply_ms": apply_ms, "step_ms": step_ms,
                         "step_kernel_ms": kernel_ms, "step_kernels": kernels, "copy_floor_ms": floor})
            print(f"| {label} | {method} | {plan_ms:.3f} | {apply_ms:.3f} | {step_ms:.3f} | {kernel_ms:.3f} | "
                  f"{kernels} | {floor:.3f} |")
            if args.profile:
                profiles.append((label, method, events.table(sort_by="cuda_time_total", row_limit=args.profile,
                                                             max_name_column_width=60)))
    for label, method, table in profiles:
        print(f"\ntop CUDA kernels of one {method} step, {label}:\n{table}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_reduction.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "dtype": args.dtype, "torch": torch.__version__, "rows": rows},
        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
