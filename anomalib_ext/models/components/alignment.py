"""Rigid alignment by normalised cross-correlation (NCC), batched in torch and exportable.

Why a component: any model that compares an image with a reference (a template, a golden sample) first has
to undo the part's shift and small rotation. The search here is a fixed grid (angles x shifts), so its cost
does not depend on the data and it traces into an ONNX/OpenVINO graph: a coarse pass scores every
(reference, angle, shift) at reduced resolution with one convolution, then a full-resolution pass refines the
best reference over all its angles and a few pixels of shift.

Pose convention: a pose ``(angle, shift)`` maps a reference into the image frame, ``image(x) ~=
reference(R(-angle) (x - shift))`` about the image centre, angles in degrees counter-clockwise as displayed
(OpenCV's ``getRotationMatrix2D`` convention), shifts in pixels ``(dx, dy)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

_EPS = 1e-6


def affine_theta(angles_deg: torch.Tensor, shifts: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``affine_grid`` matrices (N, 2, 3) for ``sample_at(y) = R(angle) y + shift`` in pixel units.

    The sampling location of output pixel ``y`` (centred pixel coordinates) is the rotated and shifted ``y``;
    the aspect ratio is folded in so that non-square images rotate without shear.
    """
    radians = angles_deg * (math.pi / 180.0)
    # counter-clockwise as displayed (y axis points down) is a negative angle in maths convention
    cos, sin = torch.cos(radians), torch.sin(-radians)
    aspect = height / width
    row_x = torch.stack([cos, -sin * aspect, 2.0 * shifts[:, 0] / width], dim=1)
    row_y = torch.stack([sin / aspect, cos, 2.0 * shifts[:, 1] / height], dim=1)
    return torch.stack([row_x, row_y], dim=1)


