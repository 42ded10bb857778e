"""Parse the benchmark's ``--model`` and ``--dataset`` arguments into plain, JSON-serialisable specs.

The parent process only parses and validates; the cell process (one per model x dataset) imports torch and
anomalib. Keeping specs as plain dicts lets the parent write them to disk, so a resumed run rebuilds the
exact same cells.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_ROOT = REPO_ROOT / "configs"
OFFLINE_BACKBONE = "tf_efficientnet_lite0"

# anomalib's built-ins on the offline backbone with comparable feature depths (see docs/benchmark.md).
BUILTIN_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "padim": (
        "anomalib.models.Padim",
        {"backbone": OFFLINE_BACKBONE, "layers": ["blocks.1", "blocks.2", "blocks.4"], "n_features": 100},
    ),
    "patchcore": (
        "anomalib.models.Patchcore",
        {"backbone": OFFLINE_BACKBONE, "layers": ["blocks.2", "blocks.4"], "coreset_sampling_ratio": 0.002},
    ),
    "stfpm": (
        "anomalib.models.Stfpm",
        {"backbone": OFFLINE_BACKBONE, "layers": ["blocks.1", "blocks.2", "blocks.4"]},
    ),
    "dfkde": ("anomalib.models.Dfkde", {"backbone": OFFLINE_BACKBONE, "layers": ["blocks.6"]}),
    "dfm": ("anomalib.models.Dfm", {"backbone": OFFLINE_BACKBONE, "layer": "blocks.6"}),
}
# our families without a config for the dataset run with their class defaults
OUR_MODELS: dict[str, str] = {
    "template_ssim": "anomalib_ext.models.TemplateSsim",
    "tile_outlier": "anomalib_ext.models.TileOutlier",
    "dfkdm": "anomalib_ext.models.Dfkdm",
    "reconstruction": "anomalib_ext.models.Reconstruction",
    "teacher_student": "anomalib_ext.models.TeacherStudent",
}
DATASET_KINDS = ("mvtec", "folder", "dice", "split")


class SpecError(ValueError):
    """A ``--model`` or ``--dataset`` argument cannot be understood; the message names it and says why."""


@dataclass
class ModelSpec:
    """What to build for one model column: a class path with init args, or a config file resolved per dataset."""

    label: str
    class_path: str | None = None
    init_args: dict[str, Any] = field(default_factory=dict)
    config: str | None = None  # explicit config file
    config_family: str | None = None  # configs/<family>/<dataset kind>.yaml, resolved per dataset
    trainer: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DatasetSpec:
    """One dataset row group: its layout kind, where it is, and options such as ``image_size``."""

    label: str
    kind: str
    path: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _split_label_and_options(text: str, what: str) -> tuple[str | None, str, dict[str, Any]]:
    """Split ``[label=]target[:{yaml mapping}]`` into its three parts."""
    label = None
    match = re.match(r"^([A-Za-z0-9_.\-]+)=(.+)$", text)
    if match and not match.group(1).endswith((".yaml", ".yml")):
        label, text = match.group(1), match.group(2)
    options: dict[str, Any] = {}
    if ":{" in text:
        text, _, raw_options = text.partition(":{")
        try:
            options = yaml.safe_load("{" + raw_options)
        except yaml.YAMLError as error:
            msg = f"{what} '{text}': options '{{{raw_options}' are not a YAML mapping ({error})"
            raise SpecError(msg) from error
        if not isinstance(options, dict):
            msg = f"{what} '{text}': options must be a mapping like {{key: value}}, got {raw_options!r}"
            raise SpecError(msg)
    if not text:
        msg = f"{what}: empty name in '{label}='"
        raise SpecError(msg)
    return label, text, options


def _read_model_section(config_path: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Return ``(class_path, init_args, trainer)`` from an anomalib config; the data section is ignored."""
    try:
        config = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError) as error:
        msg = f"model config {config_path}: cannot read it as YAML ({error})"
        raise SpecError(msg) from error
    model = (config or {}).get("model")
    if isinstance(model, str):
        return model, {}, {}
    if not isinstance(model, dict) or "class_path" not in model:
        msg = f"model config {config_path}: needs a 'model:' section with a 'class_path' (anomalib CLI format)"
        raise SpecError(msg)
    trainer = config.get("trainer") or {}
    kept_trainer = {key: trainer[key] for key in ("max_epochs",) if key in trainer}
    return model["class_path"], dict(model.get("init_args") or {}), kept_trainer


