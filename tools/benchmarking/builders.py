"""Building what a benchmark cell runs: the model from its spec and the datamodule from the dataset spec.

The one model builder of ``tools/``: the benchmark's cells, ``tools/train.py`` and ``tools/demo.py`` all build
their models here, with the offline backbone weights in place. anomalib and torch are imported inside the
builders, so the benchmark's parent process can read ``DATASET_OPTIONS`` without loading them.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any


def import_class(class_path: str) -> type:
    """Import ``package.module.Class``; a bare class name is looked up in anomalib and anomalib_ext models."""
    if "." in class_path:
        module_name, _, class_name = class_path.rpartition(".")
        modules = [module_name]
    else:
        class_name, modules = class_path, ["anomalib.models", "anomalib_ext.models"]
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, class_name):
            return getattr(module, class_name)
    msg = f"model class '{class_path}' not found (looked in {modules})"
    raise ImportError(msg)


def instantiate(value: Any) -> Any:
    """Build nested ``{class_path, init_args}`` mappings (anomalib CLI style) into objects."""
    if isinstance(value, dict) and "class_path" in value:
        cls = import_class(value["class_path"])
        return cls(**{key: instantiate(item) for key, item in (value.get("init_args") or {}).items()})
    if isinstance(value, list):
        return [instantiate(item) for item in value]
    if isinstance(value, dict):
        return {key: instantiate(item) for key, item in value.items()}
    return value


def build_model(  # noqa: ANN201
    model_spec: dict[str, Any], image_size: int | None = None, seed: int | None = None, data_checked: bool = False
):
    """The one model builder (benchmark, ``tools/train.py``, ``tools/demo.py``).

    ``model_spec`` holds ``class_path`` and ``init_args`` (nested ``{class_path, init_args}`` are built too).
    With ``image_size`` set the model gets a pre-processor resizing to that size; with ``seed`` set it reaches
    the model's own ``seed`` argument (TemplateSsim's and TileOutlier's samplers) unless the spec sets one.
    ``data_checked``: the caller already read every file of the data, so our models skip their own check.
    """
    import anomalib_ext  # noqa: F401  (registers our models with anomalib)
    from anomalib_ext.weights import ensure_pretrained

    init_args = instantiate(dict(model_spec.get("init_args") or {}))
    backbone = init_args.get("backbone")
    if isinstance(backbone, str) and backbone.startswith("tf_efficientnet_lite"):
        ensure_pretrained(backbone)
    else:
        ensure_pretrained("tf_efficientnet_lite0")
    cls = import_class(model_spec["class_path"])
    parameters = inspect.signature(cls.__init__).parameters
    if image_size and "pre_processor" not in init_args:
        if "image_size" in parameters:
            init_args["image_size"] = (image_size, image_size)  # the model builds its own resize
        else:
            init_args["pre_processor"] = cls.configure_pre_processor(image_size=(image_size, image_size))
    if seed is not None and "seed" in parameters and "seed" not in init_args:
        init_args["seed"] = seed
    if data_checked and "check_data" in parameters and "check_data" not in init_args:
        init_args["check_data"] = False  # the caller read every file already: no second pass per model
    return cls(**init_args)


# options a dice-layout --dataset may set: Dice's split arguments (the seed comes from --seed / --seeds)
DICE_OPTIONS = (
    "holdout_sessions",
    "holdout_fraction",
    "val_sessions",
    "train_sessions",
    "val_split_ratio",
    "test_split_ratio",
    "max_train_per_class",
)
DATASET_OPTIONS = {"mvtec": ("image_size", "val_split_ratio"), "folder": ("image_size", "val_split_ratio")}
DATASET_OPTIONS.update(dice=("image_size", *DICE_OPTIONS), split=("image_size",))


def build_dice(path: Path, options: dict[str, Any], seed: int, **common: Any):  # noqa: ANN201
    """``anomalib_ext.data.Dice``: its own protocol (``Dice``'s defaults) unless the dataset options change it."""
    from anomalib_ext.data import Dice

    dice_options = {key: value for key, value in options.items() if key in DICE_OPTIONS}
    return Dice(root=path, seed=seed, **dice_options, **common)


def build_datamodule(dataset: dict[str, Any], seed: int, batch_size: int, val_split: str = "synthetic"):  # noqa: ANN201
    """A datamodule whose validation set never contains a test image, unless ``val_split`` is ``same_as_test``.

    ``synthetic``: MVTec/folder hold out ``val_split_ratio`` of the normals and turn half into synthetic
    anomalies; dice uses ``Dice``'s own validation (normals + ``val/`` anomalies). ``same_as_test`` is anomalib's
    MVTecAD default, where the thresholds are picked on the test images (not a fair F1; for comparisons only).
    """
    from anomalib.data import Folder, MVTecAD
    from anomalib.data.utils import ValSplitMode

    path = Path(dataset["path"])
    options = dataset["options"]
    common = {"train_batch_size": batch_size, "eval_batch_size": batch_size, "num_workers": 0}
    same_as_test = val_split == "same_as_test"
    mode = ValSplitMode.SAME_AS_TEST if same_as_test else ValSplitMode.SYNTHETIC
    val_ratio = float(options.get("val_split_ratio", 0.2))
    if dataset["kind"] == "dice":
        return build_dice(
            path, options, seed, val_split_mode=ValSplitMode.SAME_AS_TEST if same_as_test else None, **common
        )
    if dataset["kind"] == "mvtec":
        return MVTecAD(
            root=path.parent, category=path.name, val_split_mode=mode, val_split_ratio=val_ratio, seed=seed, **common
        )
    if dataset["kind"] == "folder":

        def first_dir(names: tuple[str, ...]) -> str | None:
            return next((name for name in names if (path / name).is_dir()), None)

        return Folder(
            name=dataset["label"],
            root=path,
            normal_dir=first_dir(("good", "normal")),
            abnormal_dir=first_dir(("bad", "abnormal", "anomalous", "defect")),
            mask_dir=first_dir(("mask", "masks", "ground_truth")),
            val_split_mode=mode,
            val_split_ratio=val_ratio,
            seed=seed,
            **common,
        )
    if dataset["kind"] == "split":
        return make_split_datamodule(dataset["label"], path, {**common, "seed": seed}, same_as_test)
    msg = f"dataset '{dataset['label']}': kind '{dataset['kind']}' has no datamodule"
    raise ValueError(msg)


def make_split_datamodule(name: str, root: Path, common: dict[str, Any], same_as_test: bool = False):  # noqa: ANN201
    """Folder datamodule over explicit ``train/good``, ``val/{good,anomalous}``, ``test/{good,anomalous}``."""
    from anomalib.data import Folder
    from anomalib.data.datasets.image.folder import FolderDataset
    from anomalib.data.utils import Split, TestSplitMode, ValSplitMode

    class ExplicitSplitFolder(Folder):
        """anomalib's Folder, but validation and test come from their own folders: disjoint by construction."""

        def _setup(self, _stage: str | None = None) -> None:
            def subset(split_dir: str, split: Split) -> FolderDataset:
                held_out = split_dir != "train"
                return FolderDataset(
                    name=self.name,
                    split=split,
                    normal_dir=root / "train" / "good",
                    normal_test_dir=root / split_dir / "good" if held_out else None,
                    abnormal_dir=root / split_dir / "anomalous" if held_out else None,
                    mask_dir=(root / split_dir / "mask") if (root / split_dir / "mask").is_dir() else None,
                )

            self.train_data = subset("train", Split.TRAIN)
            self.val_data = subset("val", Split.TEST)
            self.test_data = subset("test", Split.TEST)

    return ExplicitSplitFolder(
        name=name,
        root=root,
        normal_dir=root / "train" / "good",
        test_split_mode=TestSplitMode.FROM_DIR,
        val_split_mode=ValSplitMode.SAME_AS_TEST if same_as_test else ValSplitMode.FROM_DIR,
        **common,
    )
