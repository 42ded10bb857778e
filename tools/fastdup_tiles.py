"""Tile audit of an image folder: which segments of which images are outliers?

The origin's workflow as a tool: divide every image into ``num_parts x num_parts`` tiles, embed the tiles
(fastdup's bundled model, or our offline torch backbone when fastdup is not installed), score each tile by
``1 -`` cosine similarity to its nearest tile from another image (fastdup's outlier distance), and write:

- ``outlined/<image>.png``: each image with its outlier tiles outlined in red and their scores;
- ``contact_sheet.png``: the worst tiles side by side, labelled with image and score;
- ``tile_scores.csv``: every tile with its image, grid position, pixel box, score and outlier flag;
- ``skipped.txt``: files that could not be read (reported and skipped, never fatal).

A non-empty ``--out`` folder is refused (it holds an earlier run) unless ``--overwrite`` is given.

A tile is an outlier when its score is in the top ``--outlier-fraction`` of all tiles (default 2%).

Example:
    .venv/bin/python tools/fastdup_tiles.py ../shared/data/mvtec_ad/bottle/test/broken_small --out results/audit

fastdup is non-commercial software; install it only if its licence suits you:
    pip install --no-deps fastdup==2.54 requests pillow_heif sentry-sdk
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812
from tqdm import tqdm

from anomalib_ext.data.validation import IMAGE_SUFFIXES, DataValidationError, check_image_file
from anomalib_ext.models.components.tiling import split_bands

# the audit's tile embedding has always used ImageNet statistics; kept here so it does not depend on the models'
# input-normalisation options
IMAGENET_MEAN = torch.tensor((0.485, 0.456, 0.406))
IMAGENET_STD = torch.tensor((0.229, 0.224, 0.225))
FASTDUP_HINT = "pip install --no-deps fastdup==2.54 requests pillow_heif sentry-sdk (non-commercial licence)"


@dataclass
class Tile:
    image: Path
    row: int
    col: int
    box: tuple[int, int, int, int]  # y0, x0, y1, x1 in the image's own pixels
    pixels: np.ndarray  # BGR
    score: float = 0.0
    outlier: bool = False


def read_tiles(folder: Path, num_parts: int) -> tuple[list[Tile], list[tuple[Path, str]]]:
    """All tiles of all readable images; unreadable files come back as ``(path, reason)``."""
    files = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        sys.exit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    tiles: list[Tile] = []
    skipped: list[tuple[Path, str]] = []
    for path in tqdm(files, desc="reading and tiling", unit="image"):
        problem = file_problem(path)
        if problem:
            skipped.append((path, problem))
            continue
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            skipped.append((path, "not a readable image"))
            continue
        height, width = image.shape[:2]
        if min(height, width) < num_parts:
            skipped.append((path, f"{width}x{height} px is smaller than a {num_parts}x{num_parts} grid"))
            continue
        for row, (y0, y1) in enumerate(split_bands(height, num_parts)):
            for col, (x0, x1) in enumerate(split_bands(width, num_parts)):
                tiles.append(Tile(path, row, col, (y0, x0, y1, x1), image[y0:y1, x0:x1]))
    return tiles, skipped


def file_problem(path: Path) -> str:
    """Why ``path`` is unusable (``""`` when it is fine).

    ``cv2.imread`` decodes a truncated JPEG with a grey lower half and only a libjpeg warning, so the file would
    be audited as if whole; the project's checker decodes every byte with Pillow first. 16-bit grayscale is
    allowed: OpenCV scales it to 8 bits instead of clipping it as anomalib does.
    """
    try:
        check_image_file(path, allow_16bit_gray=True)
    except DataValidationError as error:
        return error.problems[0][1]
    return ""


def embed_torch(tiles: list[Tile], crop_size: int = 64, batch_size: int = 64) -> torch.Tensor:
    """Offline ``tf_efficientnet_lite0``: each tile resized to ``crop_size``, layer means, L2-normalised."""
    from anomalib_ext.models.components import build_feature_extractor

    layers = ["blocks.2", "blocks.4"]
    extractor = build_feature_extractor(layers=layers)
    embeddings = []
    with torch.no_grad():
        for start in tqdm(range(0, len(tiles), batch_size), desc="embedding tiles (torch)", unit="batch"):
            crops = [
                cv2.resize(tile.pixels, (crop_size, crop_size), interpolation=cv2.INTER_AREA)[..., ::-1]
                for tile in tiles[start : start + batch_size]
            ]
            batch = torch.from_numpy(np.stack(crops).copy()).permute(0, 3, 1, 2).float() / 255
            features = extractor((batch - IMAGENET_MEAN.view(1, 3, 1, 1)) / IMAGENET_STD.view(1, 3, 1, 1))
            joined = torch.cat([F.normalize(features[layer].mean((2, 3)), dim=1) for layer in layers], 1)
            embeddings.append(F.normalize(joined, dim=1))
    return torch.cat(embeddings)


def embed_fastdup(tiles: list[Tile]) -> torch.Tensor:
    """fastdup's bundled model on tile files written to a temporary directory."""
    from anomalib_ext.models.tile_outlier.fastdup_backend import fastdup_embed_files

    with tempfile.TemporaryDirectory(prefix="fastdup_tiles_") as work:
        paths = []
        for index, tile in enumerate(tqdm(tiles, desc="writing tiles for fastdup", unit="tile")):
            path = Path(work) / "tiles" / f"{index:07d}.png"
            path.parent.mkdir(exist_ok=True)
            cv2.imwrite(str(path), tile.pixels)
            paths.append(path)
        print("fastdup: embedding tiles ...", file=sys.stderr)
        features = fastdup_embed_files(paths, Path(work) / "work")
    return F.normalize(torch.from_numpy(features), dim=1)


