"""A small convolutional autoencoder / VAE on raw [0, 1] images, and its loss pieces.

Shared by ``Reconstruction`` (scores pixels by reconstruction error) and ``Dfkdm``'s LAKE mode (fits a
density on the latent code plus reconstruction-error features). Pure torch, so it exports to OpenVINO.

Design choices that follow the DfKDM tips for near-constant industrial images: the input is not mean/std
normalised, the output layer is a sigmoid (the reconstruction lives in the input's [0, 1] range) and the
decoder upsamples by nearest neighbour (followed by a 3x3 convolution, which avoids the checkerboard
artefacts of transposed convolutions). GroupNorm rather than BatchNorm: no running statistics, so a model
trained for a handful of steps behaves the same in train and eval mode, and batch size 1 works.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .base import as_pair
from .filters import SSIMMap


class AutoencoderOutput(NamedTuple):
    """What one forward pass of ``ConvAutoencoder`` gives.

    ``latent`` is the code to fit a density on: the sample ``z`` for a plain AE, the mean ``mu`` for a VAE
    (deterministic, so scores and exports repeat). ``mu`` and ``logvar`` are ``None`` for a plain AE.
    """

    reconstruction: torch.Tensor
    latent: torch.Tensor
    mu: torch.Tensor | None
    logvar: torch.Tensor | None


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(8, channels), num_channels=channels)


def _down_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Halve the resolution with one strided 4x4 conv (cheap enough for 2 CPU cores)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1),
        _norm(out_channels),
        nn.LeakyReLU(0.2, inplace=True),
    )


def _up_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Double the resolution by nearest-neighbour upsampling and a 3x3 conv (no checkerboard)."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        _norm(out_channels),
        nn.LeakyReLU(0.2, inplace=True),
    )


class ConvAutoencoder(nn.Module):
    """Convolutional autoencoder with a dense bottleneck of ``latent_dim`` numbers (optionally a VAE).

    Args:
        in_channels: image channels (3 for RGB, 1 for grayscale).
        image_size: side length, or (height, width); each must be divisible by ``2 ** num_downsamples``.
        latent_dim: size of the bottleneck vector. Small enough that defects cannot be copied through.
        base_channels: channels after the first downsampling; doubled at each further stage, capped at 8x.
        num_downsamples: number of stride-2 stages; the bottleneck sees a (size / 2**n)^2 grid.
        variational: VAE (``mu``, ``logvar``, reparameterised sample in training) instead of a plain AE.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 128,
        latent_dim: int = 128,
        base_channels: int = 32,
        num_downsamples: int = 4,
        variational: bool = False,
    ) -> None:
        super().__init__()
        height, width = as_pair(image_size)
        factor = 2**num_downsamples
        for name, value in (("in_channels", in_channels), ("latent_dim", latent_dim)):
            if value < 1:
                msg = f"{name} must be >= 1, got {value}"
                raise ValueError(msg)
        if base_channels < 8:
            msg = f"base_channels must be >= 8, got {base_channels}"
            raise ValueError(msg)
        if num_downsamples < 1:
            msg = f"num_downsamples must be >= 1, got {num_downsamples}"
            raise ValueError(msg)
        if height % factor or width % factor:
            msg = (
                f"image_size {(height, width)} must be divisible by 2**num_downsamples = {factor} "
                f"(num_downsamples={num_downsamples})"
            )
            raise ValueError(msg)
        self.in_channels = in_channels
        self.image_size = (height, width)
        self.latent_dim = latent_dim
        self.variational = variational

        channels = [min(base_channels * 2**stage, base_channels * 8) for stage in range(num_downsamples)]
        self.grid = (height // factor, width // factor)
        flat = channels[-1] * self.grid[0] * self.grid[1]

        stages: list[nn.Module] = []
        previous = in_channels
        for out in channels:
            stages.append(_down_block(previous, out))
            previous = out
        self.encoder = nn.Sequential(*stages)
        self.to_mu = nn.Linear(flat, latent_dim)
        self.to_logvar = nn.Linear(flat, latent_dim) if variational else None

        self.from_latent = nn.Sequential(nn.Linear(latent_dim, flat), nn.LeakyReLU(0.2, inplace=True))
        ups: list[nn.Module] = []
        reversed_channels = channels[::-1]
        for index, inp in enumerate(reversed_channels):
            out = reversed_channels[index + 1] if index + 1 < len(reversed_channels) else base_channels // 2
            ups.append(_up_block(inp, out))
        self.decoder = nn.Sequential(*ups)
        self.to_image = nn.Sequential(
            nn.Conv2d(base_channels // 2, in_channels, kernel_size=3, padding=1),
            nn.Sigmoid(),
        )
        self._bottleneck_channels = channels[-1]

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mu, logvar) of the code; ``logvar`` is None for a plain AE, clamped so exp() cannot overflow."""
        features = self.encoder(images).flatten(1)
        mu = self.to_mu(features)
        if self.to_logvar is None:
            return mu, None
        return mu, self.to_logvar(features).clamp(-10.0, 10.0)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Image in [0, 1] from a code."""
        grid = self.from_latent(latent).view(-1, self._bottleneck_channels, *self.grid)
        return self.to_image(self.decoder(grid))

    def forward(self, images: torch.Tensor) -> AutoencoderOutput:
        """Reconstruct ``images`` (N, C, H, W) in [0, 1]. A VAE samples only in training mode."""
        mu, logvar = self.encode(images)
        code = mu
        if logvar is not None and self.training:
            code = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        reconstruction = self.decode(code)
        if logvar is None:
            return AutoencoderOutput(reconstruction=reconstruction, latent=mu, mu=None, logvar=None)
        return AutoencoderOutput(reconstruction=reconstruction, latent=mu, mu=mu, logvar=logvar)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)), summed over latent dimensions and averaged over the batch."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()


