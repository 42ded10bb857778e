"""``ExtModelMixin``: what every anomalib-ext model adds to ``AnomalibModule``.

Every model is ``class Model(ExtModelMixin, AnomalibModule)`` (fit-only ones
``class Model(ExtModelMixin, MemoryBankMixin, AnomalibModule)``). A mixin rather than an ``AnomalibModule``
subclass because anomalib finds models by name (``get_model``, ``list_models``, ``anomalib train --model``)
among the *direct* subclasses of ``AnomalibModule`` only. It provides:

- ``validation_step``: the torch model's ``InferenceBatch`` merged into the batch (``self.model`` is the torch
  model, as in every anomalib model);
- a default pre-processor that only resizes, to ``image_size`` (``int`` or ``(H, W)``; the class's
  ``default_image_size`` when not given), with the class's ``resize_interpolation``. Models normalise their
  inputs themselves (inside the torch model, so the exported graph has it too);
- export at ONNX opset 18 (``EXPORT_OPSET``): anomalib 2.7 exports through ``torch.onnx.export(dynamo=True)``
  at opset 14, the dynamo exporter writes opset 18 and down-converts, and onnx has no ``Pad`` adapter below
  18, so any model with padding (SSIM, Gaussian blur) would fail to export. OpenVINO reads opset 18 natively.
  The exported nodes are named after their torch module (``model.feature_extractor/node_Conv_12``), so the IR
  and OpenVINO's per-operation profile say where each operation comes from;
- INT8 that keeps accuracy: anomalib's ``INT8_PTQ`` export (``--compression_type INT8_PTQ``) quantises only the
  modules the model lists in ``int8_modules`` (its backbone or autoencoder convolutions); density, PCA,
  distances, SSIM, blurs, normalisation and calibration stay in float (``quantization.quantize_modules``);
- thresholds that synthetic validation anomalies cannot push out of the normal scores' reach
  (``RobustThresholdPostProcessor``, ``docs/thresholds.md``), drawn reproducibly: the synthetic validation
  anomalies depend on the datamodule's ``seed`` only (``anomalib_ext.data.seeded_split``);
- a SIGTERM exit status: Lightning turns SIGTERM (a scheduler's stop, ``kill``, a container shutdown) into a
  ``SystemExit`` without a code, so ``anomalib train`` would exit 0 like a finished run and scripts chaining
  fit -> export would carry on with a half-trained model. ``SigtermExitStatus`` makes it exit with 143 (128 +
  15) and says where the last checkpoint is.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from anomalib.data import Batch
from anomalib.metrics import AUROC, Evaluator, F1Score
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torchvision.transforms.v2 import Compose, InterpolationMode, Resize

from .distributed import fresh_storage_for_resized_buffers
from .quantization import name_nodes_by_module, quantize_modules
from .thresholds import RobustThresholdPostProcessor

EXPORT_OPSET = 18
SIGTERM_EXIT_STATUS = 143

ImageSize = int | Sequence[int]


def as_pair(image_size: ImageSize) -> tuple[int, int]:
    """``128`` -> ``(128, 128)``; ``(96, 128)`` stays; anything else is a clear error."""
    if isinstance(image_size, int):
        return image_size, image_size
    if len(image_size) != 2:
        msg = f"image_size must be an int or (height, width), got {image_size!r}"
        raise ValueError(msg)
    return int(image_size[0]), int(image_size[1])


def image_metrics_evaluator() -> Evaluator:
    """Image AUROC and F1, plus pixel AUROC when the model gives a map (``strict=False``: image-level models
    and image-level datasets are evaluated without it)."""
    return Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        ]
    )


class SigtermExitStatus(Callback):
    """On ``SIGTERMException``: name the last checkpoint and make the process exit with status 143."""

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        exception.code = SIGTERM_EXIT_STATUS
        callback = trainer.checkpoint_callback
        last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        where = f"last checkpoint: {last}" if last else "no checkpoint was written yet"
        stage = trainer.state.fn.value if trainer.state.fn else "run"
        print(f"interrupted by SIGTERM during {stage}; {where}", file=sys.stderr)  # noqa: T201


class ExtModelMixin:
    """Shared behaviour of anomalib-ext's Lightning models; put it before ``AnomalibModule`` (module docstring).

    Args:
        image_size: size the default pre-processor resizes to (``None`` = ``default_image_size``); available to
            subclasses as ``self.image_size`` (a pair).
        check_data: read every file of the datamodule before fitting (``prepare_data``) and stop with exit status 2
            naming the first bad one; ``False`` skips it.
        pre_processor, post_processor, evaluator, visualizer: as in every anomalib model.
    """

    default_image_size: ClassVar[tuple[int, int]] = (256, 256)
    resize_interpolation: ClassVar[InterpolationMode] = InterpolationMode.BILINEAR
    # module paths (from the Lightning module, e.g. "model.feature_extractor") that INT8_PTQ quantises
    int8_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        image_size: ImageSize | None = None,
        check_data: bool = True,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: nn.Module | bool = True,
        visualizer: nn.Module | bool = True,
    ) -> None:
        size = as_pair(image_size) if image_size is not None else self.default_image_size
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(size)
        super().__init__(  # type: ignore[call-arg]  (AnomalibModule, next in the MRO)
            pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer
        )
        self.image_size: tuple[int, int] = size
        self.check_data = check_data
        # fitted buffers change shape on load: give them new storage (ddp_spawn leaves them in shared memory)
        self.register_load_state_dict_pre_hook(fresh_storage_for_resized_buffers)  # type: ignore[attr-defined]

    def prepare_data(self) -> None:
        """Read every file of the attached datamodule (MVTecAD, Folder, Dice) before anything loads an image.

        Lightning calls this before the datamodule's ``setup`` (which already decodes images for anomalib's
        synthetic validation split), so a zero-byte or corrupt file stops the run with one line naming it and
        exit status 2 instead of a long traceback from a dataloader. ``check_data=False`` skips it.
        Then it sets the datamodule up with its synthetic anomalies drawn from the datamodule's ``seed`` alone
        (``seeded_split``): the same config gives the same validation images, hence the same threshold, every run.
        """
        super().prepare_data()  # type: ignore[misc]
        datamodule = getattr(getattr(self, "_trainer", None), "datamodule", None)
        if self.check_data and datamodule is not None:
            from anomalib_ext.data.validation import exit_on_bad_data  # data knows no model: imported on use

            exit_on_bad_data(datamodule)
        if datamodule is not None:
            from anomalib_ext.data.seeded_split import is_set_up, setup_with_seeded_anomalies

            if not is_set_up(datamodule):  # draw the synthetic anomalies now, from the datamodule's seed only
                setup_with_seeded_anomalies(datamodule, self._trainer.state.fn)  # type: ignore[attr-defined]

    def setup(self, stage: str) -> None:
        """Redraw, from the datamodule's seed, synthetic anomalies drawn before ``prepare_data`` could seed them
        (a datamodule set up by hand; DDP ranks other than 0, where Lightning skips ``prepare_data``)."""
        super().setup(stage)  # type: ignore[misc]
        datamodule = getattr(getattr(self, "_trainer", None), "datamodule", None)
        if datamodule is not None:
            from anomalib_ext.data.seeded_split import ensure_seeded_anomalies

            ensure_seeded_anomalies(datamodule)

    def configure_post_processor(self) -> RobustThresholdPostProcessor:
        """anomalib's post-processor with the image threshold clamped into the normal scores' window."""
        return RobustThresholdPostProcessor()

    @classmethod
    def configure_pre_processor(
        cls, image_size: ImageSize | None = None, interpolation: InterpolationMode | None = None
    ) -> PreProcessor:
        """Resize only, to ``image_size`` (default ``default_image_size``) with ``resize_interpolation``."""
        size = as_pair(image_size) if image_size is not None else cls.default_image_size
        mode = interpolation or cls.resize_interpolation
        return PreProcessor(transform=Compose([Resize(size, interpolation=mode, antialias=True)]))

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """The eval-mode torch model's scores (and maps) for anomalib's post-processor and evaluator."""
        del args, kwargs
        predictions = self.model(batch.image)  # type: ignore[attr-defined]
        return batch.update(**predictions._asdict())

    def configure_callbacks(self) -> Any:  # noqa: ANN401
        return [*list(super().configure_callbacks()), SigtermExitStatus()]  # type: ignore[misc]

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,  # noqa: ANN401
    ) -> Path:
        kwargs.setdefault("opset_version", EXPORT_OPSET)
        onnx_path = super().to_onnx(export_root, model_file_name, input_size, **kwargs)  # type: ignore[misc]
        name_nodes_by_module(onnx_path)
        return onnx_path

    def quantized_modules(self) -> tuple[str, ...]:
        """What ``INT8_PTQ`` quantises: ``int8_modules`` (a model whose modules depend on its options overrides)."""
        return self.int8_modules

    def _post_training_quantization_ov(self, model: Any, datamodule: Any = None) -> Any:  # noqa: ANN401
        """anomalib's ``INT8_PTQ`` step, restricted to ``quantized_modules()`` (anomalib calls it on the instance)."""
        return quantize_modules(model, datamodule, self.quantized_modules())
