"""Local SSIM with a Gaussian window, in plain torch so that it exports to OpenVINO.

Shared by TemplateSsim (map = 1 - SSIM to the template), Reconstruction (loss and map) and the HistAuGAN
tests (structure kept while colour changes).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


def gaussian_window(window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 2-D Gaussian kernel of shape (1, 1, k, k)."""
    coords = torch.arange(window_size, dtype=torch.float32) - (window_size - 1) / 2
    kernel_1d = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel_1d = kernel_1d / kernel_1d.sum()
    return (kernel_1d[:, None] * kernel_1d[None, :])[None, None]


def ssim_map(
    first: torch.Tensor,
    second: torch.Tensor,
    window: torch.Tensor,
    data_range: float = 1.0,
) -> torch.Tensor:
    """Per-pixel SSIM of two (N, C, H, W) batches, averaged over channels: (N, 1, H, W).

    Reflect padding keeps the output the input's size, so the map aligns with the image.
    """
    kernel = window.to(first.dtype)
    pad = window.shape[-1] // 2

    def blur(tensor: torch.Tensor) -> torch.Tensor:
        # fold channels into the batch: one single-channel conv is ~20x faster on CPU than a grouped one
        batch, channels, height, width = tensor.shape
        flat = F.pad(tensor.reshape(batch * channels, 1, height, width), (pad, pad, pad, pad), mode="reflect")
        return F.conv2d(flat, kernel).reshape(batch, channels, height, width)

    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu_x, mu_y = blur(first), blur(second)
    sigma_xx = blur(first * first) - mu_x**2
    sigma_yy = blur(second * second) - mu_y**2
    sigma_xy = blur(first * second) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)
    denominator = (mu_x**2 + mu_y**2 + c1) * (sigma_xx + sigma_yy + c2)
    return (numerator / denominator).mean(dim=1, keepdim=True)


class SSIMMap(nn.Module):
    """``ssim_map`` with its window as a buffer (moves with the model, traced into the export)."""

    def __init__(self, window_size: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> None:
        super().__init__()
        if window_size % 2 == 0 or window_size < 3:
            msg = f"window_size must be an odd number >= 3, got {window_size}"
            raise ValueError(msg)
        self.data_range = data_range
        self.register_buffer("window", gaussian_window(window_size, sigma), persistent=False)

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return ssim_map(first, second, self.window, self.data_range)


def ssim_loss(first: torch.Tensor, second: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """1 - mean SSIM, a training loss that rewards structure rather than exact intensities."""
    return 1 - ssim_map(first, second, gaussian_window(window_size, sigma).to(first.device)).mean()


def topk_mean(anomaly_map: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """Mean of the highest ``fraction`` of each map's pixels: an image score robust to a single hot pixel."""
    flat = anomaly_map.flatten(1)
    k = max(1, int(flat.shape[1] * fraction))
    return flat.topk(k, dim=1).values.mean(dim=1)
