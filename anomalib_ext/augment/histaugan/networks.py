"""HistAuGAN networks (DRIT++ / MDMM family), sized for CPU training at 64-256 px.

The image is split into a *content* code (spatial, domain-invariant: the structure) and an *attribute*
code (a small vector, the "style": colour, brightness, contrast). The generator rebuilds an image from a
content code, an attribute vector and a one-hot domain. Re-rendering an image = keep its content, swap in
an attribute sampled from a domain's fitted statistics.

All widths derive from ``base_channels`` so one knob trades quality for CPU time. The content encoder
and generator are fully convolutional: they run at any size that is a multiple of 4.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


def _conv_block(in_channels: int, out_channels: int, kernel: int, stride: int, norm: bool = True) -> nn.Sequential:
    """Reflect-padded conv, optional instance norm, ReLU."""
    layers: list[nn.Module] = [
        nn.ReflectionPad2d(kernel // 2 if stride == 1 else (kernel - stride) // 2),
        nn.Conv2d(in_channels, out_channels, kernel, stride),
    ]
    if norm:
        layers.append(nn.InstanceNorm2d(out_channels))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """Two 3x3 convs with instance norm and a skip: keeps the spatial detail of the content code."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.body(features)


class ContentEncoder(nn.Module):
    """Image -> content code at 1/4 resolution, ``4 * base_channels`` channels.

    Instance norm strips per-image colour statistics, pushing them into the attribute code.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 16, num_residual_blocks: int = 2) -> None:
        super().__init__()
        width = base_channels
        self.layers = nn.Sequential(
            _conv_block(in_channels, width, 7, 1),
            _conv_block(width, 2 * width, 4, 2),
            _conv_block(2 * width, 4 * width, 4, 2),
            *[ResidualBlock(4 * width) for _ in range(num_residual_blocks)],
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.layers(image)


class AttributeEncoder(nn.Module):
    """(image, domain) -> mean and log-variance of the attribute vector.

    The one-hot domain is tiled and concatenated to the image (as in MDMM) so one encoder serves all domains.
    No normalisation: colour statistics are exactly what it must see.
    """

    def __init__(
        self, in_channels: int = 3, num_domains: int = 1, base_channels: int = 16, attribute_dim: int = 8
    ) -> None:
        super().__init__()
        width = base_channels
        self.num_domains = num_domains
        self.features = nn.Sequential(
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels + num_domains, width, 7),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 2 * width, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(4 * width, 4 * width, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.mean_head = nn.Linear(4 * width, attribute_dim)
        self.logvar_head = nn.Linear(4 * width, attribute_dim)

    def forward(self, image: torch.Tensor, domain_onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tiled = domain_onehot[:, :, None, None].expand(-1, -1, *image.shape[-2:])
        pooled = self.features(torch.cat([image, tiled], dim=1)).flatten(1)
        return self.mean_head(pooled), self.logvar_head(pooled)


class ModulatedResidualBlock(nn.Module):
    """Residual block whose instance-normalised features are scaled and shifted by the style (FiLM/AdaIN).

    Modulating normalised features is the cheapest way to let a small attribute vector set the colour and
    contrast of every region while the content code sets where the edges are.
    """

    def __init__(self, channels: int, style_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3))
        self.conv2 = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3))
        self.norm = nn.InstanceNorm2d(channels)
        self.style1 = nn.Linear(style_dim, 2 * channels)
        self.style2 = nn.Linear(style_dim, 2 * channels)

    @staticmethod
    def _modulate(features: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        scale, shift = style[:, :, None, None].chunk(2, dim=1)
        return features * (1 + scale) + shift

    def forward(self, features: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self._modulate(self.norm(self.conv1(features)), self.style1(style)))
        hidden = self._modulate(self.norm(self.conv2(hidden)), self.style2(style))
        return features + hidden


class Generator(nn.Module):
    """(content, attribute, one-hot domain) -> image in [0, 1]."""

    def __init__(
        self,
        out_channels: int = 3,
        num_domains: int = 1,
        base_channels: int = 16,
        attribute_dim: int = 8,
        num_residual_blocks: int = 2,
        style_dim: int = 64,
    ) -> None:
        super().__init__()
        width = 4 * base_channels
        self.style_mlp = nn.Sequential(
            nn.Linear(attribute_dim + num_domains, style_dim),
            nn.ReLU(inplace=True),
            nn.Linear(style_dim, style_dim),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.ModuleList([ModulatedResidualBlock(width, style_dim) for _ in range(num_residual_blocks)])
        self.upsample = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            _conv_block(width, width // 2, 3, 1),
            nn.Upsample(scale_factor=2, mode="nearest"),
            _conv_block(width // 2, width // 4, 3, 1),
        )
        # the last layer sees the style again: the global colour cast is set here, after the spatial layers
        self.final_style = nn.Linear(style_dim, 2 * (width // 4))
        self.to_image = nn.Sequential(nn.ReflectionPad2d(2), nn.Conv2d(width // 4, out_channels, 5))

    def forward(self, content: torch.Tensor, attribute: torch.Tensor, domain_onehot: torch.Tensor) -> torch.Tensor:
        style = self.style_mlp(torch.cat([attribute, domain_onehot], dim=1))
        features = content
        for block in self.blocks:
            features = block(features, style)
        features = self.upsample(features)
        scale, shift = self.final_style(style)[:, :, None, None].chunk(2, dim=1)
        features = features * (1 + scale) + shift
        return torch.sigmoid(self.to_image(features))


class ImageDiscriminator(nn.Module):
    """PatchGAN real/fake map plus a domain classifier on pooled features (as in MDMM / StarGAN)."""

    def __init__(
        self, in_channels: int = 3, num_domains: int = 1, base_channels: int = 16, num_layers: int = 4
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels_in, channels_out = in_channels, base_channels
        for _ in range(num_layers):
            layers += [nn.utils.spectral_norm(nn.Conv2d(channels_in, channels_out, 4, 2, 1))]
            layers += [nn.LeakyReLU(0.2, inplace=True)]
            channels_in, channels_out = channels_out, min(channels_out * 2, 8 * base_channels)
        self.features = nn.Sequential(*layers)
        self.real_fake_head = nn.Conv2d(channels_in, 1, 3, 1, 1)
        self.domain_head = nn.Linear(channels_in, num_domains)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(image)
        return self.real_fake_head(features), self.domain_head(features.mean(dim=(2, 3)))


class ContentDiscriminator(nn.Module):
    """Guesses the domain from a content code; the encoder learns to make that guess impossible."""

    def __init__(self, content_channels: int, num_domains: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(content_channels, content_channels, 3, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(content_channels, content_channels, 3, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.domain_head = nn.Linear(content_channels, num_domains)

    def forward(self, content: torch.Tensor) -> torch.Tensor:
        return self.domain_head(self.features(content).flatten(1))


class HistAuGANGenerator(nn.Module):
    """Everything needed to re-render an image: content and attribute encoders, generator, and per-domain
    attribute statistics (buffers, so they travel with ``state_dict`` and the exported checkpoint).

    The discriminators are training-only and live in the LightningModule.
    """

    def __init__(
        self,
        num_domains: int = 1,
        image_channels: int = 3,
        base_channels: int = 16,
        attribute_dim: int = 8,
        num_residual_blocks: int = 2,
        style_dim: int = 64,
    ) -> None:
        super().__init__()
        if num_domains < 1:
            msg = f"num_domains must be >= 1, got {num_domains}"
            raise ValueError(msg)
        self.num_domains = num_domains
        self.attribute_dim = attribute_dim
        self.content_encoder = ContentEncoder(image_channels, base_channels, num_residual_blocks)
        self.attribute_encoder = AttributeEncoder(image_channels, num_domains, base_channels, attribute_dim)
        self.generator = Generator(
            image_channels, num_domains, base_channels, attribute_dim, num_residual_blocks, style_dim
        )
        # prior N(0, I) until fit-time statistics replace it
        self.register_buffer("attribute_mean", torch.zeros(num_domains, attribute_dim))
        self.register_buffer("attribute_std", torch.ones(num_domains, attribute_dim))

    def onehot(self, domains: torch.Tensor) -> torch.Tensor:
        return F.one_hot(domains.long(), self.num_domains).float()

    def sample_attributes(self, domains: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Attribute vectors drawn from each target domain's fitted Gaussian (diagonal)."""
        noise = torch.randn(
            len(domains), self.attribute_dim, generator=generator, device=self.attribute_mean.device
        ).to(self.attribute_mean.device)
        return self.attribute_mean[domains] + noise * self.attribute_std[domains]

    def render(
        self, images: torch.Tensor, domains: torch.Tensor, attributes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Same content as ``images``, style of ``domains`` (attributes sampled when not given)."""
        if attributes is None:
            attributes = self.sample_attributes(domains)
        return self.generator(self.content_encoder(images), attributes, self.onehot(domains))

    def forward(self, images: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
        return self.render(images, domains)
