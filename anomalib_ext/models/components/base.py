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
  and OpenVINO's per-operation profile say where each operation comes from. The export records how the
  pre-processor resizes (``resize_metadata``) so an edge tool can resize a full-size image as torch does.
  With ``input_size`` the graph takes a static batch of one, where anomalib's has a dynamic batch axis: tracing a
  symbolic batch took three times as long (TileOutlier at 128 px: 19 s against 6 s on two cores), and every
  consumer runs one image at a time (anomalib's ``OpenVINOInferencer``, ``tools/infer_openvino.py``, the
  benchmark). ``onnx_kwargs={"dynamic_axes": ...}`` (or ``dynamic_shapes``) gives anomalib's axes back;
- INT8 that keeps accuracy: anomalib's ``INT8_PTQ`` export (``--compression_type INT8_PTQ``) quantises only the
  modules the model lists in ``int8_modules`` (its backbone or autoencoder convolutions); density, PCA,
  distances, SSIM, blurs, normalisation and calibration stay in float (``quantization.quantize_modules``);
- thresholds that synthetic validation anomalies cannot push out of the normal scores' reach
  (``RobustThresholdPostProcessor``, ``docs/thresholds.md``), drawn reproducibly: the synthetic validation
  anomalies depend on the datamodule's ``seed`` only (``anomalib_ext.data.seeded_split``);
- the data checked before it is read: ``prepare_data`` is the one hook Lightning runs after the datamodule's
  ``prepare_data`` and before its ``setup`` (which decodes images for synthetic anomalies); no callback hook runs
  there (Lightning calls the datamodule's ``setup`` before any callback's). What is checked and how the split is
  drawn is the data package's (``data.datamodule_checks``, ``data.seeded_split``); the model only calls it;
- checkpoints stamped with the package version (``anomalib_ext_version``); a checkpoint of a release whose
  models this one cannot read (before ``OLDEST_READABLE_RELEASE``) fails on load with one line naming the release
  that reads it, instead of a missing-key error from deep inside ``load_state_dict``;
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

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import AUROC, Evaluator, F1Score
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torchvision.transforms.v2 import Compose, InterpolationMode, Resize

from anomalib_ext.data.datamodule_checks import exit_on_bad_data
from anomalib_ext.data.seeded_split import ensure_seeded_anomalies, is_set_up, setup_with_seeded_anomalies
from anomalib_ext.quiet import EXPORTER_LOGGERS, is_verbose, quiet_loggers
from anomalib_ext.version import __version__, release_of
from anomalib_ext.workspace import discard_empty_run

from .distributed import fresh_storage_for_resized_buffers
from .quantization import ScoreScale, name_nodes_by_module, quantize_modules, recentre_on_normal_scores
from .thresholds import RobustThresholdPostProcessor

EXPORT_OPSET = 18
SIGTERM_EXIT_STATUS = 143
# checkpoint key that holds the anomalib-ext version that wrote it
CHECKPOINT_VERSION_KEY = "anomalib_ext_version"
# 0.4.0 moved the models' fitted state into their torch models (issue 22): older checkpoints do not load
OLDEST_READABLE_RELEASE = (0, 4)
# how the pre-processor resizes, written into every export (ONNX metadata_props, which OpenVINO keeps in model.xml
# under rt_info/framework) so tools/infer_openvino.py resizes a full-size image as torch does (copies of these
# names live there: it imports no anomalib_ext; tests/test_edge_resize.py checks they agree)
RESIZE_INTERPOLATION_KEY = "anomalib_ext.resize_interpolation"
RESIZE_ANTIALIAS_KEY = "anomalib_ext.resize_antialias"
RESIZE_SIZE_KEY = "anomalib_ext.resize_size"

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


