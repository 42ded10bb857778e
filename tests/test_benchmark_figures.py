"""``tools/benchmark.py --figures``: one README figure per (dataset, model) from the cells' visualizer images."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from benchmarking.figures import CAPTION_HEIGHT, FIGURE_WIDTH, write_figures  # noqa: E402


def _visual(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((64, 256, 3), value, np.uint8)).save(path)


def test_figures_stack_the_first_seeds_normal_over_defective(tmp_path: Path) -> None:
    cells = tmp_path / "run" / "cells"
    for seed, (normal, defective) in ((0, (10, 200)), (1, (50, 60))):
        _visual(cells / "bottle__padim" / f"seed{seed}" / "visuals" / "normal_good_000.png", normal)
        _visual(cells / "bottle__padim" / f"seed{seed}" / "visuals" / "anomalous_broken_000.png", defective)
    _visual(cells / "bottle__dfm" / "seed0" / "visuals" / "normal_good_000.png", 10)  # no defective visual: skipped
    written = write_figures(tmp_path / "run", tmp_path / "figures")
    assert [path.name for path in written] == ["bottle__padim.png"]
    figure = np.asarray(Image.open(written[0]))
    row_height = 64 * FIGURE_WIDTH // 256
    assert figure.shape == (CAPTION_HEIGHT + 2 * row_height, FIGURE_WIDTH, 3)
    assert abs(int(figure[CAPTION_HEIGHT + row_height // 2, 10, 0]) - 10) <= 2  # seed 0's normal on top
    assert abs(int(figure[CAPTION_HEIGHT + row_height + row_height // 2, 10, 0]) - 200) <= 2  # its defect below
