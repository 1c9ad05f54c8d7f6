"""storm-hf: spatial-aware token reduction (STORM) for vision state space models, as Transformers models.

Importing the package registers its configurations and models with transformers' Auto classes, so saved
folders also load without `trust_remote_code` where storm-hf is installed.
"""
from __future__ import annotations

import importlib

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .reduction import StormConfig

__version__ = "0.1.0"

_ARCHS = {"vmamba": "VMamba", "plainmamba": "PlainMamba", "vim": "Vim", "groupmamba": "GroupMamba"}
__all__ = ["StormConfig", "__version__"]


def _register(arch: str, prefix: str) -> None:
    config_cls = getattr(importlib.import_module(f".configuration_{arch}", __name__), f"{prefix}Config")
    modeling = importlib.import_module(f".modeling_{arch}", __name__)
    base_cls = getattr(modeling, f"{prefix}Model")
    head_cls = getattr(modeling, f"{prefix}ForImageClassification")
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModel.register(config_cls, base_cls, exist_ok=True)
    AutoModelForImageClassification.register(config_cls, head_cls, exist_ok=True)
    globals().update({config_cls.__name__: config_cls, base_cls.__name__: base_cls, head_cls.__name__: head_cls})
    __all__.extend([config_cls.__name__, base_cls.__name__, head_cls.__name__])


for _arch, _prefix in _ARCHS.items():
    _register(_arch, _prefix)
