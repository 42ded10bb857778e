"""One benchmark cell (one model on one dataset), run in its own process by ``tools/benchmark.py``.

Stages, each saved to ``partial.json`` as soon as it is done so that a crash or a time-out keeps what was
already measured: fit (anomalib Engine; the PostProcessor picks the thresholds on the validation set),
accuracy on the test set (anomalib's AUROC / F1Score / AUPRO), torch speed, OpenVINO export + speed, a few
visualizer images. The final ``result.json`` is written only when every stage has finished.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import resource
import shutil
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any


# ------------------------------------------------------------------------------------------------ building
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


def setup_datamodule(datamodule, draw_seed: int, model_spec: dict[str, Any], dataset: dict[str, Any]) -> None:  # noqa: ANN001
    """Set the datamodule up now (Engine.fit reuses it): synthetic anomalies are drawn from the global generators
    seeded with ``draw_seed``; a study's training-set changes (augmented views, a train size) are applied here.
    """
    from lightning.pytorch import seed_everything
    from lightning.pytorch.trainer.states import TrainerFn

    from anomalib_ext.data.seeded_split import mark_drawn_with_seed
    from benchmarking.studies import augmentation, lighting, scaling

    augmentation.apply_before_setup(datamodule, model_spec)
    lighting.apply_before_setup(datamodule, model_spec)
    seed_everything(draw_seed, workers=True, verbose=False)
    datamodule.setup(TrainerFn.FITTING)
    mark_drawn_with_seed(datamodule, draw_seed)  # our models keep this draw (they would redraw an unseeded one)
    augmentation.apply_after_setup(datamodule, model_spec)
    lighting.apply_after_setup(datamodule, model_spec)
    scaling.apply_after_setup(datamodule, dataset)


# ----------------------------------------------------------------------------------------------- measuring
def squeeze_map(tensor, like):  # noqa: ANN001, ANN202 (torch tensors)
    """Bring an anomaly map or mask to (B, H, W) at the size of ``like`` (``None``: keep its size)."""
    import torch.nn.functional as functional

    if tensor.dim() == 3:
        tensor = tensor[:, None]
    if like is not None and tensor.shape[-2:] != like.shape[-2:]:
        tensor = functional.interpolate(tensor.float(), size=like.shape[-2:], mode="nearest")
    return tensor[:, 0]


def evaluate(model, datamodule, n_visuals: int, visual_dir: Path) -> tuple[dict[str, Any], list]:  # noqa: ANN001
    """Accuracy on the test set through the model's full forward (pre-process, model, post-process).

    This is the same graph OpenVINO exports, so the numbers describe what would be deployed. Image F1 uses
    ``pred_label``, i.e. the PostProcessor's threshold that was computed on the validation set during fit. From the
    same predictions (the torch model's raw scores, caught by a forward hook) come two more image F1s:
    ``image_f1_f1_optimal`` with the plain F1-optimal validation threshold (anomalib's rule, which our
    ``RobustThresholdPostProcessor`` clamps into the normal scores' window; equal to ``image_f1`` for anomalib's
    models) and ``image_f1_test_optimal`` with the best threshold on the test set itself (anomalib's default
    ``same_as_test`` protocol: an upper bound, not an honest F1).
    """
    import torch
    from anomalib.metrics import AUPRO, AUROC, F1Score
    from anomalib.visualization import ImageVisualizer

    image_auroc = AUROC(fields=["pred_score", "gt_label"])
    image_f1 = F1Score(fields=["pred_label", "gt_label"])
    pixel_auroc = AUROC(fields=["anomaly_map", "gt_mask"])
    pixel_pro = AUPRO(fields=["anomaly_map", "gt_mask"])
    scores, labels, predicted, paths = [], [], [], []
    speed_images: list[torch.Tensor] = []
    has_masks = False
    visuals_wanted = {0: (n_visuals + 1) // 2, 1: n_visuals // 2}
    visualizer = model.visualizer if isinstance(model.visualizer, ImageVisualizer) else ImageVisualizer()
    visual_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    raw_scores: list[torch.Tensor] = []
    raw_maps: list[torch.Tensor] = []
    raw_masks: list[torch.Tensor] = []

    def keep_raw_outputs(_module, _inputs, output) -> None:  # noqa: ANN001
        raw_scores.append(raw_image_score(output))
        if getattr(output, "anomaly_map", None) is not None:
            raw_maps.append(squeeze_map(output.anomaly_map.detach().float().cpu(), None))

    hook = model.model.register_forward_hook(keep_raw_outputs)
    with torch.inference_mode():
        for batch in datamodule.test_dataloader():
            output = model(batch.image)
            gt_label = batch.gt_label.int()
            pred_label = getattr(output, "pred_label", None)
            scores.append(output.pred_score.flatten().float())
            labels.append(gt_label)
            paths.extend(str(p) for p in batch.image_path)
            image_auroc.update(SimpleNamespace(pred_score=output.pred_score.flatten(), gt_label=gt_label))
            if pred_label is not None:
                predicted.append(pred_label.flatten().int())
                image_f1.update(SimpleNamespace(pred_label=pred_label.flatten().int(), gt_label=gt_label))
            if batch.gt_mask is not None and output.anomaly_map is not None and batch.gt_mask.any():
                has_masks = True
            if batch.gt_mask is not None and output.anomaly_map is not None:
                anomaly_map = squeeze_map(output.anomaly_map, output.anomaly_map)
                gt_mask = squeeze_map(batch.gt_mask.int(), anomaly_map).bool()
                pixel_update = SimpleNamespace(anomaly_map=anomaly_map, gt_mask=gt_mask)
                raw_masks.append(gt_mask.cpu())
                pixel_auroc.update(pixel_update)
                pixel_pro.update(pixel_update)
            speed_images.extend(batch.image[: max(0, 64 - len(speed_images))])
            updated = batch.update(**output._asdict())
            for item in updated:
                label = int(item.gt_label)
                if visuals_wanted.get(label, 0) > 0:
                    visuals_wanted[label] -= 1
                    image = visualizer.visualize(item)
                    if image is not None:
                        source = Path(item.image_path)
                        kind = "anomalous" if label else "normal"
                        image.save(visual_dir / f"{kind}_{source.parent.name}_{source.stem}.png")
    hook.remove()
    all_scores, all_labels = torch.cat(scores), torch.cat(labels)
    metrics: dict[str, Any] = {
        "image_auroc": float(image_auroc.compute()),
        "image_f1": float(image_f1.compute()) if predicted else None,
        "pixel_auroc": float(pixel_auroc.compute()) if has_masks else None,
        "pixel_pro": float(pixel_pro.compute()) if has_masks else None,
        "n_test": len(all_labels),
        "n_test_anomalous": int(all_labels.sum()),
    }
    threshold = getattr(model.post_processor, "image_threshold", None)
    metrics["image_threshold"] = float(threshold) if threshold is not None else None
    all_raw_scores = torch.cat(raw_scores) if raw_scores else None
    if all_raw_scores is not None and len(all_raw_scores) == len(all_labels):
        metrics.update(threshold_comparison(model.post_processor, all_raw_scores, all_labels))
        metrics.update(raw_aurocs(all_raw_scores, all_labels, raw_maps, raw_masks if has_masks else []))
    # PNG-only anomalies: a model must not win through JPEG artefacts (dice caveat); cheap from the scores.
    png = torch.tensor([Path(p).suffix.lower() == ".png" for p in paths])
    keep = png | (all_labels == 0)
    if bool((~png & (all_labels == 1)).any()) and bool((keep & (all_labels == 1)).any()):
        subset_auroc = AUROC(fields=["pred_score", "gt_label"])
        subset_auroc.update(SimpleNamespace(pred_score=all_scores[keep], gt_label=all_labels[keep]))
        metrics["image_auroc_png"] = float(subset_auroc.compute())
        if predicted:
            subset_f1 = F1Score(fields=["pred_label", "gt_label"])
            subset_f1.update(SimpleNamespace(pred_label=torch.cat(predicted)[keep], gt_label=all_labels[keep]))
            metrics["image_f1_png"] = float(subset_f1.compute())
        metrics["n_test_anomalous_png"] = int((keep & (all_labels == 1)).sum())
    return metrics, speed_images


def raw_image_score(output):  # noqa: ANN001, ANN201 (torch model output -> 1-D tensor)
    """The torch model's image scores before post-processing (the map's maximum when it gives no score)."""
    import torch

    score = getattr(output, "pred_score", None)
    if score is None:
        score = torch.amax(output.anomaly_map, dim=(-2, -1))
    return score.detach().flatten().float().cpu()


def unit_interval(values):  # noqa: ANN001, ANN201 (torch tensor -> float64 tensor)
    """``values`` rescaled into [0, 1], order kept, in float64. torchmetrics reads scores outside [0, 1] as logits
    and squashes them with a sigmoid, which ties raw scores such as 1000 and 2000."""
    values = values.double()
    return (values - values.min()) / (values.max() - values.min()).clamp_min(1e-300)


def raw_aurocs(raw_scores, labels, raw_maps, masks) -> dict[str, Any]:  # noqa: ANN001
    """Image and pixel AUROC of the torch model's raw scores and maps (``image_auroc_raw``, ``pixel_auroc_raw``).

    ``image_auroc``/``pixel_auroc`` score the post-processed outputs, as anomalib's evaluator does; those are
    normalised around the validation threshold and clamped to [0, 1], so test scores beyond the validation range
    tie at 0 or 1 and the AUROC moves with the threshold. The raw ones depend on the model alone.
    """
    import torch
    from torchmetrics.functional.classification import binary_auroc

    def auroc(values: torch.Tensor, truth: torch.Tensor) -> float | None:
        if not (truth.any() and not truth.all()):
            return None
        return float(binary_auroc(unit_interval(values.flatten()), truth.flatten().long()))

    result: dict[str, Any] = {"image_auroc_raw": auroc(raw_scores, labels.bool()), "pixel_auroc_raw": None}
    if masks and len(raw_maps) == len(masks):
        maps = torch.cat([squeeze_map(m[:, None], mask) for m, mask in zip(raw_maps, masks, strict=True)])
        result["pixel_auroc_raw"] = auroc(maps, torch.cat(masks))
    return result


def threshold_comparison(post_processor, raw_scores, labels) -> dict[str, Any]:  # noqa: ANN001
    """Image F1 of the same raw test scores under the plain F1-optimal validation threshold and the best threshold
    on test (see ``evaluate``)."""
    import torch
    from torchmetrics.functional.classification import binary_f1_score, binary_precision_recall_curve

    labels = labels.int()
    f1_optimal = getattr(post_processor, "f1_optimal_image_threshold", None)
    if f1_optimal is None or bool(torch.isnan(f1_optimal)):
        f1_optimal = getattr(post_processor, "image_threshold", None)  # anomalib's own: already F1-optimal
    result: dict[str, Any] = {}
    if f1_optimal is not None and not bool(torch.isnan(torch.as_tensor(f1_optimal))):
        f1_optimal = float(f1_optimal)
        result["image_threshold_f1_optimal"] = f1_optimal
        result["image_f1_f1_optimal"] = float(binary_f1_score((raw_scores > f1_optimal).int(), labels))
    if bool(labels.any()) and not bool(labels.all()):
        # rescaled into [0, 1]: monotone, so the same F1 per threshold
        precision, recall, _ = binary_precision_recall_curve(unit_interval(raw_scores), labels)
        result["image_f1_test_optimal"] = float((2 * precision * recall / (precision + recall + 1e-12)).max())
    lower, upper = (getattr(post_processor, name, None) for name in ("normal_score_lower", "normal_score_upper"))
    if lower is not None and upper is not None:
        result["image_threshold_window"] = [float(lower), float(upper)]
    return result


def peak_rss_mb() -> float:
    """Max resident set size of this cell process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the DDP processes of a ``--devices N`` fit)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


