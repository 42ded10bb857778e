"""Training-time image variation for TeacherStudent: new normal looks and synthetic defects.

"Augmented" normals (geometric + photometric, plus HistAuGAN restyling when a generator is given) widen what
the student learns as normal and give the teacher's classifier a second normal class. Synthetic defects
(anomalib's Perlin-noise generator and CutPaste) are the teacher's positive class. Everything works on RGB
[0, 1] batches; the torch model normalises its inputs for the backbone itself.
"""

from __future__ import annotations

from pathlib import Path

import kornia.augmentation as K  # noqa: N812
import torch
from anomalib.data.utils.generators import PerlinAnomalyGenerator
from torch import nn

from anomalib_ext.models.components import CutPaste


def load_histaugan(checkpoint: str | Path, probability: float) -> nn.Module:
    """The HistAuGAN transform, imported lazily so TeacherStudent works without that package."""
    path = Path(checkpoint)
    if not path.is_file():
        msg = (
            f"histaugan_checkpoint '{path}' does not exist "
            "(train one with `python -m anomalib_ext.augment.histaugan fit`)"
        )
        raise FileNotFoundError(msg)
    try:
        from anomalib_ext.augment.histaugan import HistAuGANAugment
    except ImportError as error:
        msg = f"histaugan_checkpoint was given but anomalib_ext.augment.histaugan cannot be imported: {error}"
        raise ImportError(msg) from error
    return HistAuGANAugment(str(path), p=probability)


class NormalVariation(nn.Module):
    """Random geometric + photometric changes per sample, then optional HistAuGAN restyling.

    Args:
        degrees: maximum rotation; ``translate``: maximum shift as a fraction of the size; ``scale``: zoom range.
        hflip / vflip: allow mirror images (only for parts that look the same mirrored).
        brightness / contrast / saturation / hue: colour-jitter strengths (0 disables one).
        histaugan_checkpoint / histaugan_p: trained HistAuGAN generator and how often it restyles a sample.
    """

    def __init__(
        self,
        degrees: float = 10.0,
        translate: float = 0.05,
        scale: tuple[float, float] = (0.95, 1.05),
        hflip: bool = False,
        vflip: bool = False,
        brightness: float = 0.15,
        contrast: float = 0.15,
        saturation: float = 0.1,
        hue: float = 0.02,
        histaugan_checkpoint: str | Path | None = None,
        histaugan_p: float = 0.5,
    ) -> None:
        super().__init__()
        steps: list[nn.Module] = [
            K.RandomAffine(
                degrees=degrees, translate=(translate, translate), scale=scale, padding_mode="reflection", p=1.0
            )
        ]
        if hflip:
            steps.append(K.RandomHorizontalFlip())
        if vflip:
            steps.append(K.RandomVerticalFlip())
        if max(brightness, contrast, saturation, hue) > 0:
            steps.append(K.ColorJitter(brightness, contrast, saturation, hue, p=0.8))
        self.pipeline = K.AugmentationSequential(*steps)
        self.histaugan = load_histaugan(histaugan_checkpoint, histaugan_p) if histaugan_checkpoint else None

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> same shape, each sample varied independently."""
        varied = self.pipeline(images).clamp(0, 1)
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
