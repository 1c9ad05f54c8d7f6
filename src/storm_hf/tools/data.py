"""Image classification datasets for evaluation: local parquet, imagefolder or Hub id, preprocessed on the fly.

Images are decoded by us (the image column is read with ``decode=False``) so that an unreadable image is
reported with its row and path instead of surfacing as an anonymous PIL error deep inside a DataLoader;
nothing is ever skipped silently. Preprocessing is the model's own image processor applied through
``Dataset.with_transform`` (nothing is cached to disk), so a 32x32 CIFAR model gets its own
``preprocessor_config.json`` and an ImageNet model its crop-and-resize.
"""
from __future__ import annotations

import glob
import io
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

#: label columns tried in order (HF conventions: CIFAR-10 `label`, some exports `labels`, CIFAR-100 `fine_label`).
LABEL_COLUMNS = ("label", "labels", "fine_label")
#: image columns tried in order when no column has the `datasets.Image` feature type.
IMAGE_COLUMNS = ("image", "img", "pixel_values")
#: column holding each row's index in the full split, so errors and subsets name the original row.
ROW_COLUMN = "_storm_row"
_GLOB_CHARS = set("*?[")


def subset_indices(num_rows: int, limit: Optional[int]) -> list[int]:
    """The documented evaluation subset: ``limit`` rows evenly spaced over the split (row ``i * n // limit``).

    Deterministic, needs no seed, and keeps class-sorted splits (CIFAR-10's test set is in class order)
    balanced, unlike taking the first ``limit`` rows. ``None`` or ``limit >= num_rows`` keeps every row.
    """
    if limit is None or limit >= num_rows:
        return list(range(num_rows))
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive number of images (or None for all), got {limit!r}.")
    return [i * num_rows // limit for i in range(limit)]


def _is_local(source: str) -> bool:
    return (
        Path(source).exists()
        or bool(_GLOB_CHARS & set(source))
        or source.endswith(".parquet")
        or source.startswith((".", "/", "~"))
    )


def _parquet_split_files(folder: Path, split: str) -> tuple[list[str], list[str]]:
    """Parquet files of ``split`` in a folder (``test.parquet``, ``test-00000-of-00001.parquet``, ``data/...``)."""
    files = sorted(folder.glob("*.parquet")) + sorted(folder.glob("data/*.parquet"))
    splits = sorted({f.name.split(".")[0].split("-")[0] for f in files})
    chosen = [str(f) for f in files if f.name.split(".")[0].split("-")[0] == split]
    return chosen, splits


def _load_raw(source: str, split: str, cache_dir: Optional[str]) -> Any:
    import datasets

    if not _is_local(source):
        try:
            return datasets.load_dataset(source, split=split, cache_dir=cache_dir)
        except ValueError as err:  # unknown split and the like: keep the library's explanation
            raise ValueError(f"Could not load split {split!r} of Hub dataset {source!r}: {err}") from err
        except Exception as err:  # noqa: BLE001 -- offline, not found, gated: say what to do
            raise FileNotFoundError(
                f"Could not load Hub dataset {source!r} ({type(err).__name__}: {err}). Check the dataset id and "
                "your network (HF_HUB_OFFLINE=1 blocks downloads), or pass a local parquet file/glob or an "
                "imagefolder directory."
            ) from err

    path = Path(source).expanduser()
    if path.is_dir():
        files, splits = _parquet_split_files(path, split)
        if splits:
            if not files:
                raise ValueError(f"{path} has no parquet file for split {split!r}; its parquet splits are {splits}.")
            return datasets.load_dataset("parquet", data_files={split: files}, split=split, cache_dir=cache_dir)
        try:
            return datasets.load_dataset("imagefolder", data_dir=str(path), split=split, cache_dir=cache_dir)
        except ValueError as err:
            raise ValueError(
                f"Could not load split {split!r} of image folder {path}: {err}. An image folder without "
                "train/validation/test subfolders has only the split 'train'."
            ) from err
    files = sorted(glob.glob(str(path))) if _GLOB_CHARS & set(source) else ([str(path)] if path.is_file() else [])
    if not files:
        raise FileNotFoundError(f"No dataset at {source!r}: not a parquet file, a glob matching files, or a folder.")
    not_parquet = [f for f in files if not f.endswith(".parquet")]
    if not_parquet:
        raise ValueError(f"Expected parquet files, got {not_parquet[:3]}; pass a parquet file/glob or a folder.")
    return datasets.load_dataset("parquet", data_files={split: files}, split=split, cache_dir=cache_dir)


def find_image_column(dataset: Any) -> str:
    """The column with the `datasets.Image` feature (else the first of IMAGE_COLUMNS present)."""
    import datasets

    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in IMAGE_COLUMNS:
        if name in dataset.column_names:
            return name
    raise ValueError(f"No image column found: columns are {dataset.column_names}; expected an Image feature "
                     f"or one of {list(IMAGE_COLUMNS)}.")


def find_label_column(dataset: Any) -> str:
    """The first of LABEL_COLUMNS present (`label`, `labels`, `fine_label`)."""
    for name in LABEL_COLUMNS:
        if name in dataset.column_names:
            return name
    raise ValueError(f"No label column found: columns are {dataset.column_names}; rename the class-index column "
                     f"to one of {list(LABEL_COLUMNS)}.")


def decode_rgb(value: Any, row: int, where: str) -> Any:
    """Decode one image cell (``{"bytes", "path"}``, a path or a PIL image) to an RGB PIL image, or say which failed."""
    from PIL import Image

    path = None
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict):
            path = value.get("path")
            data = value.get("bytes")
            image = Image.open(io.BytesIO(data) if data is not None else path)
        elif isinstance(value, (str, Path)):
            path = str(value)
            image = Image.open(path)
        else:
            raise TypeError(f"unsupported image cell of type {type(value).__name__}")
        image.load()
        # grayscale (L), palette (P), RGBA/LA and CMYK all become 3-channel RGB, as every model expects.
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as err:  # noqa: BLE001 -- any decoder failure is reported with its location
        raise ValueError(
            f"Unreadable image at row {row}{f' ({path})' if path else ''} of {where}: {type(err).__name__}: {err}. "
            "Fix or remove that file; images are never skipped silently."
        ) from err


