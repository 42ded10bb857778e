"""The three dataset layouts anomalib-ext reads: MVTec AD (``MVTecAD``, ``Visa``, ``MVTecLOCO``), dice (``Dice``) and
``anomalib.data.Folder``. Each check walks the layout once and raises one :class:`DataValidationError` listing
every problem, including what anomalib would silently get wrong (upper-case suffixes it skips, masks it pairs
with the wrong image by sort order).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .files import IMAGE_SUFFIXES, DataValidationError, ImageInfo, is_data_file, mask_problem, scan_folder


def _check_masks(
    images: Iterable[ImageInfo], mask_for: dict[Path, Path], problems: list[tuple[Path, str]], required: bool
) -> None:
    """Append to ``problems`` each anomalous image's missing (when ``required``) or unusable mask."""
    for info in images:
        mask_path = mask_for.get(info.path)
        if mask_path is None or not mask_path.exists():
            if required:
                expected = f" (expected {mask_path})" if mask_path is not None else ""
                problems.append((info.path, f"anomalous image has no mask{expected}"))
            continue
        problem = mask_problem(mask_path, (info.height, info.width))
        if problem:
            problems.append((mask_path, problem))


def check_mvtec_layout(
    root: str | Path,
    category: str,
    min_size: int | tuple[int, int] | None = None,
    require_anomalies: bool = True,
    require_masks: bool = True,
    allow_16bit_gray: bool = False,
) -> None:
    """Check ``root/category`` in MVTec AD layout before anomalib reads it; raise one error listing all problems.

    Checks ``train/good`` (exists, images, all readable), every ``test/<x>`` folder, that the test set holds
    normal and anomalous images (AUROC and F1 are undefined otherwise), and for each anomalous image its mask
    ``ground_truth/<defect>/<stem>_mask.png``: present, readable, same size, binary. Also flags upper-case
    suffixes, which anomalib's MVTec reader skips silently.
    """
    base = Path(root) / category
    context = f"MVTec dataset {base}"
    check_mvtec_paths(root, category)
    problems: list[tuple[Path, str]] = []
    kwargs: dict[str, Any] = {"min_size": min_size, "allow_16bit_gray": allow_16bit_gray}
    _, train_problems = scan_folder(base / "train" / "good", "train/good", False, allow_empty=False, **kwargs)
    problems += train_problems
    test_dir = base / "test"
    if not test_dir.is_dir():
        problems.append((test_dir, "test folder does not exist (MVTecAD needs test/good and test/<defect>)"))
    else:
        folders = sorted(p for p in test_dir.iterdir() if p.is_dir())
        n_normal = n_anomalous = 0
        for folder in folders:
            infos, folder_problems = scan_folder(folder, f"test/{folder.name}", False, allow_empty=True, **kwargs)
            problems += folder_problems
            if folder.name == "good":
                n_normal += len(infos)
                continue
            n_anomalous += len(infos)
            masks = {info.path: base / "ground_truth" / folder.name / f"{info.path.stem}_mask.png" for info in infos}
            _check_masks(infos, masks, problems, required=require_masks)
        if n_normal == 0:
            problems.append((test_dir / "good", "test set has no normal images (test/good is missing or empty)"))
        if require_anomalies and n_anomalous == 0:
            problems.append((test_dir, "test set has no anomalous images: image AUROC/F1 are undefined"))
    for path in sorted(base.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and path.suffix != path.suffix.lower():
            problems.append((path, f"upper-case extension '{path.suffix}': anomalib's MVTecAD skips it; rename it"))
    if not problems:  # names and sizes are right: would anomalib's pairing by sort order agree?
        problems += mvtec_mask_pairing_problems(base)
    if problems:
        raise DataValidationError(problems, context)


def _listing(names: list[str], shown: int = 8) -> str:
    """``"it holds: a, b, c"`` (the first ``shown`` of ``names``), for messages about a misspelt name."""
    if not names:
        return "it holds no folders"
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return f"it holds: {', '.join(names[:shown])}{more}"


def root_problem(root: Path, expected: str) -> tuple[Path, str] | None:
    """``(root, why)`` when the dataset root is missing or a file; ``expected`` says what should be under it."""
    if root.is_dir():
        return None
    found = "is a file, not a folder" if root.exists() else "folder not found"
    return root, f"data root {found} (expected {expected})"


def category_problem(root: Path, category: str) -> tuple[Path, str] | None:
    """``(root/category, why)`` when the category folder is missing: names the folders that are there and the
    closest one to ``category``, since a misspelt category is the usual cause."""
    base = root / category
    if base.is_dir():
        return None
    candidates = [entry.name for entry in root.iterdir() if entry.is_dir()]
    close = difflib.get_close_matches(category, candidates, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    shown = sorted(name for name in candidates if not name.startswith("."))
    return base, f"category folder not found under root {root} ({_listing(shown)}{hint})"


def check_mvtec_paths(root: str | Path, category: str) -> None:
    """Existence only (reads no file): ``root`` and ``root/category`` are folders; else one error naming the path.

    What anomalib's ``MVTecAD.prepare_data`` tests before it downloads the public dataset into ``root``: checked
    first, a wrong root or a misspelt category is one line instead of a download attempt.
    """
    root = Path(root)
    problem = root_problem(root, f"{root / category / 'train' / 'good'}/ with normal images, MVTec AD layout")
    problem = problem or category_problem(root, category)
    if problem:
        raise DataValidationError([problem], f"MVTec dataset {root / category}")


def mvtec_mask_pairing_problems(base: Path, shown: int = 3) -> list[tuple[Path, str]]:
    """Anomalous images that anomalib's MVTecAD would pair with another image's mask.

    MVTecAD does not look masks up by name: it sorts the anomalous test images and the ``ground_truth`` files
    by full path, zips the two lists, and only then checks that each image's stem is in its mask's stem
    (``MisMatchError``). Unpadded numbers break it: ``anomaly-10_mask.png`` sorts before ``anomaly-1_mask.png``
    while ``anomaly-1.png`` sorts before ``anomaly-10.png``.
    """

    def listed(folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        return sorted(
            (path for path in folder.glob("*/*") if path.is_file() and path.suffix in IMAGE_SUFFIXES),
            key=lambda path: str(path),
        )

    masks = listed(base / "ground_truth")
    if not masks:
        return []  # classification only: anomalib assigns no mask
    images = [path for path in listed(base / "test") if path.parent.name != "good"]
    if len(masks) != len(images):
        return [
            (
                base / "ground_truth",
                f"{len(masks)} mask files for {len(images)} anomalous test images: anomalib's MVTecAD pairs them "
                "by sorted file name, one mask per anomalous image; remove extra files from ground_truth/",
            )
        ]
    mismatched = [(image, mask) for image, mask in zip(images, masks, strict=True) if image.stem not in mask.stem]
    problems = [
        (
            image,
            f"anomalib's MVTecAD pairs masks with images in sorted file-name order and would give this image the mask "
            f"{mask.relative_to(base)} (MisMatchError); name images and masks so that both sort alike, e.g. with "
            "zero-padded numbers (anomaly-01.png ... anomaly-17.png and anomaly-01_mask.png ...)",
        )
        for image, mask in mismatched[:shown]
    ]
    if len(mismatched) > shown:
        problems.append((base / "test", f"... and {len(mismatched) - shown} more images paired with another's mask"))
    return problems


def check_dice_layout(
    root: str | Path, min_size: int | tuple[int, int] | None = None, allow_16bit_gray: bool = False
) -> None:
    """Check a dice-layout root (``train/good[/<class>]``, optional ``val/``, ``test/``, ``ground_truth/``)."""
    root = Path(root)
    check_dice_paths(root)
    kwargs: dict[str, Any] = {"min_size": min_size, "allow_16bit_gray": allow_16bit_gray}
    _, problems = scan_folder(root / "train" / "good", "train/good", True, allow_empty=False, **kwargs)
    for split in ("val", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            infos, folder_problems = scan_folder(folder, f"{split}/{folder.name}", True, allow_empty=True, **kwargs)
            problems += folder_problems
            if folder.name != "good":
                masks = {
                    info.path: root / "ground_truth" / folder.name / f"{info.path.stem}_mask.png" for info in infos
                }
                _check_masks(infos, masks, problems, required=False)  # dice masks are optional
    if problems:
        raise DataValidationError(problems, f"dice dataset {root}")


def check_dice_paths(root: str | Path) -> None:
    """Existence only: the dice root is a folder (one error naming it otherwise)."""
    root = Path(root)
    problem = root_problem(root, f"{root / 'train' / 'good'}/<class>/ with normal images, dice layout")
    if problem:
        raise DataValidationError([problem], f"dice dataset {root}")


def _folder_entries(datamodule: Any, attribute: str) -> list[Path]:  # noqa: ANN401
    """A ``Folder`` datamodule's ``normal_dir`` (etc.): one path or several, relative ones under its ``root``."""
    entry = getattr(datamodule, attribute, None)
    if entry is None:
        return []
    root = Path(datamodule.root) if datamodule.root is not None else None
    entries = [entry] if isinstance(entry, str | Path) else list(entry)
    return [root / e if root is not None and not Path(e).is_absolute() else Path(e) for e in entries]


def check_folder_paths(datamodule: Any) -> None:  # noqa: ANN401
    """Existence only: an ``anomalib.data.Folder``'s ``root`` (when given) and ``normal_dir`` are folders."""
    normal_dirs = _folder_entries(datamodule, "normal_dir")
    problem = None
    if datamodule.root is not None:
        problem = root_problem(Path(datamodule.root), f"normal_dir {', '.join(map(str, normal_dirs))} under it")
    problems = [problem] if problem else [(path, "normal_dir folder does not exist") for path in normal_dirs]
    problems = [(path, reason) for path, reason in problems if not path.is_dir()]
    if problems:
        raise DataValidationError(problems, f"Folder datamodule {datamodule.name!r}")


def check_folder_datamodule(datamodule: Any) -> None:  # noqa: ANN401
    """Check the folders of an ``anomalib.data.Folder`` datamodule (masks are matched in sorted order)."""
    check_folder_paths(datamodule)
    problems: list[tuple[Path, str]] = []
    for role, attribute, allow_empty in (
        ("normal_dir", "normal_dir", False),
        ("abnormal_dir", "abnormal_dir", True),
        ("normal_test_dir", "normal_test_dir", True),
    ):
        for folder in _folder_entries(datamodule, attribute):
            infos, folder_problems = scan_folder(folder, role, False, None, False, allow_empty)
            problems += folder_problems
            if attribute == "abnormal_dir":
                for mask_dir in _folder_entries(datamodule, "mask_dir"):
                    masks = sorted(p for p in mask_dir.iterdir() if is_data_file(p)) if mask_dir.is_dir() else []
                    if len(masks) != len(infos):
                        problems.append((mask_dir, f"{len(masks)} masks for {len(infos)} anomalous images"))
                        continue
                    _check_masks(infos, dict(zip([i.path for i in infos], masks, strict=True)), problems, True)
    if problems:
        raise DataValidationError(problems, f"Folder datamodule {datamodule.name!r}")
