"""Every model: constant, duplicated, tiny, mixed-mode images give finite scores and maps (no NaN, no /0) and
never flag a normal image; two runs with the same seed give the same metrics; the exported OpenVINO model agrees
with torch, compared on the raw scores and maps (before normalisation and clamping, which would turn most
real-image scores into 1.0 on both sides): f32 on real images (skipped without ../shared/data), INT8 on fresh
synthetic images (never skipped for want of data).

Models are picked up from ``anomalib_ext.models.__all__`` as they land (cheapest settings from the harness
cases). The harness already checks OpenVINO parity on synthetic data and the checkpoint round trip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.harness.case import ModelCase
from tests.harness.runner import export_raw_openvino, load_images, raw_outputs
from tests.robustness.models import cheapest_cases, datamodule, engine, write_constant_dataset

CASES = cheapest_cases()
IDS = [case.name for case in CASES]
PARITY_TOLERANCE = 1e-3
OPENVINO_F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def _fit_and_predict(case: ModelCase, data_root: Path, category: str, workdir: Path):
    from lightning.pytorch import seed_everything

    seed_everything(0, workers=True)
    model = case.build()
    # the case's epochs are these tests' budget (8 images: the gradient families' 50-step floor, tested in
    # tests/test_few_normals.py, would train them several times longer than the INT8 bars were measured at)
    if hasattr(model, "min_steps"):
        model.min_steps = 0
    data = datamodule(data_root, category)
    run = engine(workdir, case)
    run.fit(model=model, datamodule=data)
    metrics = run.test(model=model, datamodule=data, verbose=False)[0]
    predictions = run.predict(model=model, dataloaders=data.test_dataloader())
    return model, run, metrics, predictions, data


def _torch_and_openvino(model, xml: Path, paths: list[Path], image_size: int):  # noqa: ANN001, ANN202
    """The torch model's raw outputs on the images, and the OpenVINO export's predictions, one image at a time."""
    from anomalib.deploy import OpenVINOInferencer

    images = load_images(paths, image_size)
    inferencer = OpenVINOInferencer(path=xml, device="CPU", config=OPENVINO_F32)
    return raw_outputs(model, images), [inferencer.predict(images[index].numpy()) for index in range(len(paths))]


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
    _, _, metrics, predictions, _ = _fit_and_predict(case, constant_root, "constant", tmp_path)
    for name, value in metrics.items():
        assert np.isfinite(float(value)), f"{case.name}: metric {name} = {value} on constant images"
    for batch in predictions:
        assert torch.isfinite(batch.pred_score).all(), f"{case.name}: scores {batch.pred_score.flatten().tolist()}"
        if batch.anomaly_map is not None:
            assert torch.isfinite(batch.anomaly_map).all(), f"{case.name}: anomaly map has NaN/inf"
    # the normal test images are the very training image: flagging one means the threshold or score is broken
    scores = torch.cat([batch.pred_score.flatten() for batch in predictions])
    labels = torch.cat([batch.gt_label.flatten() for batch in predictions])
    flagged = torch.cat([batch.pred_label.flatten() for batch in predictions])
    assert not flagged[labels == 0].any(), f"{case.name}: a copy of the training image is flagged ({scores.tolist()})"
    if case.ranks_spot_on_constant_images:
        assert scores[labels == 1].min() > scores[labels == 0].max(), f"{case.name}: a defect scores no higher"


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def seeded_run(request, tiny_mvtec: Path, tmp_path_factory: pytest.TempPathFactory):
    """One seeded fit per model, shared by the determinism and the real-data parity tests."""
    case: ModelCase = request.param
    return case, _fit_and_predict(case, tiny_mvtec, "synthetic", tmp_path_factory.mktemp(f"{case.name}_a"))


def test_same_seed_gives_same_metrics_and_predictions(seeded_run, tiny_mvtec: Path, tmp_path: Path) -> None:
    case, (_, _, metrics_a, predictions_a, _) = seeded_run
    _, _, metrics_b, predictions_b, _ = _fit_and_predict(case, tiny_mvtec, "synthetic", tmp_path)
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


def test_openvino_raw_scores_and_maps_match_torch_on_real_images(seeded_run, real_data: Path, tmp_path: Path) -> None:
    """Raw scores and maps of the f32 export vs torch on real bottle and dice images (unclamped, so every image
    counts): within 1e-3 relative to their magnitude."""

    case, (model, run, _, _, _) = seeded_run
    if not case.exportable:
        pytest.skip(f"{case.name} is not exportable")
    xml = export_raw_openvino(model, run, case, tmp_path / "export")
    paths = _real_images(real_data)
    assert paths, "no images found"
    reference, results = _torch_and_openvino(model, xml, paths, case.image_size)
    torch_scores = reference.pred_score.flatten().numpy()
    openvino_scores = np.array([float(np.ravel(result.pred_score)[0]) for result in results])
    assert np.isfinite(openvino_scores).all()
    assert np.ptp(torch_scores) > 0, f"{case.name}: every real image gets the same raw score {torch_scores[0]}"
    tolerance = PARITY_TOLERANCE * max(1.0, float(np.abs(torch_scores).max()))
    difference = np.abs(openvino_scores - torch_scores)
    assert difference.max() < tolerance, f"scores differ by {difference.round(6).tolist()} (tol {tolerance})"
    if reference.anomaly_map is None:
        return
    for index, path in enumerate(paths):
        torch_map = reference.anomaly_map[index].squeeze().numpy()
        openvino_map = np.asarray(results[index].anomaly_map).squeeze()
        assert openvino_map.shape == torch_map.shape, f"{path}: map shape"
        difference = float(np.abs(openvino_map - torch_map).max())
        tolerance = PARITY_TOLERANCE * max(1.0, float(np.abs(torch_map).max()))
        assert difference < tolerance, f"{path}: raw map differs by {difference} (tol {tolerance})"


# INT8 (the modules a model lists for it, calibrated on the synthetic validation images) against torch on
# INT8_IMAGES fresh synthetic images. A normal image's raw score may move by this share of its value (a density
# amplifies the quantised features: Dfkdm 0.18 and LAKE 0.30 measured, the others <= 0.1):
INT8_SCORE_TOLERANCE = 0.1
INT8_SCORE_TOLERANCE_PER_MODEL = {"dfkdm_backbone": 0.3, "dfkdm_lake": 0.45}
# Fused's score is standardised (0 = a typical normal image, 1 = one robust spread of held-out normal scores): a share
# of a value near 0 means nothing, so its normal images may move by this many spreads. Measured 0.66-0.67 since 0.11.0
# (0.36 before): its density reads blocks.2/4's means and spreads, which INT8 rounds more than blocks.6's means, against
# the tight spread of 8 synthetic images' held-out scores; on bottle its INT8 export keeps F1 1.000 (docs/edge.md)
INT8_SCORE_SPREADS = {"fused": 1.0}
INT8_MIN_RANK_CORRELATION = 0.9  # measured 0.985 (TeacherStudent) to 0.994 (Dfkdm)
INT8_IMAGES = {"n_test_good": 8, "n_test_per_defect": 2}  # 8 normal + 8 defective: enough for a rank correlation
# the largest INT8 map difference on one image, as a share of that torch map's maximum, per model: measured
# 0.035 (Reconstruction AE) and 0.37 (TileOutlier, on a colour defect; its normal images <= 0.18), with about
# 1.5-2x that as the bar; a scrambled quantisation moves maps by their whole range. Models without a measurement
# yet keep the former bar.
INT8_MAP_TOLERANCE = {"reconstruction_ae": 0.07, "tile_outlier": 0.5, "fused": 0.5}  # fused: TileOutlier's map (0.37)
DEFAULT_INT8_MAP_TOLERANCE = 0.2


@pytest.fixture(scope="module")
def int8_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fresh synthetic images (another seed than the training set): the INT8 comparison's test set."""
    from anomalib_ext.data.synthetic import make_mvtec_dataset

    root = tmp_path_factory.mktemp("int8_images")
    return make_mvtec_dataset(root, category="int8", image_size=64, n_train=1, seed=5, **INT8_IMAGES)


