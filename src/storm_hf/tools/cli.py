"""The `storm-hf` command line: convert official checkpoints, inspect models and reduction schedules."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .archs import ARCHS, arch_of_model_type, get_arch
from .presets import find_model_preset, find_storm_preset


def parse_storm_specs(specs: Sequence[str]) -> Optional[dict[str, Any]]:
    """Merge `--storm` arguments: `key=value` pairs (JSON values), a JSON file, or a configs/storm preset name."""
    if not specs:
        return None
    merged: dict[str, Any] = {}
    for spec in specs:
        if "=" in spec:
            key, raw = spec.split("=", 1)
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            merged[key.strip()] = value
        elif spec.endswith(".json"):
            merged.update(json.loads(Path(spec).read_text()))
        elif spec.lstrip().startswith("{"):
            merged.update(json.loads(spec))
        else:
            merged.update(find_storm_preset(spec))
    return merged


def build_model(source: str, *, meta: bool = False) -> Any:
    """A model from a preset name or a saved folder; `meta=True` builds it without allocating weights."""
    import torch

    if Path(source).is_dir():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source, trust_remote_code=True)
        spec = arch_of_model_type(config.model_type)
        config = spec.config_cls(**{k: v for k, v in config.to_dict().items() if k not in ("model_type",)})
    else:
        arch, kwargs = find_model_preset(source)
        spec = get_arch(arch)
        config = spec.config_cls(**kwargs)
    if meta:
        with torch.device("meta"):
            return spec.classifier_cls(config)
    return spec.classifier_cls(config)


def _fmt_g(flops: float) -> str:
    return f"{flops / 1e9:.3f}"


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint
    from .hub import save_model_folder

    model = convert_checkpoint(args.arch, args.checkpoint, preset=args.preset, container_key=args.container_key)
    size = model.config.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    report = model.count_flops(size)
    out = save_model_folder(
        model,
        args.output,
        card_fields={
            "arch": args.arch,
            "arch_title": args.arch,
            "source": Path(args.checkpoint).name,
            "size": f"{size[0]}×{size[1]}",
            "gflops": _fmt_g(report.total),
        },
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Converted {args.checkpoint} -> {out} ({args.arch}, {n_params / 1e6:.2f} M params, "
          f"{_fmt_g(report.total)} GFLOPs at {size[0]}x{size[1]})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect_report import inspect_text

    model = build_model(args.model, meta=True)
    storm = parse_storm_specs(args.storm)
    print(inspect_text(model, tuple(args.size) if args.size else None, storm))
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="storm-hf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert an official checkpoint into a Hugging Face model folder")
    p.add_argument("--arch", required=True, choices=sorted(ARCHS))
    p.add_argument("--checkpoint", required=True, help="official .pth/.pt/.safetensors file")
    p.add_argument("--output", required=True, help="folder to write (config, safetensors, code, processor, card)")
    p.add_argument("--preset", help="preset name (configs/<arch>/); default: infer from tensor shapes")
    p.add_argument("--container-key", help="key holding the state dict (default: model, state_dict, ...)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="params, GFLOPs and grid sizes of a preset or saved model")
    p.add_argument("model", help="preset name (e.g. vmamba_tiny_s1l8) or a saved model folder")
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), help="input size (default: config image_size)")
    p.add_argument("--storm", action="append", default=[],
                   help="reduction: key=value (e.g. method=storm_tome, flops_ratio=0.3), a JSON file, or a "
                        "configs/storm preset name; repeatable")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"storm-hf {args.command}: error: {err}", file=sys.stderr)
        return 2
