"""Input checks shared by datamodules and tools: fail early, name every bad file and say why.

anomalib reads images lazily inside its dataloaders, so a bad file surfaces minutes into a run and often
without its name (a truncated PNG raises ``OSError: image file is truncated``; a mask of the wrong size
raises ``stack expects each tensor to be equal size``; an empty ``train/good`` raises ``num_samples should be
a positive integer``). These checks walk the folders once, before anything is trained, collect *all*
problems and raise one :class:`DataValidationError` that lists each file and its problem.

The checks themselves use only NumPy and Pillow. Importing this module still loads the ``anomalib_ext``
package first (and with it torch and anomalib, which register the models), so it is not a light import.

Typical use::

    from anomalib_ext.data.validation import checked_datamodule
    datamodule = checked_datamodule(MVTecAD(root="datasets/mvtec", category="bottle"))

from a shell: ``python -m anomalib_ext.data.validation datasets/mvtec --category bottle``; or in an
``anomalib train --config`` file, as a callback that checks the datamodule's folders before anything loads::

    trainer:
      callbacks:
        - class_path: anomalib_ext.data.validation.CheckData
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

# torchvision.datasets.folder.IMG_EXTENSIONS, which anomalib uses to find images (kept here to avoid torch)
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# files an image folder may hold that are not data
IGNORED_NAMES = {"thumbs.db", "desktop.ini", "readme.md", "readme.txt", "license.txt"}
MAX_PIXELS = 100_000_000  # above this Pillow warns of a decompression bomb; we refuse with a clear message


class DataValidationError(ValueError):
    """One or more input files are unusable; ``problems`` lists ``(path, reason)`` pairs.

    A ``ValueError`` so that callers catching anomalib's own ``ValueError`` keep working.
    """

    def __init__(self, problems: Sequence[tuple[Path | str, str]], context: str = "") -> None:
        self.problems = [(Path(path), reason) for path, reason in problems]
        self.context = context
        head = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        head += f" in {context}" if context else ""
        lines = [f"  - {path}: {reason}" for path, reason in self.problems[:50]]
        if len(self.problems) > 50:
            lines.append(f"  ... and {len(self.problems) - 50} more")
        super().__init__(head + ":\n" + "\n".join(lines))

    def first_problem(self, listing: str = "") -> str:
        """One line for a command-line tool: the first file and its problem, and how many more there are.

        ``listing`` is the command that lists them all (``python -m anomalib_ext.data.validation ...``).
        """
        path, reason = self.problems[0]
        more = len(self.problems) - 1
        if not more:
            return f"{path}: {reason}"
        where = f"; list them all with: {listing}" if listing else ""
        return f"{path}: {reason} (and {more} more problem{'s' if more > 1 else ''}{where})"


@dataclass(frozen=True)
class ImageInfo:
    """What a readable image file holds; ``mode`` is Pillow's (``L``, ``RGB``, ``RGBA``, ``P``, ``I;16`` ...)."""

    path: Path
    width: int
    height: int
    mode: str

    @property
    def is_16bit_gray(self) -> bool:
        """anomalib's ``read_image`` (Pillow ``convert("RGB")``) clips these at 255: most pixels turn white."""
        return self.mode in {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


def _probe(path: Path) -> tuple[ImageInfo | None, str | None]:
    """Open and fully decode ``path``; return its info or the reason it is unusable."""
    if not path.exists():
        return None, "file not found"
    if not path.is_file():
        return None, "not a file"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return None, f"unsupported extension '{path.suffix}' (supported: {' '.join(IMAGE_SUFFIXES)})"
    size = path.stat().st_size
    if size == 0:
        return None, "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    return None, f"image too large ({image.width}x{image.height} > {MAX_PIXELS} pixels)"
                image.load()  # decodes every byte: catches truncated files that open() accepts
                return ImageInfo(path, image.width, image.height, image.mode), None
    except UnidentifiedImageError:
        head = path.read_bytes()[:64]
        looks_text = all(32 <= byte < 127 or byte in b"\r\n\t" for byte in head)
        kind = "a text file" if looks_text else "not an image Pillow can identify"
        return None, f"not an image: {kind} with an image extension ({size} bytes)"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, f"image too large (more than {MAX_PIXELS} pixels)"
    except OSError as error:  # truncated or corrupt data
        reason = str(error) or type(error).__name__
        if "truncated" in reason:
            return None, f"truncated or corrupt image data ({reason}; {size} bytes)"
        return None, f"corrupt image ({reason})"
    except (ValueError, SyntaxError) as error:  # Pillow raises these for some malformed headers
        return None, f"corrupt image ({error})"


def check_image_file(
    path: str | Path, min_size: int | tuple[int, int] | None = None, allow_16bit_gray: bool = False
) -> ImageInfo:
    """Return the image's info, or raise :class:`DataValidationError` naming ``path`` and the problem.

    Args:
        path: the image file.
        min_size: smallest acceptable ``(height, width)`` (or one int for both), e.g. a tile or template size.
        allow_16bit_gray: 16-bit grayscale files are rejected by default because anomalib's ``read_image``
            saturates them (see :func:`read_rgb`); pass ``True`` when every reader uses :func:`read_rgb`.
    """
    path = Path(path)
    info, problem = _probe(path)
    problem = problem or _image_problem(info, min_size, allow_16bit_gray)
    if problem:
        raise DataValidationError([(path, problem)])
    assert info is not None  # for type checkers: no problem means the probe succeeded
    return info


def _image_problem(info: ImageInfo | None, min_size: int | tuple[int, int] | None, allow_16bit_gray: bool) -> str:
    if info is None:
        return ""
    if info.is_16bit_gray and not allow_16bit_gray:
        return (
            f"{info.mode} (16-bit/float grayscale): anomalib reads it with values clipped at 255, so most "
            "pixels turn white; convert it to 8-bit (e.g. anomalib_ext.data.validation.read_rgb, then save)"
        )
    if min_size is not None:
        min_h, min_w = (min_size, min_size) if isinstance(min_size, int) else min_size
        if info.height < min_h or info.width < min_w:
            return f"image is {info.height}x{info.width} (HxW), smaller than the required {min_h}x{min_w}"
    return ""


def read_rgb(path: str | Path) -> np.ndarray:
    """Any readable image as an ``(H, W, 3)`` uint8 RGB array, converted the way anomalib and OpenCV agree.

    Grayscale, palette, RGBA/LA (alpha dropped, not composited) and 16-bit RGB give exactly what anomalib's
    ``read_image`` gives (times 255) and what ``tools/infer_openvino.py`` (OpenCV) gives. 16-bit grayscale is
    scaled to 8 bits (value >> 8), like OpenCV and like Pillow does for 16-bit RGB; anomalib's ``read_image``
    instead clips it at 255, which is why :func:`check_image_file` rejects such files by default.
    """
    info = check_image_file(path, allow_16bit_gray=True)
    with Image.open(info.path) as image:
        if info.is_16bit_gray:
            values = np.asarray(image, dtype=np.float64)
            if info.mode == "F":  # float images: assume [0, 1] when they fit, else 16-bit range
                scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0 / 257.0
                gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
            else:
                gray = (np.clip(values, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=2)
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _is_data_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.lower() not in IGNORED_NAMES


def check_image_folder(
    folder: str | Path,
    role: str = "train/good",
    recursive: bool = True,
    min_size: int | tuple[int, int] | None = None,
    allow_16bit_gray: bool = False,
    allow_empty: bool = False,
    raise_on_error: bool = True,
) -> list[ImageInfo]:
    """Check that ``folder`` exists and holds at least one image and that every file in it is a usable image.

    Collects every problem (missing folder, no images, zero-byte, truncated, text-as-image, unsupported
    extension, too small, 16-bit grayscale) and raises one :class:`DataValidationError` listing them all. A
    file with an unsupported extension is an error because anomalib silently skips it: a folder of ``.gif``
    files would otherwise train on nothing. Hidden files and ``Thumbs.db``-like files are ignored.

    Returns the infos of the good images (when ``raise_on_error`` is False, alongside no exception).
    """
    infos, problems = _scan_folder(Path(folder), role, recursive, min_size, allow_16bit_gray, allow_empty)
    if problems and raise_on_error:
        raise DataValidationError(problems, context=f"{role} folder {folder}")
    return infos


def _scan_folder(
    folder: Path,
    role: str,
    recursive: bool,
    min_size: int | tuple[int, int] | None,
    allow_16bit_gray: bool,
    allow_empty: bool,
) -> tuple[list[ImageInfo], list[tuple[Path, str]]]:
    if not folder.exists():
        return [], [(folder, f"{role} folder does not exist")]
    if not folder.is_dir():
        return [], [(folder, f"{role} should be a folder, found a file")]
    files = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if _is_data_file(p))
    infos: list[ImageInfo] = []
    problems: list[tuple[Path, str]] = []
    for path in files:
        info, problem = _probe(path)
        problem = problem or _image_problem(info, min_size, allow_16bit_gray)
        if problem:
            problems.append((path, problem))
        elif info is not None:
            infos.append(info)
    if not infos and not problems and not allow_empty:
        problems.append((folder, f"{role} folder holds no images (looked for {' '.join(IMAGE_SUFFIXES)})"))
    elif not infos and problems and not allow_empty:
        problems.append((folder, f"{role} folder holds no usable image"))
    return infos, problems


def mask_problem(mask_path: Path, image_shape: tuple[int, int] | None) -> str:
    """Why ``mask_path`` cannot be the mask of an image of ``image_shape`` (H, W); ``""`` when it can."""
    info, problem = _probe(mask_path)
    if problem:
        return f"mask {problem}"
    assert info is not None
    if image_shape is not None and (info.height, info.width) != tuple(image_shape):
        return f"mask is {info.height}x{info.width} (HxW) but its image is {image_shape[0]}x{image_shape[1]}"
    with Image.open(mask_path) as image:
        values = np.unique(np.asarray(image.convert("L")))
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        shown = ", ".join(str(v) for v in values[:6]) + (" ..." if len(values) > 6 else "")
        return (
            f"mask is not binary ({len(values)} grey levels: {shown}); anomalib marks every value > 0 as defect, "
            "so blur or JPEG noise becomes defect pixels: save it as a PNG with only 0 and 255"
        )
    return ""


def check_mask(mask_path: str | Path, image_shape: tuple[int, int] | None = None) -> None:
    """Raise :class:`DataValidationError` unless ``mask_path`` is a readable, binary mask of ``image_shape``."""
    problem = mask_problem(Path(mask_path), image_shape)
    if problem:
        raise DataValidationError([(Path(mask_path), problem)])


def _check_masks(
    images: Iterable[ImageInfo], mask_for: dict[Path, Path], problems: list[tuple[Path, str]], required: bool
) -> None:
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
    if not base.is_dir():
        raise DataValidationError([(base, f"category folder not found under root {root}")], context)
    problems: list[tuple[Path, str]] = []
    kwargs: dict[str, Any] = {"min_size": min_size, "allow_16bit_gray": allow_16bit_gray}
    _, train_problems = _scan_folder(base / "train" / "good", "train/good", False, allow_empty=False, **kwargs)
    problems += train_problems
    test_dir = base / "test"
    if not test_dir.is_dir():
        problems.append((test_dir, "test folder does not exist (MVTecAD needs test/good and test/<defect>)"))
    else:
        folders = sorted(p for p in test_dir.iterdir() if p.is_dir())
        n_normal = n_anomalous = 0
        for folder in folders:
            infos, folder_problems = _scan_folder(folder, f"test/{folder.name}", False, allow_empty=True, **kwargs)
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
    if not root.is_dir():
        raise DataValidationError([(root, "dataset root does not exist")], f"dice dataset {root}")
    kwargs: dict[str, Any] = {"min_size": min_size, "allow_16bit_gray": allow_16bit_gray}
    _, problems = _scan_folder(root / "train" / "good", "train/good", True, allow_empty=False, **kwargs)
    for split in ("val", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            infos, folder_problems = _scan_folder(folder, f"{split}/{folder.name}", True, allow_empty=True, **kwargs)
            problems += folder_problems
            if folder.name != "good":
                masks = {
                    info.path: root / "ground_truth" / folder.name / f"{info.path.stem}_mask.png" for info in infos
                }
                _check_masks(infos, masks, problems, required=False)  # dice masks are optional
    if problems:
        raise DataValidationError(problems, f"dice dataset {root}")


def check_folder_datamodule(datamodule: Any) -> None:
    """Check the folders of an ``anomalib.data.Folder`` datamodule (masks are matched in sorted order)."""
    root = Path(datamodule.root) if datamodule.root is not None else None

    def resolve(entry: Any) -> list[Path]:
        if entry is None:
            return []
        entries = [entry] if isinstance(entry, str | Path) else list(entry)
        return [root / e if root is not None and not Path(e).is_absolute() else Path(e) for e in entries]

    problems: list[tuple[Path, str]] = []
    for role, attribute, allow_empty in (
        ("normal_dir", "normal_dir", False),
        ("abnormal_dir", "abnormal_dir", True),
        ("normal_test_dir", "normal_test_dir", True),
    ):
        for folder in resolve(getattr(datamodule, attribute, None)):
            infos, folder_problems = _scan_folder(folder, role, False, None, False, allow_empty)
            problems += folder_problems
            if attribute == "abnormal_dir":
                for mask_dir in resolve(getattr(datamodule, "mask_dir", None)):
                    masks = sorted(p for p in mask_dir.iterdir() if _is_data_file(p)) if mask_dir.is_dir() else []
                    if len(masks) != len(infos):
                        problems.append((mask_dir, f"{len(masks)} masks for {len(infos)} anomalous images"))
                        continue
                    _check_masks(infos, dict(zip([i.path for i in infos], masks, strict=True)), problems, True)
    if problems:
        raise DataValidationError(problems, f"Folder datamodule {datamodule.name!r}")


def checked_datamodule(datamodule: Any, **kwargs: Any) -> Any:
    """Validate the folders of an anomalib datamodule (MVTecAD, Folder, our Dice) and return it unchanged.

    Call before ``Engine.fit``/``test``; ``kwargs`` go to the layout check (e.g. ``min_size``). A datamodule
    type we do not know is returned unchecked.
    """
    kind = type(datamodule).__name__
    if kind in {"MVTecAD", "MVTec", "Visa", "MVTecLOCO"} and hasattr(datamodule, "category"):
        check_mvtec_layout(datamodule.root, datamodule.category, **kwargs)
    elif kind == "Dice":
        check_dice_layout(datamodule.root, **kwargs)
    elif kind == "Folder":
        check_folder_datamodule(datamodule)
    return datamodule


def listing_command(datamodule: Any) -> str:
    """The command that lists every problem of ``datamodule``'s folders (for one-line error summaries)."""
    kind = type(datamodule).__name__
    root = getattr(datamodule, "root", None)
    if kind == "Dice":
        return f"python -m anomalib_ext.data.validation {root} --dice"
    if hasattr(datamodule, "category") and kind != "Folder":
        return f"python -m anomalib_ext.data.validation {root} --category {datamodule.category}"
    return f"python -m anomalib_ext.data.validation {root}" if root is not None else ""


def exit_on_bad_data(datamodule: Any, **kwargs: Any) -> None:
    """Check ``datamodule``'s files before training; on a problem print one line and exit with status 2.

    For training entry points (``anomalib train``): a zero-byte or truncated image otherwise surfaces minutes later
    as a long traceback from inside a dataloader worker, often without the file's name.
    """
    try:
        checked_datamodule(datamodule, **kwargs)
    except DataValidationError as error:
        print(f"error: {error.first_problem(listing_command(datamodule))}", file=sys.stderr)  # noqa: T201
        raise SystemExit(2) from None


def _make_check_data() -> type:
    """Build the Lightning callback on first use, so importing this module does not import Lightning."""
    from lightning.pytorch import Callback

    class CheckData(Callback):
        """Lightning callback: ``checked_datamodule(trainer.datamodule)`` once, before fit/test/predict load data.

        ``kwargs`` go to the layout check (e.g. ``min_size``).
        """

        def __init__(self, **kwargs: Any) -> None:
            self.kwargs = kwargs
            self._checked: set[int] = set()

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            del pl_module, stage
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is not None and id(datamodule) not in self._checked:
                checked_datamodule(datamodule, **self.kwargs)
                self._checked.add(id(datamodule))

    CheckData.__module__ = __name__
    return CheckData


def __getattr__(name: str) -> Any:
    """``CheckData`` (a Lightning callback) is created lazily; see :func:`_make_check_data`."""
    if name == "CheckData":
        globals()[name] = _make_check_data()
        return globals()[name]
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def main(argv: list[str] | None = None) -> int:
    """``python -m anomalib_ext.data.validation ROOT [--category C | --dice]``: report every bad file."""
    parser = argparse.ArgumentParser(description="Check an anomaly dataset before training; list every bad file.")
    parser.add_argument("root", type=Path, help="MVTec root (with --category), dice root (--dice), or any folder")
    parser.add_argument("--category", help="MVTec category under root")
    parser.add_argument("--dice", action="store_true", help="root is in dice layout")
    parser.add_argument("--min-size", type=int, help="smallest acceptable image side")
    args = parser.parse_args(argv)
    try:
        if args.category:
            check_mvtec_layout(args.root, args.category, min_size=args.min_size)
        elif args.dice:
            check_dice_layout(args.root, min_size=args.min_size)
        else:
            check_image_folder(args.root, role="image", min_size=args.min_size)
    except DataValidationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.root}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
