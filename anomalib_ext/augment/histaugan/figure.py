"""Figure and numbers for a trained HistAuGAN: originals beside re-renderings, structure and colour change.

    python -m anomalib_ext.augment.histaugan.figure --checkpoint results/histaugan/bottle/generator.pt \\
        --images ../shared/data/mvtec_ad/bottle/train/good --out results/histaugan/bottle/figure.png

Prints, over ``--stats`` images, the SSIM of normalised luminance on edge pixels (structure kept: 1 is
perfect) and how much the per-channel mean and standard deviation moved (style changed), plus the time
per re-rendered image.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from kornia.metrics import ssim
from torch.nn import functional as F  # noqa: N812

from .data import list_images
from .transform import HistAuGANAugment


def normalised_luminance(images: torch.Tensor) -> torch.Tensor:
    """Zero-mean, unit-contrast luminance mapped around 0.5: SSIM then compares structure only."""
    gray = images.mean(dim=1, keepdim=True)
    gray = (gray - gray.mean(dim=(2, 3), keepdim=True)) / (gray.std(dim=(2, 3), keepdim=True) + 1e-6)
    return 0.5 + 0.15 * gray


def edge_mask(images: torch.Tensor, quantile: float = 0.8) -> torch.Tensor:
    """The strongest-gradient ``1 - quantile`` of each image's pixels: where structure lives."""
    gray = images.mean(dim=1, keepdim=True)
    dx = (gray[..., :, 1:] - gray[..., :, :-1]).abs()[..., 1:, :]
    dy = (gray[..., 1:, :] - gray[..., :-1, :]).abs()[..., :, 1:]
    magnitude = F.pad(dx + dy, (1, 0, 1, 0))
    threshold = magnitude.flatten(1).quantile(quantile, dim=1)[:, None, None, None]
    return magnitude >= threshold


def structure_similarity_on_edges(originals: torch.Tensor, rendered: torch.Tensor) -> float:
    """Mean SSIM of normalised luminance over the originals' edge pixels (colour changes do not count)."""
    # kornia's SSIM: Gaussian window of 7 taps, sigma 1.5, reflect padding (the map keeps the image size)
    similarity = ssim(normalised_luminance(originals), normalised_luminance(rendered), 7, eps=0.0)
    return similarity[edge_mask(originals)].mean().item()


def read_image(path: Path) -> torch.Tensor:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        msg = f"could not read image file {path}"
        raise OSError(msg)
    return torch.from_numpy(np.ascontiguousarray(image[..., ::-1])).permute(2, 0, 1).float() / 255


def _tile(image: torch.Tensor, size: int) -> np.ndarray:
    small = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True)[0]
    return (small.clamp(0, 1).permute(1, 2, 0).numpy()[..., ::-1] * 255).round().astype(np.uint8)


def make_figure(
    augment: HistAuGANAugment, originals: list[torch.Tensor], renders: int, tile: int, seed: int
) -> np.ndarray:
    """Rows of [original, one rendering per domain, then random domains], with a header row of labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = ["original"] + [f"-> {name}" for name in augment.domain_names]
    labels += ["-> random"] * max(0, renders - augment.num_domains)
    rows = []
    for original in originals:
        domains = list(range(augment.num_domains))
        extra = max(0, renders - len(domains))
        domains += torch.randint(0, augment.num_domains, (extra,), generator=generator).tolist()
        torch.manual_seed(seed + len(rows))
        rendered = augment.render(original[None].expand(len(domains), -1, -1, -1), torch.tensor(domains))
        rows.append(np.concatenate([_tile(original, tile)] + [_tile(image, tile) for image in rendered], axis=1))
    grid = np.concatenate(rows, axis=0)
    header = np.full((18, grid.shape[1], 3), 255, np.uint8)
    for column, label in enumerate(labels[: grid.shape[1] // tile]):
        cv2.putText(header, label, (column * tile + 3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([header, grid], axis=0)


def measure(augment: HistAuGANAugment, images: list[torch.Tensor], seed: int) -> dict[str, float]:
    """Structure kept (edge SSIM) and style moved (per-channel mean/std shifts), over random domains."""
    torch.manual_seed(seed)
    originals = torch.stack(images)
    start = time.perf_counter()
    rendered = torch.cat([augment.render(image[None]) for image in images])
    seconds_per_image = (time.perf_counter() - start) / len(images)
    mean_shift = (rendered.mean(dim=(2, 3)) - originals.mean(dim=(2, 3))).abs().mean().item()
    std_ratio = (rendered.std(dim=(2, 3)) / originals.std(dim=(2, 3)).clamp_min(1e-6)).log().abs().exp().mean().item()
    return {
        "edge_ssim_normalised_luminance": structure_similarity_on_edges(originals, rendered),
        "mean_abs_channel_mean_shift": mean_shift,
        "mean_contrast_ratio": std_ratio,
        "seconds_per_image": seconds_per_image,
    }


def per_domain_intensity(augment: HistAuGANAugment, images: list[torch.Tensor], seed: int) -> dict[str, float]:
    """Mean intensity (0-255) of the sources and of their re-renderings into each domain."""
    originals = torch.stack(images)
    means = {"sources": originals.mean().item() * 255}
    for index, name in enumerate(augment.domain_names):
        torch.manual_seed(seed)
        rendered = augment.render(originals, torch.full((len(originals),), index))
        means[f"rendered into {name}"] = rendered.mean().item() * 255
    return means


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--images", required=True, type=Path, help="folder of images to re-render")
    parser.add_argument("--out", required=True, type=Path, help="PNG to write")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--renders", type=int, default=5, help="re-renderings per original")
    parser.add_argument("--tile", type=int, default=96, help="side of each thumbnail in the figure")
    parser.add_argument("--stats", type=int, default=32, help="images used for the printed numbers")
    parser.add_argument("--image-size", type=int, default=None, help="generator working size (default: trained)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-domain", action="store_true", help="also print mean intensity per target domain")
    args = parser.parse_args(argv)

    paths = list_images(args.images)
    if not paths:
        parser.error(f"no images found under {args.images}")
    augment = HistAuGANAugment(args.checkpoint, p=1.0, image_size=args.image_size)
    picks = np.random.default_rng(args.seed).permutation(len(paths))
    figure = make_figure(
        augment, [read_image(paths[i]) for i in picks[: args.rows]], args.renders, args.tile, args.seed
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), figure, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"figure: {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")  # noqa: T201
    numbers = measure(augment, [read_image(paths[i]) for i in picks[: args.stats]], args.seed)
    for name, value in numbers.items():
        print(f"{name}: {value:.4f}")  # noqa: T201
    if args.per_domain:
        stats_images = [read_image(paths[i]) for i in picks[: args.stats]]
        for name, value in per_domain_intensity(augment, stats_images, args.seed).items():
            print(f"mean intensity x255, {name}: {value:.1f}")  # noqa: T201


if __name__ == "__main__":
    main()
