"""Augmentations that learn from the training data (HistAuGAN)."""

from .histaugan import HistAuGAN, HistAuGANAugment, HistAuGANDataModule

__all__ = ["HistAuGAN", "HistAuGANAugment", "HistAuGANDataModule"]
