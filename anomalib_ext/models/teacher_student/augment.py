"""Training-time image variation for TeacherStudent: new normal looks and synthetic defects.

"Augmented" normals (geometric + photometric, plus HistAuGAN restyling when a generator is given) widen what
the student learns as normal and give the teacher's classifier a second normal class. Synthetic defects
(anomalib's Perlin-noise generator and CutPaste) are the teacher's positive class. Everything works on RGB
[0, 1] batches; the torch model normalises its inputs for the backbone itself.

``Augmentation`` is the one config key that says how normals are varied (``augmentation: {color_jitter: 0}``);
``NormalVariation`` is the module it builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import kornia.augmentation as K  # noqa: N812
import torch
from anomalib.data.utils.generators import PerlinAnomalyGenerator
from torch import nn

from anomalib_ext.models.components import CutPaste
from anomalib_ext.models.components.settings import Settings

# zoom range of the affine step (not a setting: the shift and rotation already cover pose)
SCALE_RANGE = (0.95, 1.05)
# control points per side of the uneven-light surface: a falloff across the part and back, not a texture
UNEVEN_LIGHT_GRID = 3


@dataclass(frozen=True)
class Augmentation(Settings):
    """How TeacherStudent varies normal images, and how much of the student's data is varied.

    Args:
        degrees: maximum rotation in degrees.
        translate: maximum shift as a fraction of the image size.
        hflip, vflip: allow mirror images (only for parts that look the same mirrored).
        color_jitter: brightness and contrast jitter strength (saturation gets 0.7 of it, hue 0.1); 0 disables it.
        uneven_light: strength of a random light falloff: each augmented normal is multiplied by a smooth surface
            through a 3 x 3 grid of gains drawn in ``[1 - uneven_light, 1]``, so the student learns the teacher's
            features under a light that falls off across the part (a moved lamp, a vignette), which a uniform jitter
            does not show it. 0 (the default) disables it; must be below 1.
        histaugan_checkpoint: trained HistAuGAN generator (exported ``.pt`` or its Lightning ``.ckpt``); when
            given, augmented samples are restyled by it.
        histaugan_p: probability that an augmented sample is restyled by HistAuGAN.
        student_fraction: fraction of each student batch replaced by augmented normals (0 = the student sees only
            the plain training images).
    """

    degrees: float = 10.0
    translate: float = 0.05
    hflip: bool = False
    vflip: bool = False
    color_jitter: float = 0.15
    uneven_light: float = 0.0
    histaugan_checkpoint: str | None = None
    histaugan_p: float = 0.5
    student_fraction: float = 0.5

    def __post_init__(self) -> None:
        for name in ("degrees", "translate", "color_jitter"):
            if getattr(self, name) < 0:
                msg = f"augmentation.{name} must be >= 0, got {getattr(self, name)}"
                raise ValueError(msg)
        if not 0.0 <= self.uneven_light < 1.0:
            msg = f"augmentation.uneven_light must be in [0, 1), got {self.uneven_light}"
            raise ValueError(msg)
        for name in ("histaugan_p", "student_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                msg = f"augmentation.{name} must be in [0, 1], got {getattr(self, name)}"
                raise ValueError(msg)


def load_histaugan(checkpoint: str | Path, probability: float) -> nn.Module:
    """The HistAuGAN transform, imported lazily so TeacherStudent works without that package."""
    path = Path(checkpoint)
    if not path.is_file():
        msg = (
            f"augmentation.histaugan_checkpoint '{path}' does not exist "
            "(train one with `python -m anomalib_ext.augment.histaugan fit`)"
        )
        raise FileNotFoundError(msg)
    try:
        from anomalib_ext.augment.histaugan import HistAuGANAugment
    except ImportError as error:
        msg = f"augmentation.histaugan_checkpoint is set but anomalib_ext.augment.histaugan cannot be imported: {error}"
        raise ImportError(msg) from error
    return HistAuGANAugment(str(path), p=probability)


def uneven_light_field(images: torch.Tensor, strength: float) -> torch.Tensor:
    """A (B, 1, H, W) gain surface per image, bilinear through a grid of gains in ``[1 - strength, 1]``.

    Multiplicative, as a light that falls off is: kornia's illumination augmentations add a pattern instead.
    """
    gains = 1.0 - strength * torch.rand(
        images.shape[0], 1, UNEVEN_LIGHT_GRID, UNEVEN_LIGHT_GRID, device=images.device, dtype=images.dtype
    )
    return torch.nn.functional.interpolate(gains, size=images.shape[-2:], mode="bilinear", align_corners=True)


class NormalVariation(nn.Module):
    """Random geometric + photometric changes per sample, then optional HistAuGAN restyling (``Augmentation``)."""

    def __init__(self, settings: Augmentation) -> None:
        super().__init__()
        steps: list[nn.Module] = [
            K.RandomAffine(
                degrees=settings.degrees,
                translate=(settings.translate, settings.translate),
                scale=SCALE_RANGE,
                padding_mode="reflection",
                p=1.0,
            )
        ]
        if settings.hflip:
            steps.append(K.RandomHorizontalFlip())
        if settings.vflip:
            steps.append(K.RandomVerticalFlip())
        jitter = settings.color_jitter
        if jitter > 0:
            steps.append(K.ColorJitter(jitter, jitter, jitter * 0.7, jitter * 0.1, p=0.8))
        self.pipeline = K.AugmentationSequential(*steps)
        self.uneven_light = settings.uneven_light
        checkpoint = settings.histaugan_checkpoint
        self.histaugan = load_histaugan(checkpoint, settings.histaugan_p) if checkpoint else None

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> same shape, each sample varied independently."""
        varied = self.pipeline(images).clamp(0, 1)
        if self.uneven_light > 0:
            varied = varied * uneven_light_field(varied, self.uneven_light)
        if self.histaugan is not None:
            varied = torch.stack([self.histaugan(image) for image in varied]).clamp(0, 1)
        return varied


class SyntheticDefects(nn.Module):
    """Plant one synthetic defect per image: Perlin-noise blend (anomalib) or CutPaste (rectangle or scar)."""

    def __init__(self, perlin_fraction: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= perlin_fraction <= 1.0:
            msg = f"perlin_fraction must be in [0, 1], got {perlin_fraction}"
            raise ValueError(msg)
        self.perlin_fraction = perlin_fraction
        self.perlin = PerlinAnomalyGenerator(probability=1.0, blend_factor=(0.3, 1.0))
        self.cutpaste = CutPaste(color_jitter=0.5)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> defective copies in [0, 1]."""
        use_perlin = torch.rand(images.shape[0]) < self.perlin_fraction
        defective = images.clone()
        if use_perlin.any():
            defective[use_perlin] = self.perlin(images[use_perlin])[0]
        if (~use_perlin).any():
            defective[~use_perlin] = self.cutpaste(images[~use_perlin])
        return defective.clamp(0, 1)
