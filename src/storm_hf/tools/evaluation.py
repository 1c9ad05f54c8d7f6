"""Top-1/top-5 accuracy, throughput and FLOPs of a classifier on an image dataset, with Accelerate.

The loop is Accelerate's idiomatic evaluation loop (``prepare`` + ``gather_for_metrics``), so the same code
runs on one CPU, one GPU, or several processes under ``accelerate launch`` / ``torchrun``: the samples that
Accelerate duplicates to pad the last batch are dropped before scoring, and every process returns the same
result dict. Scores go through the local ``evaluate`` metric shipped in ``storm_hf/metrics/top_k_accuracy``.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .data import collate_batch

#: the local `evaluate` metric folder (works offline: ``evaluate.load(str(METRIC_PATH))``).
METRIC_PATH = Path(__file__).resolve().parent.parent / "metrics" / "top_k_accuracy"
_REPO_ROOT = Path(__file__).resolve().parents[3]
#: where `storm-hf eval` with no --model looks for the shipped CIFAR-10 VMamba (env var wins).
CHECKPOINT_ENV = "STORM_HF_EVAL_CHECKPOINT"
DEFAULT_CHECKPOINT = Path("checkpoints") / "vmamba-cifar10"
#: where the CIFAR-10 parquet copy is looked for (env var wins), else the Hub dataset below.
CIFAR10_ENV = "STORM_HF_CIFAR10"
CIFAR10_HUB_ID = "uoft-cs/cifar10"
#: `storm-hf eval` with no --model: images scored per row (every 10th CIFAR-10 test image, 100 per class),
#: so both rows (unreduced, STORM) of the configs/cifar10/vmamba.json model (0.075 GFLOPs) finish in about
#: 2 minutes on 2 busy CPU cores; --limit 0 scores the whole split.
DEFAULT_EVAL_LIMIT = 1000
#: the reduction `storm-hf eval` with no --model compares against the unreduced model (configs/storm/).
DEFAULT_STORM_PRESET = "storm_tome_flops_30"


def load_metric() -> Any:
    """The top-k accuracy metric, loaded from its local folder (no network) and kept in memory."""
    import evaluate

    return evaluate.load(str(METRIC_PATH), keep_in_memory=True)


def default_checkpoint() -> Path:
    """The shipped CIFAR-10 checkpoint: $STORM_HF_EVAL_CHECKPOINT, else checkpoints/vmamba-cifar10 (cwd, repo)."""
    if os.environ.get(CHECKPOINT_ENV):
        candidates = [Path(os.environ[CHECKPOINT_ENV])]
    else:
        candidates = [Path.cwd() / DEFAULT_CHECKPOINT, _REPO_ROOT / DEFAULT_CHECKPOINT]
    for path in candidates:
        if (path / "config.json").is_file():
            return path
    raise FileNotFoundError(
        f"No default checkpoint: looked for a model folder at {', '.join(str(p) for p in candidates)}. "
        f"Pass --model DIR_OR_PRESET, or set {CHECKPOINT_ENV} to a saved model folder."
    )


def default_cifar10() -> str:
    """CIFAR-10: $STORM_HF_CIFAR10, else the shared parquet copy beside the repo, else the Hub id."""
    if os.environ.get(CIFAR10_ENV):
        return os.environ[CIFAR10_ENV]
    shared = Path("shared") / "data" / "cifar10"
    for folder in (Path.cwd().parent / shared, _REPO_ROOT.parent / shared):
        if (folder / "test.parquet").is_file():
            return str(folder)
    return CIFAR10_HUB_ID


def load_model(source: str) -> Any:
    """A classifier with weights from a saved folder, or a randomly initialised one from a preset name."""
    from .cli import build_model

    if Path(source).is_dir():
        from transformers import AutoConfig

        from .archs import arch_of_model_type

        if not (Path(source) / "config.json").is_file():
            raise FileNotFoundError(f"{source} is not a saved model folder (no config.json).")
        try:
            model_type = AutoConfig.from_pretrained(source, trust_remote_code=True).model_type
        except (OSError, ValueError) as err:
            raise ValueError(f"Could not read the model config in {source}: {err}") from err
        try:
            spec = arch_of_model_type(model_type)
        except ValueError as err:
            raise ValueError(f"{source} holds a {model_type!r} model, not a storm-hf backbone: {err}") from err
        # Checkpoints may be stored in fp16 to stay small; compute in fp32 and leave mixed precision to Accelerate.
        import torch

        return spec.classifier_cls.from_pretrained(source, dtype=torch.float32).eval()
    return build_model(source).eval()


def storm_summary(model: Any) -> dict[str, Any]:
    """`method`, `ratio` (the requested FLOPs cut; 0 unreduced, None for an explicit schedule) and the config."""
    cfg = model.storm_config
    if not cfg.enabled:
        return {"method": "none", "ratio": 0.0, "storm": cfg.to_dict()}
    ratio = float(cfg.flops_ratio) if cfg.flops_ratio is not None else None
    return {"method": cfg.method, "ratio": ratio, "storm": cfg.to_dict()}


def flops_summary(model: Any, image_size: tuple[int, int]) -> dict[str, float]:
    """GFLOPs under the configured reduction and unreduced, per image (raises ValueError if infeasible)."""
    reduced = model.count_flops(image_size).total
    full = model._flops(image_size, {}).total  # the backbone's unreduced count (StormMixin contract)
    return {"gflops": reduced / 1e9, "gflops_unreduced": full / 1e9, "flops_cut": 1.0 - reduced / full}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate_model(
    model: Any,
    dataset: Any,
    batch_size: int = 64,
    accelerator: Any = None,
    *,
    mixed_precision: str = "no",
    num_workers: int = 0,
    progress: bool = True,
    description: str = "eval",
    summary: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``dataset`` (rows with ``pixel_values`` and ``labels``; see ``data.load_image_dataset``).

    Args:
        model: a storm-hf classifier; its current STORM setting is what gets evaluated.
        dataset: a map-style dataset of preprocessed rows.
        batch_size: per-process batch size.
        accelerator: an ``accelerate.Accelerator``; default: a new one with ``mixed_precision``.
        mixed_precision: ``no``, ``fp16`` or ``bf16`` (only used when no accelerator is passed).
        num_workers: DataLoader worker processes.
        progress: show a tqdm bar on the main process.
        summary: the method/ratio/FLOPs fields for a model without storm-hf's ``count_flops`` (e.g. a
            transformers ViT under ToMe, ``tools.vit_tome``); default: read from the storm-hf model.

    Returns (identical on every process) a dict with ``top1``, ``top5`` (fractions), ``n_samples``,
    ``img_per_s`` (forward passes only, first batch excluded as warm-up when a process has several;
    summed over processes), ``device``, ``batch_size``, ``num_processes``, ``mixed_precision``,
    ``image_size``, ``gflops`` (per image, from ``model.count_flops``), ``gflops_unreduced``,
    ``flops_cut``, ``method``, ``ratio`` and ``storm``.

    ``accelerator.prepare`` moves the model to the accelerator's device and, under mixed precision, wraps
    its ``forward`` in autocast in place (Accelerate's behaviour); evaluate copies if that matters.
    """
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty; nothing to evaluate.")
    first = dataset[0]
    if "pixel_values" not in first:
        raise ValueError("Dataset rows have no pixel_values: load it with an image processor "
                         "(storm_hf.tools.data.load_image_dataset(..., image_processor=...)).")
    image_size = tuple(int(s) for s in first["pixel_values"].shape[-2:])
    if summary is None:
        summary = {**storm_summary(model), **flops_summary(model, image_size)}  # fails fast if infeasible

    accelerator = accelerator if accelerator is not None else Accelerator(mixed_precision=mixed_precision)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_batch,
                        num_workers=num_workers)
    model.eval()
    prepared, loader = accelerator.prepare(model, loader)
    metric = load_metric() if accelerator.is_main_process else None

    n_samples = 0
    timed_images, timed_seconds = 0, 0.0
    warm_images, warm_seconds = 0, 0.0
    bar = tqdm(loader, desc=description, disable=not (progress and accelerator.is_local_main_process))
    for step, batch in enumerate(bar):
        pixel_values, labels = batch["pixel_values"], batch["labels"]
        _sync(accelerator.device)
        start = time.perf_counter()
        with torch.no_grad():
            logits = prepared(pixel_values=pixel_values).logits
        _sync(accelerator.device)
        elapsed = time.perf_counter() - start
        if step == 0:
            warm_images, warm_seconds = len(pixel_values), elapsed
        else:
            timed_images, timed_seconds = timed_images + len(pixel_values), timed_seconds + elapsed

        logits, labels = accelerator.gather_for_metrics((logits.float().contiguous(), labels.contiguous()))
        if labels.numel() and int(labels.max()) >= logits.shape[-1]:
            raise ValueError(
                f"The dataset has label {int(labels.max())} but the model has {logits.shape[-1]} classes; "
                "evaluate on a dataset with the model's label set."
            )
        if torch.isnan(logits).any():
            raise ValueError("The model produced NaN logits; try --mixed-precision no, or check the weights.")
        n_samples += len(labels)
        if metric is not None:
            metric.add_batch(predictions=logits.cpu().numpy(), references=labels.cpu().numpy())

    if timed_images == 0:  # a single batch on this process: time it, warm-up included
        timed_images, timed_seconds = warm_images, warm_seconds
    rates = accelerator.gather(torch.tensor([timed_images / max(timed_seconds, 1e-12)], device=accelerator.device,
                                            dtype=torch.float64))
    scores = [metric.compute(top_k=(1, 5)) if metric is not None else None]
    broadcast_object_list(scores, from_process=0)
    return {
        **summary,
        "top1": scores[0]["top1"],
        "top5": scores[0]["top5"],
        "n_samples": n_samples,
        "img_per_s": float(rates.sum()),
        "device": device_name(accelerator.device),
        "batch_size": batch_size,
        "num_processes": accelerator.num_processes,
        "mixed_precision": str(accelerator.mixed_precision),
        "image_size": list(image_size),
    }


