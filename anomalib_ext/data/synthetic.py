"""Synthetic datasets in MVTec AD and dice layouts, for tests and the demo.

Real plant data cannot ship with the project, so the tests need data whose defects we planted ourselves
(and therefore know the masks of). Normal images vary in position, lighting and noise like real parts do;
defects are scratches, spots, missing parts and colour changes. The same seed gives the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

MVTEC_DEFECTS = ("scratch", "spot", "missing", "colour")
# defects of a fixed size in pixels, whatever the image size: what shrinking a camera image to 256 px loses
# (docs/large_images.md); not in the default set
SMALL_DEFECTS = ("speck",)
SPECK_DIAMETER_PX = (4, 6)
DICE_DEFECTS = ("drawn_mark", "missing_pip", "scratch")
DICE_SESSIONS = ("16_09_21", "17_11_21", "25_10_21", "26_01_22")
DARK_SESSIONS = ("16_09_21", "17_11_21")


def _write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        msg = f"could not write {path}"
        raise OSError(msg)


def _noise_texture(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Smooth random field in [-1, 1]: cheap low-frequency texture."""
    coarse = rng.standard_normal((max(2, size // scale), max(2, size // scale))).astype(np.float32)
    field = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return field / (np.abs(field).max() + 1e-6)


# --------------------------------------------------------------------------------------------- MVTec layout
def _normal_object(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A bottle seen from above: dark background, a bright rim and a textured centre, with jitter."""
    centre = np.array([size / 2, size / 2]) + rng.uniform(-0.03, 0.03, 2) * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    radius = np.hypot(xx - centre[0], yy - centre[1]) / size
    gain = rng.uniform(0.9, 1.1)
    image = np.zeros((size, size, 3), np.float32)
    background = 0.12 + 0.05 * _noise_texture(rng, size, 8)[..., None]
    rim = np.exp(-(((radius - 0.36) / 0.04) ** 2))[..., None]
    body = (radius < 0.33)[..., None].astype(np.float32)
    inner = 0.45 + 0.1 * _noise_texture(rng, size, 16)[..., None] - 0.3 * radius[..., None]
    image = background * (1 - body) + inner * body + 0.5 * rim
    image = image * np.array([0.85, 0.95, 1.0], np.float32) * gain
    image += rng.normal(0, 0.015, image.shape).astype(np.float32)
    object_mask = (radius < 0.38).astype(np.uint8)
    return np.clip(image, 0, 1), object_mask


def _normal_texture(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A woven texture: oriented stripes with random phase, warp and lighting gradient."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(-0.1, 0.1) + math.pi / 4
    phase = rng.uniform(0, 2 * math.pi, 2)
    warp = 0.02 * _noise_texture(rng, size, 16)
    u = (xx * math.cos(angle) + yy * math.sin(angle) + warp) * 24 * math.pi
    v = (-xx * math.sin(angle) + yy * math.cos(angle) + warp) * 24 * math.pi
    pattern = 0.5 + 0.2 * np.sin(u + phase[0]) * np.sin(v + phase[1])
    light = rng.uniform(0.9, 1.1) + 0.1 * (xx - 0.5) * rng.uniform(-1, 1)
    image = (pattern * light)[..., None] * np.array([0.75, 0.6, 0.45], np.float32)
    image += rng.normal(0, 0.015, image.shape).astype(np.float32)
    return np.clip(image, 0, 1), np.ones((size, size), np.uint8)


def _region_mask(rng: np.random.Generator, size: int, support: np.ndarray, radius: float) -> np.ndarray:
    """An irregular blob inside ``support`` (where the part is)."""
    ys, xs = np.nonzero(support)
    pick = rng.integers(len(ys))
    centre = (int(xs[pick]), int(ys[pick]))
    mask = np.zeros((size, size), np.uint8)
    axes = (max(2, int(radius * size * rng.uniform(0.7, 1.3))), max(2, int(radius * size * rng.uniform(0.7, 1.3))))
    cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask * support


def _plant_defect(
    rng: np.random.Generator, image: np.ndarray, support: np.ndarray, defect: str
) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    image = image.copy()
    if defect == "scratch":
        mask = np.zeros((size, size), np.uint8)
        start = rng.uniform(0.3, 0.5, 2) * size
        angle = rng.uniform(0, math.pi)
        length = rng.uniform(0.25, 0.4) * size
        end = start + length * np.array([math.cos(angle), math.sin(angle)])
        cv2.line(mask, tuple(int(v) for v in start), tuple(int(v) for v in end), 1, max(2, size // 48))
        mask *= support
        image[mask > 0] = np.clip(image[mask > 0] * 0.3 + 0.75, 0, 1)
    elif defect == "spot":
        mask = _region_mask(rng, size, support, 0.06)
        image[mask > 0] = np.array([0.05, 0.15, 0.45], np.float32) + rng.normal(0, 0.02, (int(mask.sum()), 3))
    elif defect == "missing":
        mask = _region_mask(rng, size, support, 0.09)
        image[mask > 0] = 0.02
    elif defect == "speck":  # a dark fleck of 4-6 px, as on a camera image at full resolution
        mask = np.zeros((size, size), np.uint8)
        margin = max(3, size // 10)  # inside the part, off its rim: a fleck, not an edge defect
        ys, xs = np.nonzero(cv2.erode(support, np.ones((margin, margin), np.uint8)))
        pick = rng.integers(len(ys))
        radius = rng.uniform(*SPECK_DIAMETER_PX) / 2
        cv2.circle(mask, (int(xs[pick]), int(ys[pick])), round(radius - 0.5), 1, -1)
        image[mask > 0] = np.array([0.05, 0.05, 0.05], np.float32)
    elif defect == "colour":
        mask = _region_mask(rng, size, support, 0.09)
        image[mask > 0] = image[mask > 0][:, ::-1] * np.array([1.4, 0.5, 0.5], np.float32)
    else:
        msg = f"unknown defect type '{defect}', expected one of {MVTEC_DEFECTS + SMALL_DEFECTS}"
        raise ValueError(msg)
    return np.clip(image, 0, 1), mask


def make_mvtec_dataset(
    root: str | Path,
    category: str = "synthetic",
    image_size: int = 128,
    n_train: int = 32,
    n_test_good: int = 8,
    n_test_per_defect: int = 3,
    defects: tuple[str, ...] = MVTEC_DEFECTS,
    kind: str = "object",
    seed: int = 0,
) -> Path:
    """Write ``root/category/{train/good, test/good, test/<defect>, ground_truth/<defect>}``; return the category dir.

    Loads with ``anomalib.data.MVTecAD(root=root, category=category)`` and ``anomalib.data.Folder``.
    """
    makers: dict[str, Callable] = {"object": _normal_object, "texture": _normal_texture}
    if kind not in makers:
        msg = f"kind must be one of {sorted(makers)}, got '{kind}'"
        raise ValueError(msg)
    make_normal = makers[kind]
    rng = np.random.default_rng(seed)
    out = Path(root) / category

    def to_png(image: np.ndarray) -> np.ndarray:
        return (image[..., ::-1] * 255).round().astype(np.uint8)  # RGB -> BGR for OpenCV

    for index in range(n_train):
        _write_png(out / "train" / "good" / f"{index:03d}.png", to_png(make_normal(rng, image_size)[0]))
    for index in range(n_test_good):
        _write_png(out / "test" / "good" / f"{index:03d}.png", to_png(make_normal(rng, image_size)[0]))
    for defect in defects:
        for index in range(n_test_per_defect):
            normal, support = make_normal(rng, image_size)
            image, mask = _plant_defect(rng, normal, support, defect)
            _write_png(out / "test" / defect / f"{index:03d}.png", to_png(image))
            _write_png(out / "ground_truth" / defect / f"{index:03d}_mask.png", mask * 255)
    return out


# ---------------------------------------------------------------------------------------------- dice layout
# Pip positions (in units of the face half-width) per class, mirroring the Faktion set: 00 one pip, 01/02 two
# (both diagonals), 03/04 three (both diagonals), 05 four, 06 five; 07-10 the logo in four orientations.
_PIPS = {
    0: [(0, 0)],
    1: [(-0.5, 0.5), (0.5, -0.5)],
    2: [(-0.5, -0.5), (0.5, 0.5)],
    3: [(-0.5, 0.5), (0, 0), (0.5, -0.5)],
    4: [(-0.5, -0.5), (0, 0), (0.5, 0.5)],
    5: [(-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5)],
    6: [(-0.5, -0.5), (0.5, -0.5), (0, 0), (-0.5, 0.5), (0.5, 0.5)],
}
DICE_CLASSES = 11


def _dice_face(rng: np.random.Generator, size: int, cls: int, session: str) -> tuple[np.ndarray, list]:
    """One grayscale die seen from above; returns the image and its pip centres (for planting defects)."""
    canvas = np.full((size, size), 30, np.float32)
    half = size * 0.44
    centre = size / 2 + rng.uniform(-0.025, 0.025, 2) * size
    corner = int(size * 0.12)
    face = np.zeros((size, size), np.uint8)
    x0, y0 = int(centre[0] - half), int(centre[1] - half)
    x1, y1 = int(centre[0] + half), int(centre[1] + half)
    cv2.rectangle(face, (x0 + corner, y0), (x1 - corner, y1), 1, -1)
    cv2.rectangle(face, (x0, y0 + corner), (x1, y1 - corner), 1, -1)
    for cx, cy in (
        (x0 + corner, y0 + corner),
        (x1 - corner, y0 + corner),
        (x0 + corner, y1 - corner),
        (x1 - corner, y1 - corner),
    ):
        cv2.circle(face, (cx, cy), corner, 1, -1)
    shade = 200 + 15 * _noise_texture(rng, size, 4)
    canvas = np.where(face > 0, shade, canvas)
    pips = []
    if cls in _PIPS:
        for px, py in _PIPS[cls]:
            pc = (int(centre[0] + px * half * 1.1), int(centre[1] + py * half * 1.1))
            cv2.circle(canvas, pc, int(size * 0.075), 25, -1)
            cv2.circle(canvas, pc, int(size * 0.03), 60, 1)
            pips.append(pc)
    else:  # logo: a chevron and a small drop, rotated by 90 degrees per class
        chevron = np.array([[-0.5, 0.1], [0.0, -0.45], [0.5, 0.1], [0.35, 0.25], [0.0, -0.15], [-0.35, 0.25]])
        turn = (cls - 7) * math.pi / 2
        rot = np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]])
        points = (chevron @ rot.T) * half + centre
        cv2.fillPoly(canvas, [points.astype(np.int32)], 45)
        drop = (np.array([0.0, 0.15]) @ rot.T) * half + centre
        cv2.circle(canvas, tuple(int(v) for v in drop), int(size * 0.06), 45, -1)
        pips.append(tuple(int(v) for v in centre))
    # small rotation, lighting per session, sensor noise
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), float(rng.uniform(-3, 3)), 1.0)
    canvas = cv2.warpAffine(canvas, matrix, (size, size), borderValue=30)
    canvas += rng.normal(0, 3, canvas.shape)
    canvas -= 10 if session in DARK_SESSIONS else 0
    canvas *= rng.uniform(0.97, 1.03)
    return canvas, pips


def _dice_defect(rng: np.random.Generator, image: np.ndarray, pips: list, defect: str) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    image = image.copy()
    mask = np.zeros((size, size), np.uint8)
    if defect == "drawn_mark":
        points = (size / 2 + rng.uniform(-0.3, 0.3, (4, 2)) * size).astype(np.int32)
        cv2.polylines(mask, [points], False, 1, max(3, size // 25))
        image[mask > 0] = 20
    elif defect == "missing_pip":
        pc = pips[rng.integers(len(pips))]
        cv2.circle(mask, pc, int(size * 0.09), 1, -1)
        image[mask > 0] = 200 + rng.normal(0, 3, int(mask.sum()))
    elif defect == "scratch":
        start = (size / 2 + rng.uniform(-0.3, 0.0, 2) * size).astype(int)
        end = start + (rng.uniform(0.2, 0.35, 2) * size * np.array([1, rng.choice([-1, 1])])).astype(int)
        cv2.line(mask, tuple(int(v) for v in start), tuple(int(v) for v in end), 1, max(2, size // 40))
        image[mask > 0] = 110
    else:
        msg = f"unknown dice defect '{defect}', expected one of {DICE_DEFECTS}"
        raise ValueError(msg)
    return image, mask


def make_dice_dataset(
    root: str | Path,
    image_size: int = 128,
    classes: int = DICE_CLASSES,
    n_train_per_class: int = 12,
    n_val_anomalous: int = 12,
    n_test_good_per_class: int = 2,
    n_test_per_defect: int = 4,
    seed: int = 0,
) -> Path:
    """Write the Faktion dice layout with planted defects; return ``root``.

    ``train/good/<class>/``, ``val/anomalous/``, ``test/good/<class>/``, ``test/<defect>/`` and
    ``ground_truth/<defect>/<name>_mask.png``. File names carry the acquisition session like the real set;
    the two early sessions are darker, and train is drawn mostly from the later ones, as in the real data.
    """
    if not 1 <= classes <= DICE_CLASSES:
        msg = f"classes must be in 1..{DICE_CLASSES}, got {classes}"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    out = Path(root)

    def to_png(image: np.ndarray) -> np.ndarray:
        return np.clip(image, 0, 255).round().astype(np.uint8)

    train_sessions = ("16_09_21", "25_10_21", "26_01_22", "26_01_22")
    for cls in range(classes):
        for index in range(n_train_per_class):
            session = train_sessions[index % len(train_sessions)]
            image, _ = _dice_face(rng, image_size, cls, session)
            _write_png(
                out / "train" / "good" / f"{cls:02d}" / f"{cls:02d}_{session}_{cls:02d}_{index:03d}.png", to_png(image)
            )
        for index in range(n_test_good_per_class):
            session = DICE_SESSIONS[index % 2]
            image, _ = _dice_face(rng, image_size, cls, session)
            _write_png(
                out / "test" / "good" / f"{cls:02d}" / f"{cls:02d}_{session}_{cls:02d}_{index:03d}.png", to_png(image)
            )
    for index in range(n_val_anomalous):
        cls, defect = int(rng.integers(classes)), DICE_DEFECTS[index % len(DICE_DEFECTS)]
        image, pips = _dice_face(rng, image_size, cls, DICE_SESSIONS[2 + index % 2])
        image, _ = _dice_defect(rng, image, pips, defect)
        _write_png(
            out / "val" / "anomalous" / f"val_{DICE_SESSIONS[2 + index % 2]}_anomalies_{index:03d}.png", to_png(image)
        )
    for defect in DICE_DEFECTS:
        for index in range(n_test_per_defect):
            cls = int(rng.integers(classes))
            image, pips = _dice_face(rng, image_size, cls, DICE_SESSIONS[index % 2])
            image, mask = _dice_defect(rng, image, pips, defect)
            name = f"{cls:02d}_{DICE_SESSIONS[index % 2]}_{defect}_{index:03d}"
            _write_png(out / "test" / defect / f"{name}.png", to_png(image))
            _write_png(out / "ground_truth" / defect / f"{name}_mask.png", mask * 255)
    return out
