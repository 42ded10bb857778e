"""``HistAuGANAugment``: re-render normal images in another learned style, as a torchvision v2 transform.

anomalib 2.7 datasets call ``augmentations(image, mask)`` once per sample (``AnomalibDataset.__getitem__``)
with a ``tv_tensors.Image`` and a ``tv_tensors.Mask``; the mask must pass through untouched, so only
images and plain tensors are transformed. Batches (N, C, H, W) work too, with one coin flip per image.

The generator runs at ``image_size`` (default: the size it was trained at). When the input is larger, the
change the generator makes at that size is upsampled and added to the full-resolution input, so fine
detail is kept and only the style (colour, brightness, contrast) moves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F  # noqa: N812
from torchvision import tv_tensors
from torchvision.transforms.v2 import Transform

from .checkpoint import load_generator


def is_pure_tensor(item: Any) -> bool:  # noqa: ANN401
    """A plain tensor, not a ``tv_tensors`` subclass (a mask or box must not be restyled)."""
    return isinstance(item, torch.Tensor) and not isinstance(item, tv_tensors.TVTensor)


def keep_grey(sources: torch.Tensor, rendered: torch.Tensor) -> torch.Tensor:
    """A grey image stored as RGB (the dice set) stays grey: a colour cast is no lighting a camera gives it."""
    grey = (sources.amax(dim=1) - sources.amin(dim=1)).flatten(1).amax(dim=1) == 0
    rendered[grey] = rendered[grey].mean(dim=1, keepdim=True).expand(-1, rendered.shape[1], -1, -1)
    return rendered


class HistAuGANAugment(Transform):
    """With probability ``p``, keep an image's content and give it the style of a random (or fixed) domain.

    Args:
        checkpoint: generator checkpoint written at the end of ``HistAuGAN`` fit (``export_generator``), or a
            Lightning ``.ckpt`` of the ``HistAuGAN`` module.
        p: probability of re-rendering each image.
        domain: index of the target domain; ``None`` draws one uniformly per image.
        image_size: side length the generator runs at (multiple of 4); ``None`` = its training size.

    Input: float image in [0, 1], (C, H, W) or (N, C, H, W), C = 1 or 3, plain tensor or ``tv_tensors.Image``
    (uint8 is accepted and returned as uint8). Output: same type, shape, dtype and range.
    """

    _transformed_types = (tv_tensors.Image, is_pure_tensor)

    def __init__(
        self,
        checkpoint: str | Path,
        p: float = 0.5,
        domain: int | None = None,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            msg = f"HistAuGANAugment: p must be in [0, 1], got {p}"
            raise ValueError(msg)
        self.checkpoint = str(checkpoint)
        self.generator, self.config, self.domain_names = load_generator(checkpoint)
        self.generator.requires_grad_(False)
        num_domains = self.generator.num_domains
        if domain is not None and not 0 <= domain < num_domains:
            msg = f"HistAuGANAugment: domain must be in 0..{num_domains - 1} for '{checkpoint}', got {domain}"
            raise ValueError(msg)
        working_size = image_size if image_size is not None else int(self.config["image_size"])
        if working_size < 16 or working_size % 4:
            msg = f"HistAuGANAugment: image_size must be a multiple of 4 and >= 16, got {working_size}"
            raise ValueError(msg)
        self.p = p
        self.domain = domain
        self.image_size = working_size

    @property
    def num_domains(self) -> int:
        return self.generator.num_domains

    def __repr__(self) -> str:  # the generator's layers would drown the arguments in logs
        arguments = f"checkpoint='{self.checkpoint}', p={self.p}, domain={self.domain}, image_size={self.image_size}"
        return f"{type(self).__name__}({arguments})"

    @torch.no_grad()
    def render(self, images: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        """Re-render a float (N, C, H, W) batch in [0, 1] unconditionally (used by ``transform``).

        ``domains`` (N,) picks each target domain; by default ``self.domain`` or a uniform draw.
        """
        generator = self.generator
        device = generator.attribute_mean.device
        count, channels, height, width = images.shape
        if domains is None:
            domains = (
                torch.full((count,), self.domain, dtype=torch.long)
                if self.domain is not None
                else torch.randint(0, self.num_domains, (count,))
            )
        batch = images.to(device=device, dtype=torch.float32)
        if channels == 1:
            batch = batch.expand(-1, 3, -1, -1)
        if (height, width) == (self.image_size, self.image_size):
            rendered = generator.render(batch, domains.to(device))
        else:
            small = F.interpolate(batch, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
            change = generator.render(small, domains.to(device)) - small
            rendered = batch + F.interpolate(change, size=(height, width), mode="bilinear", align_corners=False)
        rendered = rendered.mean(dim=1, keepdim=True) if channels == 1 else keep_grey(batch, rendered)
        return rendered.clamp(0, 1).to(device=images.device, dtype=images.dtype)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        del params
        tensor = inpt.as_subclass(torch.Tensor) if isinstance(inpt, tv_tensors.TVTensor) else inpt
        if tensor.ndim not in (3, 4) or tensor.shape[-3] not in (1, 3):
            msg = f"HistAuGANAugment expects (C, H, W) or (N, C, H, W) with C = 1 or 3, got shape {tuple(tensor.shape)}"
            raise ValueError(msg)
        is_uint8 = tensor.dtype == torch.uint8
        if not (tensor.is_floating_point() or is_uint8):
            msg = f"HistAuGANAugment expects a float image in [0, 1] or uint8, got dtype {tensor.dtype}"
            raise TypeError(msg)
        batch = tensor[None] if tensor.ndim == 3 else tensor
        chosen = torch.rand(len(batch)) < self.p
        if not chosen.any():
            return inpt
        floats = batch.float() / 255 if is_uint8 else batch
        output = floats.clone()
        output[chosen] = self.render(floats[chosen]).to(output.dtype)
        if is_uint8:
            output = (output * 255).round().to(torch.uint8)
        output = output[0] if tensor.ndim == 3 else output
        return tv_tensors.wrap(output, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else output
