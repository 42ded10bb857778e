"""Datamodules and synthetic datasets."""

from .dice import Dice
from .synthetic import make_dice_dataset, make_mvtec_dataset
from .validation import (
    DataValidationError,
    check_dice_layout,
    check_image_file,
    check_image_folder,
    check_mask,
    check_mvtec_layout,
    checked_datamodule,
    read_rgb,
)

__all__ = [
    "DataValidationError",
    "Dice",
    "check_dice_layout",
    "check_image_file",
    "check_image_folder",
    "check_mask",
    "check_mvtec_layout",
    "checked_datamodule",
    "make_dice_dataset",
    "make_mvtec_dataset",
    "read_rgb",
]
