"""The committed CIFAR-10 checkpoints stay loadable and carry the current model code."""
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STORM_FOLDERS = sorted(p for p in (ROOT / "checkpoints").glob("*-cifar10") if (p / "reduction.py").is_file())


def test_checkpoints_are_present_and_small():
    folders = list((ROOT / "checkpoints").glob("*-cifar10"))
    assert {p.name for p in folders} >= {"vmamba-cifar10", "groupmamba-cifar10", "plainmamba-cifar10", "vim-cifar10", "vit-cifar10"}
    total = sum(f.stat().st_size for p in folders for f in p.rglob("*") if f.is_file())
    assert total <= 16 * 2**20, f"checkpoints take {total / 2**20:.1f} MiB (budget 16 MiB)"


@pytest.mark.parametrize("folder", STORM_FOLDERS, ids=lambda p: p.name)
def test_travelling_code_matches_the_package(folder):
    for path in folder.glob("*.py"):
        assert path.read_text() == (ROOT / "src" / "storm_hf" / path.name).read_text(), (
            f"{path} is stale: copy src/storm_hf/{path.name} into the checkpoint folder")


@pytest.mark.parametrize("folder", STORM_FOLDERS, ids=lambda p: p.name)
def test_travelling_code_is_complete(folder):
    """Every sibling the travelling files import (lazy Triton modules included) travels with them."""
    import re

    wanted = {m for path in folder.glob("*.py") for m in re.findall(r"from \.(\w+) import", path.read_text())}
    missing = sorted(f"{m}.py" for m in wanted if not (folder / f"{m}.py").is_file())
    assert not missing, f"{folder.name} lacks {missing}: copy them from src/storm_hf/"


@pytest.mark.parametrize("folder", STORM_FOLDERS + [ROOT / "checkpoints" / "vit-cifar10"], ids=lambda p: p.name)
def test_loads_and_predicts_ten_classes(folder):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    processor = AutoImageProcessor.from_pretrained(folder)
    assert model.config.num_labels == 10 and processor.size in ({"height": 32, "width": 32}, {"shortest_edge": 32})
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32)).logits
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
