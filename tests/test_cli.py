"""The `storm-hf` command line end to end: convert an official-layout file, load it anywhere, inspect presets."""
from __future__ import annotations

import re

import pytest
import torch

from storm_hf.tools.cli import main

from .references import vmamba_reference as ref


def test_convert_writes_a_folder_that_reproduces_the_reference(tmp_path, capsys):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    state = ref.random_state_dict(seed=11)
    ckpt = tmp_path / "vssm_official.pth"
    torch.save({"model": state, "epoch": 300, "max_accuracy": 0.0}, ckpt)
    out = tmp_path / "converted"
    assert main(["convert", "--arch", "vmamba", "--checkpoint", str(ckpt), "--output", str(out)]) == 0
    assert "Converted" in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "modeling_vmamba.py"):
        assert (out / name).is_file(), name

    model = AutoModelForImageClassification.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    assert processor.crop_pct == 0.875 and processor.size["shortest_edge"] == 224
    x = torch.randn(2, 3, 35, 29)
    with torch.no_grad():
        got = model(x).logits.double()
    expected = ref.forward(state, x.double())
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4


def test_convert_rejects_another_architecture_and_corrupt_files(tmp_path, capsys):
    ckpt = tmp_path / "vmamba.pth"
    torch.save({"model": ref.random_state_dict()}, ckpt)
    assert main(["convert", "--arch", "plainmamba", "--checkpoint", str(ckpt), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "not an official plainmamba checkpoint" in err and "--arch vmamba" in err

    broken = tmp_path / "broken.pth"
    broken.write_bytes(ckpt.read_bytes()[:200])
    assert main(["convert", "--arch", "vmamba", "--checkpoint", str(broken), "--output", str(tmp_path / "y")]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_inspect_prints_official_size_and_a_solved_schedule(capsys):
    assert main(["inspect", "vmamba_tiny_s1l8"]) == 0
    text = capsys.readouterr().out
    assert "30.25 M" in text and "GFLOPs: 4.906" in text and "stage 2: 14x14 (8 blocks)" in text

    assert main(["inspect", "vmamba_tiny_s1l8", "--storm", "method=storm_tome", "--storm", "flops_ratio=0.3"]) == 0
    text = capsys.readouterr().out
    before, after, cut = re.search(r"GFLOPs: ([\d.]+) -> ([\d.]+) \(([-+\d.]+) %\)", text).groups()
    assert float(before) == pytest.approx(4.906, abs=1e-3)
    assert abs(float(cut) + 30.0) <= 1.0
    assert float(after) == pytest.approx(float(before) * (1 + float(cut) / 100), rel=2e-3)
    assert re.search(r"stage \d+ block \d+: -> \d+x\d+", text)


def test_inspect_rejects_bad_requests(capsys):
    assert main(["inspect", "no_such_model"]) == 2
    assert "Unknown model preset" in capsys.readouterr().err
    assert main(["inspect", "vmamba_tiny_s1l8", "--storm", "flops_ratio=1.5", "--storm", "method=storm_tome"]) == 2
    assert "flops_ratio" in capsys.readouterr().err


def test_inspect_reads_a_saved_folder(tmp_path, capsys):
    from storm_hf.configuration_vmamba import VMambaConfig
    from storm_hf.modeling_vmamba import VMambaForImageClassification
    from storm_hf.tools.hub import save_model_folder

    model = VMambaForImageClassification(VMambaConfig(dims=[8, 16, 32, 64], depths=[1, 1, 2, 1], image_size=32))
    save_model_folder(model, tmp_path / "m", safe_dtype=torch.float16)
    assert next(model.parameters()).dtype == torch.float32  # saving in fp16 leaves the caller's model alone
    assert main(["inspect", str(tmp_path / "m")]) == 0
    text = capsys.readouterr().out
    assert "input: 32 x 32" in text and "stage 3: 1x1 (1 blocks)" in text
