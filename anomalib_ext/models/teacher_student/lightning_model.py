"""TeacherStudent: fine-tune a pretrained teacher on normal vs synthetic defects, then distil a student.

Both stages run in one ``anomalib train`` run with manual optimisation: with ``teacher_finetuning``, epochs
``[0, teacher_finetuning.epochs)`` train the teacher as a weighted normal-vs-defective classifier; then the teacher
is frozen and the remaining epochs train the student to match its L2-normalised features (losses in ``loss.py``).
The map is 1 - cosine similarity per layer, combined by product or sum.

Single-template mode: the model makes its own training images from the one template inside ``training_step``:
each epoch is one datamodule batch long (``limit_train_batches: 1``, a trainer argument), whose step runs the whole
epoch, ``single_template.samples_per_epoch`` samples (the template and its variations) in batches of
``single_template.batch_size``. Epochs end normally, so validation and checkpoints run as in any model. The image
threshold comes from held-out variations of the template, not from validation images: a user with one good image
has none (``RobustThresholdPostProcessor.threshold_from_normal_variations``). The user's datamodule is never
modified.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_ext.models.components import (
    DEFAULT_BACKBONE,
    DEFAULT_LAYERS,
    ExtModelMixin,
    ImageSize,
    ImageTiling,
    InputNormalization,
)
from anomalib_ext.models.components.settings import Settings
from anomalib_ext.models.components.training_budget import DEFAULT_MIN_STEPS, ensure_min_steps

from .augment import Augmentation, NormalVariation, SyntheticDefects
from .loss import FeatureMatchingLoss, TeacherClassifierLoss
from .template import SingleTemplate, load_template
from .torch_model import TeacherStudentModel

logger = logging.getLogger(__name__)

# single-template threshold: how many held-out variations of the template are scored, and the seed of their draw
# (fixed: the same template and model give the same threshold; forked, so training's random stream is untouched)
THRESHOLD_VARIATIONS = 64
THRESHOLD_VARIATIONS_SEED = 20261206

SettingsT = TypeVar("SettingsT", bound=Settings)


@dataclass(frozen=True)
class TeacherFinetuning(Settings):
    """The optional first stage: fine-tune the teacher as a normal-vs-defective classifier before the student.

    Args:
        epochs: epochs of teacher fine-tuning, counted from the first; ``max_epochs`` must leave the student one.
        learning_rate: Adam learning rate of the teacher and its head (small: adapt, do not forget ImageNet).
        normal_weight, augmented_weight, defect_weight: per-sample weights of the classifier's BCE
            (``TeacherClassifierLoss``; the origin's 5 / 2 / 10).
    """

    epochs: int = 1
    learning_rate: float = 1e-4
    normal_weight: float = 5.0
    augmented_weight: float = 2.0
    defect_weight: float = 10.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            msg = f"teacher_finetuning.epochs must be >= 1 (null keeps the ImageNet teacher), got {self.epochs}"
            raise ValueError(msg)
        if self.learning_rate <= 0:
            msg = f"teacher_finetuning.learning_rate must be > 0, got {self.learning_rate}"
            raise ValueError(msg)
        for name in ("normal_weight", "augmented_weight", "defect_weight"):
            if getattr(self, name) < 0:
                msg = f"teacher_finetuning.{name} must be >= 0, got {getattr(self, name)}"
                raise ValueError(msg)


def _optional(settings: type[SettingsT], value: SettingsT | Mapping[str, Any] | None) -> SettingsT | None:
    """``None`` stays off; an instance or a mapping of its fields (benchmark specs, plain YAML) becomes ``settings``."""
    return None if value is None else settings.coerce(value)


class TeacherStudent(ExtModelMixin, AnomalibModule):
    """Teacher-student anomaly detector with optional teacher fine-tuning, HistAuGAN and single-template mode.

    Args:
        backbone: teacher architecture (offline pretrained weights); the student has the same architecture,
            randomly initialised.
        layers: compared feature layers.
        input_normalization: how teacher and student both see the [0, 1] images: ``backbone`` (the mean/std of the
            teacher's pretrained weights, timm's ``pretrained_cfg``), ``imagenet``, ``per_image`` (each image's own
            per-channel mean/std) or ``flat_field`` (first divided by its own smooth illumination: a light that
            falls off across the part, docs/lighting.md).
        anomaly_map_mode: combine per-layer maps by ``"mul"`` (what every layer disagrees on) or ``"sum"``.
        map_sigma: Gaussian smoothing of the map (pixels at model input size); 0 disables it.
        topk_fraction: image score = mean of the top fraction of map pixels, in [0, 1); 0 = maximum.
        student_learning_rate: SGD (momentum 0.9) learning rate of the student, STFPM's 0.4 by default (for short
            runs; ``configs/teacher_student/mvtec.yaml`` uses 0.1, which localised bottle better over 8 epochs).
        augmentation: how normals are varied (rotation, shift, flips, colour jitter, HistAuGAN restyling) and which
            share of each student batch is varied: an ``Augmentation`` or a mapping of its fields, each documented
            there.
        teacher_finetuning: ``None`` (default) keeps the ImageNet teacher, which measured better on bottle:
            fine-tuning on synthetic defects moves the features the student copies. A ``TeacherFinetuning`` (or a
            mapping of its fields: ``epochs``, ``learning_rate``, the three loss weights) fine-tunes it first.
        single_template: ``None`` (default) trains on the datamodule's images. A ``SingleTemplate`` (or a mapping:
            ``path``, ``samples_per_epoch``, ``batch_size``) trains on that one good image and its variations
            instead, and takes its image threshold from held-out variations of it (the datamodule's validation
            images only set the normalisation and the pixel threshold).
        image_size: side (or (height, width)) the default pre-processor resizes to.
        image_tiling: ``ImageTiling`` or a mapping of its keys (``tile_size``, ``stride``, ``tile_batch``): teacher
            and student run on tiles of a large ``image_size``, their features stitched.
        check_data: read every file of the datamodule before fitting and stop with exit status 2 naming the first
            bad one (``False`` skips the check).
        pre_processor, post_processor, evaluator, visualizer: as in every anomalib model.
    """

    # INT8_PTQ quantises the teacher's and the student's convolutions; the cosine map, its blur and the top-k score
    # stay in float (README, "Export and INT8")
    int8_modules: ClassVar[tuple[str, ...]] = ("model.teacher", "model.student")
    # optimiser steps a fit takes at least (components.training_budget): bottle at 10 normals trained 4 steps in 4
    # epochs and ranked at image AUROC 0.42-0.68; 50 steps gave 0.99 (0.995 with all 168 normals)
    min_steps: ClassVar[int] = DEFAULT_MIN_STEPS

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str] = DEFAULT_LAYERS,
        input_normalization: InputNormalization = "backbone",
        anomaly_map_mode: str = "mul",
        map_sigma: float = 4.0,
        topk_fraction: float = 0.01,
        student_learning_rate: float = 0.4,
        augmentation: Augmentation = Augmentation(),  # noqa: B008  (frozen, so sharing the default is safe)
        teacher_finetuning: TeacherFinetuning | None = None,
        single_template: SingleTemplate | None = None,
        image_size: ImageSize = 256,
        image_tiling: ImageTiling = ImageTiling(),  # noqa: B008
        check_data: bool = True,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(image_size, check_data, pre_processor, post_processor, evaluator, visualizer)
        self.augmentation = Augmentation.coerce(augmentation)
        self.teacher_finetuning = _optional(TeacherFinetuning, teacher_finetuning)
        self.single_template = _optional(SingleTemplate, single_template)
        # read now: a missing or unreadable template fails at construction, not after the first epoch
        self._template = None if self.single_template is None else load_template(self.single_template.path)
        self._resized_template: torch.Tensor | None = None
        self._template_threshold_step: int | None = None  # global step of the last threshold from the template
        self.model = TeacherStudentModel(
            backbone=backbone,
            layers=layers,
            input_normalization=input_normalization,
            anomaly_map_mode=anomaly_map_mode,
            map_sigma=map_sigma,
            topk_fraction=topk_fraction,
            image_tiling=ImageTiling.coerce(image_tiling),
            image_size=self.image_size,
        )
        self.variation = NormalVariation(self.augmentation)
        self.defects = SyntheticDefects()
        self.student_learning_rate = student_learning_rate
        self.student_loss = FeatureMatchingLoss()
        finetuning = self.teacher_finetuning
        self.teacher_loss = (
            None
            if finetuning is None
            else TeacherClassifierLoss(finetuning.normal_weight, finetuning.augmented_weight, finetuning.defect_weight)
        )
        self.teacher_epochs = 0 if finetuning is None else finetuning.epochs
        self.automatic_optimization = False
        self._teacher_frozen = finetuning is None
        if self._teacher_frozen:
            self.model.freeze_teacher()

    # ----------------------------------------------------------------------------------- anomalib hooks
    @property
    def learning_type(self) -> LearningType:
        """One-class: only good images are needed (synthetic defects are made on the fly)."""
        return LearningType.ONE_CLASS

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Manual optimisation: Lightning must not clip gradients itself. Single-template mode: an epoch is one
        datamodule batch (its step trains on the template's samples), so the epoch ends and validates normally."""
        arguments: dict[str, Any] = {"gradient_clip_val": None, "num_sanity_val_steps": 0}
        if self.single_template is not None:
            arguments["limit_train_batches"] = 1
        return arguments

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """SGD as in STFPM for the student; with teacher fine-tuning, Adam for the teacher and its head too."""
        student = torch.optim.SGD(
            self.model.student.parameters(), lr=self.student_learning_rate, momentum=0.9, weight_decay=1e-3
        )
        if self.teacher_finetuning is None:
            return [student]
        teacher_parameters = [*self.model.teacher.parameters(), *self.model.classifier.parameters()]
        return [student, torch.optim.Adam(teacher_parameters, lr=self.teacher_finetuning.learning_rate)]

    def setup(self, stage: str) -> None:
        """Under DDP, each stage leaves parameters unused (the student while the teacher is fine-tuned; the frozen
        teacher and its classifier afterwards): DDP is told to expect it, as ``ddp_find_unused_parameters_true``
        would, unless the strategy already says otherwise. Runs before Lightning wraps the model in DDP."""
        super().setup(stage)
        strategy = self.trainer.strategy
        if isinstance(strategy, DDPStrategy):
            strategy._ddp_kwargs.setdefault("find_unused_parameters", True)  # noqa: SLF001  (no public setter)

    # --------------------------------------------------------------------------------- single template
    def on_fit_start(self) -> None:
        """Single-template mode: say what trains."""
        if self.single_template is not None:
            logger.info(
                "single-template mode: %d samples of %s per epoch, %d per step",
                self.single_template.samples_per_epoch,
                self.single_template.path,
                self.single_template.batch_size,
            )

    def _input_template(self) -> torch.Tensor:
        """The template at the model's input size (the pre-processor's resize), on the model's device."""
        assert self._template is not None
        if self._resized_template is None:
            template = self._template[None].to(self.device)
            transform = getattr(self.pre_processor, "transform", None)
            self._resized_template = (transform(template) if transform is not None else template)[0]
        return self._resized_template.to(self.device)

    def _template_images(self, count: int, first: bool) -> torch.Tensor:
        """``count`` variations of the template; with ``first``, the first sample is the template itself."""
        template = self._input_template()
        images = self.variation(template[None].expand(count, -1, -1, -1).contiguous())
        if first:
            images[0] = template
        return images

    @torch.no_grad()
    def _held_out_variations(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps of ``THRESHOLD_VARIATIONS`` variations of the template drawn from their own fixed seed
        (other draws than training's, which go on undisturbed), by the eval-mode model."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(THRESHOLD_VARIATIONS_SEED)
            images = self._template_images(THRESHOLD_VARIATIONS, first=False)
        was_training = self.model.training
        self.model.eval()
        try:
            outputs = [self.model(chunk) for chunk in images.split(self.single_template.batch_size)]
        finally:
            self.model.train(was_training)
        return torch.cat([out.pred_score for out in outputs]), torch.cat([out.anomaly_map for out in outputs])

    def _threshold_from_template(self, after_validation: bool) -> None:
        """Single-template mode: the post-processor's image threshold from held-out variations of the template (and
        its normalisation too when no validation just set it); once per optimiser step."""
        processor = self.post_processor
        if self._template is None or not hasattr(processor, "threshold_from_normal_variations"):
            return
        if not after_validation and self._template_threshold_step == self.global_step:
            return  # this epoch's validation already did it, with the same model
        scores, maps = self._held_out_variations()
        processor.threshold_from_normal_variations(scores, maps, normalise=not after_validation)
        self._template_threshold_step = self.global_step

    def on_validation_epoch_end(self) -> None:
        """Single-template mode: replace the validation's image threshold (set by the post-processor's hook, which
        runs first) before a checkpoint saves it."""
        super().on_validation_epoch_end()
        self._threshold_from_template(after_validation=True)

    def on_train_epoch_end(self) -> None:
        """Single-template mode when no validation ran this epoch (none at all with one good image): threshold and
        normalisation from the template, before the checkpoint (saved after this hook)."""
        super().on_train_epoch_end()
        self._threshold_from_template(after_validation=False)

    def on_train_start(self) -> None:
        """Fail early when the epoch budget leaves no epoch for the student; train at least ``min_steps`` steps."""
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs != -1 and max_epochs <= self.teacher_epochs:
            msg = (
                f"max_epochs ({max_epochs}) must exceed teacher_finetuning.epochs ({self.teacher_epochs}): "
                "the student needs at least one epoch"
            )
            raise ValueError(msg)
        if self._template is None:  # few images, few optimiser steps: at least min_steps (one log line)
            ensure_min_steps(self.trainer, "TeacherStudent", self.min_steps)

    def on_train_epoch_start(self) -> None:
        """Freeze the teacher once its fine-tuning epochs are over."""
        if not self._teacher_frozen and self.current_epoch >= self.teacher_epochs:
            self.model.freeze_teacher()
            self._teacher_frozen = True

    # ------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: Batch, batch_idx: int = 0, *args, **kwargs) -> STEP_OUTPUT:
        """One optimiser step on the batch; in single-template mode, the epoch's steps on template samples."""
        del args, kwargs
        if self.single_template is None:
            return {"loss": self._optimisation_step(batch.image)}
        if batch_idx > 0:  # a plain Lightning trainer, without limit_train_batches=1: train one epoch per epoch
            return None
        size, total = self.single_template.batch_size, self.single_template.samples_per_epoch
        losses = [
            self._optimisation_step(self._template_images(min(size, total - start), start == 0))
            for start in range(0, total, size)
        ]
        return {"loss": torch.stack(losses).mean()}

    def _optimisation_step(self, images: torch.Tensor) -> torch.Tensor:
        """One optimiser step of whichever stage the current epoch belongs to; the detached loss."""
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]  # Lightning unwraps a single one
        if self.current_epoch < self.teacher_epochs:
            loss, optimizer, name = self._teacher_loss(images), optimizers[1], "teacher_loss"
        else:
            loss, optimizer, name = self._student_loss(images), optimizers[0], "student_loss"
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.log(name, loss.detach(), on_step=False, on_epoch=True, prog_bar=True, batch_size=len(images))
        return loss.detach()

    def _teacher_loss(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier loss on the batch, its augmented copy and synthetic defects made from either."""
        augmented = self.variation(images)
        # defects on plain and on augmented normals alike, so the classifier cannot key on augmentation
        sources = torch.where(torch.rand(len(images), 1, 1, 1, device=images.device) < 0.5, images, augmented)
        logits = self.model.classify(torch.cat([images, augmented, self.defects(sources)]))
        return self.teacher_loss(*logits.split(len(images)))

    def _student_loss(self, images: torch.Tensor) -> torch.Tensor:
        """Feature matching on the batch, a share ``augmentation.student_fraction`` of it replaced by variations."""
        fraction = self.augmentation.student_fraction
        if fraction > 0:
            replace = torch.rand(len(images), 1, 1, 1, device=images.device) < fraction
            images = torch.where(replace, self.variation(images), images)
        return self.student_loss(*self.model(images))

    # ---------------------------------------------------------------------------------------- checkpoint
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A reloaded model is always a trained one: its teacher stays frozen."""
        super().on_load_checkpoint(checkpoint)
        self.model.freeze_teacher()
        self._teacher_frozen = True
