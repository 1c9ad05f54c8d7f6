"""Where does a reduced model's forward time go? Per-block CUDA time, unreduced vs reduced, plus top kernels.

Explains a speedup below the ideal 1/(1-r): the FLOPs-based budget cuts blocks whose *time* share may differ from
their FLOPs share. Times every block module (VMambaBlock, GroupMambaBlock, PlainMambaLayer, VimLayer and the
downsampling modules) with CUDA events around its forward, and prints the FLOPs share next to the time share.

    python scripts/profile_forward.py vmamba_tiny_s1l8 --storm method=storm_tome --storm flops_ratio=0.3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from storm_hf.tools.archs import get_arch  # noqa: E402
from storm_hf.tools.presets import find_model_preset  # noqa: E402

TIMED = ("Block", "Layer", "Downsample", "Embeddings", "PatchEmbeddings", "Stem")


def parse_storm(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def block_times(model: torch.nn.Module, x: torch.Tensor, iters: int) -> tuple[dict[str, float], float]:
    """Mean CUDA ms per timed module (by qualified name) and of the whole forward."""
    events: dict[str, list] = defaultdict(list)
    handles = []
    for name, module in model.named_modules():
        if name and type(module).__name__.endswith(TIMED) and not any(
                name.startswith(other + ".") for other in events):
            events[name] = []

            def pre(mod, args, name=name):
                start = torch.cuda.Event(enable_timing=True)
                start.record()
                events[name].append([start, None])

            def post(mod, args, output, name=name):
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                events[name][-1][1] = end
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    totals = []
    with torch.no_grad():
        for it in range(iters + 2):
            for v in events.values():
                v.clear()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            model(x)
            e.record()
            torch.cuda.synchronize()
            if it >= 2:
                totals.append((s.elapsed_time(e), {n: sum(a.elapsed_time(b) for a, b in v) for n, v in events.items()}))
    for h in handles:
        h.remove()
    names = totals[0][1].keys()
    per = {n: sum(t[1][n] for t in totals) / len(totals) for n in names}
    return per, sum(t[0] for t in totals) / len(totals)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset")
    parser.add_argument("--storm", action="append", default=[], help="key=value of StormConfig (repeatable)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--kernels", type=int, default=12, help="rows of the top-kernel table (0: none)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    arch, kwargs = find_model_preset(args.preset)
    spec = get_arch(arch)
    model = spec.classifier_cls(spec.config_cls(**kwargs)).eval().to("cuda", torch.bfloat16)
    x = torch.randn(args.batch, 3, args.size, args.size, device="cuda", dtype=torch.bfloat16)
    storm = parse_storm(args.storm)
    results = {}
    for label, setting in (("unreduced", {"method": "none", "flops_ratio": None}), ("reduced", storm)):
        model.set_storm(**setting)
        flops = model.count_flops((args.size, args.size))
        per, total = block_times(model, x, args.iters)
        results[label] = {"total_ms": total, "blocks_ms": per, "gflops": flops.total / 1e9,
                          "schedule": {f"{k}": v for k, v in (model.storm_schedule((args.size, args.size)) or {}).items()}
                          if label == "reduced" else {}}
    base, red = results["unreduced"], results["reduced"]
    cut = 1 - red["gflops"] / base["gflops"]
    print(f"{args.preset} {args.size}px batch {args.batch} bf16, storm {storm}: GFLOPs {base['gflops']:.3f} -> "
          f"{red['gflops']:.3f} (cut {cut:.1%}); forward {base['total_ms']:.2f} -> {red['total_ms']:.2f} ms "
          f"(speedup {base['total_ms'] / red['total_ms']:.2f}x, ideal {1 / (1 - cut):.2f}x)")
    print(f"schedule: {red['schedule']}")
    print("| module | unreduced ms | share | reduced ms | saved ms |")
    print("|---|---|---|---|---|")
    for name, ms in base["blocks_ms"].items():
        r = red["blocks_ms"].get(name, 0.0)
        print(f"| {name} | {ms:.3f} | {ms / base['total_ms']:.1%} | {r:.3f} | {ms - r:.3f} |")
    other_b = base["total_ms"] - sum(base["blocks_ms"].values())
    other_r = red["total_ms"] - sum(red["blocks_ms"].values())
    print(f"| (rest: head, norms, reduction outside blocks) | {other_b:.3f} | {other_b / base['total_ms']:.1%} | "
          f"{other_r:.3f} | {other_b - other_r:.3f} |")
    if args.kernels:
        for label, setting in (("unreduced", {"method": "none", "flops_ratio": None}), ("reduced", storm)):
            model.set_storm(**setting)
            with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                model(x)
                torch.cuda.synchronize()
            print(f"\ntop kernels, {label}:")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.kernels,
                                            max_name_column_width=70))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"profile_{args.preset}.json"
    path.write_text(json.dumps({"preset": args.preset, "storm": storm, "batch": args.batch, "size": args.size,
                                "device": torch.cuda.get_device_name(), **results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
