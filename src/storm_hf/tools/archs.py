"""Where each supported architecture's classes and converter live (imported lazily, by name)."""
from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    name: str
    config_module: str
    config_class: str
    modeling_module: str
    base_class: str
    classifier_class: str
    flops_function: str

    def _load(self, module: str) -> ModuleType:
        return importlib.import_module(f"storm_hf.{module}")

    @property
    def config_cls(self) -> Any:
        return getattr(self._load(self.config_module), self.config_class)

    @property
    def classifier_cls(self) -> Any:
        return getattr(self._load(self.modeling_module), self.classifier_class)

    @property
    def base_cls(self) -> Any:
        return getattr(self._load(self.modeling_module), self.base_class)

    @property
    def converter(self) -> ModuleType:
        return importlib.import_module(f"storm_hf.tools.convert_{self.name}")

    def flops(self, config: Any, image_size: tuple[int, int], schedule: Any = None) -> Any:
        return getattr(self._load(self.modeling_module), self.flops_function)(config, image_size, schedule)

    def image_processor_kwargs(self, config: Any) -> dict:
        fn = getattr(self._load(self.modeling_module), "default_image_processor_kwargs", None)
        return fn(config) if fn is not None else imagenet_eval_processor_kwargs(config)


def _spec(name: str, cls_prefix: str) -> ArchSpec:
    return ArchSpec(
        name=name,
        config_module=f"configuration_{name}",
        config_class=f"{cls_prefix}Config",
        modeling_module=f"modeling_{name}",
        base_class=f"{cls_prefix}Model",
        classifier_class=f"{cls_prefix}ForImageClassification",
        flops_function=f"{name}_flops",
    )


ARCHS: dict[str, ArchSpec] = {
    "vmamba": _spec("vmamba", "VMamba"),
    "plainmamba": _spec("plainmamba", "PlainMamba"),
    "vim": _spec("vim", "Vim"),
    "groupmamba": _spec("groupmamba", "GroupMamba"),
}


def get_arch(name: str) -> ArchSpec:
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"Unknown architecture {name!r}; choose one of {sorted(ARCHS)}.") from None


def arch_of_model_type(model_type: str) -> ArchSpec:
    """Map a config's `model_type` (e.g. 'storm_vmamba') back to its ArchSpec."""
    return get_arch(model_type.removeprefix("storm_"))


def imagenet_eval_processor_kwargs(config: Any) -> dict:
    """The timm-style ImageNet eval transform: resize short side to size/0.875 (bicubic), center-crop, normalize."""
    size = getattr(config, "image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return {
        "size": {"shortest_edge": int(size)},
        "crop_pct": 0.875,
        "resample": 3,  # PIL bicubic
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }
