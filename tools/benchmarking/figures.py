"""One figure per (dataset, model): the visualizer's normal and defective images of its first seed, stacked.

The cells already save anomalib's ``ImageVisualizer`` output (image, ground truth, anomaly map overlay, predicted
mask) under ``cells/<dataset>__<model>/seed<k>/visuals/``; ``--figures DIR`` turns them into the figures the model
READMEs open with, so the figure and the README's numbers come from the same run.
"""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image, ImageDraw

FIGURE_WIDTH = 900  # pixels: readable on a README page, small in the repository
CAPTION_HEIGHT = 28


def _first_seed_visuals(cell_dir: Path) -> Path | None:
    runs = sorted(cell_dir.glob("seed*/visuals"), key=lambda path: int(re.sub(r"\D", "", path.parent.name) or 0))
    return runs[0] if runs else None


def compose_figure(normal: Path, anomalous: Path, caption: str) -> Image.Image:
    """``normal`` above ``anomalous``, scaled to ``FIGURE_WIDTH``, under a one-line caption."""
    rows = []
    for path in (normal, anomalous):
        with Image.open(path) as image:
            row = image.convert("RGB")
        height = round(row.height * FIGURE_WIDTH / row.width)
        rows.append(row.resize((FIGURE_WIDTH, height), Image.Resampling.LANCZOS))
    figure = Image.new("RGB", (FIGURE_WIDTH, CAPTION_HEIGHT + sum(row.height for row in rows)), "white")
    ImageDraw.Draw(figure).text((8, 8), caption, fill="black")
    top = CAPTION_HEIGHT
    for row in rows:
        figure.paste(row, (0, top))
        top += row.height
    return figure


def write_figures(out_dir: Path, figures_dir: Path) -> list[Path]:
    """``figures_dir/<dataset>__<model>.png`` for every cell that saved a normal and a defective visual."""
    figures_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for cell_dir in sorted((out_dir / "cells").iterdir()):
        visuals = _first_seed_visuals(cell_dir) if cell_dir.is_dir() else None
        if visuals is None:
            continue
        normal = sorted(visuals.glob("normal_*.png"))
        anomalous = sorted(visuals.glob("anomalous_*.png"))
        if not normal or not anomalous:
            continue
        dataset, _, model = cell_dir.name.partition("__")
        caption = (
            f"{model} on {dataset} ({visuals.parent.name}): a normal test image (top) and a defective one (bottom); "
            "image, ground truth, anomaly map, predicted mask"
        )
        path = figures_dir / f"{cell_dir.name}.png"
        compose_figure(normal[0], anomalous[0], caption).save(path, optimize=True)
        written.append(path)
    return written
