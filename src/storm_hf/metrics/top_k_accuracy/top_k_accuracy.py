"""Top-k accuracy (top-1 and top-5 by default) from class scores, as a local `evaluate` metric.

Load it offline with ``evaluate.load(<path of this folder>)`` (``storm_hf.tools.evaluation.METRIC_PATH``).
It is tooling: model code never imports it.

Kept to one import per line: evaluate scans metric scripts for imports with a line-based parser.
"""
from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-k accuracy: the fraction of samples whose reference class is among the k highest-scoring classes.

A reference counts as within the top k when fewer than k *other* classes score at least as high as it.
Ties therefore count against the prediction (a model that outputs the same score for every class never
scores), which keeps the result independent of the order in which a sort visits tied classes.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per-sample class scores (logits or probabilities), shape (n_samples, n_classes).
    references: per-sample true class index in [0, n_classes).
    top_k: the k values to report (default (1, 5)); each gives a key "top{k}".
Returns:
    {"top1": float, "top5": float, ...}: fractions in [0, 1].
Example:
    >>> metric = evaluate.load("path/to/top_k_accuracy")
    >>> metric.compute(predictions=[[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], references=[1, 2], top_k=(1, 2))
    {'top1': 0.5, 'top2': 0.5}
"""

_CITATION = ""


def reference_ranks(scores: np.ndarray, references: np.ndarray) -> np.ndarray:
    """How many other classes score at least as high as the reference class (0 = a clear top-1 hit)."""
    if scores.ndim != 2:
        raise ValueError(f"predictions must be 2-D (n_samples, n_classes) scores, got shape {scores.shape}.")
    if len(references) != len(scores):
        raise ValueError(f"got {len(scores)} score rows but {len(references)} references.")
    if np.isnan(scores).any():
        raise ValueError("predictions contain NaN scores; check the model output (e.g. fp16 overflow).")
    n_classes = scores.shape[1]
    if len(references) and (references.min() < 0 or references.max() >= n_classes):
        raise ValueError(
            f"references must be class indices in [0, {n_classes}); got values from {references.min()} to "
            f"{references.max()}. Do the dataset's labels match the model's classes?"
        )
    own = scores[np.arange(len(scores)), references]
    return (scores >= own[:, None]).sum(axis=1) - 1


class TopKAccuracy(evaluate.Metric):
    """Top-1/top-5 accuracy from scores; see the module docstring for the tie rule."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, top_k=(1, 5)) -> dict[str, float]:
        if len(references) == 0:
            raise ValueError("top_k_accuracy needs at least one sample.")
        scores = np.asarray(predictions, dtype=np.float64)
        refs = np.asarray(references, dtype=np.int64)
        ranks = reference_ranks(scores, refs)
        out = {}
        for k in top_k:
            if int(k) < 1:
                raise ValueError(f"top_k values must be >= 1, got {k}.")
            out[f"top{int(k)}"] = float((ranks < int(k)).mean())
        return out