def warp(images: torch.Tensor, theta: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Resample ``images`` (N, C, H, W) at ``affine_grid(theta)``; border padding keeps the background."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def rotate(images: torch.Tensor, angles_deg: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre by its angle (degrees, counter-clockwise as displayed)."""
    height, width = images.shape[-2:]
    zeros = torch.zeros(len(images), 2, dtype=images.dtype, device=images.device)
    # output(x) = input(R(-angle) x) turns the content by +angle
    return warp(images, affine_theta(-angles_deg, zeros, height, width))


def to_reference_frame(images: torch.Tensor, angles_deg: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Undo a pose: ``out(y) = image(R(angle) y + shift)``, i.e. bring each image onto its reference."""
    height, width = images.shape[-2:]
    return warp(images, affine_theta(angles_deg, shifts, height, width))


def to_image_frame(references: torch.Tensor, angles_deg: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Apply a pose: ``out(x) = reference(R(-angle) (x - shift))``, i.e. lay each reference over its image."""
    height, width = references.shape[-2:]
    # one resampling: sample at P(-angle) (x - shift), P as in affine_theta
    radians = angles_deg * (math.pi / 180.0)
    cos, sin = torch.cos(radians), torch.sin(radians)
    rotated_shift = torch.stack(
        [cos * shifts[:, 0] - sin * shifts[:, 1], sin * shifts[:, 0] + cos * shifts[:, 1]], dim=1
    )
    return warp(references, affine_theta(-angles_deg, -rotated_shift, height, width))


def _zero_mean_unit_norm(kernels: torch.Tensor) -> torch.Tensor:
    centred = kernels - kernels.mean(dim=(-2, -1), keepdim=True)
    return centred / (centred.flatten(-2).norm(dim=-1)[..., None, None] + _EPS)


def _crop(images: torch.Tensor, margin_y: int, margin_x: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    return images[..., margin_y : height - margin_y, margin_x : width - margin_x]


class Pose(NamedTuple):
    """Best match per image: which reference, which angle (index and degrees), which shift, how good."""

    reference_index: torch.Tensor  # (N,) long
    angle_index: torch.Tensor  # (N,) long
    angle: torch.Tensor  # (N,) degrees
    shift: torch.Tensor  # (N, 2) pixels (dx, dy)
    correlation: torch.Tensor  # (N,) NCC in [-1, 1]


class NccPoseSearch(nn.Module):
    """Find, for each image, the reference, rotation and shift with the highest NCC.

    Args:
        angles: rotations to try, degrees (a fixed grid; include 0).
        max_shift: largest shift searched, pixels, in each direction.
        coarse_factor: downsampling of the exhaustive first pass; the second pass refines at full resolution
            over ``coarse_factor // 2 + 1`` pixels and every angle of the best reference.

    ``set_references`` pre-rotates the references into buffers, so inference is convolutions and gathers only.
    """

    def __init__(self, angles: list[float], max_shift: int = 8, coarse_factor: int = 4) -> None:
        super().__init__()
        if len(angles) == 0:
            msg = "angles must hold at least one rotation (degrees), e.g. [0]"
            raise ValueError(msg)
        if max_shift < 0 or coarse_factor < 1:
            msg = f"max_shift must be >= 0 and coarse_factor >= 1, got {max_shift} and {coarse_factor}"
            raise ValueError(msg)
        self.max_shift = int(max_shift)
        self.coarse_factor = int(coarse_factor)
        self.coarse_margin = math.ceil(self.max_shift / self.coarse_factor)
        self.refine_radius = min(self.max_shift, self.coarse_factor // 2 + 1) if self.coarse_factor > 1 else 0
        self.register_buffer("angles", torch.tensor([float(a) for a in angles]))
        # filled by set_references; DynamicBufferMixin-style resizing happens in the owning model
        self.register_buffer("coarse_kernels", torch.empty(0))
        self.register_buffer("fine_kernels", torch.empty(0))

    @property
    def num_angles(self) -> int:
        return int(self.angles.numel())

    @torch.no_grad()
    def set_references(self, references: torch.Tensor) -> None:
        """Pre-rotate (R, C, H, W) references into zero-mean, unit-norm correlation kernels."""
        gray = references.mean(dim=1, keepdim=True)
        count, angle_count = len(gray), self.num_angles
        repeated = gray.repeat_interleave(angle_count, dim=0)
        rotated = rotate(repeated, self.angles.to(gray).repeat(count))  # (R*A, 1, H, W), reference-major
        height, width = gray.shape[-2:]
        if height <= 2 * self.max_shift + 4 or width <= 2 * self.max_shift + 4:
            msg = f"references of {height}x{width} px are too small for max_shift={self.max_shift}"
            raise ValueError(msg)
        self.fine_kernels = _zero_mean_unit_norm(_crop(rotated, self.max_shift, self.max_shift))
        coarse = self.downsample(rotated)
        self.coarse_kernels = _zero_mean_unit_norm(_crop(coarse, self.coarse_margin, self.coarse_margin))

    def downsample(self, images: torch.Tensor) -> torch.Tensor:
        """Images at the coarse pass's resolution (average pooling by ``coarse_factor``)."""
        if self.coarse_factor == 1:
            return images
        return F.avg_pool2d(images, self.coarse_factor)

    @staticmethod
    def window_norms(images: torch.Tensor, kernel_h: int, kernel_w: int) -> torch.Tensor:
        """Norm of each zero-meaned (kernel_h, kernel_w) window of (N, 1, H, W) images, stride 1."""
        mean = F.avg_pool2d(images, (kernel_h, kernel_w), stride=1)
        mean_square = F.avg_pool2d(images * images, (kernel_h, kernel_w), stride=1)
        return torch.sqrt((mean_square - mean * mean).clamp_min(0) * (kernel_h * kernel_w) + _EPS)

    def forward(self, images: torch.Tensor) -> Pose:
        if self.fine_kernels.numel() == 0:
            msg = "NccPoseSearch has no references: call set_references() (fit the model) first"
            raise RuntimeError(msg)
        gray = images.mean(dim=1, keepdim=True)
        angle_count = self.num_angles

        # 1) exhaustive coarse pass over every (reference, angle, shift)
        coarse = self.downsample(gray)
        kernel_h, kernel_w = self.coarse_kernels.shape[-2:]
        correlation = F.conv2d(coarse, self.coarse_kernels) / self.window_norms(coarse, kernel_h, kernel_w)
        span_y, span_x = correlation.shape[-2:]
        best = correlation.flatten(1).argmax(dim=1)  # (N,)
        candidate = torch.div(best, span_y * span_x, rounding_mode="floor")
        position = best - candidate * span_y * span_x
        coarse_dy = torch.div(position, span_x, rounding_mode="floor") - self.coarse_margin
        coarse_dx = position - (coarse_dy + self.coarse_margin) * span_x - self.coarse_margin
        reference = torch.div(candidate, angle_count, rounding_mode="floor")

        # 2) full-resolution refinement: every angle of the best reference x a few pixels around the coarse
        # shift (the coarse pass tells references apart well, but small angle steps poorly)
        fine_h, fine_w = self.fine_kernels.shape[-2:]
        kernels = self.fine_kernels.reshape(-1, angle_count, fine_h * fine_w)[reference]  # (N, A, P)
        radius = self.refine_radius
        shift_x0 = coarse_dx.to(gray.dtype) * self.coarse_factor  # (N,)
        shift_y0 = coarse_dy.to(gray.dtype) * self.coarse_factor
        region = self._region(gray, shift_x0 - radius, shift_y0 - radius, fine_h + 2 * radius, fine_w + 2 * radius)
        steps = range(2 * radius + 1)
        windows = torch.stack(
            [region[:, dy : dy + fine_h, dx : dx + fine_w].flatten(1) for dy in steps for dx in steps], dim=1
        )  # (N, O, P), offsets row-major (dy, dx)
        windows = windows - windows.mean(dim=-1, keepdim=True)
        window_norm = windows.norm(dim=-1) + _EPS  # (N, O)
        fine = torch.einsum("nop,nap->nao", windows, kernels) / window_norm[:, None, :]  # (N, A, O)
        offset_count = fine.shape[-1]
        fine_best = fine.flatten(1).argmax(dim=1)
        final_angle_index = torch.div(fine_best, offset_count, rounding_mode="floor")
        offset_pick = fine_best - final_angle_index * offset_count
        offset_dy = torch.div(offset_pick, 2 * radius + 1, rounding_mode="floor")
        offset_dx = offset_pick - offset_dy * (2 * radius + 1)
        shift = torch.stack(
            [shift_x0 + (offset_dx - radius).to(gray.dtype), shift_y0 + (offset_dy - radius).to(gray.dtype)], dim=1
        )
        score = fine.flatten(1).max(dim=1).values
        return Pose(reference, final_angle_index, self.angles[final_angle_index], shift, score)

    def _region(
        self, gray: torch.Tensor, start_x: torch.Tensor, start_y: torch.Tensor, region_h: int, region_w: int
    ) -> torch.Tensor:
        """Per image, the (region_h, region_w) crop starting at pixel margin + start: (N, h, w).

        Starts are whole pixels, so bilinear sampling at pixel centres is an exact crop; pixels outside the
        image read zeros, which lowers the correlation of windows that leave the image.
        """
        height, width = gray.shape[-2:]
        ys = torch.arange(region_h, device=gray.device, dtype=gray.dtype) + self.max_shift
        xs = torch.arange(region_w, device=gray.device, dtype=gray.dtype) + self.max_shift
        sample_y = ys[None, :, None] + start_y[:, None, None]  # (N, h, 1)
        sample_x = xs[None, None, :] + start_x[:, None, None]  # (N, 1, w)
        norm_x = (2 * sample_x + 1) / width - 1
        norm_y = (2 * sample_y + 1) / height - 1
        grid = torch.stack(torch.broadcast_tensors(norm_x, norm_y), dim=-1)  # (N, h, w, 2)
        return F.grid_sample(gray, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