# ------------------------------------------------------------------------------------------------- running
def _test_images(datamodule, count: int) -> list:  # noqa: ANN001
    """The first ``count`` real test images (what ``--speed-only`` times without measuring accuracy)."""
    images: list = []
    for batch in datamodule.test_dataloader():
        images.extend(batch.image[: count - len(images)])
        if len(images) >= count:
            break
    return images


def validation_draws(engine, model, spec: dict[str, Any], seed: int, draws: int, visual_dir: Path) -> dict[str, Any]:  # noqa: ANN001
    """Threshold and test F1 on ``draws`` synthetic validation draws, same fitted model and same normal split.

    Draw ``d`` seeds the global generators with ``seed + 1000 * d`` before anomalib makes the synthetic anomalies
    (draw 0 is the one the model was fitted with); ``Engine.validate`` recomputes the PostProcessor's thresholds.
    """
    settings = spec["settings"]
    thresholds, f1_scores = [], []
    for draw in range(draws):
        datamodule = build_datamodule(spec["dataset"], seed, settings["batch_size"], settings["val_split"])
        setup_datamodule(datamodule, seed + 1000 * draw, spec["model"], spec["dataset"])
        engine.validate(model=model, datamodule=datamodule, verbose=False)
        metrics, _ = evaluate(model, datamodule, 0, visual_dir)
        thresholds.append(metrics["image_threshold"])
        f1_scores.append(metrics["image_f1"])
    return {"image_threshold_draws": thresholds, "image_f1_draws": f1_scores}


