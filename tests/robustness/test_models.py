"""Every model: constant, duplicated, tiny, mixed-mode images give finite scores and maps (no NaN, no /0);
two runs with the same seed give the same metrics; the exported OpenVINO model agrees with torch on real images.

Models are picked up from ``anomalib_ext.models.__all__`` as they land (cheapest settings from the harness
cases). The harness already checks OpenVINO parity on synthetic data and the checkpoint round trip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.harness.case import ModelCase
from tests.harness.runner import load_images
from tests.robustness.models import cheapest_cases, datamodule, engine, write_constant_dataset

CASES = cheapest_cases()
IDS = [case.name for case in CASES]
PARITY_TOLERANCE = 1e-3
OPENVINO_F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def _fit_and_predict(case: ModelCase, data_root: Path, category: str, workdir: Path):
    from lightning.pytorch import seed_everything

    seed_everything(0, workers=True)
    model = case.build()
    data = datamodule(data_root, category)
    run = engine(workdir, case)
    run.fit(model=model, datamodule=data)
    metrics = run.test(model=model, datamodule=data, verbose=False)[0]
    predictions = run.predict(model=model, dataloaders=data.test_dataloader())
    return model, run, metrics, predictions


@pytest.fixture(scope="module")
def constant_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_constant_dataset(tmp_path_factory.mktemp("constant"))


@pytest.fixture(scope="module")
def tiny_mvtec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from anomalib_ext.data.synthetic import make_mvtec_dataset

    root = tmp_path_factory.mktemp("tiny_mvtec")
    make_mvtec_dataset(root, category="synthetic", image_size=64, n_train=8, n_test_good=4, n_test_per_defect=1)
    return root


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_constant_duplicate_tiny_images_give_finite_outputs(case: ModelCase, constant_root: Path, tmp_path) -> None:
    _, _, metrics, predictions = _fit_and_predict(case, constant_root, "constant", tmp_path)
    for name, value in metrics.items():
        assert np.isfinite(float(value)), f"{case.name}: metric {name} = {value} on constant images"
    for batch in predictions:
        assert torch.isfinite(batch.pred_score).all(), f"{case.name}: scores {batch.pred_score.flatten().tolist()}"
        if batch.anomaly_map is not None:
            assert torch.isfinite(batch.anomaly_map).all(), f"{case.name}: anomaly map has NaN/inf"


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def seeded_run(request, tiny_mvtec: Path, tmp_path_factory: pytest.TempPathFactory):
    """One seeded fit per model, shared by the determinism and the real-data parity tests."""
    case: ModelCase = request.param
    return case, _fit_and_predict(case, tiny_mvtec, "synthetic", tmp_path_factory.mktemp(f"{case.name}_a"))


def test_same_seed_gives_same_metrics_and_predictions(seeded_run, tiny_mvtec: Path, tmp_path: Path) -> None:
    case, (_, _, metrics_a, predictions_a) = seeded_run
    _, _, metrics_b, predictions_b = _fit_and_predict(case, tiny_mvtec, "synthetic", tmp_path)
    assert metrics_a.keys() == metrics_b.keys()
    for name in metrics_a:
        assert float(metrics_a[name]) == pytest.approx(float(metrics_b[name]), abs=1e-6), f"{case.name}: {name}"
    scores_a = torch.cat([b.pred_score.flatten() for b in predictions_a])
    scores_b = torch.cat([b.pred_score.flatten() for b in predictions_b])
    torch.testing.assert_close(scores_a, scores_b, rtol=0, atol=1e-6)
    labels_a = torch.cat([b.pred_label.flatten() for b in predictions_a])
    labels_b = torch.cat([b.pred_label.flatten() for b in predictions_b])
    assert torch.equal(labels_a, labels_b)


def _real_images(real_data: Path) -> list[Path]:
    bottle = real_data / "mvtec_ad" / "bottle" / "test"
    dice = real_data / "dice"
    picks = [sorted((bottle / folder).glob("*.png"))[:2] for folder in ("good", "broken_large", "contamination")]
    picks.append(sorted((dice / "val" / "anomalous").glob("*.png"))[:2])
    picks.append(sorted((dice / "train" / "good" / "00").glob("*.png"))[:2])
    return [path for group in picks for path in group]


def test_openvino_matches_torch_on_real_images(seeded_run, real_data: Path, tmp_path: Path, request) -> None:
    """Scores, maps (max abs diff < 1e-3 after the exported post-processing) and labels identical on real data."""
    from anomalib.deploy import ExportType, OpenVINOInferencer

    case, (model, run, _, _) = seeded_run
    if not case.exportable:
        pytest.skip(f"{case.name} is not exportable")
    size = case.image_size
    xml = Path(
        run.export(
            model=model,
            export_type=ExportType.OPENVINO,
            export_root=tmp_path / "export",
            input_size=(size, size),
            **case.export_kwargs,
        )
    )
    paths = _real_images(real_data)
    assert paths, "no real images found"
    images = load_images(paths, size)
    model = model.eval().cpu()
    with torch.no_grad():
        reference = model(images)
    inferencer = OpenVINOInferencer(path=xml, device="CPU", config=OPENVINO_F32)
    for index, path in enumerate(paths):
        result = inferencer.predict(images[index].numpy())
        torch_score = float(reference.pred_score.flatten()[index])
        assert abs(float(np.ravel(result.pred_score)[0]) - torch_score) < PARITY_TOLERANCE, f"{path}: score"
        if reference.anomaly_map is not None:
            torch_map = reference.anomaly_map[index].squeeze().numpy()
            openvino_map = np.asarray(result.anomaly_map).squeeze()
            assert openvino_map.shape == torch_map.shape, f"{path}: map shape"
            difference = float(np.abs(openvino_map - torch_map).max())
            assert difference < PARITY_TOLERANCE, f"{path}: map differs by {difference}"
        if reference.pred_label is not None:
            assert bool(np.ravel(result.pred_label)[0]) == bool(reference.pred_label.flatten()[index]), f"{path}"