def nearest_feasible_ratio(model: Any, method: str, ratio: float, image_size: tuple[int, int], *,
                           step: float = 0.01, max_shift: float = 0.1) -> Optional[float]:
    """The FLOPs ratio closest to ``ratio`` (on a ``step`` grid, within ``max_shift``) the budget solver can meet.

    Small inputs (CIFAR's 8x8 token grids) only reach a few cuts, so a demo default may be unreachable.
    Leaves the model's STORM setting as it found it; returns None when nothing nearby is feasible.
    """
    saved = model.config.storm
    try:
        for k in range(int(round(max_shift / step)) + 1):
            for candidate in ((ratio,) if k == 0 else (ratio - k * step, ratio + k * step)):
                candidate = round(candidate, 6)
                if not 0.0 < candidate < 1.0:
                    continue
                try:
                    model.set_storm(method=method, flops_ratio=candidate, schedule=None)
                    model.count_flops(image_size)
                    return candidate
                except ValueError:
                    continue
        return None
    finally:
        model.config.storm = saved


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of evaluation rows (accuracies in percent)."""
    header = "| method | ratio | GFLOPs | FLOPs cut | top-1 % | top-5 % | img/s | images | device, batch |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for row in rows:
        if row.get("status") == "infeasible":
            lines.append(f"| {row['method']} | {_fmt(row.get('ratio'), '.3g')} | infeasible: {row.get('reason', '')} "
                         "| | | | | | |")
            continue
        ratio = _fmt(row.get("ratio"), ".3g") + (f" (ran {row['ratio_used']:g})" if row.get("ratio_used") else "")
        lines.append(
            f"| {row['method']} | {ratio} | {_fmt(row.get('gflops'), '.4g')} "
            f"| {_fmt(row.get('flops_cut'), '.1%')} | {_fmt(_pct(row.get('top1')), '.2f')} "
            f"| {_fmt(_pct(row.get('top5')), '.2f')} | {_fmt(row.get('img_per_s'), '.1f')} "
            f"| {row.get('n_samples', '')} | {row.get('device', '')}, {row.get('batch_size', '')} |"
        )
    return "\n".join(lines)


def _pct(value: Optional[float]) -> Optional[float]:
    return None if value is None else 100.0 * value


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)
