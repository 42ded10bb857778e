"""Edge deployment: INT8 exports that keep their ranking, the quantisation recipe, TileOutlier's one-read scoring.

The INT8 parity test trains every harness family on the synthetic data (tests/harness), exports it twice through
anomalib (plain OpenVINO, and ``INT8_PTQ`` with the model's own recipe) and checks that the INT8 model still
ranks every planted defect the f32 export separates above every normal image.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_ext.models.components.quantization import RECENTRING_NODE, module_pattern, shift_image_scores
from tests.harness.configs import build_from_config, config_id, model_configs, model_section


# -------------------------------------------------------------------------------------- the recipe itself
def test_module_pattern_keeps_everything_outside_the_named_modules_in_float() -> None:
    pattern = re.compile(module_pattern(("model.feature_extractor", "model.teacher")))
    ignored = [
        "model/node_matmul_6",
        "model.density/node_matmul",
        "model.feature_extractor_extra/node_Conv_1",  # a sibling whose name only starts the same
        "post_processor/node_lt_1",
        "node_Conv_3",
    ]
    quantised = ["model.feature_extractor/node_Conv_896/WithoutBiases", "model.teacher.blocks/node_Conv_1"]
    assert all(pattern.match(name) for name in ignored)
    assert not any(pattern.match(name) for name in quantised)


LEARNED_LAYERS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)


def _layers_run_by_inference(model: torch.nn.Module) -> list[str]:
    """The convolution and linear layers an eval forward of the (unfitted) model calls, in order: the ones an INT8
    export could speed up. A fit-only model may stop once its features reach the empty memory bank or density;
    the layers before that have run by then. The pre-processor resizes the image to the model's size."""
    ran: list[str] = []
    hooks = [
        module.register_forward_hook(lambda *_args, name=name: ran.append(name))
        for name, module in model.named_modules()
        if isinstance(module, LEARNED_LAYERS)
    ]
    images = torch.rand(1, 3, 256, 256)
    try:
        with torch.no_grad():
            model.eval()(images)
    except Exception:  # noqa: BLE001, S110  (an unfitted bank or density; the network in front of it has run)
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return ran


def _graph_with_score_and_label(threshold: float) -> object:
    """A stand-in exported graph: ``pred_score`` = its input, ``pred_label`` = the score against ``threshold``."""
    import openvino
    from openvino import opset13 as ops

    images = ops.parameter([4], np.float32, name="input")
    score = ops.multiply(images, ops.constant(np.float32(1.0)))
    label = ops.greater(score, ops.constant(np.float32(threshold)))
    score.output(0).get_tensor().set_names({"pred_score"})
    label.output(0).get_tensor().set_names({"pred_label"})
    return openvino.Model([ops.result(score), ops.result(label)], [images])


@pytest.mark.parametrize("scale", ["raw", "softsign"])
def test_recentring_takes_the_shift_off_the_score_and_the_label_it_makes(scale: str) -> None:
    """INT8 recentring (quantization.shift_image_scores): the output keeps its name, the label reads the corrected
    score, and on the normalised (softsign) scale the shift is applied in raw units, keeping the order and (0, 1)."""
    import openvino

    graph = _graph_with_score_and_label(0.5 if scale == "softsign" else 2.0)
    shift_image_scores(graph, 0.6, scale)  # type: ignore[arg-type]
    assert [op.get_type_name() for op in graph.get_ops() if op.get_friendly_name() == RECENTRING_NODE] != []
    compiled = openvino.Core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    inputs = np.array([0.2, 0.55, 0.8, 0.9] if scale == "softsign" else [1.0, 2.3, 2.7, 3.0], dtype=np.float32)
    outputs = compiled(inputs)
    scores, labels = outputs["pred_score"], outputs["pred_label"]
    if scale == "raw":
        np.testing.assert_allclose(scores, inputs - 0.6, atol=1e-6)
        assert labels.tolist() == [False, False, True, True]  # 2.3 - 0.6 is below 2.0 now, 2.7 - 0.6 above
    else:
        raw = (2 * inputs - 1) / (1 - np.abs(2 * inputs - 1))  # the softsign undone
        moved = raw - 0.6
        np.testing.assert_allclose(scores, 0.5 + 0.5 * moved / (1 + np.abs(moved)), atol=1e-5)
        assert (np.diff(scores) > 0).all() and (scores > 0).all() and (scores < 1).all()
        assert labels.tolist() == (scores > 0.5).tolist() == [False, False, True, True]  # 0.55 was above, is below


