"""ToMe on transformers' ViT (the sweep's attention reference): patching, matching, FLOPs, solver, sweep rows."""
from __future__ import annotations

import math

import pytest
import torch

from storm_hf.tools.vit_tome import (
    bipartite_matching,
    merge_tokens,
    patch_tome,
    solve_tome_r,
    tome,
    tome_reference,
    unpatch_tome,
    vit_tome_flops,
)

TOKENS = 17  # 8x8 image, patch 2 -> 16 patches + CLS


def tiny_vit(attn: str = "sdpa", image_size: int = 8, patch_size: int = 2):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=image_size, patch_size=patch_size, hidden_size=24, num_hidden_layers=3,
                       num_attention_heads=3, intermediate_size=48, num_labels=5, attn_implementation=attn)
    return ViTForImageClassification(config).eval()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def pixels(batch: int = 3, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_r0_is_bit_identical_and_unpatch_restores(attn):
    model, x = tiny_vit(attn), pixels()
    with torch.no_grad():
        reference = model(pixel_values=x).logits
        with tome(model, 0) as state:
            assert torch.equal(model(pixel_values=x).logits, reference)
        assert state.token_counts == [TOKENS] * 3
        with tome(model, 2):
            assert not torch.allclose(model(pixel_values=x).logits, reference)
        assert torch.equal(model(pixel_values=x).logits, reference)
    assert not hasattr(model, "_tome_state")
    assert all(not layer.attention.k_proj._forward_hooks and "forward" not in layer.__dict__
               for layer in model.vit.layers)


def test_each_layer_merges_exactly_r_and_sizes_add_up():
    model = tiny_vit()
    state = patch_tome(model, 3)
    with torch.no_grad():
        logits = model(pixel_values=pixels()).logits
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()
    assert state.token_counts == [14, 11, 8]
    assert state.sizes.shape == (3, 8) and torch.equal(state.sizes.sum(dim=1), torch.full((3,), float(TOKENS)))
    assert (state.sizes[:, 0] == 1).all()  # CLS never merges
    patch_tome(model, [8, 8, 0])  # clamped to what each step can merge: 17 -> 9 -> 5 -> 5
    with torch.no_grad():
        model(pixel_values=pixels())
    assert state.token_counts == [9, 5, 5]
    unpatch_tome(model)


def test_proportional_attention_adds_log_sizes():
    model = tiny_vit()
    masks = []

    def grab(_module, args, kwargs):
        masks.append(args[1] if len(args) > 1 else kwargs.get("attention_mask"))

    handles = [layer.attention.register_forward_pre_hook(grab, with_kwargs=True) for layer in model.vit.layers]
    state = patch_tome(model, [4, 0, 0])
    with torch.no_grad():
        proportional = model(pixel_values=pixels()).logits
    assert masks[0] is None
    assert torch.equal(masks[1], state.sizes.log()[:, None, None, :]) and torch.equal(masks[2], masks[1])
    assert masks[1].max() > 0  # some token holds several patches
    patch_tome(model, [4, 0, 0], proportional_attention=False)
    masks.clear()
    with torch.no_grad():
        plain = model(pixel_values=pixels()).logits
    assert masks == [None, None, None] and not torch.allclose(plain, proportional)
    unpatch_tome(model)
    for handle in handles:
        handle.remove()


def loop_merge(x: torch.Tensor, metric: torch.Tensor, sizes: torch.Tensor, r: int) -> tuple[list, list]:
    """One ToMe step for a single image, element by element (paper, Sec. 3): the independent reference."""
    n = x.shape[0]
    a_ids, b_ids = list(range(0, n, 2)), list(range(1, n, 2))

    def cosine(i: int, j: int) -> float:
        u, v = metric[i].tolist(), metric[j].tolist()
        dot = sum(p * q for p, q in zip(u, v))
        return dot / (math.sqrt(sum(p * p for p in u)) * math.sqrt(sum(q * q for q in v)))

    best = {}
    for i in a_ids[1:]:  # the CLS (token 0) is protected
        scores = [cosine(i, j) for j in b_ids]
        best[i] = (max(scores), b_ids[scores.index(max(scores))])
    merged = sorted(best, key=lambda i: -best[i][0])[:r]
    total = {j: x[j] * sizes[j] for j in b_ids}
    weight = {j: float(sizes[j]) for j in b_ids}
    for i in merged:
        j = best[i][1]
        total[j] = total[j] + x[i] * sizes[i]
        weight[j] += float(sizes[i])
    kept = [i for i in a_ids if i not in merged]
    tokens = [x[i] for i in kept] + [total[j] / weight[j] for j in b_ids]
    return tokens, [float(sizes[i]) for i in kept] + [weight[j] for j in b_ids]


@pytest.mark.parametrize("n,r", [(17, 5), (16, 7), (9, 4)])
def test_batched_matching_agrees_with_loop(n, r):
    gen = torch.Generator().manual_seed(n)
    x, metric = torch.randn(2, n, 6, generator=gen), torch.randn(2, n, 4, generator=gen)
    sizes = torch.randint(1, 5, (2, n), generator=gen).float()
    out, out_sizes = merge_tokens(x, sizes, bipartite_matching(metric, r))
    assert out.shape == (2, n - r, 6)
    for b in range(2):
        tokens, token_sizes = loop_merge(x[b], metric[b], sizes[b], r)
        torch.testing.assert_close(out[b], torch.stack(tokens), rtol=1e-5, atol=1e-6)
        assert out_sizes[b].tolist() == token_sizes


def test_matching_rejects_bad_input():
    with pytest.raises(ValueError, match="at most 8"):
        bipartite_matching(torch.randn(1, 17, 4), 9)
    with pytest.raises(ValueError, match="batch, tokens, dim"):
        bipartite_matching(torch.randn(17, 4), 1)
    with pytest.raises(ValueError, match="one per layer"):
        patch_tome(tiny_vit(), [1, 2])


@pytest.mark.parametrize("r", [0, 3, [8, 8, 1]])
def test_flops_match_a_counted_forward(r):
    from torch.utils.flop_counter import FlopCounterMode

    from storm_hf.tools.training import model_gflops

    model = tiny_vit("eager")  # eager attention: CPU SDPA kernels are invisible to torch's FLOP counter
    if r == 0:
        assert model_gflops(model, 8) * 1e9 == pytest.approx(vit_tome_flops(model.config, 0).total, rel=1e-12)
    with tome(model, r), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixel_values=pixels(batch=1))
    report = vit_tome_flops(model.config, r)
    assert counter.get_total_flops() // 2 == report.total
    assert (report.parts["tome_matching"] > 0) == (r != 0)


