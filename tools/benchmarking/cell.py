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

WARMUP_CALLS = 2


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


def build_model(model_spec: dict[str, Any], image_size: int | None):  # noqa: ANN201 (AnomalibModule)
    """Instantiate the model; with ``image_size`` set, give it a pre-processor resizing to that size."""
    import anomalib_ext  # noqa: F401  (registers our models with anomalib)
    from anomalib_ext.weights import ensure_pretrained

    init_args = instantiate(dict(model_spec["init_args"]))
    backbone = init_args.get("backbone")
    if isinstance(backbone, str) and backbone.startswith("tf_efficientnet_lite"):
        ensure_pretrained(backbone)
    else:
        ensure_pretrained("tf_efficientnet_lite0")
    cls = import_class(model_spec["class_path"])
    if image_size and "pre_processor" not in init_args:
        if "image_size" in inspect.signature(cls.__init__).parameters:
            init_args["image_size"] = (image_size, image_size)  # the model builds its own resize
        else:
            init_args["pre_processor"] = cls.configure_pre_processor(image_size=(image_size, image_size))
    return cls(**init_args)


def build_datamodule(dataset: dict[str, Any], seed: int, batch_size: int):  # noqa: ANN201 (AnomalibDataModule)
    """A datamodule whose validation set never contains a test image (see docs/benchmark.md)."""
    from anomalib.data import Folder, MVTecAD
    from anomalib.data.utils import ValSplitMode

    path = Path(dataset["path"])
    options = dataset["options"]
    common = {"train_batch_size": batch_size, "eval_batch_size": batch_size, "num_workers": 0, "seed": seed}
    val_ratio = float(options.get("val_split_ratio", 0.2))
    if dataset["kind"] == "mvtec":
        return MVTecAD(
            root=path.parent,
            category=path.name,
            val_split_mode=ValSplitMode.SYNTHETIC,
            val_split_ratio=val_ratio,
            **common,
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
            val_split_mode=ValSplitMode.SYNTHETIC,
            val_split_ratio=val_ratio,
            **common,
        )
    if dataset["kind"] == "split":
        return make_split_datamodule(dataset["label"], path, common)
    msg = f"dataset '{dataset['label']}': kind '{dataset['kind']}' has no datamodule (prepare it first)"
    raise ValueError(msg)


def make_split_datamodule(name: str, root: Path, common: dict[str, Any]):  # noqa: ANN201
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
        val_split_mode=ValSplitMode.FROM_DIR,
        **common,
    )


# ----------------------------------------------------------------------------------------------- measuring
def _squeeze_map(tensor, like):  # noqa: ANN001, ANN202 (torch tensors)
    """Bring an anomaly map or mask to (B, H, W) at the size of ``like``."""
    import torch.nn.functional as functional

    if tensor.dim() == 3:
        tensor = tensor[:, None]
    if tensor.shape[-2:] != like.shape[-2:]:
        tensor = functional.interpolate(tensor.float(), size=like.shape[-2:], mode="nearest")
    return tensor[:, 0]


