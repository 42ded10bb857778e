"""Datamodules, synthetic datasets and the checks of what they read. Knows no model: models import from here.

- ``dice``: the ``Dice`` datamodule; ``class_folders``: a normal image's class from its ``good/<class>/`` folder
- ``synthetic``: MVTec- and dice-layout datasets with planted defects; ``duplicates``: byte-identical copies
- ``validation``: checks of image files, folders, masks and dataset layouts (``python -m`` lists every bad file)
- ``datamodule_checks``: the check each datamodule gets (its folders' existence first, before anomalib could
  download into a wrong root), the exit on bad data, the ``CheckData`` callback
- ``seeded_split``: synthetic validation anomalies drawn from the datamodule's seed alone
"""

from .class_folders import NORMAL_DIR, class_from_path
from .datamodule_checks import CheckData, check_data_paths, checked_datamodule, exit_on_bad_data
from .dice import Dice
from .synthetic import make_dice_dataset, make_mvtec_dataset
from .validation import (
    DataValidationError,
    check_dice_layout,
    check_image_file,
    check_image_folder,
    check_mask,
    check_mvtec_layout,
    read_rgb,
)

__all__ = [
    "NORMAL_DIR",
    "CheckData",
    "DataValidationError",
    "Dice",
    "check_data_paths",
    "check_dice_layout",
    "check_image_file",
    "check_image_folder",
    "check_mask",
    "check_mvtec_layout",
    "checked_datamodule",
    "class_from_path",
    "exit_on_bad_data",
    "make_dice_dataset",
    "make_mvtec_dataset",
    "read_rgb",
]
