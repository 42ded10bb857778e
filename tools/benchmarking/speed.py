"""The one speed routine of the benchmark: torch and OpenVINO timed the same way for every model.

Every figure comes from :func:`time_calls`: the same real test images (float, clamped to [0, 1] so that
anomalib's ``OpenVINOInferencer`` does not mistake them for 0-255 images), batch size 1, the same warm-up, the
same number of CPU threads for torch and OpenVINO, and the machine's 1-minute load average read when the timing
starts (on a shared machine a speed means little without it). OpenVINO runs the compiled model itself (what
``tools/infer_openvino.py`` and anomalib's ``OpenVINOInferencer`` call, without the inferencer's Python
wrapping) with ``INFERENCE_PRECISION_HINT: f32``: the CPU's default bf16 moves scores by about 1e-2.

Exports come in two precisions (``--export-precision fp32,int8``): ``fp32`` is anomalib's plain OpenVINO export,
``int8`` is anomalib's ``INT8_PTQ`` (NNCF post-training quantisation calibrated on the validation images, with
whatever the model keeps in floating point). Each export is scored on the whole test set by OpenVINO itself
(:func:`openvino_accuracy`), and each model is timed beside the bare backbone trunk it is built on
(:func:`export_trunk`: the same timm backbone, features only, up to the model's deepest layer, exported the same
way, same size, same threads), all timed interleaved (:func:`time_interleaved`) so their ratios share one load.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from benchmarking.measures import squeeze_map

WARMUP_CALLS = 2
MIN_TIMED_SECONDS = 3.0  # interleaved timing repeats the images until every runner has run this long
MAX_TIMED_PASSES = 20
EXPORT_PRECISIONS = ("fp32", "int8")
OUTPUT_NAMES = ("pred_score", "pred_label", "anomaly_map", "pred_mask")  # an output may carry several names


def load_average() -> float:
    """The machine's 1-minute load average (NaN where the OS has none)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")


def speed_inputs(images: Sequence[Any]) -> list[Any]:
    """Float (C, H, W) images clamped to [0, 1]: what a uint8 image gives, and what OpenVINO reads as such."""
    return [image.float().clamp(0.0, 1.0) for image in images]


def time_calls(call: Callable[[Any], float], inputs: Sequence[Any], images_per_call: int = 1) -> dict[str, Any]:
    """Warm up on the first inputs, then time one call per input; returns rate, scores and the load."""
    if not inputs:
        msg = "no images to time"
        raise ValueError(msg)
    for item in inputs[:WARMUP_CALLS]:
        call(item)
    load = load_average()
    scores = []
    start = time.perf_counter()
    for item in inputs:
        scores.append(call(item))
    elapsed = time.perf_counter() - start
    return {"images_per_s": len(inputs) * images_per_call / elapsed, "scores": scores, "load_average_1min": load}


def torch_speed(model: Any, images: Sequence[Any], threads: int) -> dict[str, Any]:  # noqa: ANN401
    """The model's full forward (pre-process, model, post-process) at batch size 1 with ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    model.eval()
    with torch.inference_mode():
        timed = time_calls(lambda image: float(model(image[None]).pred_score.flatten()[0]), speed_inputs(images))
    return {
        "torch_images_per_s": timed["images_per_s"],
        "torch_threads": torch.get_num_threads(),
        "torch_load_average_1min": timed["load_average_1min"],
        "torch_scores": timed["scores"],
    }


def export_openvino(
    engine: Any,  # noqa: ANN401
    model: Any,  # noqa: ANN401
    export_root: Path,
    precision: str = "fp32",
    datamodule: Any = None,  # noqa: ANN401
    input_size: tuple[int, int] | None = None,
) -> Path:
    """anomalib's OpenVINO export (opset 18: this onnx cannot down-convert some ops, e.g. Pad, to 14).

    ``int8`` is anomalib's ``INT8_PTQ`` compression, calibrated on ``datamodule``'s validation images: exactly
    what ``anomalib export --compression_type INT8_PTQ --data ...`` does, including a model's own recipe.
    ``input_size`` is ``--input_size``, what docs/edge.md tells an edge user to export with: a fixed height and
    width, so a pre-processing resize to that same size is traced as nothing (torchvision returns the image) instead
    of an OpenVINO ``Interpolate`` that copies it (1.6 ms of Dfkdm's 16 ms at 256 px, f32, one thread). With it
    the f32 graph takes a static batch of one, as our models' exports do by default since 0.13.0 (tracing
    anomalib's symbolic batch axis took three times as long, and the timing compiles a dynamic batch to one image
    anyway); anomalib's own models keep their batch axis in INT8, whose calibration feeds the loader's batches.
    """
    from anomalib.deploy import CompressionType, ExportType

    if precision not in EXPORT_PRECISIONS:
        msg = f"export precision must be one of {EXPORT_PRECISIONS}, got {precision!r}"
        raise ValueError(msg)
    compression: dict[str, Any] = {}
    if precision == "int8":
        compression = {"compression_type": CompressionType.INT8_PTQ, "datamodule": datamodule}
    static_batch = {"dynamic_shapes": None} if input_size is not None and precision != "int8" else {}
    return Path(
        engine.export(
            model=model,
            export_type=ExportType.OPENVINO,
            export_root=export_root,
            input_size=input_size,
            onnx_kwargs={"opset_version": 18, **static_batch},
            **compression,
        )
    )


def compile_openvino(model: Any, threads: int) -> Any:  # noqa: ANN401
    """An IR (path or ``ov.Model``) compiled for the CPU: f32 inference precision (not the bf16 default),
    ``threads`` threads, latency mode."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    return ov.Core().compile_model(model if isinstance(model, ov.Model) else str(model), "CPU", config)


