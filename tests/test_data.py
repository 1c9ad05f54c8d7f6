"""Loading labelled image datasets for evaluation: parquet, imagefolder, Hub ids, decoding, labels, subsets."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from storm_hf.tools.data import (
    class_names,
    collate_batch,
    load_image_dataset,
    processor_for,
    subset_indices,
)

CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


# -- builders shared with the evaluation/sweep tests (plain helpers, not tests) ---------------------------


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def random_images(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def make_parquet(path: Path, images, labels, *, label_column: str = "label", names=None, image_column: str = "image",
                 paths=None) -> Path:
    """Write a `datasets` parquet file with an Image column (PNG bytes, or raw bytes for corrupt cells)."""
    import datasets

    names = names or [f"c{i}" for i in range(max(labels) + 1)]
    cells = [{"bytes": im if isinstance(im, bytes) else png_bytes(im), "path": (paths or [None] * len(images))[i]}
             for i, im in enumerate(images)]
    features = datasets.Features({image_column: datasets.Image(), label_column: datasets.ClassLabel(names=names)})
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({image_column: cells, label_column: labels}, features=features).to_parquet(str(path))
    return path


def simple_processor():
    """No resize/crop, mean = std = 0.5: pixel = (v / 255 - 0.5) / 0.5, computable by hand."""
    from transformers.models.convnext import ConvNextImageProcessorPil

    return ConvNextImageProcessorPil(do_resize=False, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def by_hand(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((rgb.astype(np.float64) / 255.0 - 0.5) / 0.5).permute(2, 0, 1).float()


# -- tests ---------------------------------------------------------------------------------------------------


def test_parquet_file_decodes_converts_modes_and_normalises(tmp_path):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    palette = Image.fromarray(rgb).convert("P")
    images = [Image.fromarray(gray, "L"), Image.fromarray(rgba, "RGBA"), Image.fromarray(rgb), palette]
    path = make_parquet(tmp_path / "d.parquet", images, [0, 1, 2, 1])
    ds = load_image_dataset(str(path), "test", image_processor=simple_processor(), cache_dir=str(tmp_path / "c"))
    assert len(ds) == 4
    rows = [ds[i] for i in range(4)]
    # grayscale -> the gray value in all three channels; RGBA -> alpha dropped; palette -> palette colours
    assert torch.allclose(rows[0]["pixel_values"], by_hand(np.stack([gray] * 3, axis=-1)), atol=1e-6)
    assert torch.allclose(rows[1]["pixel_values"], by_hand(rgba[..., :3]), atol=1e-6)
    assert torch.allclose(rows[2]["pixel_values"], by_hand(rgb), atol=1e-6)
    lut = np.array(palette.getpalette(), dtype=np.uint8).reshape(-1, 3)
    assert torch.allclose(rows[3]["pixel_values"], by_hand(lut[np.array(palette)]), atol=1e-6)
    assert [int(r["labels"]) for r in rows] == [0, 1, 2, 1]
    batch = collate_batch(rows)
    assert batch["pixel_values"].shape == (4, 3, 8, 8) and batch["labels"].tolist() == [0, 1, 2, 1]


def test_parquet_glob_and_split_folder(tmp_path):
    images = random_images(6, size=8)
    make_parquet(tmp_path / "d" / "train-00000-of-00002.parquet", images[:2], [0, 1])
    make_parquet(tmp_path / "d" / "train-00001-of-00002.parquet", images[2:4], [1, 0])
    make_parquet(tmp_path / "d" / "test.parquet", images[4:], [1, 1])
    cache = str(tmp_path / "c")
    train = load_image_dataset(str(tmp_path / "d"), "train", image_processor=simple_processor(), cache_dir=cache)
    assert len(train) == 4
    assert torch.allclose(train[2]["pixel_values"], by_hand(np.array(images[2])), atol=1e-6)
    test = load_image_dataset(str(tmp_path / "d"), "test", image_processor=simple_processor(), cache_dir=cache)
    assert [int(r) for r in test[:]["labels"]] == [1, 1]
    globbed = load_image_dataset(str(tmp_path / "d" / "train-*.parquet"), "train", cache_dir=cache)
    assert len(globbed) == 4 and globbed[0]["image"].mode == "RGB"  # no processor: decoded RGB images
    with pytest.raises(ValueError, match=r"no parquet file for split 'validation'.*\['test', 'train'\]"):
        load_image_dataset(str(tmp_path / "d"), "validation", cache_dir=cache)


def test_imagefolder_labels_from_class_folders(tmp_path):
    root = tmp_path / "folder"
    for split, n in (("train", 2), ("test", 3)):
        for name, value in (("cat", 10), ("dog", 200)):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8, 3), value + i, dtype=np.uint8)).save(root / split / name / f"{i}.png")
    ds = load_image_dataset(str(root), "test", image_processor=simple_processor(), cache_dir=str(tmp_path / "c"))
    assert len(ds) == 6 and class_names(ds) == ["cat", "dog"]
    for row in (ds[i] for i in range(len(ds))):
        value = 10 if int(row["labels"]) == 0 else 200
        first = round((float(row["pixel_values"][0, 0, 0]) * 0.5 + 0.5) * 255)
        assert value <= first < value + 3  # the image really came from its class folder


def test_label_column_detection(tmp_path):
    images = random_images(2, size=8)
    for column in ("labels", "fine_label"):
        path = make_parquet(tmp_path / f"{column}.parquet", images, [1, 0], label_column=column)
        ds = load_image_dataset(str(path), "test", image_processor=simple_processor(), cache_dir=str(tmp_path / "c"))
        assert [int(r["labels"]) for r in (ds[0], ds[1])] == [1, 0]
    path = make_parquet(tmp_path / "other.parquet", images, [1, 0], label_column="category")
    with pytest.raises(ValueError, match=r"No label column.*'category'.*label"):
        load_image_dataset(str(path), "test", cache_dir=str(tmp_path / "c"))


def test_unreadable_images_are_reported_with_row_and_path(tmp_path):
    images = random_images(3, size=8)
    path = make_parquet(tmp_path / "bad.parquet", [images[0], b"not an image at all", images[2]], [0, 1, 0],
                        paths=["a.png", "broken.jpg", "c.png"])
    ds = load_image_dataset(str(path), "test", image_processor=simple_processor(), cache_dir=str(tmp_path / "c"))
    assert ds[0]["pixel_values"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match=r"Unreadable image at row 1 \(broken\.jpg\).*never skipped"):
        ds[1]
    root = tmp_path / "folder" / "test" / "cat"
    root.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "good.png")
    (root.parent / "dog").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root.parent / "dog" / "good.png")
    (root / "truncated.png").write_bytes(png_bytes(images[1])[:40])
    ds = load_image_dataset(str(tmp_path / "folder"), "test", image_processor=simple_processor(),
                            cache_dir=str(tmp_path / "c2"))
    with pytest.raises(ValueError, match=r"Unreadable image at row \d \(.*truncated\.png\)"):
        [ds[i] for i in range(len(ds))]


def test_limit_is_an_evenly_spaced_deterministic_subset(tmp_path):
    assert subset_indices(10, 3) == [0, 3, 6]
    assert subset_indices(10000, 4) == [0, 2500, 5000, 7500]
    assert subset_indices(5, None) == subset_indices(5, 9) == [0, 1, 2, 3, 4]
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="limit must be a positive"):
            subset_indices(10, bad)
    images = random_images(10, size=8)
    path = make_parquet(tmp_path / "d.parquet", images, list(range(10)))
    ds = load_image_dataset(str(path), "test", image_processor=simple_processor(), limit=3,
                            cache_dir=str(tmp_path / "c"))
    assert [int(ds[i]["labels"]) for i in range(3)] == [0, 3, 6]
    assert [ds[i]["_storm_row"] for i in range(3)] == [0, 3, 6]
    assert torch.allclose(ds[1]["pixel_values"], by_hand(np.array(images[3])), atol=1e-6)


def test_missing_sources_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="No dataset at"):
        load_image_dataset(str(tmp_path / "nothing.parquet"), "test")
    with pytest.raises(FileNotFoundError, match="No dataset at"):
        load_image_dataset(str(tmp_path / "none-*.parquet"), "test")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="Expected parquet files"):
        load_image_dataset(str(tmp_path / "*.txt"), "test")
    images = random_images(1, size=8)
    root = tmp_path / "flat" / "cat"
    root.mkdir(parents=True)
    images[0].save(root / "0.png")
    with pytest.raises(ValueError, match="only the split 'train'"):
        load_image_dataset(str(tmp_path / "flat"), "test", cache_dir=str(tmp_path / "c"))


def test_hub_id_offline_fails_with_advice(tmp_path):
    code = (
        "from storm_hf.tools.data import load_image_dataset\n"
        "try:\n    load_image_dataset('storm-hf-test-org/no-such-dataset', 'test')\n"
        "except FileNotFoundError as e:\n    print('MSG', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MSG Could not load Hub dataset 'storm-hf-test-org/no-such-dataset'" in result.stdout
    assert "HF_HUB_OFFLINE" in result.stdout


def test_processor_from_model_folder_wins(tmp_path):
    from storm_hf.tools.archs import get_arch

    from .tiny_configs import TINY_CONFIGS

    spec = get_arch("vmamba")
    model = spec.classifier_cls(spec.config_cls(**TINY_CONFIGS["vmamba"]))
    default = processor_for(model)
    assert default.size == {"shortest_edge": 32} and default.crop_pct == 0.875
    folder = tmp_path / "m"
    simple_processor().save_pretrained(folder)
    own = processor_for(model, str(folder))
    assert own.do_resize is False and list(own.image_mean) == [0.5] * 3
    assert processor_for(model, str(tmp_path / "no-folder")).crop_pct == 0.875


@pytest.mark.skipif(not (CIFAR10 / "test.parquet").is_file(), reason="shared CIFAR-10 copy not present")
def test_shared_cifar10_subset(tmp_path):
    ds = load_image_dataset(str(CIFAR10), "test", image_processor=simple_processor(), limit=20,
                            cache_dir=str(tmp_path / "c"))
    assert class_names(ds)[:3] == ["airplane", "automobile", "bird"]
    rows = [ds[i] for i in range(20)]
    # the test split is in class order (1,000 per class): every 500th row gives two images of each class
    assert [int(r["labels"]) for r in rows] == [i // 2 for i in range(20)]
    assert all(r["pixel_values"].shape == (3, 32, 32) for r in rows)
