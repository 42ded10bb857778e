"""The shipped model configs (``anomalib_ext/configs/<family>/<name>.yaml``) as models, for tests that should follow
the configs rather than restate constructor arguments: a renamed argument is renamed in the config, not here."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "anomalib_ext" / "configs"
NOT_MODELS = ("histaugan",)  # GAN configs for ``python -m anomalib_ext.augment.histaugan``


def model_configs() -> list[Path]:
    """Every shipped config whose ``model`` section is an anomalib model."""
    return sorted(path for path in CONFIG_ROOT.glob("*/*.yaml") if path.parent.name not in NOT_MODELS)


def config_id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def model_section(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())["model"]


def instantiate(spec: Any) -> Any:  # noqa: ANN401
    """``{class_path, init_args}`` mappings (nested too) as objects; anything else as it is."""
    if isinstance(spec, dict) and "class_path" in spec:
        module, name = spec["class_path"].rsplit(".", 1)
        arguments = {key: instantiate(value) for key, value in (spec.get("init_args") or {}).items()}
        return getattr(importlib.import_module(module), name)(**arguments)
    if isinstance(spec, list):
        return [instantiate(item) for item in spec]
    return spec


def build_from_config(path: Path, **overrides: Any) -> Any:  # noqa: ANN401
    """The config's model, with ``overrides`` replacing (or adding) top-level init args."""
    section = model_section(path)
    return instantiate({**section, "init_args": {**(section.get("init_args") or {}), **overrides}})
