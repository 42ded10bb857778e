"""INT8 that keeps accuracy: each model names the modules NNCF may quantise; everything else stays in float.

anomalib's ``INT8_PTQ`` export (``anomalib export --compression_type INT8_PTQ --data ...``) calls
``nncf.quantize`` on the whole OpenVINO graph. That quantises the backbone convolutions, which is where INT8
pays, but also the density, PCA, distance, normalisation and calibration steps that follow, whose small
differences are the score: Dfkdm's bottle AUROC fell from 1.000 to 0.650 that way. Here:

- :func:`name_nodes_by_module` renames every node of the exported ONNX file after the torch module that made it
  (``model.feature_extractor/node_Conv_12``), from the module path the dynamo exporter records in each node's
  metadata. OpenVINO keeps node names as its operation names, so the IR (and OpenVINO's per-operation profile)
  says which module every operation belongs to;
- :func:`quantize_modules` is anomalib's post-training quantisation (same calibration data: the datamodule's
  validation images) with an ``nncf.IgnoredScope`` that leaves every operation outside the named modules in
  float, and NNCF's full bias correction (the fast one left Dfkdm's bottle AUROC at 0.979, the full one at
  0.998). A model that names no module gets its float graph back.

``ExtModelMixin`` applies both; a model declares its modules in ``int8_modules`` (see each model's README,
"Export and INT8").

NNCF calibrates an activation's INT8 range as the *mean* over calibration images of each image's extremes, which
clips the largest values of the others. Where a module multiplies unit vectors (TileOutlier's similarity product
with its bank, ``UNIT_VECTOR_MODULES``) that clipping shortens the largest components of every tile embedding and
lowered every cosine similarity (raw scores of normal synthetic images rose by 0.09). Their range is set to the
bound of a unit vector's components, [-1, 1], instead (:func:`bound_unit_vector_inputs`).
"""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from anomalib_ext.quiet import NNCF_LOGGER, quiet_loggers

logger = logging.getLogger(__name__)

# node metadata written by torch.onnx.export(dynamo=True): the module path of the node, outermost first
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
MODULE_SEPARATOR = "/"
RECOMMENDED_CALIBRATION_IMAGES = 300
NNCF_DEFAULT_SUBSET_SIZE = 300  # nncf.quantize's default subset_size, in loader items (batches)
MISSING_DATA_MESSAGE = (
    "INT8_PTQ calibrates on images and no datamodule was given: add --data to the export command "
    "(e.g. --data anomalib.data.MVTecAD --data.root DIR --data.category NAME), or datamodule= to Engine.export"
)


# modules, by their own name (the last part of their path), whose quantised inputs are unit vectors
# (components.tile_scoring.BankSimilarity); see the module docstring
UNIT_VECTOR_MODULES = ("bank_similarity",)


def name_nodes_by_module(onnx_path: Path | str) -> None:
    """Prefix every node name of the ONNX file with the path of the torch module that produced it."""
    import onnx

    model = onnx.load(str(onnx_path))
    renamed = False
    for node in model.graph.node:
        scopes = next((entry.value for entry in node.metadata_props if entry.key == _SCOPES_KEY), None)
        if not scopes:
            continue
        names = ast.literal_eval(scopes)  # ['', 'model', 'model.feature_extractor', 'conv2d']: last is the op
        module = names[-2] if len(names) >= 2 else ""  # noqa: PLR2004
        if module and not node.name.startswith(module + MODULE_SEPARATOR):
            node.name = f"{module}{MODULE_SEPARATOR}{node.name}"
            renamed = True
    if renamed:
        onnx.save(model, str(onnx_path))


def module_pattern(modules: Sequence[str]) -> str:
    """A regular expression matching the (renamed) operation names that are *not* inside ``modules``."""
    alternatives = "|".join(re.escape(module) for module in modules)
    return rf"(?!(?:{alternatives})[./])"


def calibration_transform(model: Any) -> Any:  # noqa: ANN401
    """Batch -> model input: the images, resized to the model's input size when the IR has a fixed one (an export
    with ``--input_size`` smaller than the data, which anomalib's own ``INT8_PTQ`` cannot calibrate)."""
    shape = model.input(0).partial_shape
    size = (shape[2].get_length(), shape[3].get_length()) if shape[2].is_static and shape[3].is_static else None

    def transform(batch: Any) -> Any:  # noqa: ANN401
        import torch

        images = batch["image"]
        if size is not None and tuple(images.shape[-2:]) != size:
            images = torch.nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True)
        return images.clamp(0.0, 1.0)

    return transform


