"""Which files a datamodule reads, checked before training: the layout check per datamodule class, the one-line
exit of training entry points, and ``CheckData``, a Lightning callback for configs of anomalib's own models.

Typical use::

    from anomalib_ext.data.datamodule_checks import checked_datamodule
    datamodule = checked_datamodule(MVTecAD(root="datasets/mvtec", category="bottle"))

or, in an ``anomalib train --config`` file, a callback that checks the datamodule's folders at ``setup``::

    trainer:
      callbacks:
        - class_path: anomalib_ext.data.datamodule_checks.CheckData

anomalib-ext's own models need neither: they check that the datamodule's folders exist in ``configure_callbacks``
(``check_data_paths``; before the datamodule's ``prepare_data``, where anomalib's ``MVTecAD`` downloads into a missing
root) and read every file in ``prepare_data``, before the datamodule's ``setup`` decodes a single image
(``check_data=False`` turns both off).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from anomalib.data import Folder, MVTecAD, MVTecLOCO, Visa
from lightning.pytorch import Callback, LightningModule, Trainer

from .dice import Dice
from .validation.files import DataValidationError
from .validation.layouts import (
    check_dice_layout,
    check_dice_paths,
    check_folder_datamodule,
    check_folder_paths,
    check_mvtec_layout,
    check_mvtec_paths,
)

# datamodules that read ``root/category`` in MVTec AD layout
MVTEC_LAYOUT_DATAMODULES = (MVTecAD, Visa, MVTecLOCO)


def checked_datamodule(datamodule: Any, **kwargs: Any) -> Any:  # noqa: ANN401
    """Validate the folders of an anomalib datamodule (MVTecAD, Visa, MVTecLOCO, Folder, our Dice) and return it
    unchanged.

    Call before ``Engine.fit``/``test``; ``kwargs`` go to the layout check (e.g. ``min_size``; a ``Folder`` takes
    none). A datamodule of another class is returned unchecked.
    """
    if isinstance(datamodule, MVTEC_LAYOUT_DATAMODULES):
        check_mvtec_layout(datamodule.root, datamodule.category, **kwargs)
    elif isinstance(datamodule, Dice):
        check_dice_layout(datamodule.root, **kwargs)
    elif isinstance(datamodule, Folder):
        check_folder_datamodule(datamodule)
    return datamodule


def check_data_paths(datamodule: Any) -> None:  # noqa: ANN401
    """Existence only (reads no file): the folders ``datamodule`` reads are there; else one error naming the path.

    Meant for before the datamodule's ``prepare_data``: anomalib's ``MVTecAD`` and ``Visa`` download the public
    dataset into a root that lacks the category folder, so a wrong ``root`` or a misspelt ``category`` would
    otherwise start a download (and, offline, end in a long ``URLError`` traceback). A datamodule of another class
    passes unchecked.
    """
    if isinstance(datamodule, Visa):  # processed (visa_pytorch/<category>) or raw (<category>) layout
        if not (Path(datamodule.split_root) / datamodule.category).is_dir():
            check_mvtec_paths(datamodule.root, datamodule.category)
    elif isinstance(datamodule, MVTEC_LAYOUT_DATAMODULES):
        check_mvtec_paths(datamodule.root, datamodule.category)
    elif isinstance(datamodule, Dice):
        check_dice_paths(datamodule.root)
    elif isinstance(datamodule, Folder):
        check_folder_paths(datamodule)


def listing_command(datamodule: Any) -> str:  # noqa: ANN401
    """The command that lists every problem of ``datamodule``'s folders (for one-line error summaries)."""
    root = getattr(datamodule, "root", None)
    if isinstance(datamodule, Dice):
        return f"python -m anomalib_ext.data.validation {root} --dice"
    if isinstance(datamodule, MVTEC_LAYOUT_DATAMODULES):
        return f"python -m anomalib_ext.data.validation {root} --category {datamodule.category}"
    return f"python -m anomalib_ext.data.validation {root}" if root is not None else ""


def exit_on_bad_data(datamodule: Any, paths_only: bool = False, **kwargs: Any) -> None:  # noqa: ANN401
    """Check ``datamodule``'s files before training; on a problem print one line and exit with status 2.

    For training entry points (``anomalib train``): a zero-byte or truncated image otherwise surfaces minutes later
    as a long traceback from inside a dataloader worker, often without the file's name. ``paths_only`` checks only
    that its folders exist (``check_data_paths``: no file is read), for before the datamodule's ``prepare_data``.
    """
    try:
        if paths_only:
            check_data_paths(datamodule)
        else:
            checked_datamodule(datamodule, **kwargs)
    except DataValidationError as error:
        print(f"error: {error.first_problem(listing_command(datamodule))}", file=sys.stderr)  # noqa: T201
        raise SystemExit(2) from None


class CheckData(Callback):
    """``checked_datamodule(trainer.datamodule)`` once per datamodule, at ``setup`` of fit/test/predict.

    ``kwargs`` go to the layout check (e.g. ``min_size``). Lightning sets the datamodule up before any callback's
    ``setup``, so a file that the datamodule's own ``setup`` decodes (anomalib's synthetic validation anomalies)
    fails there first; our models check in ``prepare_data`` instead.
    """

    def __init__(self, **kwargs: Any) -> None:  # noqa: ANN401
        self.kwargs = kwargs
        self._checked: set[int] = set()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        del pl_module, stage
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and id(datamodule) not in self._checked:
            checked_datamodule(datamodule, **self.kwargs)
            self._checked.add(id(datamodule))
