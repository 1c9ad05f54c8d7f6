"""Saved folders and Hub pushes load with trust_remote_code where storm_hf cannot be imported.

The loading side runs in a subprocess whose `storm_hf` import is blocked, so only the model files that
travelled with the checkpoint can be used; logits must be bit-identical to the saving process's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch

from storm_hf.tools.archs import get_arch
from storm_hf.tools.hub import save_model_folder

from .tiny_configs import TINY_CONFIGS

LOADER = textwrap.dedent(
    """
    import sys
    sys.modules["storm_hf"] = None  # any `import storm_hf` now raises ImportError
    sys.path = [p for p in sys.path if not p.rstrip("/").endswith("src")]
    import json, torch
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification
    try:
        import storm_hf  # noqa: F401
        raise SystemExit("storm_hf was importable in the loader")
    except ImportError:
        pass
    source, inputs_path, out_path, storm = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    torch.set_num_threads(int(sys.argv[5]))  # same CPU summation order as the saving process
    kwargs = {"storm": json.loads(storm)} if storm != "-" else {}
    model = AutoModelForImageClassification.from_pretrained(source, trust_remote_code=True, **kwargs).eval()
    assert "storm_hf" not in type(model).__module__, type(model).__module__
    base = AutoModel.from_pretrained(source, trust_remote_code=True)
    config = AutoConfig.from_pretrained(source, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(source)
    pixel_values = torch.load(inputs_path)
    with torch.no_grad():
        logits = model(pixel_values).logits
        pooled = base(pixel_values).pooler_output
    torch.save({"logits": logits, "pooled": pooled, "model_type": config.model_type,
                "processor": type(processor).__name__, "storm": model.config.storm}, out_path)
    """
)


def _run_loader(tmp_path: Path, source: str, pixel_values: torch.Tensor, env: dict, storm=None) -> dict:
    inputs = tmp_path / "inputs.pt"
    out = tmp_path / "out.pt"
    torch.save(pixel_values, inputs)
    script = tmp_path / "loader.py"
    script.write_text(LOADER)
    full_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full_env.update({"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), **env})
    result = subprocess.run(
        [sys.executable, str(script), source, str(inputs), str(out), json.dumps(storm) if storm else "-",
         str(torch.get_num_threads())],
        cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)


def _tiny_model(arch: str):
    torch.manual_seed(0)
    spec = get_arch(arch)
    model = spec.classifier_cls(spec.config_cls(**TINY_CONFIGS[arch])).eval()
    return model


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_saved_folder_loads_without_storm_hf(tmp_path, arch):
    model = _tiny_model(arch)
    folder = save_model_folder(model, tmp_path / f"tiny-{arch}")
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "reduction.py", "selective_scan.py",
            "reduction_triton.py", "selective_scan_triton.py",
            f"configuration_{arch}.py", f"modeling_{arch}.py"} <= files, files
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert set(auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForImageClassification"}
    size = TINY_CONFIGS[arch].get("image_size", 32)
    size = size if isinstance(size, int) else size[0]
    pixel_values = torch.randn(2, 3, size, size)
    reloaded = get_arch(arch).classifier_cls.from_pretrained(folder).eval()
    with torch.no_grad():
        original = model(pixel_values).logits
        expected = reloaded(pixel_values).logits
    got = _run_loader(tmp_path, str(folder), pixel_values, {})
    assert got["model_type"] == f"storm_{arch}"
    # The travelling code must compute exactly what storm_hf computes from the same loaded weights. Against the
    # in-memory original only rounding may differ: safetensors tensors can sit at unaligned addresses, which
    # changes CPU BLAS summation order.
    assert torch.equal(got["logits"], expected)
    torch.testing.assert_close(got["logits"], original, rtol=1e-5, atol=1e-6)
    assert got["processor"].startswith("ConvNextImageProcessor")


@pytest.mark.parametrize("arch", ["vmamba"])
def test_storm_passed_through_from_pretrained(tmp_path, arch):
    model = _tiny_model(arch)
    folder = save_model_folder(model, tmp_path / "m")
    storm = {"method": "storm_tome", "schedule": [{"stage": 0, "block": 0, "size": [6, 6]}]}
    size = TINY_CONFIGS[arch].get("image_size", 32)
    pixel_values = torch.randn(1, 3, size, size)
    reloaded = get_arch(arch).classifier_cls.from_pretrained(folder).eval().set_storm(**storm)
    with torch.no_grad():
        expected = reloaded(pixel_values).logits
    got = _run_loader(tmp_path, str(folder), pixel_values, {}, storm=storm)
    assert got["storm"]["method"] == "storm_tome" and got["storm"]["schedule"] == storm["schedule"]
    assert torch.equal(got["logits"], expected)


class _FakeApi:
    """Stands in for huggingface_hub.HfApi: records the commit instead of uploading it."""

    def __init__(self):
        self.files: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kwargs):
        return mock.MagicMock(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            src = op.path_or_fileobj
            self.files[op.path_in_repo] = Path(src).read_bytes() if isinstance(src, (str, Path)) else (
                src if isinstance(src, bytes) else src.read())
        return mock.MagicMock(oid="0" * 40, commit_url="", pr_url=None)

    def __getattr__(self, name):  # any other Hub call is a no-op
        return mock.MagicMock()


def test_push_to_hub_then_offline_load_by_repo_id(tmp_path):
    import transformers.utils.hub as hf_hub_utils
    from huggingface_hub import ModelCard

    model = _tiny_model("vmamba")
    api = _FakeApi()
    with mock.patch.object(hf_hub_utils, "hf_api", return_value=api, create=True), \
         mock.patch.object(hf_hub_utils, "create_and_tag_model_card", return_value=ModelCard("---\n---\n")):
        model.push_to_hub("acme/storm-vmamba-tiny")
    assert "model.safetensors" in api.files and "reduction.py" in api.files, sorted(api.files)

    snapshot = tmp_path / "hf_home" / "hub" / "models--acme--storm-vmamba-tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for name, data in api.files.items():
        (snapshot / name).write_bytes(data)
    # the image processor is pushed separately by transformers; lay ours beside it as `storm-hf push` does
    from storm_hf.tools.hub import image_processor_for
    image_processor_for(model).save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)

    pixel_values = torch.randn(2, 3, 32, 32)
    reloaded = get_arch("vmamba").classifier_cls.from_pretrained(snapshot).eval()
    with torch.no_grad():
        expected = reloaded(pixel_values).logits
    got = _run_loader(tmp_path, "acme/storm-vmamba-tiny", pixel_values, {})
    assert torch.equal(got["logits"], expected)