def make_transform(
    image_column: str, label_column: str, image_processor: Any = None, where: str = "the dataset"
) -> Callable[[dict], dict]:
    """The on-the-fly batch transform: decode to RGB, preprocess, and return ``pixel_values`` + ``labels``."""

    def transform(batch: dict) -> dict:
        rows = batch[ROW_COLUMN]
        images = [decode_rgb(v, r, where) for v, r in zip(batch[image_column], rows)]
        labels = batch[label_column]
        missing = [r for r, lab in zip(rows, labels) if lab is None]
        if missing:
            raise ValueError(f"Rows {missing[:5]} of {where} have no label in column {label_column!r}.")
        out: dict[str, Any] = {"labels": torch.as_tensor(labels, dtype=torch.long), ROW_COLUMN: list(rows)}
        if image_processor is None:
            out["image"] = images
        else:
            out["pixel_values"] = image_processor(images=images, return_tensors="pt")["pixel_values"]
        return out

    return transform


def load_image_dataset(
    source: str,
    split: str = "test",
    *,
    image_processor: Any = None,
    limit: Optional[int] = None,
    cache_dir: Optional[str] = None,
) -> Any:
    """A labelled image dataset, preprocessed on access.

    Args:
        source: a parquet file or glob, a folder of parquet files named by split (``test.parquet``,
            ``train-00000-of-00004.parquet``), an imagefolder directory (``<split>/<class>/<image>``), or a
            Hub dataset id (e.g. ``uoft-cs/cifar10``).
        split: which split to read.
        image_processor: the model's image processor (see :func:`processor_for`); without one, rows carry
            the decoded RGB ``image`` instead of ``pixel_values``.
        limit: evaluate on this many rows, evenly spaced over the split (:func:`subset_indices`).
        cache_dir: where `datasets` keeps its Arrow cache (default: ``$HF_HOME/datasets``).

    Rows are dicts with ``pixel_values`` (C, H, W), ``labels`` (int) and ``_storm_row`` (the row in the full split).
    """
    from datasets import Image

    raw = _load_raw(source, split, cache_dir)
    if len(raw) == 0:
        raise ValueError(f"Split {split!r} of {source!r} has no rows.")
    image_column = find_image_column(raw)
    label_column = find_label_column(raw)
    if isinstance(raw.features[image_column], Image):
        raw = raw.cast_column(image_column, Image(decode=False))
    raw = raw.add_column(ROW_COLUMN, list(range(len(raw))))
    if limit is not None and limit < len(raw):
        raw = raw.select(subset_indices(len(raw), limit))
    where = f"split {split!r} of {source}"
    return raw.with_transform(make_transform(image_column, label_column, image_processor, where))


def class_names(dataset: Any) -> Optional[list[str]]:
    """Label names when the label column is a ClassLabel, else None."""
    import datasets

    feature = dataset.features.get(find_label_column(dataset))
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def collate_batch(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack preprocessed rows into ``pixel_values`` (B, C, H, W) and ``labels`` (B,)."""
    if "pixel_values" not in examples[0]:
        raise ValueError("Rows have no pixel_values: load the dataset with image_processor=... to preprocess them.")
    shapes = {tuple(e["pixel_values"].shape) for e in examples}
    if len(shapes) > 1:
        raise ValueError(f"Images preprocess to different sizes {sorted(shapes)}; the image processor must "
                         "resize/crop to one size.")
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.stack([torch.as_tensor(e["labels"]) for e in examples]),
    }


def processor_for(model: Any, source: Optional[str] = None) -> Any:
    """The image processor to evaluate ``model`` with.

    A model folder's own ``preprocessor_config.json`` wins (so a CIFAR model saved with a 32x32 processor
    keeps it); otherwise the family's official eval preprocessing from ``storm_hf.tools.hub``.
    """
    if source is not None and (Path(source) / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(source)
    from .hub import image_processor_for

    return image_processor_for(model)
