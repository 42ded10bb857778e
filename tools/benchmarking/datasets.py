"""Dataset preparation: turn a dice-layout folder into explicit train / validation / test splits.

The dice set ships normal images per class and a pool of anomalies, with no test split. The benchmark needs a
validation set (to pick the F1 threshold) that is disjoint from the test set, and both should measure what
matters on the line: holding up across acquisition sessions. So training uses the bright later sessions,
validation and test normals come from the two darker earlier sessions (one session each), and the anomalies
are dealt alternately to validation and test. The split is a tree of symbolic links (no copies of the data)
plus a ``split.csv`` manifest, so anyone can audit exactly which file went where.
"""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from anomalib_ext.data.duplicates import without_copies_of

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICE_DEFAULTS: dict[str, Any] = {
    "sessions": ["16_09_21", "17_11_21", "25_10_21", "26_01_22"],
    "val_sessions": ["17_11_21"],
    "test_sessions": ["16_09_21"],
    "train_per_class": 50,
    "val_normal_per_class": 15,
    "test_normal_per_class": 20,
    "max_anomalies_per_split": 150,
    "seed": 0,
}


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _session_of(path: Path, sessions: list[str]) -> str | None:
    name = f"_{path.stem}_"
    return next((session for session in sessions if f"_{session}_" in name), None)


def _cap_per_class(by_class: dict[str, list[Path]], cap: int, rng: random.Random) -> list[Path]:
    chosen: list[Path] = []
    for cls in sorted(by_class):
        files = sorted(by_class[cls])
        rng.shuffle(files)
        chosen.extend(sorted(files[:cap]))
    return chosen


def _link(files: list[Path], folder: Path, keep_class_folder: bool) -> None:
    """Link ``files`` into ``folder``; normals keep their ``<class>/`` folder (class-aware models read it)."""
    for source in files:
        target = folder / source.parent.name / source.name if keep_class_folder else folder / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_symlink():
            target.symlink_to(source.resolve())


def prepare_dice_split(source: Path, destination: Path, options: dict[str, Any]) -> dict[str, int]:
    """Write ``destination/{train/good, val/good, val/anomalous, test/good, test/anomalous}`` as links.

    Returns the number of images per split. Idempotent: a resumed run finds the same files.
    """
    unknown = set(options) - set(DICE_DEFAULTS) - {"image_size"}
    if unknown:
        msg = f"dice dataset {source}: unknown options {sorted(unknown)}; known: {sorted(DICE_DEFAULTS)}"
        raise ValueError(msg)
    settings = {**DICE_DEFAULTS, **options}
    rng = random.Random(settings["seed"])
    sessions = list(settings["sessions"])
    normals_by_group: dict[str, dict[str, list[Path]]] = {"train": defaultdict(list)}
    normals_by_group["val"] = defaultdict(list)
    normals_by_group["test"] = defaultdict(list)
    train_root = source / "train" / "good"
    class_dirs = sorted(p for p in train_root.iterdir() if p.is_dir()) or [train_root]
    has_test = (source / "test").is_dir()
    for class_dir in class_dirs:
        for image in _images(class_dir):
            session = _session_of(image, sessions)
            if session in settings["val_sessions"]:
                group = "val"
            elif session in settings["test_sessions"] and not has_test:
                group = "test"
            else:
                group = "train"
            normals_by_group[group][class_dir.name].append(image)
    for group in ("val", "test") if not has_test else ("val",):
        # a set without the held-out sessions still gets a disjoint validation/test split: 15 % per class
        if not normals_by_group[group]:
            for cls, files in normals_by_group["train"].items():
                files.sort()
                rng.shuffle(files)
                take = max(1, len(files) * 15 // 100)
                normals_by_group[group][cls], normals_by_group["train"][cls] = files[:take], files[take:]
    anomalies = _images(source / "val" / "anomalous")
    if not anomalies:
        msg = f"dice dataset {source}: no images in val/anomalous; the validation threshold needs anomalies"
        raise ValueError(msg)
    cap = settings["max_anomalies_per_split"]
    if has_test:
        val_anomalies = anomalies[: 2 * cap]
        test_normals = _images(source / "test" / "good")
        test_anomalies = [p for p in _images(source / "test") if "good" not in p.relative_to(source / "test").parts]
    else:
        val_anomalies, test_anomalies = anomalies[0::2][:cap], anomalies[1::2][:cap]
        test_normals = _cap_per_class(normals_by_group["test"], settings["test_normal_per_class"], rng)
    # the real set repeats images byte for byte across its two dark sessions: keep copies out of every split
    # but one (test first, then validation), or the threshold and the training see test images
    held_out = [*test_normals, *test_anomalies]
    val_normals = without_copies_of(
        _cap_per_class(normals_by_group["val"], settings["val_normal_per_class"], rng), held_out, "validation"
    )
    train_normals = without_copies_of(
        _cap_per_class(normals_by_group["train"], settings["train_per_class"], rng),
        [*held_out, *val_normals, *val_anomalies],
        "training",
    )
    splits = {
        "train/good": train_normals,
        "val/good": val_normals,
        "val/anomalous": val_anomalies,
        "test/good": test_normals,
        "test/anomalous": test_anomalies,
    }
    empty = [name for name, files in splits.items() if not files]
    if empty:
        msg = f"dice dataset {source}: split(s) {empty} came out empty with options {settings}"
        raise ValueError(msg)
    destination.mkdir(parents=True, exist_ok=True)
    with (destination / "split.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["split", "source"])
        for name, files in splits.items():
            _link(files, destination / name, keep_class_folder=name.endswith("good"))
            writer.writerows([name, str(path)] for path in files)
    return {name: len(files) for name, files in splits.items()}