@pytest.mark.parametrize("config", model_configs(), ids=config_id)
def test_int8_recipe_quantises_the_networks_inference_runs_and_nothing_else(config: Path, tmp_path: Path) -> None:
    """From each shipped config: every convolution or linear layer the model's inference runs lies inside a module
    the model declares for INT8 (TemplateSsim runs none and declares none), a declared module is a real submodule,
    and never the whole torch model (its scoring stays in float). Training-only networks (TeacherStudent's
    synthetic-anomaly classifier) need not be declared."""
    overrides = {}
    single_template = model_section(config).get("init_args", {}).get("single_template")
    if single_template:  # it points at the user's own image: give it one
        template = tmp_path / "good.png"
        Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8)).save(template)
        overrides["single_template"] = {**single_template, "path": str(template)}
    model = build_from_config(config, **overrides)
    ran = sorted(set(_layers_run_by_inference(model)))
    declared = model.quantized_modules()
    for module in declared:
        model.get_submodule(module)  # raises for a name that is not there
    assert "model" not in declared and len(set(declared)) == len(declared), declared
    inside = {module: [name for name in ran if name.startswith(f"{module}.")] for module in declared}
    outside = [name for name in ran if not any(name in names for names in inside.values())]
    assert not outside, f"{config_id(config)}: runs {outside} in float although INT8 could take them"
    assert not ran or any(inside.values()), f"{config_id(config)}: declares {declared}, runs {ran}"


