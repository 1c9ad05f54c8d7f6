"""Put sweep results into a model card: Hub `model-index` metadata plus a readable table."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

RESULTS_HEADING = "## Training-free token reduction (storm-hf sweep)"


def _rows(results: str | Path | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(results, (str, Path)):
        data = json.loads(Path(results).read_text())
        return data["rows"] if isinstance(data, dict) else data
    return list(results)


def add_results_to_card(
    folder: str | Path,
    results: str | Path | Iterable[dict[str, Any]],
    *,
    dataset_type: str = "cifar10",
    dataset_name: str = "CIFAR-10",
    split: str = "test",
    source: str = "",
) -> Path:
    """Write every finished sweep row into `folder/README.md` as model-index entries and a markdown table.

    Re-running replaces the earlier results section and metadata, so a card never carries stale numbers.
    """
    from huggingface_hub import EvalResult, ModelCard

    path = Path(folder) / "README.md"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no README.md model card to update.")
    # rows of reference models (e.g. the ViT + ToMe rows of `sweep --reference-vit`) describe another model
    rows = [r for r in _rows(results) if r.get("status", "ok") == "ok" and r.get("top1") is not None
            and not r.get("reference_model")]
    if not rows:
        raise ValueError("The results hold no finished rows (all infeasible or failed).")
    card = ModelCard.load(path)
    evals = []
    for row in rows:
        label = "unreduced" if row["method"] == "none" else f"{row['method']}, FLOPs -{100 * row['flops_cut']:.1f}%"
        for metric, key in (("accuracy", "top1"), ("top_5_accuracy", "top5")):
            evals.append(EvalResult(
                task_type="image-classification", dataset_type=dataset_type, dataset_name=dataset_name,
                dataset_split=split, metric_type=metric, metric_value=round(100 * row[key], 2),
                metric_name=f"{'top-1' if key == 'top1' else 'top-5'} ({label})",
                metric_config=f"{row['method']}@{row['ratio']}",
            ))
    card.data.eval_results = evals
    card.data.model_name = card.data.model_name or Path(folder).name
    body = card.text.split(RESULTS_HEADING)[0].rstrip()
    table = [
        RESULTS_HEADING, "",
        f"{dataset_name} {split} top-1 without any training after reduction; GFLOPs per image at the model's input "
        "size (1 multiply-add = 1 FLOP). Produced by `storm-hf sweep`" + (f" ({source})." if source else "."), "",
        "| method | target ratio | GFLOPs | FLOPs cut | top-1 % | top-5 % | images |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        table.append(f"| {row['method']} | {row['ratio']} | {row['gflops']:.4f} | {100 * row['flops_cut']:.1f} % | "
                     f"{100 * row['top1']:.2f} | {100 * row['top5']:.2f} | {row.get('n_samples', '')} |")
    card.text = body + "\n\n" + "\n".join(table) + "\n"
    card.save(path)
    return path
