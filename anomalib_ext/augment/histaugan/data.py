"""Training data for HistAuGAN: a folder of normal images, each assigned to a domain.

A domain is whatever should become a "style" the GAN can re-render into: a sub-folder (scanner, session,
stain), a group captured by a regular expression on the file name (the dice set encodes the acquisition
session there), or, when the data carry no such label, a k-means cluster of colour and brightness
statistics. Images are decoded once, resized and kept in memory as uint8 (small at 64-128 px).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from lightning import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DomainSource = Literal["auto", "folders", "clusters", "regex"]


def list_images(root: str | Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[Path]:
    """All image files under ``root`` (recursive), sorted so that runs are reproducible."""
    return sorted(path for path in Path(root).rglob("*") if path.is_file() and path.suffix.lower() in extensions)


def load_image(path: Path, image_size: int) -> np.ndarray:
    """RGB uint8 (H, W, 3) resized to a square ``image_size``; grayscale files are repeated to 3 channels."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        msg = f"could not read image file {path}"
        raise OSError(msg)
    image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image[..., ::-1])


def colour_statistics(images: np.ndarray) -> np.ndarray:
    """Per-image mean and standard deviation of each channel: what lighting and stain change."""
    flat = images.reshape(len(images), -1, images.shape[-1]).astype(np.float32) / 255
    return np.concatenate([flat.mean(axis=1), flat.std(axis=1)], axis=1)


def kmeans(features: np.ndarray, num_clusters: int, seed: int = 0, iterations: int = 50) -> np.ndarray:
    """Cluster labels by k-means with k-means++ seeding on standardised features (tiny data, numpy only)."""
    if num_clusters > len(features):
        msg = f"num_domains={num_clusters} is larger than the number of training images ({len(features)})"
        raise ValueError(msg)
    features = (features - features.mean(0)) / (features.std(0) + 1e-8)
    rng = np.random.default_rng(seed)
    centres = [features[rng.integers(len(features))]]
    for _ in range(1, num_clusters):
        distances = np.min([((features - centre) ** 2).sum(1) for centre in centres], axis=0)
        probabilities = distances / distances.sum() if distances.sum() > 0 else None
        centres.append(features[rng.choice(len(features), p=probabilities)])
    centre_array = np.stack(centres)
    labels = np.zeros(len(features), dtype=np.int64)
    for _ in range(iterations):
        labels = ((features[:, None] - centre_array[None]) ** 2).sum(-1).argmin(1)
        for cluster in range(num_clusters):
            if (labels == cluster).any():
                centre_array[cluster] = features[labels == cluster].mean(0)
    # order clusters by brightness so domain 0 is the darkest: stable, readable names
    brightness = np.array([features[labels == c, :3].mean() if (labels == c).any() else 0 for c in range(num_clusters)])
    rank = np.argsort(np.argsort(brightness))
    return rank[labels]


class DomainImageDataset(Dataset):
    """Preloaded uint8 images and their domain indices; returns float images in [0, 1]."""

    def __init__(self, images: np.ndarray, domains: np.ndarray, flip: bool = True) -> None:
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        self.domains = torch.from_numpy(domains).long()
        self.flip = flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.images[index].float() / 255
        if self.flip and torch.rand(1).item() < 0.5:
            image = image.flip(-1)
        return {"image": image, "domain": self.domains[index]}