def openvino_stage(engine, model, datamodule, images: list, torch_scores: list, settings: dict, cell_dir: Path) -> dict:  # noqa: ANN001, PLR0913
    """Export in every ``export_precisions`` (fp32 first), time each export beside the bare backbone trunk, and
    score each export on the test set with OpenVINO itself.

    The trunk and the exports are timed interleaved (one call of each in turn per image,
    ``speed.time_interleaved``), so their ratios are measured under the same load. The first precision's figures
    also go to the top level of the result (``openvino_images_per_s``, ...), as before; ``openvino_exports`` holds
    one entry per precision (one row each in ``results.csv``).
    """
    from benchmarking import speed

    threads = settings["threads"]
    started = time.perf_counter()
    precisions = settings.get("export_precisions") or ["fp32"]
    shape = tuple(images[0].shape)  # every runner compiled for this static input, like an edge deployment
    runners = {
        precision: speed.OpenVinoRunner(
            speed.export_openvino(
                engine, model, cell_dir / f"export_{precision}", precision, datamodule, input_size=shape[-2:]
            ),
            threads,
            image_shape=shape,
        )
        for precision in precisions
    }
    trunk = speed.export_trunk(model, images[0], cell_dir / "export_trunk")
    trunks = {}
    if trunk is not None:
        trunks["trunk"] = speed.OpenVinoRunner(trunk[0], threads, score_output=None, image_shape=shape)
        if "int8" in precisions:  # the network alone in INT8: the ceiling of any INT8 speed-up at this size
            int8_trunk = speed.quantize_trunk(trunk[0], datamodule)
            trunks["trunk_int8"] = speed.OpenVinoRunner(int8_trunk, threads, score_output=None, image_shape=shape)
    min_seconds = 0.0 if settings.get("quick") else speed.MIN_TIMED_SECONDS  # --quick: one pass
    timed = speed.time_interleaved({**trunks, **runners}, images, min_seconds)
    backbone: dict[str, Any] = {"backbone_img_per_s": None, "backbone_layer": None}
    if trunk is not None:
        backbone = {"backbone_img_per_s": timed["trunk"]["images_per_s"], "backbone_layer": trunk[1]}
    if "trunk_int8" in timed:
        backbone["backbone_int8_img_per_s"] = timed["trunk_int8"]["images_per_s"]
        backbone["backbone_int8_speedup"] = timed["trunk_int8"]["images_per_s"] / timed["trunk"]["images_per_s"]
    exports = []
    for precision in precisions:
        entry: dict[str, Any] = {"openvino_precision": precision, **backbone, **runners[precision].description()}
        entry["openvino_images_per_s"] = timed[precision]["images_per_s"]
        entry["openvino_load_average_1min"] = timed[precision]["load_average_1min"]
        entry["openvino_timed_passes"] = timed[precision]["timed_passes"]
        entry["openvino_max_score_diff"] = max(
            abs(a - b) for a, b in zip(torch_scores, timed[precision]["scores"], strict=True)
        )
        entry["openvino_speedup_vs_fp32"] = entry["openvino_images_per_s"] / timed[precisions[0]]["images_per_s"]
        if backbone["backbone_img_per_s"]:
            entry["openvino_fraction_of_backbone"] = entry["openvino_images_per_s"] / backbone["backbone_img_per_s"]
        try:  # where the time goes, per stage (module) of the graph; never fails the cell
            entry["openvino_stage_ms"] = speed.stage_profile(runners[precision], runners[precision].arrays(images)[0])
        except Exception as error:  # noqa: BLE001
            entry["openvino_stage_ms"] = {"error": str(error)}
        if not settings.get("speed_only"):
            entry.update(speed.openvino_accuracy(runners[precision], datamodule))
        exports.append(entry)
    result: dict[str, Any] = {**exports[0], "openvino_exports": exports}
    result["export_and_openvino_seconds"] = time.perf_counter() - started
    return result


