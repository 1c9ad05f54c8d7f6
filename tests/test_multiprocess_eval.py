"""The evaluation loop on two CPU processes scores exactly what one process scores.

13 samples with a per-process batch of 4 make Accelerate pad the last global batch of 8 with duplicated
samples; `gather_for_metrics` must drop them, so counts and accuracies match the single-process run.

`accelerate.debug_launcher` forks. Forking a process whose OpenMP pool already ran torch ops (any earlier
test in the same pytest session) can deadlock the children, so the launcher runs in a fresh interpreter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from storm_hf.tools.archs import get_arch
from storm_hf.tools.data import collate_batch, load_image_dataset, processor_for
from storm_hf.tools.evaluation import evaluate_model

from .test_data import make_parquet, random_images
from .tiny_configs import TINY_CONFIGS

N_SAMPLES, BATCH = 13, 4


def _model():
    torch.manual_seed(0)
    spec = get_arch("vmamba")
    return spec.classifier_cls(spec.config_cls(**TINY_CONFIGS["vmamba"])).eval()


def _dataset(data: str, cache_dir: str):
    return load_image_dataset(data, "test", image_processor=processor_for(_model()), cache_dir=cache_dir)


def _worker(data: str, out_dir: str) -> None:
    """Runs in each of the two processes started by accelerate.debug_launcher."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # forked from pytest: start from a clean singleton
    torch.set_num_threads(1)
    accelerator = Accelerator()
    rank = accelerator.process_index
    dataset = _dataset(data, str(Path(out_dir) / f"cache{rank}"))
    result = evaluate_model(_model(), dataset, BATCH, accelerator, progress=False)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


LAUNCH = (
    "import sys\n"
    "from accelerate import debug_launcher\n"
    "from tests.test_multiprocess_eval import _worker\n"
    "debug_launcher(_worker, args=(sys.argv[1], sys.argv[2]), num_processes=2)\n"
)


def test_two_processes_match_one(tmp_path):
    data = make_parquet(tmp_path / "test.parquet", random_images(N_SAMPLES, seed=7), [i % 10 for i in range(N_SAMPLES)])
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root / "src"), str(root), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", LAUNCH, str(data), str(tmp_path)], cwd=root, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["num_processes"] == 2

    dataset = _dataset(str(data), str(tmp_path / "cache"))
    single = evaluate_model(_model(), dataset, BATCH, progress=False)
    for result in results:  # every process returns the same scores
        assert result["n_samples"] == single["n_samples"] == N_SAMPLES
        assert (result["top1"], result["top5"]) == (single["top1"], single["top5"])

    # and those are the scores of a plain forward over all 13 images
    batch = collate_batch([dataset[i] for i in range(N_SAMPLES)])
    with torch.no_grad():
        logits = _model()(batch["pixel_values"]).logits
    ranks = (logits > logits.gather(1, batch["labels"][:, None])).sum(1)
    assert single["top1"] == (ranks < 1).double().mean().item()
    assert single["top5"] == (ranks < 5).double().mean().item()