def quantize_modules(model: Any, datamodule: Any, modules: Sequence[str]) -> Any:  # noqa: ANN401
    """NNCF post-training quantisation of the operations inside ``modules`` only (the rest stays float).

    Calibrates on ``datamodule``'s validation images, like anomalib's own ``INT8_PTQ``.
    """
    import nncf

    if datamodule is None:
        raise ValueError(MISSING_DATA_MESSAGE)
    if not modules:
        logger.warning("INT8_PTQ: this model declares no module that benefits from INT8; the export stays float")
        return model
    ignored = nncf.IgnoredScope(patterns=[module_pattern(modules)], validate=False)
    quantized = quantize_calibrated(model, datamodule, ignored)
    bound_unit_vector_inputs(quantized)
    return quantized


def _module_of(operation_name: str) -> str:
    """The torch module path in a (renamed) operation's name: ``model.bank_similarity/node_matmul_6`` -> its part
    before the separator; empty for operations OpenVINO created itself."""
    return operation_name.split(MODULE_SEPARATOR, 1)[0] if MODULE_SEPARATOR in operation_name else ""


def bound_unit_vector_inputs(model: Any, modules: Sequence[str] = UNIT_VECTOR_MODULES) -> int:  # noqa: ANN401
    """Give every activation quantiser read only by ``modules`` (by their own name) the range [-1, 1] of a unit
    vector's components, on NNCF's grid (zero stays a level); returns how many it changed.

    The calibrated range (mean of the calibration images' extremes) clips components that the bound never clips;
    the price is a coarser step (1/127), which moves a cosine similarity by about 0.002.
    """
    import numpy as np
    from openvino import opset13

    changed = 0
    for operation in model.get_ops():
        if operation.get_type_name() != "FakeQuantize":
            continue
        if operation.input(0).get_source_output().get_node().get_type_name() == "Constant":
            continue  # a weight: its range is its own extremes already
        readers = [target.get_node().get_friendly_name() for target in operation.output(0).get_target_inputs()]
        if not readers or any(_module_of(name).rsplit(".", 1)[-1] not in modules for name in readers):
            continue
        limits = [operation.input(index).get_source_output().get_node() for index in range(1, 5)]
        if any(limit.get_type_name() != "Constant" for limit in limits):
            continue
        high = float(np.max(limits[1].get_data()))  # input_high; NNCF's signed grid has low = -high * 128/127
        if high <= 0:
            continue
        for index, limit in zip(range(1, 5), limits, strict=True):
            rescaled = (limit.get_data() / high).astype(np.float32)
            operation.input(index).replace_source_output(opset13.constant(rescaled).output(0))
        changed += 1
    return changed


def calibration_loader(model: Any, datamodule: Any) -> Any:  # noqa: ANN401
    """The datamodule's validation loader, in batches of the IR's batch size when that is fixed (the loader uses
    ``eval_batch_size``; anomalib sets only ``train_batch_size``, which that loader never reads)."""
    datamodule.setup("fit")
    if model.input(0).partial_shape[0].is_static:
        datamodule.train_batch_size = datamodule.eval_batch_size = model.input(0).shape[0]
    return datamodule.val_dataloader()


def calibration_note(images: int, batches: int) -> str | None:
    """The one warning about the calibration set's size, in images (NNCF counts loader items, i.e. batches: its own
    "only N samples" said 1 where the loader held 20 images)."""
    if images >= RECOMMENDED_CALIBRATION_IMAGES:
        return None
    return (
        f"INT8 calibration uses all {images} validation images ({batches} batch{'es' if batches != 1 else ''}); "
        f"{RECOMMENDED_CALIBRATION_IMAGES} or more are recommended"
    )


def quantize_calibrated(model: Any, datamodule: Any, ignored_scope: Any = None) -> Any:  # noqa: ANN401
    """``nncf.quantize`` calibrated on ``datamodule``'s validation images (anomalib's ``INT8_PTQ`` data), with full
    bias correction; everything in ``ignored_scope`` stays float (``None``: the whole graph is quantised).

    NNCF's ``subset_size`` counts loader items (batches): the default 300 asks for 300 batches and NNCF warns when
    the loader has fewer. Passing ``min(batches, 300)`` calibrates on exactly what the default did, and the size
    warning is ours, in images. NNCF's per-operation INFO lines show with ``ANOMALIB_EXT_VERBOSE=1``.
    """
    import nncf

    dataloader = calibration_loader(model, datamodule)
    batches = len(dataloader)
    note = calibration_note(len(dataloader.dataset), batches)
    if note is not None:
        logger.warning(note)
    calibration = nncf.Dataset(dataloader, calibration_transform(model))
    with quiet_loggers((NNCF_LOGGER,)):
        return nncf.quantize(
            model,
            calibration,
            subset_size=max(1, min(batches, NNCF_DEFAULT_SUBSET_SIZE)),
            ignored_scope=ignored_scope,
            fast_bias_correction=False,
        )


