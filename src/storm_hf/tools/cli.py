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
        config_file = Path(source) / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{source} is not a saved model folder (no config.json).")
        spec = arch_of_model_type(json.loads(config_file.read_text()).get("model_type", ""))
        config = spec.config_cls.from_pretrained(source)
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


def _limit(value: Optional[int], default: Optional[int]) -> Optional[int]:
    """`--limit`: None -> the command's default, 0 -> the whole split."""
    value = default if value is None else value
    return None if not value else value


def _write_json(path: str, payload: Any) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")


def cmd_eval(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    from .data import load_image_dataset, processor_for
    from .evaluation import (
        DEFAULT_EVAL_LIMIT,
        DEFAULT_STORM_PRESET,
        default_checkpoint,
        default_cifar10,
        evaluate_model,
        format_table,
        load_model,
        nearest_feasible_ratio,
    )

    demo = args.model is None  # no --model: the shipped CIFAR-10 checkpoint, unreduced vs default STORM
    source = args.model or str(default_checkpoint())
    data = args.data or default_cifar10()
    limit = _limit(args.limit, DEFAULT_EVAL_LIMIT if demo else None)
    model = load_model(source)
    dataset = load_image_dataset(data, args.split, image_processor=processor_for(model, source), limit=limit)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    say = print if accelerator.is_main_process else (lambda *a, **k: None)

    storm = parse_storm_specs(args.storm)
    settings: list[Optional[dict[str, Any]]] = []
    notes: list[str] = []
    if demo or args.baseline:
        settings.append({"method": "none"})
    if storm is None and demo:
        storm = find_storm_preset(DEFAULT_STORM_PRESET)
        size = tuple(dataset[0]["pixel_values"].shape[-2:])
        ratio = nearest_feasible_ratio(model, storm["method"], storm["flops_ratio"], size)
        if ratio is None:
            notes.append(f"{storm['method']} cannot reach a FLOPs cut near {storm['flops_ratio']} on {size} inputs.")
            storm = None
        elif ratio != storm["flops_ratio"]:
            notes.append(f"{storm['method']}: flops_ratio {storm['flops_ratio']} is not reachable on {size[0]}x"
                         f"{size[1]} inputs; using the nearest reachable ratio, {ratio}.")
            storm = {**storm, "flops_ratio": ratio}
    if storm is not None:
        settings.append(storm)
    elif not demo and not args.baseline:
        settings.append(None)  # the model's own configured reduction

    rows = []
    for setting in settings:
        if setting is not None:
            model.set_storm(setting)
        rows.append(evaluate_model(model, dataset, args.batch_size, accelerator, num_workers=args.num_workers,
                                   progress=not args.no_progress, description=model.storm_config.method))
    subset = f" (subset of {limit}, evenly spaced)" if limit else ""
    say(f"{source} on {data} [{args.split}]: {rows[0]['n_samples']} images{subset}")
    for note in notes:
        say(f"note: {note}")
    say(format_table(rows))
    if args.output and accelerator.is_main_process:
        _write_json(args.output, {"model": source, "data": data, "split": args.split, "limit": limit, "rows": rows})
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    from .data import load_image_dataset, processor_for
    from .evaluation import default_checkpoint, default_cifar10, format_table, load_model
    from .sweep import run_sweep, write_outputs

    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("storm-hf sweep: error: plots need matplotlib: pip install 'storm-hf[plot]', or pass --no-plots.",
                  file=sys.stderr)
            return 2
    source = args.model or str(default_checkpoint())
    data = args.data or default_cifar10()
    limit = _limit(args.limit, None)
    model = load_model(source)
    base_storm = parse_storm_specs(args.storm)
    if base_storm:  # shared settings (window, positions, similarity...) for every swept point
        model.set_storm(base_storm)
    processor = processor_for(model, source)
    dataset = load_image_dataset(data, args.split, image_processor=processor, limit=limit)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    out_dir = Path(args.output_dir)
    setup = {
        "model": str(Path(source).resolve()) if Path(source).is_dir() else source,
        "data": data, "split": args.split, "limit": limit, "mixed_precision": args.mixed_precision,
        "storm": base_storm,
    }
    references = None
    if args.reference_vit:  # ToMe on a transformers ViT: extra rows/series in the same results
        from .vit_tome import TOME_METHOD, load_vit, tome_reference

        vit = load_vit(args.reference_vit)
        vit_processor = processor_for(vit, args.reference_vit)
        vit_dataset = dataset if vit_processor.to_dict() == processor.to_dict() else load_image_dataset(
            data, args.split, image_processor=vit_processor, limit=limit)
        setup["reference_vit"] = str(Path(args.reference_vit).resolve())
        references = {TOME_METHOD: tome_reference(vit, vit_dataset, args.batch_size, accelerator,
                                                  tolerance=args.reference_tolerance, source=setup["reference_vit"],
                                                  progress=not args.no_progress)}
    rows = run_sweep(model, dataset, args.methods, args.ratios, out_dir / "results.jsonl", setup=setup,
                     batch_size=args.batch_size, accelerator=accelerator, include_baseline=not args.no_baseline,
                     references=references, progress=not args.no_progress, snap=args.snap)
    if accelerator.is_main_process:
        written = write_outputs(rows, out_dir, plots=not args.no_plots)
        print(format_table(rows))
        print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_folder

    if not Path(args.folder).is_dir():
        raise FileNotFoundError(f"{args.folder} is not a folder; pass a model folder written by `storm-hf convert`.")
    url = push_folder(args.folder, args.repo, private=args.private)
    print(f"Pushed {args.folder} -> {url}")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from .cards import add_results_to_card

    path = add_results_to_card(args.model, args.results, dataset_type=args.dataset_type,
                               dataset_name=args.dataset_name, split=args.split, source=args.source)
    print(f"Updated {path} (model-index + results table)")
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

    p = sub.add_parser("card", help="write sweep results into a model folder's card (model-index + table)")
    p.add_argument("model", help="model folder holding README.md")
    p.add_argument("--results", required=True, help="results.json written by `storm-hf sweep`")
    p.add_argument("--dataset-type", default="cifar10")
    p.add_argument("--dataset-name", default="CIFAR-10")
    p.add_argument("--split", default="test")
    p.add_argument("--source", default="", help="where the numbers come from (shown on the Hub)")
    p.set_defaults(func=cmd_card)

    storm_help = ("reduction: key=value (e.g. method=storm_tome, flops_ratio=0.3), a JSON file, or a "
                  "configs/storm preset name; repeatable")
    p = sub.add_parser("eval", help="top-1/top-5, img/s and GFLOPs on an image dataset (works under accelerate launch)",
                       description="With no arguments: the shipped VMamba CIFAR-10 checkpoint on a 1,000-image "
                                   "subset of the CIFAR-10 test set, unreduced vs STORM at the default ratio.")
    p.add_argument("--model", help="saved model folder or preset name (default: $STORM_HF_EVAL_CHECKPOINT or "
                                   "checkpoints/vmamba-cifar10)")
    p.add_argument("--data", help="parquet file/glob, folder of parquet or images, or Hub dataset id "
                                  "(default: CIFAR-10 from ../shared/data/cifar10, else uoft-cs/cifar10)")
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument("--batch-size", type=int, default=64, help="per-process batch size (default: 64)")
    p.add_argument("--storm", action="append", default=[], help=storm_help)
    p.add_argument("--baseline", action="store_true", help="also evaluate the unreduced model first")
    p.add_argument("--limit", type=int, help="score N images evenly spaced over the split; 0 = all "
                                             "(default: all; 1000 with no --model)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--output", help="write the result rows to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sweep", help="methods x FLOPs ratios on one model; resumable; table, CSV/JSON and plots")
    p.add_argument("--model", help="saved model folder or preset name (default: as for eval)")
    p.add_argument("--data", help="dataset source (default: as for eval)")
    p.add_argument("--split", default="test")
    p.add_argument("--methods", nargs="+", default=["storm_tome", "storm_evit", "evit", "tome"],
                   help="reduction methods (default: storm_tome storm_evit evit tome)")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4],
                   help="FLOPs cuts (default: 0.1 0.2 0.3 0.4)")
    p.add_argument("--storm", action="append", default=[],
                   help="settings shared by every point (window, positions, similarity, ...); " + storm_help)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, help="score N images evenly spaced over the split; 0 = all (default)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--output-dir", required=True,
                   help="results.jsonl (resumed if present), results.json/.csv/.md and the PNG plots go here")
    p.add_argument("--snap", type=float, default=0.0, metavar="SHIFT",
                   help="when a ratio is unreachable, evaluate the nearest reachable ratio within SHIFT instead "
                        "(e.g. 0.05; recorded as ratio_used); a resumed sweep retries its infeasible points")
    p.add_argument("--no-baseline", action="store_true", help="skip the unreduced row")
    p.add_argument("--reference-vit", metavar="PATH",
                   help="saved transformers ViT folder: add its unreduced row and ToMe rows (method vit_tome, "
                        "constant r per layer solved for each ratio) as a reference series")
    p.add_argument("--reference-tolerance", type=float, default=0.01,
                   help="largest gap between a requested FLOPs cut and ToMe's nearest (default: 0.01)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("push", help="upload a saved model folder to the Hugging Face Hub")
    p.add_argument("folder", help="model folder written by `storm-hf convert` (or save_model_folder)")
    p.add_argument("--repo", required=True, help="ORG/NAME of the Hub model repo (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.set_defaults(func=cmd_push)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"storm-hf {args.command}: error: {err}", file=sys.stderr)
        return 2
