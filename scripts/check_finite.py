"""No NaN/inf in half precision: forward (and one training step) of trained checkpoints and random-init presets.

For each model, in bf16 and fp16 (weights cast), unreduced and with STORM(ToMe)/STORM(EViT) at flops_ratio 0.3, runs a
forward on real-scale random inputs and checks every logit is finite; also one bf16-autocast training step (loss and
gradients finite). Prints a table; exits 1 if anything is non-finite.

    python scripts/check_finite.py --checkpoints checkpoints/*-cifar10 --presets vmamba_tiny_s1l8 plainmamba_l2 vim_small groupmamba_tiny
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from storm_hf.tools.archs import get_arch  # noqa: E402
from storm_hf.tools.presets import find_model_preset  # noqa: E402

SETTINGS = [("none", None), ("storm_tome", 0.3), ("storm_evit", 0.3)]


def load(source: str):
    if Path(source).is_dir():
        from storm_hf.tools.evaluation import load_model
        model = load_model(source)
        size = model.config.image_size
        return model, int(size[0] if isinstance(size, (list, tuple)) else size)
    arch, kwargs = find_model_preset(source)
    spec = get_arch(arch)
    model = spec.classifier_cls(spec.config_cls(**kwargs))
    return model, int(kwargs.get("image_size", 224))


def check(source: str, batch: int, device: str = "cuda") -> list[dict]:
    rows = []
    base, size = load(source)
    base = base.float()
    x = torch.randn(batch, 3, size, size, device=device) * 1.5
    for dtype in (torch.bfloat16, torch.float16):
        model = copy.deepcopy(base).to(device, dtype).eval()
        for method, ratio in SETTINGS:
            model.set_storm(method=method, flops_ratio=ratio)
            try:
                model.count_flops((size, size))  # the budget solver raises ValueError when unreachable
            except ValueError:
                continue  # e.g. a single-stage model on 32x32 has no schedule near 0.3: nothing to check
            with torch.no_grad():
                logits = model(x.to(dtype)).logits
            rows.append({"model": source, "device": device, "dtype": str(dtype).split(".")[-1], "method": method, "ratio": ratio,
                         "what": "forward", "finite": bool(torch.isfinite(logits).all()),
                         "max_abs": float(logits.float().abs().max())})
    model = base.to(device, torch.float32).train()
    model.set_storm(method="none", flops_ratio=None)
    labels = torch.randint(0, model.config.num_labels, (batch,), device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = model(x, labels=labels).loss
    loss.backward()
    grads_ok = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    rows.append({"model": source, "device": device, "dtype": "bf16-autocast", "method": "none", "ratio": None, "what": "train step",
                 "finite": bool(torch.isfinite(loss)) and bool(grads_ok), "max_abs": float(loss.detach())})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="*", default=[])
    parser.add_argument("--presets", nargs="*", default=[])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cuda", help="cuda (Triton scan) or cpu (PyTorch scan)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    rows = []
    print("| model | dtype | method | ratio | what | finite | max abs logit / loss |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for source in args.checkpoints + args.presets:  # rows print as each model finishes
        found = check(source, args.batch, args.device)
        for r in found:
            print(f"| {r['model']} | {r['dtype']} | {r['method']} | {r['ratio']} | {r['what']} | {r['finite']} | "
                  f"{r['max_abs']:.3g} |", flush=True)
        rows += found
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "check_finite.json").write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if not r["finite"]]
    print(f"{len(rows) - len(bad)}/{len(rows)} finite")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
