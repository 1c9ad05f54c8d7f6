"""CPU inference speed of VMamba-T (random init) with the chunked scan vs the plain sequential scan.

Reference point: the official VMamba code's pure-PyTorch fallback (Python loop over L) needs about
3.4 s per 224×224 image on 2 CPU cores (see /work/shared/notes/vmamba_groupmamba.md §7). Target: ≥ 7×
faster, i.e. ≤ 0.49 s/img.

    PYTHONPATH=src python scripts/bench_cpu.py                # table
    PYTHONPATH=src python scripts/bench_cpu.py --profile      # plus where the time goes
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from typing import Callable

import torch

import storm_hf.modeling_vmamba as modeling_vmamba
from storm_hf.configuration_vmamba import VMambaConfig
from storm_hf.modeling_vmamba import VMambaForImageClassification
from storm_hf.selective_scan import scan_backend

OFFICIAL_FALLBACK_S = 3.4  # official pure-PyTorch fallback, VMamba-T[s1l8], 224², 2 CPU cores
TARGET_SPEEDUP = 7.0


def load_config(preset: str) -> tuple[VMambaConfig, str]:
    """The preset's config, or VMambaConfig's defaults (which are VMamba-T[s1l8]) if presets are missing."""
    try:
        from storm_hf.tools.presets import find_model_preset

        arch, kwargs = find_model_preset(preset)
        if arch != "vmamba":
            raise SystemExit(f"Preset {preset!r} is a {arch} model; this benchmark needs a VMamba preset.")
        return VMambaConfig(**kwargs), f"preset {preset}"
    except (ValueError, FileNotFoundError, ImportError) as err:
        return VMambaConfig(), f"VMambaConfig() defaults (preset {preset!r} not loadable: {err})"


def time_forward(fn: Callable[[], object], warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


class FunctionTimer:
    """Wraps module-level functions of `modeling_vmamba` to add up the wall time spent inside each.

    `selective_scan` is keyed by its input shape (batch, channels, L), the others by name.
    """

    def __init__(self, names: tuple[str, ...] = ("selective_scan", "cross_scan", "cross_merge")) -> None:
        self.originals = {n: getattr(modeling_vmamba, n) for n in names if hasattr(modeling_vmamba, n)}
        self.seconds: dict[object, float] = defaultdict(float)
        self.calls: dict[object, int] = defaultdict(int)

    def _wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            key = tuple(args[0].shape) if name == "selective_scan" else name
            self.seconds[key] += time.perf_counter() - start
            self.calls[key] += 1
            return out

        return timed

    def __enter__(self) -> "FunctionTimer":
        for name, fn in self.originals.items():
            setattr(modeling_vmamba, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self.originals.items():
            setattr(modeling_vmamba, name, fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vmamba_tiny_s1l8")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5, help="timed forwards per backend (median reported)")
    parser.add_argument("--backends", nargs="+", default=["chunked", "reference"],
                        choices=["chunked", "reference"])
    parser.add_argument("--profile", action="store_true", help="also print where the time goes (chunked)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config, source = load_config(args.preset)
    model = VMambaForImageClassification(config).eval()
    pixels = torch.randn(args.batch, config.num_channels, args.image_size, args.image_size)
    params = sum(p.numel() for p in model.parameters()) / 1e6

    print(f"VMamba ({source}, {params:.2f} M params), {args.image_size}², batch {args.batch}, "
          f"{args.threads} threads, fp32, inference_mode, median of {args.runs} after {args.warmup} warm-up "
          f"(torch {torch.__version__})\n")
    results = {}
    for name in args.backends:
        with torch.inference_mode(), scan_backend(name):
            times = time_forward(lambda: model(pixels), args.warmup, args.runs)
        results[name] = (statistics.median(times) / args.batch, min(times) / args.batch)

    print("| scan backend | s/img (median) | s/img (min) | speed-up vs sequential scan | "
          f"speed-up vs official fallback ({OFFICIAL_FALLBACK_S} s) | ≤ {OFFICIAL_FALLBACK_S / TARGET_SPEEDUP:.2f} s/img |")
    print("|---|---|---|---|---|---|")
    for name, (median, best) in results.items():
        vs_ref = f"{results['reference'][0] / median:.2f}×" if "reference" in results else "—"
        verdict = "yes" if median <= OFFICIAL_FALLBACK_S / TARGET_SPEEDUP else "no"
        label = "chunked" if name == "chunked" else "reference (plain sequential)"
        print(f"| {label} | {median:.3f} | {best:.3f} | {vs_ref} | {OFFICIAL_FALLBACK_S / median:.1f}× | {verdict} |")

    if args.profile:
        profile(model, pixels, args)


def profile(model: torch.nn.Module, pixels: torch.Tensor, args: argparse.Namespace) -> None:
    """Share of the scan (per stage) and of the cross-scan/merge copies in the forward, and the heaviest ATen ops."""
    with torch.inference_mode(), scan_backend("chunked"):
        total = statistics.median(time_forward(lambda: model(pixels), 1, args.runs))
        with FunctionTimer() as timer:
            time_forward(lambda: model(pixels), 0, args.runs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(pixels)
    runs = args.runs
    scans = {k: v for k, v in timer.seconds.items() if isinstance(k, tuple)}
    scan_total = sum(scans.values()) / runs
    print(f"\nForward {total:.3f} s (chunked); inside selective_scan {scan_total:.3f} s "
          f"({100 * scan_total / total:.0f} %), outside {total - scan_total:.3f} s.\n")
    print("| part | calls/forward | ms/forward |")
    print("|---|---|---|")
    for key in sorted(scans, key=lambda k: -k[2]):
        print(f"| selective_scan {key} | {timer.calls[key] // runs} | {1e3 * scans[key] / runs:.1f} |")
    for key in ("cross_scan", "cross_merge"):
        if key in timer.seconds:
            print(f"| {key} | {timer.calls[key] // runs} | {1e3 * timer.seconds[key] / runs:.1f} |")
    print("\nHeaviest ATen ops in one forward (self CPU time):\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
