"""Named configurations shipped in `configs/` (inside the wheel as `storm_hf/_configs`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def configs_dir() -> Path:
    """The presets folder: the wheel's copy, else the source checkout's `configs/`."""
    for candidate in (_PACKAGE_DIR / "_configs", _PACKAGE_DIR.parent.parent / "configs"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("storm-hf's configs/ folder was not found; reinstall the package.")


def list_presets(kind: str | None = None) -> dict[str, Path]:
    """`{preset name: path}` for every JSON under configs/<kind>/ (all kinds when kind is None)."""
    root = configs_dir()
    folders = [root / kind] if kind else [p for p in sorted(root.iterdir()) if p.is_dir()]
    return {p.stem: p for folder in folders if folder.is_dir() for p in sorted(folder.glob("*.json"))}


def find_model_preset(name: str) -> tuple[str, dict[str, Any]]:
    """Return `(arch, config kwargs)` for a model preset such as 'vmamba_tiny_s1l8' or 'cifar10/vmamba'.

    Plain presets hold config kwargs and are filed under their architecture's folder; task presets
    (e.g. configs/cifar10/) hold `{"arch", "model", "training"}`.
    """
    root = configs_dir()
    paths = [root / f"{name}.json"] if "/" in name else sorted(root.glob(f"*/{name}.json"))
    for path in paths:
        if path.is_file() and path.parent.name != "storm":
            data = json.loads(path.read_text())
            if "arch" in data and "model" in data:
                return data["arch"], dict(data["model"])
            return path.parent.name, data
    known = sorted(
        str(p.relative_to(root).with_suffix("")) for p in root.glob("*/*.json") if p.parent.name != "storm"
    )
    raise ValueError(f"Unknown model preset {name!r}. Known presets: {', '.join(known) or 'none'}.")


def find_storm_preset(name: str) -> dict[str, Any]:
    """Return the StormConfig dict of a reduction preset in configs/storm/."""
    path = configs_dir() / "storm" / f"{name}.json"
    if not path.is_file():
        known = sorted(list_presets("storm"))
        raise ValueError(f"Unknown STORM preset {name!r}. Known presets: {', '.join(known) or 'none'}.")
    return json.loads(path.read_text())
