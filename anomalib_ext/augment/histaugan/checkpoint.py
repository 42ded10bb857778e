"""The HistAuGAN generator checkpoint: what ``HistAuGANAugment`` loads.

Format (a ``torch.save`` dict, loadable with ``weights_only=True``)::

    {
        "format": "anomalib_ext.histaugan.generator",
        "version": 1,
        "config": {num_domains, image_channels, base_channels, attribute_dim,
                   num_residual_blocks, style_dim, image_size},
        "domain_names": [str, ...],            # one per domain, in index order
        "state_dict": HistAuGANGenerator.state_dict(),
                      # content_encoder.*, attribute_encoder.*, generator.*,
                      # attribute_mean (K, attribute_dim), attribute_std (K, attribute_dim)
    }

A Lightning ``.ckpt`` of the ``HistAuGAN`` module loads too (its ``renderer.*`` weights and hyper-parameters).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .networks import HistAuGANGenerator

CHECKPOINT_FORMAT = "anomalib_ext.histaugan.generator"
CHECKPOINT_VERSION = 1
GENERATOR_KEYS = ("num_domains", "image_channels", "base_channels", "attribute_dim", "num_residual_blocks", "style_dim")


class HistAuGANCheckpointError(ValueError):
    """The file is missing, unreadable, or not a HistAuGAN generator."""


def save_generator(
    renderer: HistAuGANGenerator, config: dict[str, int], domain_names: list[str], path: str | Path
) -> Path:
    """Write the generator checkpoint (a few MB at most) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {key: value.detach().cpu().clone() for key, value in renderer.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": dict(config),
        "domain_names": list(domain_names),
        "state_dict": state_dict,
    }
    torch.save(payload, path)
    return path


def _read(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (any decoding failure means the same thing to the user)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        msg = f"HistAuGAN checkpoint '{path}' could not be read (corrupt or not a torch file): {reason[:200]}"
        raise HistAuGANCheckpointError(msg) from None


def _from_lightning(payload: dict, path: Path) -> tuple[dict[str, int], list[str], dict[str, torch.Tensor]]:
    hyper_parameters = payload.get("hyper_parameters") or {}
    state_dict = {
        key.removeprefix("renderer."): value
        for key, value in payload["state_dict"].items()
        if key.startswith("renderer.")
    }
    missing = [key for key in GENERATOR_KEYS if key not in hyper_parameters]
    if not state_dict or missing:
        msg = (
            f"'{path}' is a Lightning checkpoint but not of a HistAuGAN module "
            f"(renderer weights found: {bool(state_dict)}; missing hyper-parameters: {missing})"
        )
        raise HistAuGANCheckpointError(msg)
    config = {key: int(hyper_parameters[key]) for key in GENERATOR_KEYS}
    config["image_size"] = int(hyper_parameters.get("image_size", 64))
    domain_names = payload.get("histaugan_domain_names") or [f"domain{i}" for i in range(config["num_domains"])]
    return config, list(domain_names), state_dict


def load_generator(path: str | Path) -> tuple[HistAuGANGenerator, dict[str, int], list[str]]:
    """Load a generator checkpoint (exported or Lightning ``.ckpt``) in eval mode on the CPU.

    Returns the generator, its config (including the training ``image_size``) and the domain names.
    Raises ``FileNotFoundError`` or ``HistAuGANCheckpointError`` with the file name in the message.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"HistAuGAN checkpoint '{path}' does not exist"
        raise FileNotFoundError(msg)
    payload = _read(path)
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        if payload.get("version") != CHECKPOINT_VERSION:
            msg = f"HistAuGAN checkpoint '{path}' has version {payload.get('version')}, expected {CHECKPOINT_VERSION}"
            raise HistAuGANCheckpointError(msg)
        config, domain_names, state_dict = dict(payload["config"]), list(payload["domain_names"]), payload["state_dict"]
    elif isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        config, domain_names, state_dict = _from_lightning(payload, path)
    else:
        found = sorted(payload)[:8] if isinstance(payload, dict) else type(payload).__name__
        msg = (
            f"'{path}' is not a HistAuGAN generator checkpoint: expected format '{CHECKPOINT_FORMAT}' "
            f"or a Lightning checkpoint of HistAuGAN, found {found}"
        )
        raise HistAuGANCheckpointError(msg)
    try:
        renderer = HistAuGANGenerator(**{key: int(config[key]) for key in GENERATOR_KEYS})
        renderer.load_state_dict(state_dict, strict=True)
    except (KeyError, RuntimeError, TypeError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0][:300]
        msg = f"HistAuGAN checkpoint '{path}' does not match the generator it describes: {first_line}"
        raise HistAuGANCheckpointError(msg) from None
    if len(domain_names) != renderer.num_domains:
        domain_names = [f"domain{index}" for index in range(renderer.num_domains)]
    return renderer.eval(), config, domain_names
