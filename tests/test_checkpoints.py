"""Reading official checkpoint files: containers, prefixes and clear errors for bad files."""
import pytest
import torch

from storm_hf.tools.checkpoints import CheckpointError, load_checkpoint_file, strip_prefix, unwrap_state_dict
from storm_hf.tools.cli import parse_storm_specs


def _state():
    return {"a.weight": torch.randn(2, 3), "b": torch.zeros(4)}


@pytest.mark.parametrize("container", [None, "model", "state_dict"])
def test_unwraps_released_containers(tmp_path, container):
    state = _state()
    obj = state if container is None else {container: state, "epoch": 3, "optimizer": {"lr": 0.1}}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    out = unwrap_state_dict(load_checkpoint_file(path))
    assert set(out) == set(state)
    assert all(torch.equal(out[k], state[k]) for k in state)


def test_model_is_preferred_over_model_ema(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model_ema": {"x": torch.ones(1)}, "model": {"x": torch.zeros(1)}}, path)
    assert torch.equal(unwrap_state_dict(load_checkpoint_file(path))["x"], torch.zeros(1))
    assert torch.equal(unwrap_state_dict(load_checkpoint_file(path), prefer="model_ema")["x"], torch.ones(1))


def test_missing_empty_and_corrupt_files_are_reported(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint_file(tmp_path / "nope.pth")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint_file(empty)
    good = tmp_path / "good.pth"
    torch.save({"model": _state()}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint_file(truncated)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint_file(bad_st)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "hook": Evil()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint_file(path)


def test_container_without_state_dict_is_rejected():
    with pytest.raises(CheckpointError, match="No state dict"):
        unwrap_state_dict({"epoch": 3, "config": {"a": 1}})


def test_strip_prefix_only_touches_prefixed_keys():
    out = strip_prefix({"module.a": torch.ones(1), "b": torch.ones(1)}, "module.")
    assert set(out) == {"a", "b"}


def test_storm_spec_parsing(tmp_path):
    spec_file = tmp_path / "s.json"
    spec_file.write_text('{"method": "storm_evit", "window": 7}')
    merged = parse_storm_specs([str(spec_file), "flops_ratio=0.3", "similarity=cosine"])
    assert merged == {"method": "storm_evit", "window": 7, "flops_ratio": 0.3, "similarity": "cosine"}
    assert parse_storm_specs([]) is None