# -------------------------------------------------------------------------------- TileOutlier's scoring
def _brute_force_scores(model, embeddings: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """Each tile against the bank tiles of every grid position within ``neighborhood``: the definition."""
    batch, rows, cols, _ = embeddings.shape
    pad = model.neighborhood
    scores = torch.empty(batch, rows, cols)
    for b in range(batch):
        for i in range(rows):
            for j in range(cols):
                candidates = [
                    model.memory_bank[pad + i + dy, pad + j + dx]
                    for dy in range(-pad, pad + 1)
                    for dx in range(-pad, pad + 1)
                    if 0 <= i + dy < rows and 0 <= j + dx < cols
                ]
                similarity = embeddings[b, i, j] @ torch.cat(candidates).T
                top = similarity.topk(min(model.num_neighbors, similarity.numel())).values
                scores[b, i, j] = 1 - top.mean()
    return scores


@pytest.mark.parametrize(
    ("neighborhood", "num_neighbors", "width"), [(1, 1, 64), (1, 3, 64), (2, 2, 64), (0, 1, 64), (1, 2, 40)]
)
def test_position_aware_scores_read_each_bank_position_once_and_equal_the_definition(
    neighborhood: int, num_neighbors: int, width: int
) -> None:
    from anomalib_ext.models.tile_outlier.torch_model import TileOutlierModel

    torch.manual_seed(0)
    model = TileOutlierModel(
        image_size=(64, width),
        num_parts=None,
        tile_size=16,
        stride=8,
        embed="pool",
        backbone="tf_efficientnet_lite0",
        layers=["blocks.1"],
        input_normalization="backbone",
        pre_trained=False,
        crop_size=None,
        position_aware=True,
        neighborhood=neighborhood,
        num_neighbors=num_neighbors,
        max_bank_size=7 * 7 * 5,
        map_sigma=0.0,
    ).eval()
    rows, cols = model.grid.shape  # 7 x 7, or 7 x 4 (a grid that is not square)
    normal = torch.nn.functional.normalize(torch.randn(12, rows, cols, 24), dim=-1)
    model.fit(normal)
    queries = torch.nn.functional.normalize(torch.randn(2, rows, cols, 24), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(model.tile_scores(queries), _brute_force_scores(model, queries), atol=1e-5, rtol=0)


# INT8 exports of every family against torch (scores, ranking, maps, and which operations run in INT8):
# tests/robustness/test_models.py::test_int8_export_keeps_scores_ranking_and_maps, on the models it trains once.


def _quantised_readers(xml: Path) -> set[str]:
    """Names of the operations of an IR that read an INT8 (fake-quantised) input."""
    import openvino

    return {
        target.get_node().get_friendly_name()
        for op in openvino.Core().read_model(xml).get_ops()
        if op.get_type_name() == "FakeQuantize"
        for target in op.output(0).get_target_inputs()
    }


def _openvino_predictions(xml: Path, images: torch.Tensor) -> list:
    """The export's predictions, one image at a time, in f32 inference precision (the CPU's bf16 default moves
    scores by about 1e-2)."""
    from anomalib.deploy import OpenVINOInferencer

    inferencer = OpenVINOInferencer(path=xml, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})
    return [inferencer.predict(image.numpy()) for image in images]


def test_tile_outlier_int8_export_runs_the_bank_search_in_int8_and_keeps_the_ranking(tmp_path: Path) -> None:
    """A small TileOutlier fitted on synthetic normals, exported twice through anomalib's ``Engine.export`` (as
    ``anomalib export`` does; the post-processor's normalisation off, since its clamping to [0, 1] ties scores):
    the f32 graph equals torch (raw scores and maps within 1e-3); the INT8 graph quantises the similarity product
    with the bank (an INT8 constant, INT8 queries) besides the backbone, and nothing else, and still ranks every
    planted defect that torch ranks above all normal images above all of them."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    from anomalib_ext.data.synthetic import make_mvtec_dataset
    from anomalib_ext.models import TileOutlier
    from tests.harness.case import ModelCase
    from tests.harness.runner import export_raw_openvino, load_images, raw_outputs

    torch.manual_seed(0)
    size = 64
    category = make_mvtec_dataset(tmp_path, image_size=size, n_train=16, n_test_good=6, n_test_per_defect=2, seed=5)
    model = TileOutlier(image_size=size, tiling={"tile_size": 16, "stride": 8}, layers=["blocks.1", "blocks.2"])
    datamodule = MVTecAD(root=tmp_path, category=category.name, num_workers=0, train_batch_size=16, eval_batch_size=16)
    engine = Engine(default_root_dir=tmp_path / "run", accelerator="cpu", logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    case = ModelCase(name="tile_outlier", build=lambda: model, image_size=size)
    f32_xml = export_raw_openvino(model, engine, case, tmp_path / "f32")
    int8_xml = export_raw_openvino(model, engine, case, tmp_path / "int8", datamodule)

    readers = _quantised_readers(int8_xml)
    assert any(name.startswith("model.bank_similarity/") for name in readers), sorted(readers)
    assert all(name.startswith(("model.feature_extractor", "model.bank_similarity")) for name in readers), readers
    assert not _quantised_readers(f32_xml)

    paths = sorted(category.glob("test/*/*.png"))
    normal = np.array([path.parent.name == "good" for path in paths])
    images = load_images(paths, size)
    reference = raw_outputs(model, images)
    f32_results = _openvino_predictions(f32_xml, images)
    torch_scores = reference.pred_score.flatten().numpy()
    f32_scores = np.array([float(np.ravel(result.pred_score)[0]) for result in f32_results])
    np.testing.assert_allclose(f32_scores, torch_scores, atol=1e-3, rtol=0)
    for index, result in enumerate(f32_results):
        torch_map = reference.anomaly_map[index].squeeze().numpy()
        assert np.abs(np.asarray(result.anomaly_map).squeeze() - torch_map).max() < 1e-3

    int8_results = _openvino_predictions(int8_xml, images)
    int8_scores = np.array([float(np.ravel(result.pred_score)[0]) for result in int8_results])
    found = torch_scores > torch_scores[normal].max()
    summary = f"torch {torch_scores.round(4).tolist()}, INT8 {int8_scores.round(4).tolist()}, normal {normal.tolist()}"
    assert found.sum() >= 2, f"torch separates too few planted defects to test a ranking: {summary}"  # noqa: PLR2004
    assert (int8_scores[found] > int8_scores[normal].max()).all(), f"a normal passes a defect in INT8: {summary}"
    # the normal images, where the threshold lives, keep their raw score (``1 -`` cosine, about 0.1 here): with
    # NNCF's calibrated range for the embeddings instead of [-1, 1] they rose by 0.09-0.11 (measured <= 0.012 now)
    assert np.abs(int8_scores - torch_scores)[normal].max() < 0.05, summary  # noqa: PLR2004
    assert not np.allclose(int8_scores, f32_scores, atol=1e-6, rtol=0), "the INT8 graph scores exactly like f32"


# ------------------------------------------------------------------------------------ the exported input shape
def test_export_takes_a_static_batch_of_one_unless_anomalibs_axes_are_asked_for(tmp_path: Path) -> None:
    """With ``input_size`` the IR takes ``[1, 3, H, W]`` (tracing anomalib's symbolic batch took three times as long,
    and every consumer runs one image at a time); ``dynamic_axes`` in ``onnx_kwargs`` gives anomalib's batch axis."""
    import openvino as ov

    from anomalib_ext.models import Reconstruction

    model = Reconstruction(image_size=64).eval()
    static = model.to_openvino(tmp_path / "static", input_size=(64, 64))
    assert ov.Core().read_model(str(static)).input(0).get_partial_shape().to_shape() == [1, 3, 64, 64]
    dynamic = model.to_openvino(
        tmp_path / "dynamic", input_size=(64, 64), onnx_kwargs={"dynamic_axes": {"input": {0: "batch"}}}
    )
    shape = ov.Core().read_model(str(dynamic)).input(0).get_partial_shape()
    assert shape[0].is_dynamic and [dimension.get_length() for dimension in list(shape)[1:]] == [3, 64, 64]