def test_solver_lands_within_tolerance_or_says_why():
    config = tiny_vit().config
    full = vit_tome_flops(config, 0).total

    def cut(r: int) -> float:
        return 1 - vit_tome_flops(config, r).total / full

    r = solve_tome_r(config, 0.3, tolerance=0.05)
    assert abs(cut(r) - 0.3) <= 0.05
    assert all(abs(cut(other) - 0.3) >= abs(cut(r) - 0.3) for other in range(9))
    assert solve_tome_r(config, 0.0) == 0
    with pytest.raises(ValueError, match="cannot cut"):
        solve_tome_r(config, 0.95)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        solve_tome_r(config, 1.2)


def test_reference_rows_and_sweep_resume(tmp_path):
    from storm_hf.tools.sweep import read_rows, run_sweep

    model = tiny_vit()
    gen = torch.Generator().manual_seed(3)
    dataset = [{"pixel_values": torch.randn(3, 8, 8, generator=gen), "labels": i % 5} for i in range(6)]
    fn = tome_reference(model, dataset, batch_size=4, tolerance=0.05, progress=False, source="tiny-vit")
    row = fn(0.3)
    assert row["method"] == "vit_tome" and row["n_samples"] == 6 and row["tome_r"] > 0
    assert row["flops_cut"] == pytest.approx(1 - row["gflops"] / row["gflops_unreduced"])
    assert abs(row["flops_cut"] - 0.3) <= 0.05 and row["reference_model"] == "tiny-vit"
    assert not hasattr(model, "_tome_state")

    calls = []

    def counted(ratio):
        calls.append(ratio)
        return fn(ratio)

    storm_model = _tiny_storm_model()
    kwargs = dict(setup={"model": "tiny"}, batch_size=4, references={"vit_tome": counted}, progress=False,
                  log=lambda s: None, evaluate_fn=lambda *a, **k: pytest.fail("no storm-hf point expected"))
    rows = run_sweep(storm_model, dataset, [], [0.3, 0.95], tmp_path / "r.jsonl", include_baseline=False, **kwargs)
    assert [(r["key"], r["status"]) for r in rows] == [("vit_tome@0.3", "ok"), ("vit_tome@0.95", "infeasible")]
    run_sweep(storm_model, dataset, [], [0.3, 0.95], tmp_path / "r.jsonl", include_baseline=False, **kwargs)
    assert calls == [0.3, 0.95] and len(read_rows(tmp_path / "r.jsonl")) == 2


def _tiny_storm_model():
    from storm_hf.tools.archs import get_arch

    from .tiny_configs import TINY_CONFIGS

    spec = get_arch("vmamba")
    return spec.classifier_cls(spec.config_cls(**TINY_CONFIGS["vmamba"])).eval()


def test_cli_sweep_adds_the_vit_reference(tmp_path):
    from transformers import AutoImageProcessor

    from storm_hf.tools.cli import main
    from storm_hf.tools.hub import save_model_folder
    from storm_hf.tools.sweep import read_rows

    from .test_data import make_parquet, random_images

    storm_model = _tiny_storm_model()
    folder = save_model_folder(storm_model, tmp_path / "m")
    vit = tiny_vit(image_size=32, patch_size=8)
    vit.save_pretrained(tmp_path / "vit")
    AutoImageProcessor.from_pretrained(folder).save_pretrained(tmp_path / "vit")
    data = make_parquet(tmp_path / "data" / "test.parquet", random_images(5, seed=2), [i % 5 for i in range(5)])
    args = ["sweep", "--model", str(folder), "--data", str(data), "--methods", "storm_tome", "--ratios", "0.3",
            "--batch-size", "4", "--output-dir", str(tmp_path / "out"), "--no-progress",
            "--reference-vit", str(tmp_path / "vit"), "--reference-tolerance", "0.05"]
    assert main(args) == 0
    rows = {r["key"]: r for r in read_rows(tmp_path / "out" / "results.jsonl")}
    assert {"none@0", "storm_tome@0.3", "vit_tome@0", "vit_tome@0.3"} <= set(rows)
    assert rows["vit_tome@0"]["flops_cut"] == 0 and rows["vit_tome@0.3"]["status"] == "ok"
    assert rows["vit_tome@0.3"]["setup"]["reference_vit"] == str((tmp_path / "vit").resolve())
    assert (tmp_path / "out" / "top1_vs_gflops.png").is_file()