def nearest_other_image_scores(embeddings: torch.Tensor, image_ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``1 -`` cosine similarity of each tile to its nearest tile of another image."""
    scores = []
    for start in range(0, len(embeddings), chunk):
        similarity = embeddings[start : start + chunk] @ embeddings.T
        same_image = image_ids[start : start + chunk, None] == image_ids[None, :]
        similarity = similarity.masked_fill(same_image, -2.0)
        scores.append(1 - similarity.max(1).values)
    return torch.cat(scores)


def write_outputs(tiles: list[Tile], out: Path, sheet_tiles: int, sheet_tile_px: int = 96) -> None:
    """Outlined images, contact sheet of the worst tiles, CSV of every tile."""
    outlined = out / "outlined"
    outlined.mkdir(parents=True, exist_ok=True)
    with (out / "tile_scores.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "row", "col", "y0", "x0", "y1", "x1", "score", "outlier"])
        for tile in tiles:
            writer.writerow([tile.image, tile.row, tile.col, *tile.box, f"{tile.score:.6f}", int(tile.outlier)])
    by_image: dict[Path, list[Tile]] = {}
    for tile in tiles:
        by_image.setdefault(tile.image, []).append(tile)
    names_used: set[str] = set()
    for path, image_tiles in tqdm(by_image.items(), desc="writing outlined images", unit="image"):
        canvas = cv2.imread(str(path), cv2.IMREAD_COLOR)
        for tile in image_tiles:
            if tile.outlier:
                y0, x0, y1, x1 = tile.box
                cv2.rectangle(canvas, (x0, y0), (x1 - 1, y1 - 1), (0, 0, 255), max(1, canvas.shape[0] // 128))
                cv2.putText(
                    canvas, f"{tile.score:.2f}", (x0 + 2, y0 + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 255), 1
                )
        name = f"{path.parent.name}_{path.stem}.png"
        while name in names_used:
            name = "_" + name
        names_used.add(name)
        cv2.imwrite(str(outlined / name), canvas)
    worst = sorted(tiles, key=lambda tile: tile.score, reverse=True)[:sheet_tiles]
    columns = min(8, max(1, len(worst)))
    rows = (len(worst) + columns - 1) // columns
    label_px = 28
    sheet = np.full((rows * (sheet_tile_px + label_px), columns * sheet_tile_px, 3), 255, np.uint8)
    for index, tile in enumerate(worst):
        top, left = (index // columns) * (sheet_tile_px + label_px), (index % columns) * sheet_tile_px
        sheet[top : top + sheet_tile_px, left : left + sheet_tile_px] = cv2.resize(
            tile.pixels, (sheet_tile_px, sheet_tile_px), interpolation=cv2.INTER_NEAREST
        )
        label = f"{tile.image.stem[:10]} r{tile.row}c{tile.col}"
        cv2.putText(sheet, label, (left + 2, top + sheet_tile_px + 11), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (0, 0, 0), 1)
        cv2.putText(
            sheet,
            f"{tile.score:.3f}",
            (left + 2, top + sheet_tile_px + 24),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.35,
            (0, 0, 200),
            1,
        )
    cv2.imwrite(str(out / "contact_sheet.png"), sheet)


def fastdup_available() -> bool:
    try:
        from anomalib_ext.models.tile_outlier.fastdup_backend import import_fastdup

        import_fastdup()
    except ImportError:
        return False
    return True


def audit(
    folder: Path,
    out: Path,
    num_parts: int = 4,
    backend: str = "auto",
    outlier_fraction: float = 0.02,
    sheet_tiles: int = 32,
    *,
    overwrite: bool = False,
) -> list[Tile]:
    """Run the audit; returns the scored tiles (also written under ``out``).

    A non-empty ``out`` holds an earlier run, so it is refused before any work unless ``overwrite`` is set.
    """
    if not folder.is_dir():
        sys.exit(f"input folder {folder} does not exist")
    if out.exists() and not out.is_dir():
        sys.exit(f"{out}: --out is a file, not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        sys.exit(f"{out}: folder exists and is not empty; choose another --out or pass --overwrite")
    if not 0 < outlier_fraction < 1:
        sys.exit(f"--outlier-fraction must be in (0, 1), got {outlier_fraction}")
    if backend == "auto":
        backend = "fastdup" if fastdup_available() else "torch"
        print(f"backend: {backend}", file=sys.stderr)
    elif backend == "fastdup" and not fastdup_available():
        sys.exit("backend fastdup asked for but fastdup is not installed: " + FASTDUP_HINT)
    tiles, skipped = read_tiles(folder, num_parts)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "skipped.txt").open("w") as handle:
        for path, reason in skipped:
            print(f"skipped {path}: {reason}", file=sys.stderr)
            handle.write(f"{path}\t{reason}\n")
    if not tiles:
        sys.exit(f"no readable image under {folder}")
    embeddings = embed_fastdup(tiles) if backend == "fastdup" else embed_torch(tiles)
    image_index = {path: index for index, path in enumerate(dict.fromkeys(tile.image for tile in tiles))}
    image_ids = torch.tensor([image_index[tile.image] for tile in tiles])
    if len(image_index) < 2:
        sys.exit("the audit compares tiles across images: it needs at least two readable images")
    scores = nearest_other_image_scores(embeddings, image_ids)
    cutoff = torch.quantile(scores, 1 - outlier_fraction).item()
    for tile, score in zip(tiles, scores.tolist(), strict=True):
        tile.score, tile.outlier = score, score >= cutoff
    write_outputs(tiles, out, sheet_tiles)
    print(
        f"{len(tiles)} tiles from {len(image_index)} images, {len(skipped)} skipped; results in {out}", file=sys.stderr
    )
    return tiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="folder of images (searched recursively)")
    parser.add_argument("--out", type=Path, default=Path("results/fastdup_tiles"))
    parser.add_argument("--num-parts", type=int, default=4, help="N for an N x N grid of tiles per image")
    parser.add_argument("--backend", choices=["auto", "fastdup", "torch"], default="auto")
    parser.add_argument("--outlier-fraction", type=float, default=0.02)
    parser.add_argument("--sheet-tiles", type=int, default=32, help="tiles on the contact sheet")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out folder (same-named files replaced, others kept)",
    )
    args = parser.parse_args()
    if args.num_parts <= 0:
        sys.exit(f"--num-parts must be positive, got {args.num_parts}")
    audit(
        args.folder,
        args.out,
        args.num_parts,
        args.backend,
        args.outlier_fraction,
        args.sheet_tiles,
        overwrite=args.overwrite,
    )


if __name__ == "__main__":
    main()
