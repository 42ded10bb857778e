"""Training data for HistAuGAN: a folder of normal images, each assigned to a domain.

A domain is whatever should become a "style" the GAN can re-render into: a sub-folder (scanner, session,
stain), a group captured by a regular expression on the file name (the dice set encodes the acquisition
session there), or, when the data carry no such label, a k-means cluster of colour and brightness
statistics. Images are decoded once, resized and kept in memory as uint8 (small at 64-128 px).

Training draws a domain uniformly, then an image within it (``domain_balanced``), as the original HistAuGAN
does: sampling images instead lets the biggest domains own the generator (on dice, the two dark sessions are
a fifth of the images, and a 10-minute generator rendered them 3-5 grey levels where the real gap is 12).
A few images per domain (``check_images``) are held out of training for the style check run after fit.
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
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

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
        seed: seed for the subset, the clustering, the held-out check images and the domain sampler.
        domain_balanced: draw each training sample's domain uniformly, then an image within it (weight
            ``1 / |domain|`` per image, with replacement; an epoch is still one draw per training image).
            ``False`` samples images uniformly, so each domain is seen in proportion to its size.
        check_images: images per domain held out of training for the style check after fit. They come first
            from the images ``max_images`` leaves out (domains from folders or file names), so the training set
            stays whole; the rest from the loaded images, at most a quarter of a domain, so small domains keep
            most of theirs. 0 holds none out and the check re-renders training images.
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
        domain_balanced: bool = True,
        check_images: int = 16,
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
        self.domain_balanced = domain_balanced
        if check_images < 0:
            msg = f"check_images must be >= 0, got {check_images}"
            raise ValueError(msg)
        self.check_images = check_images
        self._check_mask: np.ndarray | None = None
        self.spare_paths: list[Path] = []  # images max_images leaves out: the first source of check images
        self.check_paths: list[Path] = []  # of those, the ones held for the style check (loaded after image_paths)
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
            kept = set(keep.tolist())
            self.spare_paths = [path for index, path in enumerate(paths) if index not in kept]
            paths = [paths[index] for index in sorted(keep)]
        return paths

    def _resolved_source(self) -> str:
        if self.domain_source != "auto":
            return self.domain_source
        if self.domain_regex:
            return "regex"
        folders = {path.relative_to(self.root).parts[0] for path in self.image_paths if path.parent != self.root}
        return "folders" if len(folders) >= 2 else "clusters"

    def _names(self, source: str, paths: list[Path]) -> list[str]:
        if source == "folders":
            return [path.relative_to(self.root).parts[0] if path.parent != self.root else "." for path in paths]
        if not self.domain_regex:
            msg = "domain_source='regex' needs domain_regex"
            raise ValueError(msg)
        pattern = re.compile(self.domain_regex)
        names = []
        for path in paths:
            match = pattern.search(path.name)
            if match is None:
                msg = f"domain_regex '{self.domain_regex}' does not match file name '{path}'"
                raise ValueError(msg)
            names.append(match.group(1) if match.groups() else match.group(0))
        return names

    def _assign_domains_from_names(self) -> None:
        """Folder and regex domains need no pixels, so they are known at construction (for CLI linking)."""
        source = self._resolved_source()
        if source not in ("folders", "regex"):
            return
        names = self._names(source, self.image_paths)
        self.domain_names = sorted(set(names))
        if self.requested_num_domains is not None and self.requested_num_domains != len(self.domain_names):
            msg = (
                f"num_domains={self.requested_num_domains} but {source} give {len(self.domain_names)} domains "
                f"({', '.join(self.domain_names)}); drop num_domains or fix the data"
            )
            raise ValueError(msg)
        self._domains = np.array([self.domain_names.index(name) for name in names], dtype=np.int64)
        if self.spare_paths and self.check_images:  # check images from outside the training cap, per domain
            spare_names = self._names(source, self.spare_paths)
            rng = np.random.default_rng(self.seed + 1)
            held_domains = []
            for domain, name in enumerate(self.domain_names):
                candidates = [path for path, other in zip(self.spare_paths, spare_names, strict=True) if other == name]
                count = min(self.check_images, len(candidates))
                for index in sorted(rng.choice(len(candidates), count, replace=False).tolist()):
                    self.check_paths.append(candidates[index])
                    held_domains.append(domain)
            self._domains = np.concatenate([self._domains, np.array(held_domains, dtype=np.int64)])

    @property
    def num_domains(self) -> int:
        if self.domain_names:
            return len(self.domain_names)
        return self.requested_num_domains or 3

    def _load(self) -> None:
        if self._images is not None:
            return
        paths = self.image_paths + self.check_paths
        logger.info("HistAuGAN: loading %d images from %s at %d px", len(paths), self.root, self.image_size)
        self._images = np.stack([load_image(path, self.image_size) for path in paths])
        if self._domains is None:
            clusters = self.num_domains
            self._domains = kmeans(colour_statistics(self._images), clusters, seed=self.seed)
            self.domain_names = [f"cluster{index}" for index in range(clusters)]
        counts = np.bincount(self._domains, minlength=self.num_domains)
        loaded = dict(zip(self.domain_names, counts.tolist(), strict=True))
        rank_zero_info(f"HistAuGAN domains (images loaded each, check images included): {loaded}")

    @property
    def images(self) -> np.ndarray:
        """Every image (training, then the check images from outside the cap), (N, H, W, 3) uint8 RGB."""
        self._load()
        assert self._images is not None
        return self._images

    @property
    def domains(self) -> np.ndarray:
        self._load()
        assert self._domains is not None
        return self._domains

    @property
    def check_mask(self) -> np.ndarray:
        """True for the images held out of training for the style check (seeded, per domain)."""
        if self._check_mask is None:
            domains = self.domains
            rng = np.random.default_rng(self.seed + 2)
            mask = np.zeros(len(domains), dtype=bool)
            mask[len(self.image_paths) :] = True  # the spare images held at construction
            for domain in range(self.num_domains):
                members = np.flatnonzero((domains == domain) & ~mask)
                needed = self.check_images - int(((domains == domain) & mask).sum())
                held = max(0, min(needed, len(members) // 4))
                mask[rng.choice(members, held, replace=False)] = True
            self._check_mask = mask
        return self._check_mask

    def domain_sampler(self, train_domains: np.ndarray) -> WeightedRandomSampler:
        """Domain first, then image: each image weighs ``1 / |its domain|``, so every domain is drawn equally."""
        counts = np.bincount(train_domains, minlength=self.num_domains)
        weights = torch.from_numpy(1.0 / counts[train_domains]).double()
        generator = torch.Generator().manual_seed(self.seed)
        return WeightedRandomSampler(weights, num_samples=len(train_domains), replacement=True, generator=generator)

    def setup(self, stage: str | None = None) -> None:
        del stage
        train = ~self.check_mask
        self.train_dataset = DomainImageDataset(self.images[train], self.domains[train], flip=self.flip)
        held = np.bincount(self.domains[~train], minlength=self.num_domains).tolist()
        sampling = "a domain drawn uniformly, then an image" if self.domain_balanced else "images drawn uniformly"
        rank_zero_info(
            f"HistAuGAN: {int(train.sum())} training images ({sampling}); held out for the style check: "
            f"{dict(zip(self.domain_names, held, strict=True))}"
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup()
        assert self.train_dataset is not None
        sampler = self.domain_sampler(self.train_dataset.domains.numpy()) if self.domain_balanced else None
        return DataLoader(
            self.train_dataset,
            batch_size=min(self.batch_size, len(self.train_dataset)),
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