# how the exported graph's pred_score relates to the raw score the threshold applies to
ScoreScale = Literal["raw", "softsign"]
MAX_RECENTRING_IMAGES = 300  # normal calibration images scored by both graphs to measure INT8's shift
RECENTRING_NODE = "int8_recentring/pred_score"  # the operation that makes the recentred score
# how close to 0 or 1 a normalised score may come before undoing the softsign (which is infinite there): the same
# bound for measuring the shift and for taking it off in the graph, so the two undo it alike
_SOFTSIGN_EDGE = 1e-7


def _softsign_inverse(scores: Any) -> Any:  # noqa: ANN401
    """``t`` from ``0.5 + 0.5 t / (1 + |t|)`` (``RobustThresholdPostProcessor``'s normalisation): raw units again."""
    import numpy as np

    centred = np.clip(2.0 * np.asarray(scores, dtype=np.float64) - 1.0, _SOFTSIGN_EDGE - 1.0, 1.0 - _SOFTSIGN_EDGE)
    return centred / (1.0 - np.abs(centred))


def normal_score_shift(float_model: Any, quantized: Any, datamodule: Any, scale: ScoreScale) -> float | None:  # noqa: ANN401
    """Median over the calibration split's normal images of the INT8 graph's image score minus the float graph's,
    in the units the threshold applies to (``None``: no normal image to measure it on)."""
    import numpy as np
    import openvino

    core = openvino.Core()
    compiled = [
        core.compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}) for graph in (float_model, quantized)
    ]
    transform = calibration_transform(quantized)
    shifts: list[float] = []
    for batch in calibration_loader(quantized, datamodule):
        normal = np.asarray(batch["gt_label"]).reshape(-1) == 0
        if not normal.any():
            continue
        images = np.asarray(transform(batch))
        reference, rounded = (
            np.asarray(graph(images)["pred_score"], dtype=np.float64).reshape(-1) for graph in compiled
        )
        if scale == "softsign":
            reference, rounded = _softsign_inverse(reference), _softsign_inverse(rounded)
        shifts.extend((rounded - reference)[normal].tolist())
        if len(shifts) >= MAX_RECENTRING_IMAGES:
            break
    return float(np.median(shifts)) if shifts else None


def shift_image_scores(graph: Any, shift: float, scale: ScoreScale) -> None:  # noqa: ANN401
    """Take ``shift`` (raw units) off the graph's ``pred_score`` where it is made, so every reader of it (the
    output, the label's comparison with the threshold) sees the corrected score."""
    import numpy as np
    from openvino import opset13 as ops

    result = next(output.get_node() for output in graph.outputs if "pred_score" in output.get_names())
    source = result.input(0).get_source_output()
    readers = list(source.get_target_inputs())
    dtype = source.get_element_type().to_dtype()

    def constant(value: float) -> Any:  # noqa: ANN401
        return ops.constant(np.array(value, dtype=dtype))

    if scale == "raw":
        corrected = ops.subtract(source, constant(shift))
    else:  # undo the softsign, shift, squash again: strictly increasing, still in (0, 1)
        centred = ops.clamp(
            ops.subtract(ops.multiply(source, constant(2.0)), constant(1.0)), _SOFTSIGN_EDGE - 1.0, 1.0 - _SOFTSIGN_EDGE
        )
        raw = ops.divide(centred, ops.subtract(constant(1.0), ops.abs(centred)))
        moved = ops.subtract(raw, constant(shift))
        squashed = ops.divide(moved, ops.add(constant(1.0), ops.abs(moved)))
        corrected = ops.add(constant(0.5), ops.multiply(constant(0.5), squashed))
    corrected.set_friendly_name(RECENTRING_NODE)
    names = source.get_tensor().get_names()
    source.get_tensor().set_names(set())
    corrected.output(0).get_tensor().set_names(names)
    for reader in readers:
        reader.replace_source_output(corrected.output(0))
    graph.validate_nodes_and_infer_types()


def recentre_on_normal_scores(float_model: Any, quantized: Any, datamodule: Any, scale: ScoreScale) -> float | None:  # noqa: ANN401
    """Measure INT8's shift of normal image scores and take it off the INT8 graph; returns the shift (raw units)."""
    shift = normal_score_shift(float_model, quantized, datamodule, scale)
    if shift is None:
        logger.warning(
            "INT8: no normal calibration image to measure the score shift on; the scores are left as they are"
        )
        return None
    shift_image_scores(quantized, shift, scale)
    logger.info("INT8: normal image scores moved by %+.4g (median, raw units); taken off the INT8 graph", shift)
    return shift