def cell_dataset(spec: dict[str, Any]) -> dict[str, Any]:
    """The cell's dataset spec, with the options a study gave this model (``dataset_options``) merged in."""
    dataset = spec["dataset"]
    return {**dataset, "options": {**dataset["options"], **spec["model"].get("dataset_options", {})}}


def run_cell(spec_path: Path) -> int:
    """Run every stage of one cell; write ``partial.json`` after each and ``result.json`` at the end."""
    spec = json.loads(spec_path.read_text())
    spec["dataset"] = cell_dataset(spec)
    cell_dir = Path(spec["cell_dir"])
    settings = spec["settings"]
    seed = int(spec.get("seed", settings["seed"]))
    result: dict[str, Any] = {"dataset": spec["dataset"]["label"], "model": spec["model"]["label"], "seed": seed}

    def save(name: str) -> None:
        result["peak_rss_mb"] = peak_rss_mb()
        (cell_dir / name).write_text(json.dumps(result, indent=2))

    def stage(name: str) -> None:
        result["stage"] = name
        save("partial.json")  # every stage is saved as it starts, so a time-out names the right one

    started = time.perf_counter()
    result["load_average_1min"] = os.getloadavg()[0]  # at the start of the cell; each speed has its own
    try:
        import anomalib.models  # noqa: F401  (import cost belongs to the baseline, not the model)
        import torch
        from anomalib.engine import Engine
        from lightning.pytorch import seed_everything

        import anomalib_ext  # noqa: F401  (registers our models)
        from benchmarking import speed
        from benchmarking.studies import lighting, sessions

        result["baseline_rss_mb"] = peak_rss_mb()  # python + torch + anomalib imported, no model or data yet
        torch.set_num_threads(settings["threads"])
        seed_everything(seed, workers=True)
        image_size = spec["dataset"]["options"].get("image_size", settings["image_size"])
        spec["model"] = lighting.model_for_cell(spec["model"])  # the arm's augmentation, as the model takes it
        model = build_model(spec["model"], image_size, seed, data_checked=True)  # check_dataset ran in the parent
        datamodule = build_datamodule(spec["dataset"], seed, settings["batch_size"], settings["val_split"])
        setup_datamodule(datamodule, seed, spec["model"], spec["dataset"])
        # --max-epochs bounds every model: a config asking for more epochs is capped to it
        config_epochs = spec["model"].get("trainer", {}).get("max_epochs", settings["max_epochs"])
        result["max_epochs"] = min(config_epochs, settings["max_epochs"])
        # --devices N: N CPU processes (DDP); test, speed and export then run here on the fitted model that the
        # strategy hands back, so they measure the same thing for any N
        devices = int(settings.get("devices", 1))
        parallel = {"strategy": settings.get("strategy") or "ddp_spawn"} if devices > 1 else {}
        from benchmarking.ranks import RankPeakMemory

        engine = Engine(
            default_root_dir=cell_dir / "engine",
            logger=False,
            accelerator="cpu",
            devices=devices,
            enable_progress_bar=False,
            max_epochs=result["max_epochs"],
            callbacks=[RankPeakMemory(cell_dir)],
            **parallel,
        )
        result["devices"] = devices
        result["setup_seconds"] = time.perf_counter() - started
        stage("fit")
        fit_start, fit_cpu_start = time.perf_counter(), cpu_seconds()
        engine.fit(model=model, datamodule=datamodule)
        result["fit_seconds"] = time.perf_counter() - fit_start
        # CPU seconds of every thread of the cell (and of its DDP processes): the load-independent fit cost
        result["fit_cpu_seconds"] = cpu_seconds() - fit_cpu_start
        result["fit_peak_rss_mb"] = peak_rss_mb()
        result["fit_peak_rss_mb_per_process"] = RankPeakMemory.collect(cell_dir)
        threshold = getattr(model.post_processor, "image_threshold", None)
        if threshold is not None and bool(torch.isnan(torch.as_tensor(threshold))):
            # validation never ran during fit (e.g. check_val_every_n_epoch > epochs): set the thresholds now
            engine.validate(model=model, datamodule=datamodule)
            result["validated_after_fit"] = True
        result["n_train"] = len(datamodule.train_data)
        result["n_val"] = len(datamodule.val_data)
        result["val_split"] = settings["val_split"]
        save("partial.json")

        if settings.get("speed_only"):
            speed_images = _test_images(datamodule, settings["speed_images"])
        else:
            stage("test")
            test_start = time.perf_counter()
            metrics, speed_images = evaluate(model, datamodule, settings["n_visuals"], cell_dir / "visuals")
            result.update(metrics)
            speed_images = speed_images[: settings["speed_images"]]
            result["test_seconds"] = time.perf_counter() - test_start
            save("partial.json")
            if settings.get("study") == "sessions":
                stage("sessions study")
                result["sessions"] = sessions.validation_scores_by_session(model, datamodule)
                save("partial.json")

        stage("torch speed")
        torch_result = speed.torch_speed(model, speed_images, settings["threads"])
        torch_scores = torch_result.pop("torch_scores")
        result.update(torch_result)
        save("partial.json")

        if settings["openvino"]:
            stage("openvino")
            result.update(openvino_stage(engine, model, datamodule, speed_images, torch_scores, settings, cell_dir))
            save("partial.json")

        draws = settings.get("val_draws", 1)
        if draws > 1 and not settings.get("speed_only") and datamodule.val_split_mode == "synthetic":
            stage("validation draws")  # last: it leaves the model with the last draw's thresholds
            result.update(validation_draws(engine, model, spec, seed, draws, cell_dir / "visuals"))
        result["stage"] = "done"
        result["status"] = "ok"
        result["cell_seconds"] = time.perf_counter() - started
        for checkpoint in (cell_dir / "engine").rglob("*.ckpt"):
            checkpoint.unlink()  # checkpoints are not part of the benchmark output and can be large
        save("result.json")
        return 0
    except Exception as error:  # noqa: BLE001  (any failure is recorded, the parent carries on)
        result["status"] = "error"
        result["error"] = f"{type(error).__name__} in stage '{result.get('stage', 'setup')}': {error}"
        result["traceback"] = traceback.format_exc()
        result["cell_seconds"] = time.perf_counter() - started
        save("result.json")
        return 1
    finally:
        shutil.rmtree(cell_dir / "engine" / "images", ignore_errors=True)
