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
(:func:`trunk_speed`: the same timm backbone, features only, up to the model's deepest layer, exported the same
way, same size, same threads, timed just before the model).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

WARMUP_CALLS = 2
EXPORT_PRECISIONS = ("fp32", "int8")


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
) -> Path:
    """anomalib's OpenVINO export (opset 18: this onnx cannot down-convert some ops, e.g. Pad, to 14).

    ``int8`` is anomalib's ``INT8_PTQ`` compression, calibrated on ``datamodule``'s validation images: exactly
    what ``anomalib export --compression_type INT8_PTQ --data ...`` does, including a model's own recipe.
    """
    from anomalib.deploy import CompressionType, ExportType

    if precision not in EXPORT_PRECISIONS:
        msg = f"export precision must be one of {EXPORT_PRECISIONS}, got {precision!r}"
        raise ValueError(msg)
    compression: dict[str, Any] = {}
    if precision == "int8":
        compression = {"compression_type": CompressionType.INT8_PTQ, "datamodule": datamodule}
    return Path(
        engine.export(
            model=model,
            export_type=ExportType.OPENVINO,
            export_root=export_root,
            onnx_kwargs={"opset_version": 18},
            **compression,
        )
    )


def compile_openvino(xml_path: Path, threads: int) -> Any:  # noqa: ANN401
    """The IR compiled for the CPU: f32 inference precision (not the bf16 default), ``threads`` threads, latency."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    return ov.Core().compile_model(str(xml_path), "CPU", config)


def _batch_of(compiled: Any) -> int:  # noqa: ANN401
    dimension = compiled.input(0).get_partial_shape()[0]
    return dimension.get_length() if dimension.is_static else 1


def _outputs(compiled: Any, request: Any) -> dict[str, Any]:  # noqa: ANN401
    return {next(iter(output.get_names())): request.get_tensor(output).data for output in compiled.outputs}


def openvino_speed(xml_path: Path, images: Sequence[Any], threads: int) -> dict[str, Any]:
    """The exported IR (f32 inference, ``threads`` threads) at batch size 1, one synchronous request.

    Some graphs come out of the exporter with a static batch size (anomalib's Dfm: 2); those get the image
    repeated to fill the batch, and every image in the batch counts towards images/s.
    """
    import numpy as np

    xml_path = Path(xml_path)
    compiled = compile_openvino(xml_path, threads)
    request = compiled.create_infer_request()
    batch = _batch_of(compiled)
    arrays = [np.repeat(image.numpy()[None], batch, axis=0) for image in speed_inputs(images)]

    def call(array: Any) -> float:  # noqa: ANN401
        request.infer(array)
        return float(np.ravel(_outputs(compiled, request)["pred_score"])[0])

    timed = time_calls(call, arrays, images_per_call=batch)
    precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    size_bytes = sum(p.stat().st_size for p in xml_path.parent.glob("model.*") if p.suffix in (".xml", ".bin"))
    return {
        "openvino_images_per_s": timed["images_per_s"],
        "openvino_threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
        "openvino_inference_precision": getattr(precision, "to_string", lambda: str(precision))(),
        "openvino_load_average_1min": timed["load_average_1min"],
        "openvino_batch": batch,
        "openvino_model_mb": size_bytes / 2**20,
        "openvino_scores": timed["scores"],
    }


def openvino_accuracy(xml_path: Path, datamodule: Any, threads: int) -> dict[str, Any]:  # noqa: ANN401
    """Image and pixel AUROC of the exported model itself (OpenVINO, f32 inference) on every test image."""
    import numpy as np
    import torch
    from anomalib.metrics import AUROC

    from benchmarking.cell import squeeze_map

    compiled = compile_openvino(Path(xml_path), threads)
    request = compiled.create_infer_request()
    batch = _batch_of(compiled)
    scores, labels, maps, masks = [], [], [], []
    for data in datamodule.test_dataloader():
        for index, image in enumerate(speed_inputs(data.image)):
            request.infer(np.repeat(image.numpy()[None], batch, axis=0))
            outputs = _outputs(compiled, request)
            scores.append(float(np.ravel(outputs["pred_score"])[0]))
            labels.append(int(data.gt_label[index]))
            if "anomaly_map" in outputs and data.gt_mask is not None:
                anomaly_map = squeeze_map(torch.from_numpy(np.array(outputs["anomaly_map"][:1])), None)
                maps.append(anomaly_map)
                masks.append(squeeze_map(data.gt_mask[index : index + 1].int(), anomaly_map).bool())
    image_auroc = AUROC(fields=["pred_score", "gt_label"])
    image_auroc.update(SimpleNamespace(pred_score=torch.tensor(scores), gt_label=torch.tensor(labels)))
    result: dict[str, Any] = {"openvino_image_auroc": float(image_auroc.compute()), "openvino_pixel_auroc": None}
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


def trunk_speed(model: Any, images: Sequence[Any], threads: int, export_root: Path) -> dict[str, Any]:  # noqa: ANN401
    """The bare backbone trunk (pretrained timm features only, up to the model's deepest layer), exported like the
    model (ONNX opset 18 -> OpenVINO) at the model's input size and timed with the same routine and threads.
    """
    import openvino as ov
    import torch
    from anomalib.models.components import TimmFeatureExtractor

    found = trunk_layer(model)
    if found is None:
        return {"backbone_img_per_s": None, "backbone_layer": None}
    backbone, layer = found

    class Trunk(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.extractor = TimmFeatureExtractor(backbone=backbone, layers=[layer], pre_trained=True).eval()

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.extractor(image)[layer]

    inputs = speed_inputs(images)
    export_root.mkdir(parents=True, exist_ok=True)
    onnx_path = export_root / "trunk.onnx"
    with torch.no_grad():
        torch.onnx.export(Trunk(), (inputs[0][None],), str(onnx_path), opset_version=18, dynamo=True)
    ov.save_model(ov.convert_model(onnx_path), export_root / "trunk.xml")
    compiled = compile_openvino(export_root / "trunk.xml", threads)
    request = compiled.create_infer_request()

    def call(image: Any) -> float:  # noqa: ANN401
        request.infer(image.numpy()[None])
        return 0.0

    timed = time_calls(call, inputs)
    return {
        "backbone_img_per_s": timed["images_per_s"],
        "backbone_layer": f"{backbone}:{layer}",
        "backbone_load_average_1min": timed["load_average_1min"],
    }
