"""Input checks shared by datamodules and tools: fail early, name every bad file and say why.

- ``files``: one image file, one folder of images, one mask (``DataValidationError``, ``read_rgb``);
- ``layouts``: the MVTec AD, dice and ``Folder`` layouts, every problem of a dataset in one error (and
  ``check_*_paths``: only that the root and category folders exist, reading no file);
- ``python -m anomalib_ext.data.validation ROOT [--category C | --dice]`` lists every bad file (``__main__``).

Which check a datamodule gets, the exit policy of training entry points and the ``CheckData`` callback live in
``anomalib_ext.data.datamodule_checks``, beside the datamodules they dispatch on.

Typical use::

    from anomalib_ext.data.validation import check_mvtec_layout
    check_mvtec_layout("datasets/mvtec", "bottle")
"""

from .files import (
    IMAGE_SUFFIXES,
    DataValidationError,
    ImageInfo,
    check_image_file,
    check_image_folder,
    check_mask,
    read_rgb,
)
from .layouts import (
    check_dice_layout,
    check_dice_paths,
    check_folder_datamodule,
    check_folder_paths,
    check_mvtec_layout,
    check_mvtec_paths,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "DataValidationError",
    "ImageInfo",
    "check_dice_layout",
    "check_dice_paths",
    "check_folder_datamodule",
    "check_folder_paths",
    "check_image_file",
    "check_image_folder",
    "check_mask",
    "check_mvtec_layout",
    "check_mvtec_paths",
    "read_rgb",
]
