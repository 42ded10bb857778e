"""The Faktion dice layout as an anomalib datamodule.

Layout (class folders optional everywhere)::

    root/train/good/<class>/*.png     normal images, the folder name is the class ("00".."10")
    root/val/<anomaly>/*              optional: anomalies reserved for validation (threshold choice)
    root/test/good[/<class>]/*        optional: normal test images
    root/test/<defect>/*              optional: anomalous test images
    root/ground_truth/<defect>/<name>_mask.png   optional masks for test anomalies

How the class label reaches a model: anomalib's ``ImageItem``/``ImageBatch`` have fixed fields, so the class
travels in the one field that already identifies a sample, ``image_path``: a training image stored at
``.../good/<class>/<name>`` has class ``<class>`` (``class_from_path``). A flat ``train/good/`` means no
classes. The samples table also carries ``class_name`` and ``session`` columns for analysis.

Splits (the test split never picks a threshold):

* validation = the ``val/`` anomalies plus a seeded, class-stratified ``val_split_ratio`` of train normals;
  without ``val/``, anomalib's synthetic validation (held-out normals + generated anomalies).
* test = ``test/`` when it exists. The real dataset ships without its test split, so otherwise the test split
  is built from held-out data: normals of ``holdout_sessions`` (acquisition dates in the file names; a
  cross-session test), or a ``test_split_ratio`` of the normals when no session is given, plus a seeded
  ``test_split_ratio`` of the ``val/`` anomalies (stratified by file type, because most real anomalies are
  JPEG while every normal is PNG).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from anomalib import TaskType
from anomalib.data.datamodules.base.image import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import LabelName, TestSplitMode, ValSplitMode
from torchvision.transforms.v2 import Transform

from .class_folders import NORMAL_DIR, class_from_path
from .duplicates import without_copies_of
from .validation.files import IMAGE_SUFFIXES
from .validation.layouts import check_dice_layout

_SESSION = re.compile(r"(?<!\d)([0-3]\d_[01]\d_2\d)(?!\d)")  # dd_mm_yy, e.g. 16_09_21
# The dice protocol (the benchmark's and the configs'): a plant's data shifts by acquisition session, so the test
# normals are half of the two darker sessions (per class, seeded); the other half stays for training and validation,
# which is how the set's own test split is drawn (mostly from these sessions, their other images in train).
HOLDOUT_SESSIONS: tuple[str, ...] = ("16_09_21", "17_11_21")
HOLDOUT_FRACTION = 0.5


def session_from_path(image_path: str | Path) -> str:
    """Acquisition date (``dd_mm_yy``) in a dice file name, or ``""``."""
    match = _SESSION.search(Path(image_path).name)
    return match.group(1) if match else ""


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _rows(paths: list[Path], split: str, label: str, label_index: int, root: Path) -> list[dict]:
    rows = []
    for path in paths:
        mask_path = ""
        if label_index == LabelName.ABNORMAL:
            candidate = root / "ground_truth" / label / f"{path.stem}_mask.png"
            mask_path = str(candidate) if candidate.is_file() else ""
        rows.append(
            {
                "image_path": str(path),
                "label": label,
                "label_index": label_index,
                "mask_path": mask_path,
                "split": split,
                "class_name": class_from_path(path) or "",
                "session": session_from_path(path),
            }
        )
    return rows


def make_dice_samples(root: str | Path) -> pd.DataFrame:
    """Every image under ``root`` as one table, ``split`` in {train, val, test}; raises on a bad layout."""
    root = Path(root)
    train_dir = root / "train" / NORMAL_DIR
    if not train_dir.is_dir():
        msg = f"Dice root '{root}' has no '{train_dir.relative_to(root)}' folder (expected root/train/good/<class>/)"
        raise FileNotFoundError(msg)
    rows = _rows(_images_under(train_dir), "train", NORMAL_DIR, LabelName.NORMAL, root)
    if not rows:
        msg = f"no images under '{train_dir}' (looked for {', '.join(IMAGE_SUFFIXES)})"
        raise FileNotFoundError(msg)
    for split in ("val", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            is_normal = folder.name == NORMAL_DIR
            label_index = LabelName.NORMAL if is_normal else LabelName.ABNORMAL
            rows += _rows(_images_under(folder), split, folder.name, label_index, root)
    samples = pd.DataFrame(rows)
    samples["label_index"] = samples["label_index"].astype("Int64")
    return samples


def _seeded_fraction(samples: pd.DataFrame, fraction: float, by: str, seed: int | None) -> pd.Index:
    """Index of a random ``fraction`` of ``samples``, stratified by column ``by`` (at least one per group)."""
    rng = np.random.default_rng(seed)
    picked: list = []
    for _, group in samples.groupby(by, sort=True):
        count = round(len(group) * fraction)
        if fraction > 0 and len(group) > 1:
            count = min(max(count, 1), len(group) - 1)
        picked += list(rng.choice(group.index.to_numpy(), size=count, replace=False))
    return pd.Index(sorted(picked))


def _without_copies(train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Drop train and val images that are byte-identical copies of test images, and train copies of val images.

    The real set repeats 457 images across two sessions (see ``duplicates``); seeded fractions split each copy
    independently, so a "held-out" test normal could have its twin in train.
    """
    val = val[val.image_path.isin(without_copies_of(list(val.image_path), test.image_path, "validation"))]
    held = [*test.image_path, *val.image_path]
    train = train[train.image_path.isin(without_copies_of(list(train.image_path), held, "training"))]
    return train, val