class OpenVinoRunner:
    """One compiled IR (f32 inference, ``threads`` threads, latency mode, one request) and its inputs.

    With ``image_shape`` ``(C, H, W)`` a graph exported with dynamic axes (anomalib's default: a dynamic batch,
    and dynamic H/W without ``--input_size``) is reshaped to that static input before compiling, as an edge
    deployment does (``tools/infer_openvino.py``): OpenVINO's CPU plugin then plans every tensor once instead
    of on every call (about 1.3x for TileOutlier). An input of another shape goes through the dynamic graph.
    Some graphs come out of the exporter with a static batch size (anomalib's Dfm: 2); those get the image
    repeated to fill the batch, and every image in the batch counts towards images/s.
    """

    def __init__(
        self,
        xml_path: Path,
        threads: int,
        score_output: str | None = "pred_score",
        image_shape: Sequence[int] | None = None,
    ) -> None:
        import openvino as ov

        self.xml_path = Path(xml_path)
        self.threads = threads
        model = ov.Core().read_model(str(self.xml_path))
        dimensions = model.input(0).get_partial_shape()
        self.batch = dimensions[0].get_length() if dimensions[0].is_static else 1
        self.static_shape = None
        if image_shape is not None and dimensions.is_dynamic:
            self.static_shape = (self.batch, *(int(size) for size in image_shape))
            model.reshape({model.input(0): ov.PartialShape(list(self.static_shape))})
        self.compiled = compile_openvino(model, threads)
        self.request = self.compiled.create_infer_request()
        self.score_output = score_output
        self._dynamic: Any = None

    def arrays(self, images: Sequence[Any]) -> list[Any]:
        import numpy as np

        return [np.repeat(image.numpy()[None], self.batch, axis=0) for image in speed_inputs(images)]

    def outputs(self, array: Any) -> dict[str, Any]:  # noqa: ANN401
        """Infer one input; the outputs by name (views into the request's tensors, valid until the next call)."""
        compiled, request = self.compiled, self.request
        if self.static_shape is not None and tuple(array.shape) != self.static_shape:
            if self._dynamic is None:
                self._dynamic = compile_openvino(self.xml_path, self.threads)
            compiled = self._dynamic
            request = self._dynamic.create_infer_request()
        request.infer(array)
        names = [output.get_names() for output in compiled.outputs]
        return {
            next((name for name in OUTPUT_NAMES if name in aliases), min(aliases)): request.get_tensor(output).data
            for output, aliases in zip(compiled.outputs, names, strict=True)
        }

    def __call__(self, array: Any) -> float:  # noqa: ANN401
        import numpy as np

        if self.score_output is None:
            self.request.infer(array)
            return 0.0
        return float(np.ravel(self.outputs(array)[self.score_output])[0])

    def description(self) -> dict[str, Any]:
        precision = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        files = self.xml_path.parent.glob(self.xml_path.stem + ".*")
        return {
            "openvino_threads": int(self.compiled.get_property("INFERENCE_NUM_THREADS")),
            "openvino_inference_precision": getattr(precision, "to_string", lambda: str(precision))(),
            "openvino_batch": self.batch,
            "openvino_model_mb": sum(p.stat().st_size for p in files if p.suffix in (".xml", ".bin")) / 2**20,
        }


