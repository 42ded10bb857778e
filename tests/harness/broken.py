"""A deliberately broken model, to prove that a test can fail: ``ANOMALIB_EXT_BROKEN_MODEL=<mode> pytest ...``.

Every model's torch forward ends in anomalib's ``InferenceBatch(pred_score=..., anomaly_map=...)``; this module
replaces what goes into that batch, so every family (and anomalib's own models) is broken the same way, in the
test process and in every Python process it starts (CLI runs, torchrun ranks, benchmark cells, through the
``sitecustomize`` in ``tests/harness/broken_site``, which the conftest puts on ``PYTHONPATH``). The
post-processor's batch (the one that carries ``pred_label``) is left alone: it only passes the broken scores on.

Modes:
- ``random``: uniform noise for scores and maps (the export traces it as a random op, so OpenVINO is broken too);
- ``constant``: every score and map is 0;
- ``shuffle``: scores and maps permuted across the batch (a batch of one image is left as it is).

Training is untouched (gradient families train on their losses, fit-only models fit their banks); only what the
model says about an image is broken. A test that still passes under any of these modes checks nothing about the
model's answers.
"""

from __future__ import annotations

import os
import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Any

BROKEN_MODEL_ENV = "ANOMALIB_EXT_BROKEN_MODEL"
MODES = ("random", "constant", "shuffle")
SITE_DIR = Path(__file__).resolve().parent / "broken_site"
BATCH_MODULE = "anomalib.data.dataclasses.torch.base"


def _broken(value: Any, mode: str, order: Any) -> Any:  # noqa: ANN401
    import torch

    if not isinstance(value, torch.Tensor):
        return value
    if mode == "random":
        return torch.rand_like(value)
    if mode == "constant":
        return torch.zeros_like(value)
    return value[order] if value.ndim and value.shape[0] == order.numel() else value


def break_inference_batches(mode: str) -> None:
    """Make every model-level ``InferenceBatch`` carry broken scores and maps (idempotent)."""
    if mode not in MODES:
        msg = f"{BROKEN_MODEL_ENV}={mode!r}: expected one of {MODES}"
        raise ValueError(msg)
    import importlib

    import torch

    InferenceBatch = importlib.import_module(BATCH_MODULE).InferenceBatch  # noqa: N806

    if getattr(InferenceBatch, "_broken_mode", None):
        return
    original_new = InferenceBatch.__new__

    def broken_new(cls, pred_score=None, pred_label=None, anomaly_map=None, pred_mask=None):  # noqa: ANN001, ANN202
        if pred_label is None and isinstance(pred_score, torch.Tensor):  # a model's output, not the post-processor's
            order = torch.randperm(pred_score.shape[0]) if pred_score.ndim else None
            pred_score = _broken(pred_score, mode, order)
            anomaly_map = _broken(anomaly_map, mode, order)
        return original_new(cls, pred_score, pred_label, anomaly_map, pred_mask)

    InferenceBatch.__new__ = broken_new
    InferenceBatch._broken_mode = mode


class _PatchOnImport(MetaPathFinder):
    """Breaks ``InferenceBatch`` right after anomalib defines it, so a process that never imports anomalib (the
    torch-free edge tool) stays as it is."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def find_spec(self, name: str, path: Any, target: Any = None) -> ModuleSpec | None:  # noqa: ANN401
        if name != BATCH_MODULE:
            return None
        sys.meta_path.remove(self)
        from importlib.util import find_spec

        spec = find_spec(name)
        sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader, mode = spec.loader, self.mode
        exec_module = loader.exec_module

        def exec_and_break(module: Any) -> None:  # noqa: ANN401
            exec_module(module)
            sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _PatchOnImport)]
            break_inference_batches(mode)

        loader.exec_module = exec_and_break
        return spec


def install_from_environment() -> str | None:
    """Break models in this process (now, or when anomalib is imported) if ``ANOMALIB_EXT_BROKEN_MODEL`` is set,
    and pass the setting on to child processes. Returns the mode."""
    mode = os.environ.get(BROKEN_MODEL_ENV)
    if not mode:
        return None
    if mode not in MODES:
        msg = f"{BROKEN_MODEL_ENV}={mode!r}: expected one of {MODES}"
        raise ValueError(msg)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(SITE_DIR) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), *filter(None, paths)])
    if BATCH_MODULE in sys.modules:
        break_inference_batches(mode)
    elif not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport(mode))
    return mode
