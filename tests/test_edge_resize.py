"""The edge tool resizes as torch does: ``tools/infer_openvino.py`` resizes a full-size image to the export's input
size as the model's pre-processor does (torchvision ``Resize``: bilinear antialiased, or nearest for Reconstruction
and DfkdmLake), reading which from the export's metadata.

Here: the numpy resize against torchvision's pixels, and the metadata names the export writes and the tool reads.
Every family end to end (trained, exported, the tool run on images larger and smaller than the export, scores
against torch) is in tests/test_model_harness.py, which already trains and exports each one.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "infer_openvino.py"


def _tool():  # noqa: ANN202
    """tools/infer_openvino.py as a module (it is a script, not part of the package)."""
    if "infer_openvino" in sys.modules:
        return sys.modules["infer_openvino"]
    spec = importlib.util.spec_from_file_location("infer_openvino", TOOL)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["infer_openvino"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


# ------------------------------------------------------------------------------------------ the resize itself
@pytest.mark.parametrize(("interpolation", "antialias"), [("bilinear", True), ("bilinear", False), ("nearest", False)])
def test_numpy_resize_equals_torchvision_resize(interpolation: str, antialias: bool) -> None:
    """Random float images, up and down, square and not, even 2x (torch's nearest special case): the tool's numpy
    resize gives torchvision's pixels to 1e-5 (measured 3.6e-6 antialiased, 1.8e-7 plain bilinear, 0 nearest),
    where OpenCV's INTER_AREA / INTER_LINEAR are 1e-2 to 1e-1 off on random pixels."""
    from torchvision.transforms.v2 import InterpolationMode, Resize

    tool = _tool()
    rng = np.random.default_rng(0)
    shapes = [((97, 131), (64, 64)), ((40, 56), (64, 64)), ((512, 300), (96, 80)), ((33, 20), (66, 41))]
    shapes += [((7, 700), (5, 64)), ((30, 30), (60, 60))]  # extreme ratios; exactly 2x (torch's nearest shortcut)
    for (height, width), size in shapes:
        image = rng.random((height, width, 3), dtype=np.float32)
        tensor = torch.from_numpy(image.transpose(2, 0, 1).copy())
        expected = Resize(size, interpolation=InterpolationMode(interpolation), antialias=antialias)(tensor)
        recipe = tool.ResizeRecipe(interpolation=interpolation, antialias=antialias)
        got = tool.resize_like_torch(image, size, recipe)
        assert got.shape == (*size, 3)
        difference = float(np.abs(got - expected.numpy().transpose(1, 2, 0)).max())
        assert difference < 1e-5, f"{(height, width)} -> {size}: {difference}"


def test_tool_reads_the_resize_keys_the_export_writes() -> None:
    """The tool imports no anomalib_ext, so it keeps copies of the metadata keys: they must stay equal."""
    from anomalib_ext.models.components import base

    tool = _tool()
    for key in ("RESIZE_INTERPOLATION_KEY", "RESIZE_ANTIALIAS_KEY", "RESIZE_SIZE_KEY"):
        assert getattr(tool, key) == getattr(base, key)


@pytest.mark.parametrize(
    "name", ["TemplateSsim", "TileOutlier", "Dfkdm", "DfkdmLake", "Reconstruction", "TeacherStudent"]
)
def test_export_metadata_names_each_models_own_resize(name: str) -> None:
    """What the export records is the pre-processor's training-time resize: antialiased bilinear, or nearest (no
    antialiasing: torchvision ignores it there) for the two autoencoder families; nothing for a pre-processor
    that does not start with a resize to (H, W)."""
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize

    import anomalib_ext.models as models
    from anomalib_ext.models.components.base import resize_metadata

    model_class = getattr(models, name)
    nearest = name in {"DfkdmLake", "Reconstruction"}
    metadata = resize_metadata(model_class.configure_pre_processor((48, 40)))
    assert metadata == {
        "anomalib_ext.resize_interpolation": "nearest" if nearest else "bilinear",
        "anomalib_ext.resize_antialias": "false" if nearest else "true",
        "anomalib_ext.resize_size": "48,40",
    }
    assert resize_metadata(PreProcessor(transform=Compose([Normalize([0.5] * 3, [0.5] * 3)]))) == {}
    assert resize_metadata(None) == {}
