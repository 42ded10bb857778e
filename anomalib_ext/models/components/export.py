"""Export defaults that work with this torch/onnx stack.

anomalib 2.7 exports through ``torch.onnx.export(dynamo=True)`` at opset 14. The dynamo exporter writes
opset 18 and then down-converts, and onnx's converter has no adapter for ``Pad`` below 18, so any model
with padding (reflect-padded SSIM, Gaussian blur) fails to export. Exporting at opset 18 skips the
conversion; OpenVINO reads opset 18 natively.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

EXPORT_OPSET = 18


class ExportDefaultsMixin:
    """Put before ``AnomalibModule`` in the bases: ``class Model(ExportDefaultsMixin, AnomalibModule)``."""

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Path:
        kwargs.setdefault("opset_version", EXPORT_OPSET)
        return super().to_onnx(export_root, model_file_name, input_size, **kwargs)  # type: ignore[misc]
