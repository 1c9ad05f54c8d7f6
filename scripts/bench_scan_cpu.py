"""CPU speed of the selective scan: plain sequential reference vs the chunked path, per call.

Shapes are the ones the backbones produce for one 224×224 image: VMamba-T's four stages
(4 scan directions × d_inner channels, N = 1, G = 4) and PlainMamba/Vim blocks (N = 16, G = 1).

    PYTHONPATH=src python scripts/bench_scan_cpu.py --threads 2
    PYTHONPATH=src python scripts/bench_scan_cpu.py --chunk-sizes 4 8 16 32   # tuning sweep
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from storm_hf.selective_scan import default_chunk_size, selective_scan_chunked, selective_scan_reference

STAT = "median"

# (label, channels, L, N, G)
SHAPES = [
    ("VMamba-T stage 1", 384, 3136, 1, 4),
    ("VMamba-T stage 2", 768, 784, 1, 4),
    ("VMamba-T stage 3", 1536, 196, 1, 4),
    ("VMamba-T stage 4", 3072, 49, 1, 4),
    ("PlainMamba/Vim-S block", 768, 196, 16, 1),
    ("Vim-S block (+cls)", 768, 197, 16, 1),
    ("Vim-T block (+cls)", 384, 197, 16, 1),
]


def median_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall time in ms (``--stat min`` switches to the minimum, steadier on a busy machine)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * (min(times) if STAT == "min" else statistics.median(times))


def make_inputs(batch: int, channels: int, length: int, n_state: int, groups: int, seed: int = 0):
    """Inputs with the magnitudes of an initialised Mamba block (Δ ≈ softplus(small), A = -exp(A_log))."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, channels, length, generator=g)
    delta = 0.5 * torch.randn(batch, channels, length, generator=g) - 4.0
    A = -torch.arange(1, n_state + 1, dtype=torch.float32).repeat(channels, 1)
    B = torch.randn(batch, groups, n_state, length, generator=g)
    C = torch.randn(batch, groups, n_state, length, generator=g)
    D = torch.ones(channels)
    bias = torch.rand(channels, generator=g)
    return u, delta, A, B, C, D, bias


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--chunk-sizes", type=int, nargs="*", default=None,
        help="also time the chunked path at these chunk sizes (default: only the built-in choice)",
    )
    parser.add_argument("--skip-reference", action="store_true", help="time only the chunked path")
    parser.add_argument("--stat", choices=("median", "min"), default="median", help="statistic over repeats")
    args = parser.parse_args()
    global STAT
    STAT = args.stat
    torch.set_num_threads(args.threads)

    extra = args.chunk_sizes or []
    header = ["shape", "(channels, L, N, G)", "reference ms", "chunked ms (T)", "speed-up", "max rel. diff"]
    header += [f"T={t} ms" for t in extra]
    print(f"selective scan, fp32 forward, batch {args.batch}, {args.threads} threads, "
          f"{args.stat} of {args.repeats} (torch {torch.__version__})\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label, channels, length, n_state, groups in SHAPES:
        u, delta, A, B, C, D, bias = make_inputs(args.batch, channels, length, n_state, groups)
        kwargs = dict(D=D, delta_bias=bias, delta_softplus=True)
        with torch.inference_mode():
            fast = lambda: selective_scan_chunked(u, delta, A, B, C, **kwargs)  # noqa: E731
            t_fast = median_ms(fast, args.warmup, args.repeats)
            if args.skip_reference:
                t_ref, speedup, diff = float("nan"), "", ""
            else:
                slow = lambda: selective_scan_reference(u, delta, A, B, C, **kwargs)  # noqa: E731
                t_ref = median_ms(slow, 1, max(3, args.repeats // 2))
                y_ref, y_fast = slow(), fast()
                diff = f"{((y_fast - y_ref).abs().max() / y_ref.abs().max()).item():.1e}"
                speedup = f"{t_ref / t_fast:.1f}×"
            sweep = [
                f"{median_ms(lambda t=t: selective_scan_chunked(u, delta, A, B, C, chunk_size=t, **kwargs), args.warmup, args.repeats):.2f}"
                for t in extra
            ]
        row = [label, f"({channels}, {length}, {n_state}, {groups})", f"{t_ref:.2f}",
               f"{t_fast:.2f} ({default_chunk_size(length, n_state)})", speedup, diff] + sweep
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