def evaluate(model, datamodule, n_visuals: int, visual_dir: Path) -> tuple[dict[str, Any], list]:  # noqa: ANN001
    """Accuracy on the test set through the model's full forward (pre-process, model, post-process).

    This is the same graph OpenVINO exports, so the numbers describe what would be deployed. Image F1 uses
    ``pred_label``, i.e. the PostProcessor's threshold that was computed on the validation set during fit.
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
                anomaly_map = _squeeze_map(output.anomaly_map, output.anomaly_map)
                gt_mask = _squeeze_map(batch.gt_mask.int(), anomaly_map).bool()
                pixel_update = SimpleNamespace(anomaly_map=anomaly_map, gt_mask=gt_mask)
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


def torch_speed(model, images: list) -> tuple[float, list[float]]:  # noqa: ANN001
    """Images per second of the full torch forward at batch size 1 (the deployment case), after warm-up."""
    import torch

    with torch.inference_mode():
        for image in images[:WARMUP_CALLS]:
            model(image[None])
        scores = []
        start = time.perf_counter()
        for image in images:
            scores.append(float(model(image[None]).pred_score.flatten()[0]))
        elapsed = time.perf_counter() - start
    return len(images) / elapsed, scores


def openvino_speed(engine, model, images: list, export_root: Path, threads: int) -> dict[str, Any]:  # noqa: ANN001
    """Export with anomalib, load with its OpenVINOInferencer, time it at batch size 1 on the same images.

    Some graphs come out of the dynamo exporter with a static batch size (anomalib's Dfm: 2). Those get the
    image repeated to fill the batch, and every image in the batch counts towards images/s.
    """
    import numpy as np
    from anomalib.deploy import ExportType, OpenVINOInferencer

    # opset 18: anomalib asks for 14, which this onnx cannot down-convert some ops (Pad) to
    xml_path = Path(
        engine.export(
            model=model,
            export_type=ExportType.OPENVINO,
            export_root=export_root,
            onnx_kwargs={"opset_version": 18},
        )
    )
    size_bytes = sum(p.stat().st_size for p in xml_path.parent.glob("model.*") if p.suffix in (".xml", ".bin"))
    inferencer = OpenVINOInferencer(path=xml_path, device="CPU", config={"INFERENCE_NUM_THREADS": threads})
    batch_dimension = inferencer.model.input(0).get_partial_shape()[0]
    batch = batch_dimension.get_length() if batch_dimension.is_static else 1
    arrays = [np.repeat(image.numpy()[None], batch, axis=0) for image in images]
    for array in arrays[:WARMUP_CALLS]:
        inferencer.predict(array)
    scores = []
    start = time.perf_counter()
    for array in arrays:
        scores.append(float(inferencer.predict(array).pred_score.flatten()[0]))
    elapsed = time.perf_counter() - start
    return {
        "openvino_images_per_s": len(arrays) * batch / elapsed,
        "openvino_batch": batch,
        "openvino_model_mb": size_bytes / 2**20,
        "openvino_scores": scores,
    }


def peak_rss_mb() -> float:
    """Max resident set size of this cell process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------- running
def run_cell(spec_path: Path) -> int:
    """Run every stage of one cell; write ``partial.json`` after each and ``result.json`` at the end."""
    spec = json.loads(spec_path.read_text())
    cell_dir = Path(spec["cell_dir"])
    settings = spec["settings"]
    result: dict[str, Any] = {"dataset": spec["dataset"]["label"], "model": spec["model"]["label"]}

    def save(name: str) -> None:
        result["peak_rss_mb"] = peak_rss_mb()
        (cell_dir / name).write_text(json.dumps(result, indent=2))

    started = time.perf_counter()
    result["load_average_1min"] = os.getloadavg()[0]  # speeds below are only comparable at similar load
    try:
        import anomalib.models  # noqa: F401  (import cost belongs to the baseline, not the model)
        import torch
        from anomalib.engine import Engine
        from lightning.pytorch import seed_everything

        import anomalib_ext  # noqa: F401  (registers our models)

        result["baseline_rss_mb"] = peak_rss_mb()  # python + torch + anomalib imported, no model or data yet
        seed_everything(settings["seed"], workers=True)
        torch.set_num_threads(settings["threads"])
        result["torch_threads"] = torch.get_num_threads()
        model = build_model(spec["model"], spec["dataset"]["options"].get("image_size", settings["image_size"]))
        datamodule = build_datamodule(spec["dataset"], settings["seed"], settings["batch_size"])
        # --max-epochs bounds every model: a config asking for more epochs is capped to it
        config_epochs = spec["model"].get("trainer", {}).get("max_epochs", settings["max_epochs"])
        trainer_args = {"max_epochs": min(config_epochs, settings["max_epochs"])}
        result["max_epochs"] = trainer_args["max_epochs"]
        engine = Engine(
            default_root_dir=cell_dir / "engine",
            logger=False,
            accelerator="cpu",
            devices=1,
            enable_progress_bar=False,
            **trainer_args,
        )
        result["setup_seconds"] = time.perf_counter() - started
        result["stage"] = "fit"
        save("partial.json")  # every stage is saved as it starts, so a time-out names the right one
        fit_start, fit_cpu_start = time.perf_counter(), time.process_time()
        engine.fit(model=model, datamodule=datamodule)
        result["fit_seconds"] = time.perf_counter() - fit_start
        # CPU seconds of every thread of the cell: the load-independent measure of fit cost on a shared machine
        result["fit_cpu_seconds"] = time.process_time() - fit_cpu_start
        result["fit_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        threshold = getattr(model.post_processor, "image_threshold", None)
        if threshold is not None and bool(torch.isnan(torch.as_tensor(threshold))):
            # validation never ran during fit (e.g. check_val_every_n_epoch > epochs): set the thresholds now
            engine.validate(model=model, datamodule=datamodule)
            result["validated_after_fit"] = True
        result["n_train"] = len(datamodule.train_data)
        result["n_val"] = len(datamodule.val_data)
        save("partial.json")

        result["stage"] = "test"
        save("partial.json")
        test_start = time.perf_counter()
        metrics, speed_images = evaluate(model, datamodule, settings["n_visuals"], cell_dir / "visuals")
        result.update(metrics)
        speed_images = speed_images[: settings["speed_images"]]
        result["test_seconds"] = time.perf_counter() - test_start
        save("partial.json")

        result["stage"] = "torch speed"
        save("partial.json")
        result["torch_images_per_s"], torch_scores = torch_speed(model, speed_images)
        save("partial.json")

        if settings["openvino"]:
            result["stage"] = "openvino"
            save("partial.json")
            export_start = time.perf_counter()
            openvino = openvino_speed(engine, model, speed_images, cell_dir / "export", settings["threads"])
            openvino_scores = openvino.pop("openvino_scores")
            result.update(openvino)
            result["export_and_openvino_seconds"] = time.perf_counter() - export_start
            result["openvino_max_score_diff"] = max(
                abs(a - b) for a, b in zip(torch_scores, openvino_scores, strict=True)
            )
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
