"""Writers of bad and unusual image files for the robustness tests (tiny, deterministic)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


def rgb_pattern(size: int = 32, seed: int = 0) -> np.ndarray:
    """A small textured RGB image (uint8, HxWx3)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def _zero_byte(path: Path) -> Path:
    path = path.with_suffix(".png")
    path.write_bytes(b"")
    return path


def _truncated_png(path: Path) -> Path:
    path = write_png(path.with_suffix(".png"), rgb_pattern(64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_jpeg(path: Path) -> Path:
    path = path.with_suffix(".jpg")
    Image.fromarray(rgb_pattern(64)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _text_as_png(path: Path) -> Path:
    path = path.with_suffix(".png")
    path.write_text("this is not an image\n")
    return path


def _unsupported_extension(path: Path) -> Path:
    path = path.with_suffix(".gif")
    Image.fromarray(rgb_pattern(32)).save(path)
    return path


# kind -> (writer, words the error must contain about that file)
BAD_FILES: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "zero_byte": (_zero_byte, ("empty", "0 bytes")),
    "truncated_png": (_truncated_png, ("truncated",)),
    "truncated_jpeg": (_truncated_jpeg, ("truncated",)),
    "text_as_png": (_text_as_png, ("not an image", "text")),
    "unsupported_extension": (_unsupported_extension, ("unsupported extension", ".gif")),
}


def write_modes(folder: Path, base: np.ndarray) -> dict[str, Path]:
    """The same picture saved as RGB, grayscale, RGBA, palette, LA, 16-bit RGB, JPEG and BMP files."""
    folder.mkdir(parents=True, exist_ok=True)
    gray = np.asarray(Image.fromarray(base).convert("L"))
    rgba = np.concatenate([base, np.full(base.shape[:2] + (1,), 77, np.uint8)], axis=2)
    paths = {
        "rgb": write_png(folder / "rgb.png", base),
        "gray": write_png(folder / "gray.png", gray),
        "rgba": write_png(folder / "rgba.png", rgba),
        "la": write_png(folder / "la.png", np.stack([gray, gray], axis=2), "LA"),
        "jpeg": folder / "rgb.jpg",
        "bmp": folder / "rgb.bmp",
        "rgb16": folder / "rgb16.png",
    }
    Image.fromarray(base).save(paths["jpeg"], quality=95)
    Image.fromarray(base).save(paths["bmp"])
    Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(folder / "palette.png")
    paths["palette"] = folder / "palette.png"
    # 16-bit RGB (OpenCV writes BGR); Pillow reads it as 8-bit RGB = value >> 8
    cv2.imwrite(str(paths["rgb16"]), (base[..., ::-1].astype(np.uint16) * 257))
    return paths


def write_gray16(path: Path, gray8: np.ndarray) -> Path:
    """A 16-bit grayscale PNG whose >> 8 is ``gray8``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), gray8.astype(np.uint16) * 257)
    return path