class ReconstructionLoss(nn.Module):
    """``l2_weight * MSE + ssim_weight * (1 - SSIM) [+ beta * KL]``: the AE / VAE training objective.

    L2 alone rewards blurry outputs and ignores structure; SSIM keeps edges and texture. ``beta`` weighs
    the KL term of a VAE (ignored when ``mu``/``logvar`` are absent). Returns the total and its parts so a
    training step can log them. The SSIM window defaults to the standard one (11 taps, sigma 1.5: Wang et al.
    2004, kornia's fixed sigma), which no model changes.
    """

    def __init__(
        self,
        *,
        l2_weight: float,
        ssim_weight: float,
        beta: float,
        ssim_window_size: int = 11,
        ssim_sigma: float = 1.5,
    ) -> None:
        super().__init__()
        for name, value in (("l2_weight", l2_weight), ("ssim_weight", ssim_weight), ("beta", beta)):
            if value < 0:
                msg = f"{name} must be >= 0, got {value}"
                raise ValueError(msg)
        if l2_weight == 0 and ssim_weight == 0:
            msg = "l2_weight and ssim_weight cannot both be 0: nothing would be reconstructed"
            raise ValueError(msg)
        self.l2_weight = l2_weight
        self.ssim_weight = ssim_weight
        self.beta = beta
        self.ssim = SSIMMap(ssim_window_size, ssim_sigma)

    def forward(self, images: torch.Tensor, output: AutoencoderOutput) -> dict[str, torch.Tensor]:
        """Loss terms for ``images`` and the autoencoder's ``output``; key ``"loss"`` is the total."""
        l2 = torch.mean((output.reconstruction - images) ** 2)
        ssim = 1 - self.ssim(output.reconstruction, images).mean()
        total = self.l2_weight * l2 + self.ssim_weight * ssim
        terms = {"l2": l2.detach(), "ssim": ssim.detach()}
        if output.mu is not None and output.logvar is not None:
            kl = kl_divergence(output.mu, output.logvar)
            total = total + self.beta * kl
            terms["kl"] = kl.detach()
        terms["loss"] = total
        return terms
