"""The graph branches the harness case does not take: crop embedding, global bank, num_parts grids.

The harness exports the default (pooled, position-aware, overlapping tiles). Here each other branch is fitted
directly on a few synthetic images and exported to OpenVINO, which must agree with torch within 1e-3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.deploy import OpenVINOInferencer

OPENVINO_F32 = {"INFERENCE_PRECISION_HINT": "f32"}


@pytest.fixture(scope="module")
def small_images(tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    from anomalib.data.utils import read_image

    from anomalib_ext.data.synthetic import make_mvtec_dataset

    root = tmp_path_factory.mktemp("export_src")
    category = make_mvtec_dataset(root, image_size=64, n_train=6, n_test_good=0, n_test_per_defect=1, seed=7)
    paths = sorted(category.glob("train/good/*.png")) + sorted(category.glob("test/*/*.png"))
    return torch.stack([read_image(path, as_tensor=True) for path in paths])


@pytest.mark.parametrize(
    "options",
    [
        {"tiling": {"embed": "crop", "tile_size": 16, "stride": 12, "crop_size": 24}},
        {
            "search": {"position_aware": False, "num_neighbors": 3},
            "tiling": {"num_parts": 5, "tile_size": None, "stride": None},
        },
    ],
    ids=["crop", "global-num-parts"],
)
def test_other_branches_export_and_match_torch(options: dict, small_images: torch.Tensor, tmp_path: Path) -> None:
    from anomalib_ext.models import TileOutlier

    model = TileOutlier(image_size=64, memory_bank={"max_tiles": 500}, visualizer=False, evaluator=False, **options)
    model.eval()
    train, test = small_images[:6], small_images[6:]
    with torch.no_grad():
        model.model.fit(model.model.embed(model.pre_processor.transform(train)))
    model._is_fitted = torch.tensor([True])
    xml = model.to_openvino(export_root=tmp_path, input_size=(64, 64))
    inferencer = OpenVINOInferencer(path=xml, device="CPU", config=OPENVINO_F32)
    with torch.no_grad():
        reference = model(test)
    for index in range(len(test)):
        result = inferencer.predict(test[index].numpy())
        assert abs(float(np.ravel(result.pred_score)[0]) - float(reference.pred_score[index])) < 1e-3
        difference = np.abs(np.asarray(result.anomaly_map).squeeze() - reference.anomaly_map[index].squeeze().numpy())
        assert difference.max() < 1e-3