def test_int8_export_keeps_scores_ranking_and_maps(seeded_run, int8_root: Path, tmp_path: Path) -> None:
    """INT8 vs torch on synthetic images of the distribution it was calibrated on (on out-of-distribution real
    images a model fitted on 8 synthetic images loses its ranking in INT8: Dfkdm measured Spearman -0.10): normal
    images keep their raw score within ``INT8_SCORE_TOLERANCE`` (per model), the ranking holds (Spearman >= 0.9 over 16
    images), every planted defect torch ranks above all normal images stays there, and maps move by at most the
    model's ``INT8_MAP_TOLERANCE`` of their maximum. No real data: this never skips for want of it."""
    import openvino
    from scipy.stats import spearmanr

    from anomalib_ext.data.synthetic import MVTEC_DEFECTS
    from anomalib_ext.models.components.quantization import RECENTRING_NODE

    case, (model, run, _, _, datamodule) = seeded_run
    if not case.exportable:
        pytest.skip(f"{case.name} is not exportable")
    if not model.quantized_modules():
        pytest.skip(f"{case.name} quantises nothing: its INT8 export is its f32 export")
    xml = export_raw_openvino(model, run, case, tmp_path / "export", datamodule)
    # the recipe: every operation that reads quantised values belongs to a declared module (NNCF names a quantiser
    # after the op whose output it rounds, which may be one OpenVINO created; the op reading it runs in INT8)
    reads_int8 = [
        target.get_node().get_friendly_name()
        for op in openvino.Core().read_model(xml).get_ops()
        if op.get_type_name() == "FakeQuantize"
        for target in op.output(0).get_target_inputs()
    ]
    assert reads_int8, f"{case.name}: INT8_PTQ quantised nothing"
    prefixes = tuple(f"{module}{separator}" for module in model.quantized_modules() for separator in "/.")
    assert sorted({name for name in reads_int8 if not name.startswith(prefixes)}) == []
    # INT8's shift of normal scores, measured on the calibration images, is taken off the graph's score
    assert any(op.get_friendly_name() == RECENTRING_NODE for op in openvino.Core().read_model(xml).get_ops())
    paths = sorted((int8_root / "test").rglob("*.png"))
    assert len(paths) == INT8_IMAGES["n_test_good"] + len(MVTEC_DEFECTS) * INT8_IMAGES["n_test_per_defect"]
    reference, results = _torch_and_openvino(model, xml, paths, case.image_size)
    torch_scores = reference.pred_score.flatten().numpy()
    openvino_scores = np.array([float(np.ravel(result.pred_score)[0]) for result in results])
    assert np.isfinite(openvino_scores).all()
    assert np.ptp(torch_scores) > 0, f"{case.name}: every image gets the same raw score {torch_scores[0]}"
    # normal images (where the threshold lives) keep their score; defects far out may be compressed by the
    # calibrated activation ranges (measured: Dfkdm 43018 -> 24743, TileOutlier 0.55 -> 0.47) but keep their rank
    relative = np.abs(openvino_scores - torch_scores) / np.abs(torch_scores).clip(1e-12)
    correlation = spearmanr(openvino_scores, torch_scores).statistic
    normal = np.array([path.parent.name == "good" for path in paths])
    above = torch_scores > torch_scores[normal].max()
    summary = (
        f"{case.name}: INT8 moves scores by {relative.round(3).tolist()} of their value, Spearman {correlation:.3f} "
        f"(torch {torch_scores.round(4).tolist()}, INT8 {openvino_scores.round(4).tolist()})"
    )
    # recentred on the calibration images, normal images scatter around their torch scores (measured without it on
    # these images: medians 0.26 spreads for fused, 1-1.4 % for the others; on bottle Fused's rose past its threshold)
    shift = openvino_scores - torch_scores
    if case.name in INT8_SCORE_SPREADS:
        moved = np.abs(shift)[normal].max()
        assert moved <= INT8_SCORE_SPREADS[case.name], f"normal scores move by {moved:.3f} spreads: {summary}"
        assert abs(np.median(shift[normal])) <= INT8_SCORE_SPREADS[case.name] / 2, f"not recentred: {summary}"
    else:
        tolerance = INT8_SCORE_TOLERANCE_PER_MODEL.get(case.name, INT8_SCORE_TOLERANCE)
        assert relative[normal].max() <= tolerance, summary
        signed = shift[normal] / np.abs(torch_scores[normal]).clip(1e-12)
        assert abs(np.median(signed)) <= tolerance / 2, f"not recentred: {summary}"
    assert correlation >= INT8_MIN_RANK_CORRELATION, summary
    assert (openvino_scores[above] > openvino_scores[normal].max()).all(), f"a normal passes a defect: {summary}"
    if reference.anomaly_map is None:
        return
    shares = []
    for index, path in enumerate(paths):
        torch_map = reference.anomaly_map[index].squeeze().numpy()
        openvino_map = np.asarray(results[index].anomaly_map).squeeze()
        assert openvino_map.shape == torch_map.shape, f"{path}: map shape"
        scale = max(float(np.abs(torch_map).max()), 1e-6)
        shares.append(float(np.abs(openvino_map - torch_map).max()) / scale)
    tolerance = INT8_MAP_TOLERANCE.get(case.name, DEFAULT_INT8_MAP_TOLERANCE)
    assert max(shares) <= tolerance, f"{case.name}: INT8 maps move by {np.round(shares, 4).tolist()} of their max"