def stage_profile(runner: OpenVinoRunner, array: Any, repeats: int = 5) -> dict[str, float]:  # noqa: ANN401
    """Milliseconds per call spent in each stage of the graph, from OpenVINO's per-operation counters.

    A stage is the torch module an operation came from (our exports name every node after its module:
    ``model.feature_extractor``, ``model``, ``post_processor``, ...); operations OpenVINO created itself when it
    fused or reordered nodes carry no module and count as ``other``.
    """
    import openvino as ov

    model = ov.Core().read_model(str(runner.xml_path))
    if runner.static_shape is not None:
        model.reshape({model.input(0): ov.PartialShape(list(runner.static_shape))})
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": runner.threads, "PERF_COUNT": True}
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    for _ in range(WARMUP_CALLS):
        request.infer(array)
    stages: dict[str, float] = {}
    for _ in range(repeats):
        request.infer(array)
        for entry in request.profiling_info:
            name = entry.node_name
            stage = name.split("/", 1)[0] if "/" in name and not name.startswith("/") else "other"
            stages[stage] = stages.get(stage, 0.0) + entry.real_time.total_seconds() * 1000 / repeats
    return dict(sorted(stages.items(), key=lambda item: -item[1]))


def time_interleaved(
    runners: dict[str, Any], images: Sequence[Any], min_seconds: float = MIN_TIMED_SECONDS
) -> dict[str, dict[str, Any]]:
    """Time several runners on the same images, one call of each in turn per image, so that every runner meets
    the same machine load: their ratios hold on a shared machine even when the absolute speeds do not.

    Same warm-up as :func:`time_calls`; the images are timed again, pass after pass, until every runner has run
    for ``min_seconds`` (at most ``MAX_TIMED_PASSES`` passes): one pass of 32 images is a fraction of a
    second for a fast model, too short to average out a shared virtual machine. Per runner: images/s, the scores
    of the first pass, and the load average at the start.
    """
    import time as clock

    inputs = {name: runner.arrays(images) for name, runner in runners.items()}
    for name, runner in runners.items():
        for array in inputs[name][:WARMUP_CALLS]:
            runner(array)
    load = load_average()
    spent = dict.fromkeys(runners, 0.0)
    scores: dict[str, list[float]] = {name: [] for name in runners}
    passes = 0
    while passes == 0 or (passes < MAX_TIMED_PASSES and min(spent.values()) < min_seconds):
        for index in range(len(images)):
            for name, runner in runners.items():
                start = clock.perf_counter()
                score = runner(inputs[name][index])
                spent[name] += clock.perf_counter() - start
                if passes == 0:
                    scores[name].append(score)
        passes += 1
    return {
        name: {
            "images_per_s": passes * len(images) * runner.batch / spent[name],
            "scores": scores[name],
            "load_average_1min": load,
            "timed_passes": passes,
        }
        for name, runner in runners.items()
    }


def openvino_accuracy(runner: OpenVinoRunner, datamodule: Any) -> dict[str, Any]:  # noqa: ANN401
    """Image and pixel AUROC of the exported model itself (the runner's compiled IR) on every test image, and the F1
    of its own labels: the threshold inside the graph, as a deployment applies it (an INT8 graph whose normal
    scores moved past it flags them, whatever its AUROC)."""
    import numpy as np
    import torch
    from anomalib.metrics import AUROC
    from torchmetrics.functional.classification import binary_f1_score

    scores, labels, predicted, maps, masks = [], [], [], [], []
    for data in datamodule.test_dataloader():
        for index, array in enumerate(runner.arrays(data.image)):
            outputs = runner.outputs(array)
            scores.append(float(np.ravel(outputs["pred_score"])[0]))
            if "pred_label" in outputs:
                predicted.append(int(bool(np.ravel(outputs["pred_label"])[0])))
            labels.append(int(data.gt_label[index]))
            if "anomaly_map" in outputs and data.gt_mask is not None:
                anomaly_map = squeeze_map(torch.from_numpy(np.array(outputs["anomaly_map"][:1])), None)
                maps.append(anomaly_map)
                masks.append(squeeze_map(data.gt_mask[index : index + 1].int(), anomaly_map).bool())
    image_auroc = AUROC(fields=["pred_score", "gt_label"])
    image_auroc.update(SimpleNamespace(pred_score=torch.tensor(scores), gt_label=torch.tensor(labels)))
    result: dict[str, Any] = {"openvino_image_auroc": float(image_auroc.compute()), "openvino_pixel_auroc": None}
    result["openvino_image_f1"] = (
        float(binary_f1_score(torch.tensor(predicted), torch.tensor(labels))) if len(predicted) == len(labels) else None
    )
    if maps and any(bool(mask.any()) for mask in masks):
        pixel_auroc = AUROC(fields=["anomaly_map", "gt_mask"])
        pixel_auroc.update(SimpleNamespace(anomaly_map=torch.cat(maps), gt_mask=torch.cat(masks)))
        result["openvino_pixel_auroc"] = float(pixel_auroc.compute())
    return result


