"""Every model family, through anomalib's own machinery: train, detect, export, agree, reload.

A family joins by adding ``tests/harness/cases/<name>.py`` with a ``CASE``.
"""

from __future__ import annotations

import importlib
import pkgutil

import numpy as np
import pytest
import torch
from anomalib.deploy import OpenVINOInferencer

import tests.harness.cases as cases_package
from tests.harness.case import ModelCase
from tests.harness.runner import TrainedCase, export_openvino, load_images, train_case

CASES: list[ModelCase] = [
    importlib.import_module(f"{cases_package.__name__}.{info.name}").CASE
    for info in pkgutil.iter_modules(cases_package.__path__)
]

PARITY_TOLERANCE = 1e-3
# OpenVINO runs in bf16 by default on CPUs that have it (this one does), which moves scores by ~1e-2.
OPENVINO_F32 = {"INFERENCE_PRECISION_HINT": "f32"}


@pytest.fixture(scope="module", params=CASES, ids=[case.name for case in CASES])
def trained(request, tmp_path_factory, mvtec_root, dice_root) -> TrainedCase:
    case: ModelCase = request.param
    data_root = dice_root if case.dataset == "dice" else mvtec_root
    return train_case(case, data_root, tmp_path_factory.mktemp(case.name))


def test_planted_defects_outscore_normal_images(trained: TrainedCase) -> None:
    from sklearn.metrics import roc_auc_score

    normal = trained.scores[trained.labels == 0]
    defective = trained.scores[trained.labels == 1]
    assert len(normal) > 0
    assert len(defective) > 0
    assert np.isfinite(trained.scores).all(), "scores contain NaN or inf"
    separated = float((defective > normal.max()).mean())
    auroc = roc_auc_score(trained.labels, trained.scores)
    assert separated >= trained.case.min_separated_fraction, (
        f"only {separated:.0%} of defective images score above every normal image "
        f"(normal max {normal.max():.3f}, defective {np.sort(defective).round(3)})"
    )
    assert auroc >= trained.case.min_image_auroc, f"image AUROC {auroc:.3f}"


def _torch_outputs(trained: TrainedCase, images: torch.Tensor):
    model = trained.model.eval().cpu()
    with torch.no_grad():
        return model(images)


def test_openvino_export_matches_torch(trained: TrainedCase) -> None:
    if not trained.case.exportable:
        pytest.skip(f"{trained.case.name} is not exportable")
    xml = export_openvino(trained)
    assert xml.is_file()
    inferencer = OpenVINOInferencer(path=xml, device="CPU", config=OPENVINO_F32)
    paths = trained.image_paths[:: max(1, len(trained.image_paths) // 6)]
    images = load_images(paths, trained.case.image_size)
    reference = _torch_outputs(trained, images)
    for index in range(len(paths)):
        result = inferencer.predict(images[index].numpy())
        score_difference = abs(float(np.ravel(result.pred_score)[0]) - float(reference.pred_score.flatten()[index]))
        assert score_difference < PARITY_TOLERANCE, f"{paths[index]}: score differs by {score_difference}"
        if reference.anomaly_map is not None:
            torch_map = reference.anomaly_map[index].squeeze().numpy()
            openvino_map = np.asarray(result.anomaly_map).squeeze()
            assert openvino_map.shape == torch_map.shape
            map_difference = float(np.abs(openvino_map - torch_map).max())
            assert map_difference < PARITY_TOLERANCE, f"{paths[index]}: map differs by {map_difference}"
        if reference.pred_label is not None:
            assert bool(np.ravel(result.pred_label)[0]) == bool(reference.pred_label.flatten()[index])


def test_checkpoint_round_trip_gives_identical_predictions(trained: TrainedCase) -> None:
    model_class = type(trained.model)
    reloaded = model_class.load_from_checkpoint(trained.checkpoint, map_location="cpu").eval()
    images = load_images(trained.image_paths[:6], trained.case.image_size)
    expected = _torch_outputs(trained, images)
    with torch.no_grad():
        actual = reloaded(images)
    torch.testing.assert_close(actual.pred_score, expected.pred_score, rtol=0, atol=1e-6)
    if expected.anomaly_map is not None:
        torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, rtol=0, atol=1e-6)
