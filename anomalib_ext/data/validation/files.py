"""Checks of single image files, image folders and masks: every bad file named with its problem.

anomalib reads images lazily inside its dataloaders, so a bad file surfaces minutes into a run and often
without its name (a truncated PNG raises ``OSError: image file is truncated``; a mask of the wrong size
raises ``stack expects each tensor to be equal size``; an empty ``train/good`` raises ``num_samples should be
a positive integer``). These checks read each file once and fully (``probe_image``), collect *all* problems
and raise one :class:`DataValidationError` that lists each file and its problem. NumPy and Pillow only.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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


def probe_image(path: Path) -> tuple[ImageInfo | None, str | None]:
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
    info, problem = probe_image(path)
    problem = problem or image_problem(info, min_size, allow_16bit_gray)
    if problem:
        raise DataValidationError([(path, problem)])
    assert info is not None  # for type checkers: no problem means the probe succeeded
    return info


def image_problem(info: ImageInfo | None, min_size: int | tuple[int, int] | None, allow_16bit_gray: bool) -> str:
    """Why a readable image is still unusable (16-bit grayscale, too small); ``""`` when it is usable."""
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


def is_data_file(path: Path) -> bool:
    """A file that should be an image: not hidden, not a ``Thumbs.db``/``README``-like companion."""
    return path.is_file() and not path.name.startswith(".") and path.name.lower() not in IGNORED_NAMES


def check_image_folder(
    folder: str | Path,
    role: str = "train/good",
    recursive: bool = True,
    min_size: int | tuple[int, int] | None = None,
    allow_16bit_gray: bool = False,
    allow_empty: bool = False,
) -> list[ImageInfo]:
    """Check that ``folder`` exists and holds at least one image and that every file in it is a usable image.

    Collects every problem (missing folder, no images, zero-byte, truncated, text-as-image, unsupported
    extension, too small, 16-bit grayscale) and raises one :class:`DataValidationError` listing them all. A
    file with an unsupported extension is an error because anomalib silently skips it: a folder of ``.gif``
    files would otherwise train on nothing. Hidden files and ``Thumbs.db``-like files are ignored.

    Returns the infos of the images.
    """
    infos, problems = scan_folder(Path(folder), role, recursive, min_size, allow_16bit_gray, allow_empty)
    if problems:
        raise DataValidationError(problems, context=f"{role} folder {folder}")
    return infos


def scan_folder(
    folder: Path,
    role: str,
    recursive: bool,
    min_size: int | tuple[int, int] | None,
    allow_16bit_gray: bool,
    allow_empty: bool,
) -> tuple[list[ImageInfo], list[tuple[Path, str]]]:
    """The usable images of ``folder`` and every problem found, for the layout checks that gather problems of
    several folders into one error (``check_image_folder`` raises at once)."""
    if not folder.exists():
        return [], [(folder, f"{role} folder does not exist")]
    if not folder.is_dir():
        return [], [(folder, f"{role} should be a folder, found a file")]
    files = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if is_data_file(p))
    infos: list[ImageInfo] = []
    problems: list[tuple[Path, str]] = []
    for path in files:
        info, problem = probe_image(path)
        problem = problem or image_problem(info, min_size, allow_16bit_gray)
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
    info, problem = probe_image(mask_path)
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
