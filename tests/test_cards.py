"""Sweep results land in a model card as Hub model-index metadata and a table."""
import pytest
from huggingface_hub import ModelCard

from storm_hf.tools.cards import RESULTS_HEADING, add_results_to_card

ROWS = [
    dict(method="none", ratio=0.0, gflops=0.075, flops_cut=0.0, top1=0.8422, top5=0.9906, n_samples=10000),
    dict(method="storm_tome", ratio=0.2, gflops=0.060, flops_cut=0.198, top1=0.7664, top5=0.9807, n_samples=10000),
    dict(method="tome", ratio=0.4, status="infeasible", error="no schedule"),
    dict(method="vit_tome", ratio=0.3, gflops=0.43, flops_cut=0.3, top1=0.7477, top5=0.96, n_samples=10000,
         reference_model="checkpoints/vit-cifar10"),  # another model's row: not this card's metadata
]


def _card(tmp_path):
    (tmp_path / "README.md").write_text("---\nlibrary_name: transformers\n---\n\n# tiny\n\nIntro.\n")
    return tmp_path


def test_results_become_model_index_and_a_table(tmp_path):
    folder = _card(tmp_path)
    add_results_to_card(folder, ROWS)
    card = ModelCard.load(folder / "README.md")
    results = card.data.eval_results
    assert len(results) == 4  # two finished rows x (top-1, top-5); infeasible and reference rows skipped
    values = {(r.metric_config, r.metric_type): r.metric_value for r in results}
    assert values[("none@0.0", "accuracy")] == 84.22 and values[("storm_tome@0.2", "top_5_accuracy")] == 98.07
    assert "model-index" in (folder / "README.md").read_text()
    assert "| storm_tome | 0.2 | 0.0600 | 19.8 % | 76.64 | 98.07 | 10000 |" in card.text
    assert "# tiny\n\nIntro." in card.text  # the existing card body is kept above the results
    assert "vit_tome" not in card.text


def test_rerunning_replaces_instead_of_appending(tmp_path):
    folder = _card(tmp_path)
    add_results_to_card(folder, ROWS)
    add_results_to_card(folder, ROWS[:1])
    card = ModelCard.load(folder / "README.md")
    assert card.text.count(RESULTS_HEADING) == 1 and len(card.data.eval_results) == 2


def test_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="README.md"):
        add_results_to_card(tmp_path, ROWS)
    with pytest.raises(ValueError, match="no finished rows"):
        add_results_to_card(_card(tmp_path), ROWS[2:])
