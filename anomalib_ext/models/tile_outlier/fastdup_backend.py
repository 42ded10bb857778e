"""Optional fastdup backend: tiles embedded by fastdup's bundled model (the origin's tool).

fastdup is non-commercial software (Visual Layer's licence) and pins numpy<2 / Pillow==10.3.0; it runs with
this stack when installed with ``pip install --no-deps fastdup==2.54 requests pillow_heif sentry-sdk``. It is
imported only here, only when ``backend: fastdup`` is asked for, with ``SENTRY_OPT_OUT=1`` set first so it
sends no telemetry. fastdup works on image files, so tiles are written as PNG files to a temporary directory
(under ``$TMPDIR``, removed after each batch) and its feature extractor (``run_mode=1``) embeds them; nearest
normal neighbours are then found by the same cosine scoring as the torch backend (fastdup's own default distance
is cosine too).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_ext.models.components.tiling import TileGrid

FASTDUP_INSTALL = "pip install --no-deps fastdup==2.54 requests pillow_heif sentry-sdk"
FASTDUP_DIM = 576


def import_fastdup() -> ModuleType:
    """Import fastdup with telemetry off; a clear error when it is not installed."""
    os.environ["SENTRY_OPT_OUT"] = "1"
    try:
        import fastdup
    except ImportError as error:
        msg = f"backend 'fastdup' needs the optional fastdup package (non-commercial licence): {FASTDUP_INSTALL}"
        raise ImportError(msg) from error
    return fastdup


def fastdup_embed_files(paths: list[Path], work_dir: Path, num_threads: int = -1) -> np.ndarray:
    """``(len(paths), 576)`` fastdup embeddings of image files, in the order of ``paths``."""
    fastdup = import_fastdup()
    work_dir.mkdir(parents=True, exist_ok=True)
    absolute = [str(Path(path).resolve()) for path in paths]
    status = fastdup.run(input_dir=absolute, work_dir=str(work_dir), run_mode=1, num_threads=num_threads, verbose=False)
    if status != 0:
        msg = f"fastdup feature extraction failed (status {status}); see {work_dir}"
        raise RuntimeError(msg)
    names, features = fastdup.load_binary_feature(str(work_dir / "atrain_features.dat"), d=FASTDUP_DIM)
    row_of = {str(Path(name).resolve()): index for index, name in enumerate(names)}
    missing = [path for path in absolute if path not in row_of]
    if missing:
        msg = f"fastdup could not read {len(missing)} file(s), first: {missing[0]}"
        raise RuntimeError(msg)
    return np.asarray(features, dtype=np.float32)[[row_of[path] for path in absolute]]


class FastdupTileEmbedder:
    """Cut images into the grid's tiles, write them as PNG, embed them with fastdup."""

    def __init__(self, grid: TileGrid) -> None:
        import_fastdup()  # fail at construction, not in the middle of training
        self.grid = grid

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` images in [0, 1] -> ``(B, rows, cols, 576)`` unit-norm tile embeddings."""
        import cv2

        rows, cols = self.grid.shape
        pixels = (images.detach().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        base = Path(tempfile.mkdtemp(prefix="tile_outlier_fastdup_"))  # $TMPDIR; removed below
        try:
            tile_dir = base / "tiles"
            tile_dir.mkdir()
            paths = []
            for image_index, image in enumerate(pixels):
                for tile_index, (y0, x0, y1, x1) in enumerate(self.grid.boxes().tolist()):
                    path = tile_dir / f"{image_index:05d}_{tile_index:05d}.png"
                    cv2.imwrite(str(path), np.ascontiguousarray(image[y0:y1, x0:x1, ::-1]))
                    paths.append(path)
            features = fastdup_embed_files(paths, base / "work")
        finally:
            shutil.rmtree(base, ignore_errors=True)
        embeddings = torch.from_numpy(features).view(len(pixels), rows, cols, -1)
        return F.normalize(embeddings, dim=-1)