class FitOnlyHooks:
    """What every fit-only model (a bank or a density fitted in one pass) tells Lightning and anomalib: nothing to
    optimise, one epoch without a sanity check (nothing is fitted before it), one-class, image AUROC and F1 and pixel
    AUROC. Put it first among the bases, before ``ExtModelMixin``. A model whose fit needs more says so in its own
    ``fit``; under DDP each model merges its ranks' data there."""

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Image AUROC and F1, and pixel AUROC where the model has a map."""
        return image_metrics_evaluator()

    @staticmethod
    def configure_optimizers() -> None:
        """Nothing to optimise: fitted, not trained."""
        return

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """One pass, no gradients, no sanity check."""
        return {"gradient_clip_val": 0, "max_epochs": 1, "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ONE_CLASS


def resize_metadata(pre_processor: nn.Module | None) -> dict[str, str]:
    """The pre-processor's training-time resize (its transform's leading torchvision ``Resize`` to ``(H, W)``) as
    export metadata; empty when it has none. The transform, not anomalib's export copy with antialiasing off: it is
    what ``anomalib train/test/predict`` feed the model, so what its threshold and normalisation were fitted on."""
    transform = getattr(pre_processor, "transform", None)
    if isinstance(transform, Compose):
        transform = transform.transforms[0] if transform.transforms else None
    if not isinstance(transform, Resize) or transform.size is None or len(transform.size) != 2:  # noqa: PLR2004
        return {}
    interpolation = InterpolationMode(transform.interpolation)
    # torchvision antialiases bilinear, bicubic and Lanczos only
    smooth = interpolation in {InterpolationMode.BILINEAR, InterpolationMode.BICUBIC, InterpolationMode.LANCZOS}
    return {
        RESIZE_INTERPOLATION_KEY: interpolation.value,
        RESIZE_ANTIALIAS_KEY: str(bool(transform.antialias) and smooth).lower(),
        RESIZE_SIZE_KEY: ",".join(str(int(side)) for side in transform.size),
    }


def write_onnx_metadata(onnx_path: Path, metadata: dict[str, str]) -> None:
    """Add ``metadata`` to the ONNX file's ``metadata_props`` (OpenVINO carries them into the IR's rt_info)."""
    import onnx

    if not metadata:
        return
    model = onnx.load(str(onnx_path))
    onnx.helper.set_model_props(model, {**{entry.key: entry.value for entry in model.metadata_props}, **metadata})
    onnx.save(model, str(onnx_path))


def keep_only_output_tensor_names(xml_path: Path) -> None:
    """Drop the exporter's names (``add_27``) from every tensor of the IR but the graph's inputs and outputs.

    OpenVINO's CPU plugin removes no-op nodes when it compiles and gives their names to the tensor that takes their
    place: a statically shaped graph's ``anomaly_map`` output came out named ``{add_27, anomaly_map}``, and anomalib's
    ``OpenVINOInferencer``, which keys each output by ``any_name``, failed on ``add_27``.
    """
    import openvino as ov

    core = ov.Core()
    core.set_property({"ENABLE_MMAP": False})  # the .bin is rewritten below
    model = core.read_model(str(xml_path))
    for operation in model.get_ordered_ops():
        if operation.get_type_name() in {"Parameter", "Result"}:
            continue
        for port in operation.outputs():
            if not any(target.get_node().get_type_name() == "Result" for target in port.get_target_inputs()):
                port.get_tensor().set_names(set())
    # save_model rewrites the weights as they are (an FP16-compressed IR keeps its f16 constants)
    ov.save_model(model, str(xml_path), compress_to_fp16=False)


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


class IncompatibleCheckpointError(ValueError):
    """A checkpoint written by a release whose models this release cannot read."""


def check_checkpoint_release(
    checkpoint: dict[str, Any],
    path: str | Path | None = None,
    oldest_readable: tuple[int, int] = OLDEST_READABLE_RELEASE,
) -> None:
    """Raise :class:`IncompatibleCheckpointError` (one line naming the release that reads it) unless ``checkpoint``
    was written by ``oldest_readable`` (a model's ``oldest_readable_release``) or later. ``path`` only names the file
    in the message."""
    written_by = checkpoint.get(CHECKPOINT_VERSION_KEY)
    release = release_of(str(written_by)) if written_by is not None else None
    if release is not None and release >= oldest_readable:
        return
    oldest = ".".join(str(part) for part in oldest_readable)
    older = f"{OLDEST_READABLE_RELEASE[0]}.{OLDEST_READABLE_RELEASE[1] - 1}"
    what = f"{Path(path).name} was" if path else "this checkpoint was"
    if written_by is None:
        origin, reader = f"anomalib-ext {older}.x or older (it has no '{CHECKPOINT_VERSION_KEY}')", f"{older}.0"
    else:
        origin, reader = f"anomalib-ext {written_by}", str(written_by)
    msg = (
        f"{what} written by {origin}; this is {__version__}, which reads checkpoints of {oldest} and later: "
        f"retrain, or load it with `pip install anomalib-ext=={reader}`"
    )
    raise IncompatibleCheckpointError(msg)


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
    # the oldest release whose checkpoints of this model load (a model whose buffers changed meaning raises it)
    oldest_readable_release: ClassVar[tuple[int, int]] = OLDEST_READABLE_RELEASE

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
        trainer = getattr(self, "_trainer", None)
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            return
        if self.check_data:
            exit_on_bad_data(datamodule)
        if not is_set_up(datamodule):  # draw the synthetic anomalies now, from the datamodule's seed only
            setup_with_seeded_anomalies(datamodule, trainer.state.fn)  # type: ignore[union-attr]

    def setup(self, stage: str) -> None:
        """Redraw, from the datamodule's seed, synthetic anomalies drawn before ``prepare_data`` could seed them
        (a datamodule set up by hand; DDP ranks other than 0, where Lightning skips ``prepare_data``)."""
        super().setup(stage)  # type: ignore[misc]
        datamodule = getattr(getattr(self, "_trainer", None), "datamodule", None)
        if datamodule is not None:
            ensure_seeded_anomalies(datamodule)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Stamp the checkpoint with the version that wrote it (what ``on_load_checkpoint`` checks)."""
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        checkpoint[CHECKPOINT_VERSION_KEY] = __version__

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        """Lightning's ``load_from_checkpoint``; a checkpoint of an older release whose saved arguments this release
        no longer takes fails with the one-line release message, not a ``TypeError`` from the constructor (Lightning
        builds the model from the saved arguments before ``on_load_checkpoint`` can look at the version)."""
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]
        except (TypeError, ValueError) as error:
            if isinstance(error, IncompatibleCheckpointError) or not isinstance(checkpoint_path, str | Path):
                raise
            checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
            check_checkpoint_release(checkpoint, checkpoint_path, cls.oldest_readable_release)
            raise

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, in one line, a checkpoint of a release whose models this one cannot read.

        Models that override this hook call ``super().on_load_checkpoint(checkpoint)`` first.
        """
        path = getattr(getattr(self, "_trainer", None), "ckpt_path", None)
        check_checkpoint_release(checkpoint, path, self.oldest_readable_release)
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]

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
        """``SigtermExitStatus``; first, the datamodule's folders checked for existence.

        Lightning calls this once the datamodule is attached and before the datamodule's ``prepare_data``, where
        anomalib's ``MVTecAD`` would download the public dataset into a wrong root or for a misspelt category: here
        that is one line naming the path and exit status 2 (``check_data=False`` skips it, as it skips the files).
        """
        trainer = getattr(self, "_trainer", None)
        datamodule = getattr(trainer, "datamodule", None)
        if self.check_data and datamodule is not None:
            try:
                exit_on_bad_data(datamodule, paths_only=True)
            except SystemExit:  # the Engine already made this run's v<N> and moved `latest` to it: undo that
                discard_empty_run(trainer.default_root_dir)  # type: ignore[union-attr]
                raise
        return [*list(super().configure_callbacks()), SigtermExitStatus()]  # type: ignore[misc]

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,  # noqa: ANN401
    ) -> Path:
        kwargs.setdefault("opset_version", EXPORT_OPSET)
        if input_size is not None and "dynamic_shapes" not in kwargs and "dynamic_axes" not in kwargs:
            kwargs["dynamic_shapes"] = None  # a static batch of one (the module docstring says why)
        kwargs.setdefault("verbose", None if is_verbose() else False)  # torch.onnx's progress lines
        with quiet_loggers(EXPORTER_LOGGERS):  # ~700 INFO lines, one per deduplicated initializer or folded node
            onnx_path = super().to_onnx(export_root, model_file_name, input_size, **kwargs)  # type: ignore[misc]
        name_nodes_by_module(onnx_path)
        write_onnx_metadata(onnx_path, resize_metadata(getattr(self, "pre_processor", None)))
        return onnx_path

    def to_openvino(self, *args, **kwargs) -> Path:  # noqa: ANN002, ANN003
        """anomalib's export; the IR's tensors named only at the graph's inputs and outputs."""
        xml_path = Path(super().to_openvino(*args, **kwargs))  # type: ignore[misc]
        keep_only_output_tensor_names(xml_path)
        return xml_path

    def quantized_modules(self) -> tuple[str, ...]:
        """What ``INT8_PTQ`` quantises: ``int8_modules`` (a model whose modules depend on its options overrides)."""
        return self.int8_modules

    def _post_training_quantization_ov(self, model: Any, datamodule: Any = None) -> Any:  # noqa: ANN401
        """anomalib's ``INT8_PTQ`` step, restricted to ``quantized_modules()`` (anomalib calls it on the instance),
        then the INT8 graph's image scores recentred on the float graph's for normal images, so the threshold learnt
        in float holds (``quantization.recentre_on_normal_scores``)."""
        quantized = quantize_modules(model, datamodule, self.quantized_modules())
        scale = self._exported_score_scale()
        if quantized is not model and scale is not None:
            recentre_on_normal_scores(model, quantized, datamodule, scale)
        return quantized

    def _exported_score_scale(self) -> ScoreScale | None:
        """How the exported ``pred_score`` maps to the raw score: ``raw`` (normalisation off), ``softsign`` (ours),
        ``None`` when the post-processor is another one (its clamp cannot be undone: no recentring)."""
        post_processor = getattr(self, "post_processor", None)
        if not isinstance(post_processor, nn.Module):
            return None
        if not getattr(post_processor, "enable_normalization", True):
            return "raw"
        return "softsign" if isinstance(post_processor, RobustThresholdPostProcessor) else None
