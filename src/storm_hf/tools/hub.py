"""Write complete Hugging Face model folders (weights, code, image processor, model card) and push them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from .archs import arch_of_model_type

_TEMPLATE_DIRS = (
    Path(__file__).resolve().parent.parent / "_model_cards",
    Path(__file__).resolve().parents[3] / "model_cards",
)


def model_card_template(name: str = "converted") -> str:
    for folder in _TEMPLATE_DIRS:
        path = folder / f"{name}.md"
        if path.is_file():
            return path.read_text()
    raise FileNotFoundError(f"Model card template {name!r} not found in {[str(d) for d in _TEMPLATE_DIRS]}.")


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def image_processor_for(model: Any):
    """The family's official eval preprocessing as a built-in transformers image processor (PIL backend)."""
    from transformers.models.convnext import ConvNextImageProcessorPil

    kwargs = arch_of_model_type(model.config.model_type).image_processor_kwargs(model.config)
    return ConvNextImageProcessorPil(**kwargs)


def save_model_folder(
    model: Any,
    output_dir: str | Path,
    *,
    card_fields: Optional[dict[str, Any]] = None,
    card_template: str = "converted",
    safe_dtype: Any = None,
    image_processor: Any = None,
) -> Path:
    """Save config, safetensors weights, model code, preprocessor config and a README model card.

    `image_processor` defaults to the family's official ImageNet eval preprocessing.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if safe_dtype is not None:  # cast a copy: the caller's model keeps its dtype
        import copy

        model = copy.deepcopy(model).to(safe_dtype)
    model.save_pretrained(output_dir)
    (image_processor or image_processor_for(model)).save_pretrained(output_dir)
    if card_fields is not None:
        fields = {
            "title": output_dir.name,
            "repo": f"<org>/{output_dir.name}",
            "params": f"{count_params(model) / 1e6:.2f} M",
            "storm": json.dumps(model.config.storm),
            **card_fields,
        }
        (output_dir / "README.md").write_text(model_card_template(card_template).format(**fields))
    return output_dir


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, token: Optional[str] = None) -> str:
    """Upload a folder written by `save_model_folder` to the Hub as one commit; returns the repo URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    missing = [f for f in ("config.json", "model.safetensors", "preprocessor_config.json") if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a complete storm-hf model folder: missing {missing}.")
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload storm-hf model")
    return str(url)
