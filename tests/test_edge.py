"""Edge deployment: INT8 exports that keep their ranking, the quantisation recipe, TileOutlier's one-read scoring.

The INT8 parity test trains every harness family on the synthetic data (tests/harness), exports it twice through
anomalib (plain OpenVINO, and ``INT8_PTQ`` with the model's own recipe) and checks that the INT8 model still
ranks every planted defect the f32 export separates above every normal image.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalib_ext.models.components.quantization import module_pattern


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


def test_declared_modules_per_family() -> None:
    from anomalib_ext.models import Dfkdm, Reconstruction, TeacherStudent, TemplateSsim, TileOutlier

    assert TileOutlier.int8_modules == ("model.feature_extractor",)
    assert TeacherStudent.int8_modules == ("model.teacher", "model.student", "model.projections")
    assert Reconstruction.int8_modules == ("model.autoencoder",)
    assert TemplateSsim.int8_modules == ()
    assert Dfkdm(image_size=64).quantized_modules() == ("model.feature_extractor",)
    lake = Dfkdm(feature_source="autoencoder", image_size=64, num_downsamples=2, latent_dim=8, base_channels=8)
    assert lake.quantized_modules() == ("model.autoencoder",)


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
    model.fit_bank(normal)
    queries = torch.nn.functional.normalize(torch.randn(2, rows, cols, 24), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(model.tile_scores(queries), _brute_force_scores(model, queries), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ INT8 parity per family
CASE_NAMES = ["template_ssim", "tile_outlier", "dfkdm_backbone", "reconstruction_ae", "teacher_student"]


def _separated(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Which defective images score above every normal image."""
    return scores[labels == 1] > scores[labels == 0].max()


@pytest.mark.parametrize("name", CASE_NAMES)
def test_int8_export_ranks_planted_defects_like_the_f32_export(
    name: str, mvtec_root: Path, dice_root: Path, tmp_path: Path
) -> None:
    import openvino as ov

    from tests.harness.runner import export_raw_openvino, load_images, make_datamodule, train_case

    case = importlib.import_module(f"tests.harness.cases.{name}").CASE
    data_root = dice_root if case.dataset == "dice" else mvtec_root
    trained = train_case(case, data_root, tmp_path)
    images = load_images(trained.image_paths, case.image_size).numpy()
    core = ov.Core()
    scores, fake_quantize = {}, {}
    for precision in ("fp32", "int8"):
        calibration = make_datamodule(case, data_root) if precision == "int8" else None
        # raw scores: normalised ones are clamped to [0, 1] and tie every image beyond the validation range
        xml = export_raw_openvino(trained.model, trained.engine, case, tmp_path / precision, calibration)
        model = core.read_model(xml)
        # what each quantiser feeds (NNCF names a quantiser after the op whose output it rounds, which may be an
        # op OpenVINO created; the op that reads the rounded values is the one that runs in INT8)
        fake_quantize[precision] = [
            target.get_node().get_friendly_name()
            for op in model.get_ops()
            if op.get_type_name() == "FakeQuantize"
            for target in op.output(0).get_target_inputs()
        ]
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        scores[precision] = np.array([float(np.ravel(compiled(image[None])["pred_score"])[0]) for image in images])
    labels = trained.labels
    f32_separated = _separated(scores["fp32"], labels)
    int8_separated = _separated(scores["int8"], labels)
    assert f32_separated.mean() >= case.min_separated_fraction
    # every defect the f32 export puts above all normal images, the INT8 export does too
    assert int8_separated[f32_separated].all(), (
        f"INT8 lost {int(f32_separated.sum() - (int8_separated & f32_separated).sum())} separated defects"
    )
    quantised = trained.model.quantized_modules()
    if not quantised:  # nothing benefits: the INT8 export is the float graph
        assert not fake_quantize["int8"]
        np.testing.assert_allclose(scores["int8"], scores["fp32"], atol=1e-6)
        return
    assert fake_quantize["int8"], "INT8_PTQ quantised nothing"
    # the recipe: every operation that reads quantised values belongs to a declared module
    prefixes = tuple(f"{module}{separator}" for module in quantised for separator in "/.")
    outside = sorted({name for name in fake_quantize["int8"] if not name.startswith(prefixes)})
    assert not outside, outside