class HistAuGANDataModule(LightningDataModule):
    """Normal images with a domain label each, for ``HistAuGAN`` training.

    Args:
        root: folder of training images (searched recursively), e.g. ``.../bottle/train/good``.
        image_size: side the images are resized to; a multiple of 4. 64-128 trains on a CPU in minutes.
        batch_size: images per step (pairs are formed inside the batch).
        num_domains: number of k-means clusters when domains come from colour statistics; must match the
            number of folders/groups otherwise (or be left ``None``).
        domain_source: ``auto`` uses ``domain_regex`` when given, else sub-folders of ``root`` when there
            are at least two, else colour clusters.
        domain_regex: a regular expression searched in each file name; its first group (or whole match)
            names the domain, e.g. ``_(\\d\\d_\\d\\d_\\d\\d)_`` for the dice acquisition sessions.
        max_images: cap on the number of images (random subset, seeded) so big sets stay cheap.
        flip: random horizontal flips during training.
        num_workers: DataLoader workers (images are in memory; 0 is usually fastest on a small CPU).
        seed: seed for the subset and the clustering.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int = 64,
        batch_size: int = 8,
        num_domains: int | None = None,
        domain_source: DomainSource = "auto",
        domain_regex: str | None = None,
        max_images: int | None = None,
        flip: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        if not self.root.is_dir():
            msg = f"HistAuGANDataModule root '{self.root}' is not a directory"
            raise FileNotFoundError(msg)
        if image_size < 16 or image_size % 4:
            msg = f"image_size must be a multiple of 4 and >= 16, got {image_size}"
            raise ValueError(msg)
        if domain_source not in ("auto", "folders", "clusters", "regex"):
            msg = f"domain_source must be auto, folders, clusters or regex, got '{domain_source}'"
            raise ValueError(msg)
        self.image_size = image_size
        self.batch_size = batch_size
        self.requested_num_domains = num_domains
        self.domain_source = domain_source
        self.domain_regex = domain_regex
        self.max_images = max_images
        self.flip = flip
        self.num_workers = num_workers
        self.seed = seed
        self.image_paths = self._select_paths()
        self.domain_names: list[str] = []
        self._domains: np.ndarray | None = None
        self._images: np.ndarray | None = None
        self.train_dataset: DomainImageDataset | None = None
        self._assign_domains_from_names()

    def _select_paths(self) -> list[Path]:
        paths = list_images(self.root)
        if not paths:
            msg = f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under '{self.root}'"
            raise FileNotFoundError(msg)
        if self.max_images is not None and len(paths) > self.max_images:
            keep = np.random.default_rng(self.seed).choice(len(paths), self.max_images, replace=False)
            paths = [paths[index] for index in sorted(keep)]
        return paths

    def _resolved_source(self) -> str:
        if self.domain_source != "auto":
            return self.domain_source
        if self.domain_regex:
            return "regex"
        folders = {path.relative_to(self.root).parts[0] for path in self.image_paths if path.parent != self.root}
        return "folders" if len(folders) >= 2 else "clusters"

    def _assign_domains_from_names(self) -> None:
        """Folder and regex domains need no pixels, so they are known at construction (for CLI linking)."""
        source = self._resolved_source()
        if source == "folders":
            names = [
                path.relative_to(self.root).parts[0] if path.parent != self.root else "." for path in self.image_paths
            ]
        elif source == "regex":
            if not self.domain_regex:
                msg = "domain_source='regex' needs domain_regex"
                raise ValueError(msg)
            pattern = re.compile(self.domain_regex)
            names = []
            for path in self.image_paths:
                match = pattern.search(path.name)
                if match is None:
                    msg = f"domain_regex '{self.domain_regex}' does not match file name '{path}'"
                    raise ValueError(msg)
                names.append(match.group(1) if match.groups() else match.group(0))
        else:
            return
        self.domain_names = sorted(set(names))
        if self.requested_num_domains is not None and self.requested_num_domains != len(self.domain_names):
            msg = (
                f"num_domains={self.requested_num_domains} but {source} give {len(self.domain_names)} domains "
                f"({', '.join(self.domain_names)}); drop num_domains or fix the data"
            )
            raise ValueError(msg)
        self._domains = np.array([self.domain_names.index(name) for name in names], dtype=np.int64)

    @property
    def num_domains(self) -> int:
        if self.domain_names:
            return len(self.domain_names)
        return self.requested_num_domains or 3

    def _load(self) -> None:
        if self._images is not None:
            return
        logger.info("HistAuGAN: loading %d images from %s at %d px", len(self.image_paths), self.root, self.image_size)
        self._images = np.stack([load_image(path, self.image_size) for path in self.image_paths])
        if self._domains is None:
            clusters = self.num_domains
            self._domains = kmeans(colour_statistics(self._images), clusters, seed=self.seed)
            self.domain_names = [f"cluster{index}" for index in range(clusters)]
        counts = np.bincount(self._domains, minlength=self.num_domains)
        rank_zero_info(f"HistAuGAN domains (images each): {dict(zip(self.domain_names, counts.tolist(), strict=True))}")

    @property
    def images(self) -> np.ndarray:
        """All training images, (N, H, W, 3) uint8 RGB."""
        self._load()
        assert self._images is not None
        return self._images

    @property
    def domains(self) -> np.ndarray:
        self._load()
        assert self._domains is not None
        return self._domains

    def setup(self, stage: str | None = None) -> None:
        del stage
        self.train_dataset = DomainImageDataset(self.images, self.domains, flip=self.flip)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup()
        return DataLoader(
            self.train_dataset,
            batch_size=min(self.batch_size, len(self.train_dataset)),
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