def trunk_layer(model: Any) -> tuple[str, str] | None:  # noqa: ANN401
    """``(backbone, deepest layer)`` of the first timm feature extractor inside ``model``, or None (no backbone)."""
    from anomalib.models.components import TimmFeatureExtractor

    for module in model.modules():
        if isinstance(module, TimmFeatureExtractor):
            # timm's feature names sort by depth ("blocks.1" < "blocks.4"); the trunk stops at the deepest
            deepest = max(module.layers, key=lambda name: [int(p) if p.isdigit() else p for p in name.split(".")])
            return module.backbone, deepest
    return None


def export_trunk(model: Any, image: Any, export_root: Path) -> tuple[Path, str] | None:  # noqa: ANN401
    """The bare backbone trunk of ``model`` (pretrained timm features only, up to its deepest layer), exported like
    the model (ONNX opset 18 -> OpenVINO) for ``image``'s size: ``(model.xml, "backbone:layer")``, or None."""
    import openvino as ov
    import torch
    from anomalib.models.components import TimmFeatureExtractor

    found = trunk_layer(model)
    if found is None:
        return None
    backbone, layer = found

    class Trunk(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.extractor = TimmFeatureExtractor(backbone=backbone, layers=[layer], pre_trained=True).eval()

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.extractor(image)[layer]

    export_root.mkdir(parents=True, exist_ok=True)
    onnx_path = export_root / "trunk.onnx"
    with torch.no_grad():
        torch.onnx.export(Trunk(), (speed_inputs([image])[0][None],), str(onnx_path), opset_version=18, dynamo=True)
    ov.save_model(ov.convert_model(onnx_path), export_root / "model.xml")
    return export_root / "model.xml", f"{backbone}:{layer}"


def quantize_trunk(trunk_xml: Path, datamodule: Any) -> Path:  # noqa: ANN401
    """The trunk, all of it quantised by NNCF (calibrated on ``datamodule``'s validation images, as the exports):
    how much INT8 speeds up the network alone, the ceiling of a model's INT8 speed-up at this size and threads."""
    import openvino as ov

    from anomalib_ext.models.components.quantization import quantize_calibrated

    model = ov.Core().read_model(str(trunk_xml))
    shape = model.input(0).partial_shape
    model.reshape({model.input(0): ov.PartialShape([-1, shape[1], shape[2], shape[3]])})  # batches of val images
    target = trunk_xml.with_name("model_int8.xml")
    ov.save_model(quantize_calibrated(model, datamodule), target)
    return target


def openvino_stage(engine, model, datamodule, images: list, torch_scores: list, settings: dict, cell_dir: Path) -> dict:  # noqa: ANN001, PLR0913
    """Export in every ``export_precisions`` (fp32 first), time each export beside the bare backbone trunk, and
    score each export on the test set with OpenVINO itself.

    The trunk and the exports are timed interleaved (one call of each in turn per image,
    ``time_interleaved``), so their ratios are measured under the same load. The first precision's figures
    also go to the top level of the result (``openvino_images_per_s``, ...), as before; ``openvino_exports`` holds
    one entry per precision (one row each in ``results.csv``).
    """
    threads = settings["threads"]
    started = time.perf_counter()
    precisions = settings.get("export_precisions") or ["fp32"]
    shape = tuple(images[0].shape)  # every runner compiled for this static input, like an edge deployment
    runners = {
        precision: OpenVinoRunner(
            export_openvino(
                engine, model, cell_dir / f"export_{precision}", precision, datamodule, input_size=shape[-2:]
            ),
            threads,
            image_shape=shape,
        )
        for precision in precisions
    }
    trunk = export_trunk(model, images[0], cell_dir / "export_trunk")
    trunks = {}
    if trunk is not None:
        trunks["trunk"] = OpenVinoRunner(trunk[0], threads, score_output=None, image_shape=shape)
        if "int8" in precisions:  # the network alone in INT8: the ceiling of any INT8 speed-up at this size
            int8_trunk = quantize_trunk(trunk[0], datamodule)
            trunks["trunk_int8"] = OpenVinoRunner(int8_trunk, threads, score_output=None, image_shape=shape)
    min_seconds = 0.0 if settings.get("quick") else MIN_TIMED_SECONDS  # --quick: one pass
    timed = time_interleaved({**trunks, **runners}, images, min_seconds)
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
            entry["openvino_stage_ms"] = stage_profile(runners[precision], runners[precision].arrays(images)[0])
        except Exception as error:  # noqa: BLE001
            entry["openvino_stage_ms"] = {"error": str(error)}
        if not settings.get("speed_only"):
            entry.update(openvino_accuracy(runners[precision], datamodule))
        exports.append(entry)
    result: dict[str, Any] = {**exports[0], "openvino_exports": exports}
    result["export_and_openvino_seconds"] = time.perf_counter() - started
    return result