def parse_model(text: str) -> ModelSpec:
    """Turn one ``--model`` value into a spec.

    Accepted forms (options are a YAML flow mapping that overrides the init args):
    ``padim``, ``padim:{n_features: 50}``, ``anomalib.models.Padim:{backbone: resnet18}``,
    ``configs/tile_outlier/mvtec.yaml``, ``tile_outlier`` (picks ``configs/tile_outlier/<dataset>.yaml`` per
    dataset), and any of these prefixed with ``label=``.
    """
    label, target, options = _split_label_and_options(text.strip(), "--model")
    lowered = target.lower()
    if target.endswith((".yaml", ".yml")):
        config_path = Path(target)
        if not config_path.is_file():
            msg = f"--model {text}: config file {config_path} does not exist"
            raise SpecError(msg)
        class_path, init_args, trainer = _read_model_section(config_path)
        family = config_path.parent.name
        return ModelSpec(
            label=label or f"{family}/{config_path.stem}",
            class_path=class_path,
            init_args={**init_args, **options},
            config=str(config_path.resolve()),
            trainer=trainer,
        )
    if lowered in BUILTIN_MODELS:
        class_path, init_args = BUILTIN_MODELS[lowered]
        return ModelSpec(label=label or lowered, class_path=class_path, init_args={**init_args, **options})
    if "." in target:
        short = target.rsplit(".", 1)[-1].lower()
        defaults = BUILTIN_MODELS.get(short, (None, {}))[1] if target.startswith("anomalib.models") else {}
        return ModelSpec(label=label or short, class_path=target, init_args={**defaults, **options})
    family_dir = CONFIG_ROOT / target
    if family_dir.is_dir() and any(family_dir.glob("*.yaml")):
        return ModelSpec(label=label or target, config_family=target, init_args=options)
    if lowered in OUR_MODELS:
        return ModelSpec(label=label or lowered, class_path=OUR_MODELS[lowered], init_args=options)
    known = ", ".join(sorted(BUILTIN_MODELS) + sorted(OUR_MODELS))
    msg = (
        f"--model {text}: unknown model '{target}'. Use a built-in short name ({known}), a class path like "
        f"anomalib.models.Padim, a config file path, or a family under {CONFIG_ROOT} with *.yaml configs"
    )
    raise SpecError(msg)


def resolve_config_family(family: str, dataset_kind: str, dataset_label: str) -> Path:
    """Pick ``configs/<family>/<name>.yaml`` that fits the dataset: its label, its layout kind, or the only one.

    A family without a config for the dataset's kind falls back to its general ``mvtec.yaml``: the benchmark
    takes only the model's arguments from a config (and sets the image size from the dataset), never its data.
    """
    family_dir = CONFIG_ROOT / family
    candidates = sorted(family_dir.glob("*.yaml"))
    preferred = [dataset_label.lower(), dataset_kind, "mvtec" if dataset_kind in ("mvtec", "folder") else "dice"]
    preferred.append("mvtec")
    for name in preferred:
        for candidate in candidates:
            if candidate.stem.lower() == name:
                return candidate
    if len(candidates) == 1:
        return candidates[0]
    msg = (
        f"model family '{family}': none of {[c.name for c in candidates]} in {family_dir} matches dataset "
        f"'{dataset_label}' (kind {dataset_kind}); pass the config file explicitly"
    )
    raise SpecError(msg)


def detect_layout(path: Path) -> str:
    """Tell the dataset layout from its folders, or explain what was expected."""
    if (path / "train" / "good").is_dir() and (path / "val" / "anomalous").is_dir():
        return "dice"
    if (path / "train" / "good").is_dir() and (path / "test").is_dir():
        return "mvtec"
    if (path / "train" / "good").is_dir() and (path / "val" / "good").is_dir() and (path / "test").is_dir():
        return "split"
    if any((path / name).is_dir() for name in ("good", "normal")):
        return "folder"
    msg = (
        f"--dataset {path}: unknown layout. Expected MVTec (train/good + test/<defect> [+ ground_truth]), "
        "dice (train/good/<class>/ + val/anomalous/), or folder (good|normal/ + bad|abnormal|anomalous/ [+ mask/])"
    )
    raise SpecError(msg)


def parse_dataset(text: str) -> DatasetSpec:
    """Turn one ``--dataset`` value (``[label=]path[:{yaml options}]``) into a spec; the layout is detected."""
    label, target, options = _split_label_and_options(text.strip(), "--dataset")
    path = Path(target).expanduser()
    if not path.is_dir():
        msg = f"--dataset {text}: {path} is not a directory"
        raise SpecError(msg)
    kind = options.pop("layout", None) or detect_layout(path)
    if kind not in DATASET_KINDS:
        msg = f"--dataset {text}: layout '{kind}' is not one of {DATASET_KINDS}"
        raise SpecError(msg)
    return DatasetSpec(label=label or path.name, kind=kind, path=str(path.resolve()), options=options)


def cell_id(dataset_label: str, model_label: str) -> str:
    """A filesystem-safe, stable name for one (dataset, model) cell."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", f"{dataset_label}__{model_label}")
