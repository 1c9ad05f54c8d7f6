"""storm-hf: spatial-aware token reduction (STORM) for vision state space models, as Transformers models."""

__version__ = "0.1.0"
