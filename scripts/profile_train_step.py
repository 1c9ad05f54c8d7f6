"""Profile a few training steps of a CIFAR-10 preset on CUDA: which kernels dominate one step.

    python scripts/profile_train_step.py plainmamba --batch 512
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from storm_hf.tools.archs import get_arch  # noqa: E402
from storm_hf.tools.presets import find_model_preset  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", help="e.g. plainmamba (configs/cifar10/) or a model preset name")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    name = args.preset if "/" in args.preset or not (Path("configs/cifar10") / f"{args.preset}.json").is_file() \
        else f"cifar10/{args.preset}"
    arch, kwargs = find_model_preset(name)
    spec = get_arch(arch)
    model = spec.classifier_cls(spec.config_cls(**kwargs)).cuda().train()
    size = kwargs.get("image_size", 224)
    x = torch.randn(args.batch, 3, size, size, device="cuda")
    y = torch.randint(0, model.config.num_labels, (args.batch,), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - t0) / args.steps
    print(f"{name}: {per_step * 1e3:.1f} ms/step at batch {args.batch} -> {args.batch / per_step:.0f} img/s")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