class DiceDataset(AnomalibDataset):
    """One split of the dice layout; ``samples`` must follow ``make_dice_samples``' columns."""

    def __init__(self, samples: pd.DataFrame, split: str, augmentations: Transform | None = None) -> None:
        super().__init__(augmentations=augmentations)
        self.split = split
        samples = samples.reset_index(drop=True).copy()
        anomalous = samples[samples.label_index == LabelName.ABNORMAL]
        has_masks = len(anomalous) > 0 and (anomalous.mask_path != "").all()
        samples.attrs["task"] = TaskType.SEGMENTATION if has_masks else TaskType.CLASSIFICATION
        self.samples = samples


class Dice(AnomalibDataModule):
    """Faktion dice datamodule (see the module docstring for layout and splits).

    Args:
        root: dataset folder (``../shared/data/dice`` for the real set).
        train_batch_size, eval_batch_size, num_workers: as in anomalib's datamodules.
        val_split_ratio: fraction of train normals (per class) moved to validation when ``val/`` exists.
        test_split_ratio: without ``test/``: fraction of ``val/`` anomalies (and of normals, if no
            ``holdout_sessions``) moved to the test split.
        holdout_sessions: without ``test/``: acquisition dates whose normals form the test normals (default:
            the two darker sessions of the real set, ``HOLDOUT_SESSIONS``; ``[]`` = a random ``test_split_ratio``).
        holdout_fraction: share (per class, seeded) of those sessions' normals moved to test; 1.0 = a strict
            cross-session test, below 1 the rest of those sessions stays in train/validation (default 0.5).
        val_sessions: acquisition dates whose training-pool normals provide the validation normals (a seeded,
            class-stratified ``val_split_ratio`` share of those sessions' normals); empty = every session.
            Validating on the sessions a plant will shift to puts the threshold where test normals will be.
        train_sessions: acquisition dates whose normals the model may train on (empty = every session); the others
            are dropped from training after validation and test were taken out, e.g. to train on the bright
            sessions only and test on the dark ones (``tools/benchmark.py --study lighting``).
        max_train_per_class: keep at most this many training normals per class (seeded; ``None`` = all), to
            bound the fit time of slow models. Applied after validation and test were taken out.
        val_split_mode: ``None`` picks ``from_dir`` when ``val/`` exists, else ``synthetic``.
        seed: seed of every random split.
        train_augmentations, val_augmentations, test_augmentations, augmentations: as in anomalib.
    """

    def __init__(
        self,
        root: str | Path = "./datasets/dice",
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        val_split_ratio: float = 0.2,
        test_split_ratio: float = 0.5,
        holdout_sessions: Sequence[str] = HOLDOUT_SESSIONS,
        holdout_fraction: float = HOLDOUT_FRACTION,
        val_sessions: Sequence[str] = (),
        train_sessions: Sequence[str] = (),
        max_train_per_class: int | None = None,
        val_split_mode: ValSplitMode | str | None = None,
        seed: int | None = 0,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
    ) -> None:
        for name, ratio in (("val_split_ratio", val_split_ratio), ("test_split_ratio", test_split_ratio)):
            if not 0.0 <= ratio < 1.0:
                msg = f"Dice: {name} must be in [0, 1), got {ratio}"
                raise ValueError(msg)
        self.root = Path(root)
        if val_split_mode is None:
            val_split_mode = ValSplitMode.FROM_DIR if (self.root / "val").is_dir() else ValSplitMode.SYNTHETIC
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            test_split_mode=TestSplitMode.FROM_DIR,
            test_split_ratio=test_split_ratio,
            seed=seed,
        )
        self.val_split_ratio = val_split_ratio  # the base class turns 0 into 0.5
        self.test_split_ratio = test_split_ratio
        self.holdout_sessions = tuple(holdout_sessions)
        if not 0.0 < holdout_fraction <= 1.0:
            msg = f"Dice: holdout_fraction must be in (0, 1], got {holdout_fraction}"
            raise ValueError(msg)
        self.holdout_fraction = holdout_fraction
        session_lists = (
            ("holdout_sessions", holdout_sessions),
            ("val_sessions", val_sessions),
            ("train_sessions", train_sessions),
        )
        for name, sessions in session_lists:
            if isinstance(sessions, str) or not all(isinstance(s, str) and _SESSION.fullmatch(s) for s in sessions):
                msg = f"Dice: {name} must be a list of dd_mm_yy dates like ['16_09_21'], got {sessions!r}"
                raise ValueError(msg)
        self.val_sessions = tuple(val_sessions)
        self.train_sessions = tuple(train_sessions)
        if max_train_per_class is not None and (isinstance(max_train_per_class, bool) or max_train_per_class < 1):
            msg = f"Dice: max_train_per_class must be a positive integer or None, got {max_train_per_class!r}"
            raise ValueError(msg)
        self.max_train_per_class = max_train_per_class

    @property
    def name(self) -> str:
        return "dice"

    @property
    def category(self) -> str:
        return "dice"

    @category.setter
    def category(self, category: str) -> None:  # anomalib sets it from configs; the dice set has one
        del category

    def split_samples(self) -> dict[str, pd.DataFrame]:
        """The train/val/test tables this datamodule uses (val is empty unless ``val/`` drives validation)."""
        samples = make_dice_samples(self.root)
        train = samples[samples.split == "train"]
        val_anomalies = samples[(samples.split == "val") & (samples.label_index == LabelName.ABNORMAL)]
        test = samples[samples.split == "test"]
        if test.empty:  # the real set ships without its test split: hold data out
            if self.holdout_sessions:
                held = train[train.session.isin(self.holdout_sessions)]
                if held.empty:
                    msg = f"Dice: no train image of holdout_sessions {self.holdout_sessions} under '{self.root}'"
                    raise ValueError(msg)
                held_index = held.index
                if self.holdout_fraction < 1.0:
                    held_index = _seeded_fraction(held, self.holdout_fraction, "class_name", self.seed)
            else:
                held_index = _seeded_fraction(train, self.test_split_ratio, "class_name", self.seed)
            held_normals = train.loc[held_index]
            train = train.drop(held_index)
            anomaly_kind = val_anomalies.image_path.str.lower().str.rsplit(".", n=1).str[-1]
            test_anomaly_index = _seeded_fraction(
                val_anomalies.assign(kind=anomaly_kind), self.test_split_ratio, "kind", self.seed
            )
            test = pd.concat([held_normals, val_anomalies.loc[test_anomaly_index]])
            val_anomalies = val_anomalies.drop(test_anomaly_index)
        if test.empty:
            msg = f"Dice: nothing to test under '{self.root}': add root/test/ or set test_split_ratio > 0"
            raise ValueError(msg)
        val = train.iloc[0:0]
        if self.val_split_mode == ValSplitMode.FROM_DIR:
            if val_anomalies.empty:
                msg = f"Dice: val_split_mode 'from_dir' needs anomalies under '{self.root / 'val'}'"
                raise ValueError(msg)
            pool = train[train.session.isin(self.val_sessions)] if self.val_sessions else train
            if pool.empty:
                msg = f"Dice: no training-pool normal of val_sessions {self.val_sessions} under '{self.root}'"
                raise ValueError(msg)
            val_normal_index = _seeded_fraction(pool, self.val_split_ratio, "class_name", self.seed)
            val = pd.concat([train.loc[val_normal_index], val_anomalies])
            train = train.drop(val_normal_index)
        elif self.val_sessions:
            msg = "Dice: val_sessions needs validation from the data (val/ anomalies, val_split_mode 'from_dir')"
            raise ValueError(msg)
        train, val = _without_copies(train, val, test)
        if self.train_sessions:
            train = train[train.session.isin(self.train_sessions)]
            if train.empty:
                msg = f"Dice: no training normal of train_sessions {self.train_sessions} under '{self.root}'"
                raise ValueError(msg)
        if self.max_train_per_class is not None:
            rng = np.random.default_rng(self.seed)
            keep = [
                index
                for _, group in train.groupby("class_name", sort=True)
                for index in sorted(rng.permutation(group.index.to_numpy())[: self.max_train_per_class])
            ]
            train = train.loc[sorted(keep)]
        return {"train": train, "val": val, "test": test}

    def _setup(self, _stage: str | None = None) -> None:
        # fail early, naming every bad file, instead of anomalib's "image file is truncated" mid-epoch
        check_dice_layout(self.root)
        tables = self.split_samples()
        self.train_data = DiceDataset(tables["train"], "train")
        self.test_data = DiceDataset(tables["test"], "test")
        if self.val_split_mode == ValSplitMode.FROM_DIR:
            self.val_data = DiceDataset(tables["val"], "val")
