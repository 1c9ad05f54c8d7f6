"""Small helpers shared by the parity tests."""
import torch


def seeded_image(*shape, seed: int = 0) -> torch.Tensor:
    """A reproducible random image batch."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
