"""Named studies on the benchmark's own cell runner (``tools/benchmark.py --study NAME``).

A study only changes which cells run or adds a measurement to each cell; fitting, metrics (anomalib's),
speed (``benchmarking.speed``) and reports are the benchmark's. Each module has ``expand(datasets, models,
settings)`` returning the cells' datasets and models, and ``report(rows)`` returning extra Markdown lines.
"""

from __future__ import annotations

from typing import Any

from benchmarking.studies import augmentation, fewshot, light_changes, lighting, scaling, sessions

STUDIES = {
    "augmentation": augmentation,
    "fewshot": fewshot,
    "light_changes": light_changes,
    "lighting": lighting,
    "scaling": scaling,
    "sessions": sessions,
}


def expand(
    study: str | None, datasets: list[dict[str, Any]], models: list[dict[str, Any]], settings: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The datasets and models whose cells a study runs (unchanged without a study)."""
    if not study:
        return datasets, models
    return STUDIES[study].expand(datasets, models, settings)


def report(study: str | None, rows: list[dict[str, Any]]) -> list[str]:
    """The study's own Markdown section for ``results.md`` (nothing without a study)."""
    return STUDIES[study].report(rows) if study else []
