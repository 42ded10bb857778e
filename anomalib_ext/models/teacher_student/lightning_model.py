"""TeacherStudent: fine-tune a pretrained teacher on normal vs synthetic defects, then distil a student.

Both stages run in one ``anomalib train`` run with manual optimisation: epochs ``[0, teacher_epochs)`` train
the teacher as a weighted normal-vs-defective classifier, then the teacher is frozen and the remaining
epochs train the student to match its L2-normalised features. The map is 1 - cosine similarity per layer,
combined by product or sum.

Single-template mode: the model makes its own training images from the one template inside ``training_step``:
the first training batch of each epoch only gives the batch size, and that step runs the whole epoch,
``samples_per_epoch`` samples (the template and its variations) in batches of that size; the rest of the
datamodule's training batches are skipped. The user's datamodule is never modified.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

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
from torch.nn import functional as F  # noqa: N812

from anomalib_ext.models.components import (
    DEFAULT_BACKBONE,
    DEFAULT_LAYERS,
    ExtModelMixin,
    ImageSize,
    InputNormalization,
)

from .augment import NormalVariation, SyntheticDefects
from .template import load_template
from .torch_model import TeacherStudentModel, layer_feature_loss

logger = logging.getLogger(__name__)

# the default of ``input_normalization`` (one place to flip it)
INPUT_NORMALIZATION: InputNormalization = "backbone"


class TeacherStudent(ExtModelMixin, AnomalibModule):
    """Teacher-student anomaly detector with optional teacher fine-tuning, HistAuGAN and single-template mode.

    Args:
        backbone: teacher architecture (offline pretrained weights).
        layers: compared feature layers.
        student_backbone: student architecture (random init); ``None`` = same as the teacher.
        input_normalization: how the torch model standardises the [0, 1] images for teacher and student:
            ``backbone`` (the mean/std the teacher's pretrained weights expect, timm's ``pretrained_cfg``) or
            ``imagenet``.
        anomaly_map_mode: combine per-layer maps by ``"mul"`` or ``"sum"``.
        map_sigma: Gaussian smoothing of the map (pixels at model input size); 0 disables it.
        topk_fraction: image score = mean of the top fraction of map pixels; 0 = maximum.
        teacher_epochs: epochs spent fine-tuning the teacher first; 0 (default) keeps the ImageNet teacher, which
            measured better on bottle: fine-tuning on synthetic defects moves the features the student copies.
        teacher_learning_rate: Adam learning rate of the teacher fine-tuning (small: adapt, do not forget ImageNet).
        student_learning_rate: SGD (momentum 0.9) learning rate of the student, STFPM's 0.4 by default (for short
            runs; ``configs/teacher_student/mvtec.yaml`` uses 0.1, which localised bottle better over 8 epochs).
        normal_weight / augmented_weight / defect_weight: per-sample weights of the teacher's classifier loss
            (the origin's 5 / 2 / 10).
        student_augment_p: fraction of each student batch replaced by augmented normals.
        degrees / translate / hflip / vflip / color_jitter: augmentation strengths (see ``NormalVariation``).
        histaugan_checkpoint: trained HistAuGAN generator; restyles augmented samples when given.
        histaugan_p: probability that an augmented sample is restyled by HistAuGAN.
        single_template: path of one good image; training then uses it and its variations instead of the
            datamodule's training images (whose first batch per epoch only sets the batch size).
        samples_per_epoch: training samples (the template, then its variations) per epoch in single-template
            mode.
        image_size: side (or (height, width)) the default pre-processor resizes to.
        check_data: read every file of the datamodule before fitting and stop with exit status 2 naming the first
            bad one (``False`` skips the check).
        pre_processor, post_processor, evaluator, visualizer: as in every anomalib model.
    """

    # INT8_PTQ quantises the teacher's and the student's convolutions (and the 1x1 projections); the cosine map,
    # its blur and the top-k score stay in float (README, "Export and INT8")
    int8_modules: ClassVar[tuple[str, ...]] = ("model.teacher", "model.student", "model.projections")

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str] = DEFAULT_LAYERS,
        student_backbone: str | None = None,
        input_normalization: InputNormalization = INPUT_NORMALIZATION,
        anomaly_map_mode: str = "mul",
        map_sigma: float = 4.0,
        topk_fraction: float = 0.01,
        teacher_epochs: int = 0,
        teacher_learning_rate: float = 1e-4,
        student_learning_rate: float = 0.4,
        normal_weight: float = 5.0,
        augmented_weight: float = 2.0,
        defect_weight: float = 10.0,
        student_augment_p: float = 0.5,
        degrees: float = 10.0,
        translate: float = 0.05,
        hflip: bool = False,
        vflip: bool = False,
        color_jitter: float = 0.15,
        histaugan_checkpoint: str | None = None,
        histaugan_p: float = 0.5,
        single_template: str | None = None,
        samples_per_epoch: int = 64,
        image_size: ImageSize = 256,
        check_data: bool = True,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(image_size, check_data, pre_processor, post_processor, evaluator, visualizer)
        if teacher_epochs < 0:
            msg = f"teacher_epochs must be >= 0, got {teacher_epochs}"
            raise ValueError(msg)
        for name, weight in (
            ("normal_weight", normal_weight),
            ("augmented_weight", augmented_weight),
            ("defect_weight", defect_weight),
        ):
            if weight < 0:
                msg = f"{name} must be >= 0, got {weight}"
                raise ValueError(msg)
        if not 0.0 <= student_augment_p <= 1.0:
            msg = f"student_augment_p must be in [0, 1], got {student_augment_p}"
            raise ValueError(msg)
        if samples_per_epoch < 1:
            msg = f"samples_per_epoch must be >= 1, got {samples_per_epoch}"
            raise ValueError(msg)
        # read now: a missing or unreadable template fails at construction, not after the first epoch
        self._template = None if single_template is None else load_template(Path(single_template))
        self.model = TeacherStudentModel(
            backbone=backbone,
            layers=layers,
            student_backbone=student_backbone,
            anomaly_map_mode=anomaly_map_mode,
            map_sigma=map_sigma,
            topk_fraction=topk_fraction,
            input_normalization=input_normalization,
        )
        self.variation = NormalVariation(
            degrees=degrees,
            translate=translate,
            hflip=hflip,
            vflip=vflip,
            brightness=color_jitter,
            contrast=color_jitter,
            saturation=color_jitter * 0.7,
            hue=color_jitter * 0.1,
            histaugan_checkpoint=histaugan_checkpoint,
            histaugan_p=histaugan_p,
        )
        self.defects = SyntheticDefects()
        self.teacher_epochs = teacher_epochs
        self.teacher_learning_rate = teacher_learning_rate
        self.student_learning_rate = student_learning_rate
        self.sample_weights = (normal_weight, augmented_weight, defect_weight)
        self.student_augment_p = student_augment_p
        self.single_template = single_template
        self.samples_per_epoch = samples_per_epoch
        self.automatic_optimization = False
        self._teacher_frozen = teacher_epochs == 0
        if self._teacher_frozen:
            self.model.freeze_teacher()

    # ----------------------------------------------------------------------------------- anomalib hooks
    @property
    def learning_type(self) -> LearningType:
        """One-class: only good images are needed (synthetic defects are made on the fly)."""
        return LearningType.ONE_CLASS

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Manual optimisation: Lightning must not clip gradients itself."""
        return {"gradient_clip_val": None, "num_sanity_val_steps": 0}

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Adam for the teacher (+ classifier head); SGD as in STFPM for the student (+ projections)."""
        teacher_parameters = [*self.model.teacher.parameters(), *self.model.classifier.parameters()]
        student_parameters = [*self.model.student.parameters(), *self.model.projections.parameters()]
        return [
            torch.optim.Adam(teacher_parameters, lr=self.teacher_learning_rate),
            torch.optim.SGD(student_parameters, lr=self.student_learning_rate, momentum=0.9, weight_decay=1e-3),
        ]

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
        """Single-template mode: bring the template to the model's input size once."""
        if self._template is None:
            return
        template = self._template[None].to(self.device)
        transform = getattr(self.pre_processor, "transform", None)
        self._template = (transform(template) if transform is not None else template)[0]
        logger.info("single-template mode: %d samples of %s per epoch", self.samples_per_epoch, self.single_template)

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> int | None:
        """Single-template mode: the first batch's step trains the whole epoch; skip the other batches."""
        del batch
        return -1 if self._template is not None and batch_idx > 0 else None

    def _template_images(self, count: int, first: bool) -> torch.Tensor:
        """``count`` variations of the template; with ``first``, the first sample is the template itself."""
        assert self._template is not None
        template = self._template.to(self.device)
        images = self.variation(template[None].expand(count, -1, -1, -1).contiguous())
        if first:
            images[0] = template
        return images

    def on_train_start(self) -> None:
        """Fail early when the epoch budget leaves no epoch for the student."""
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs != -1 and max_epochs <= self.teacher_epochs:
            msg = (
                f"max_epochs ({max_epochs}) must exceed teacher_epochs ({self.teacher_epochs}): "
                "the student needs at least one epoch"
            )
            raise ValueError(msg)

    def on_train_epoch_start(self) -> None:
        """Freeze the teacher once its fine-tuning epochs are over."""
        if not self._teacher_frozen and self.current_epoch >= self.teacher_epochs:
            self.model.freeze_teacher()
            self._teacher_frozen = True

    # ------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One optimiser step on the batch; in single-template mode, the epoch's steps on template samples."""
        del args, kwargs
        if self._template is None:
            return {"loss": self._optimisation_step(batch.image)}
        size = len(batch.image)
        losses = [
            self._optimisation_step(self._template_images(min(size, self.samples_per_epoch - start), start == 0))
            for start in range(0, self.samples_per_epoch, size)
        ]
        return {"loss": torch.stack(losses).mean()}

    def _optimisation_step(self, images: torch.Tensor) -> torch.Tensor:
        """One optimiser step of whichever stage the current epoch belongs to; the detached loss."""
        teacher_optimizer, student_optimizer = self.optimizers()
        if self.current_epoch < self.teacher_epochs:
            loss = self._teacher_loss(images)
            optimizer, name = teacher_optimizer, "teacher_loss"
        else:
            loss = self._student_loss(images)
            optimizer, name = student_optimizer, "student_loss"
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.log(name, loss.detach(), on_step=False, on_epoch=True, prog_bar=True, batch_size=len(images))
        return loss.detach()

    def _teacher_loss(self, images: torch.Tensor) -> torch.Tensor:
        """Weighted BCE: normal (label 0), augmented normal (0) and synthetic defects (1)."""
        augmented = self.variation(images)
        # defects on plain and on augmented normals alike, so the classifier cannot key on augmentation
        sources = torch.where(torch.rand(len(images), 1, 1, 1, device=images.device) < 0.5, images, augmented)
        defective = self.defects(sources)
        inputs = torch.cat([images, augmented, defective])
        labels = torch.cat([images.new_zeros(2 * len(images)), images.new_ones(len(images))])
        normal_w, augmented_w, defect_w = self.sample_weights
        weights = torch.cat(
            [
                images.new_full((len(images),), normal_w),
                images.new_full((len(images),), augmented_w),
                images.new_full((len(images),), defect_w),
            ]
        )
        logits = self.model.classify(inputs)
        per_sample = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        return (per_sample * weights).sum() / weights.sum().clamp_min(1e-8)

    def _student_loss(self, images: torch.Tensor) -> torch.Tensor:
        """Feature matching on normals, part of them replaced by augmented normals."""
        if self.student_augment_p > 0:
            replace = torch.rand(len(images), 1, 1, 1, device=images.device) < self.student_augment_p
            images = torch.where(replace, self.variation(images), images)
        teacher, student = self.model(images)
        return layer_feature_loss(teacher, student)

    # ---------------------------------------------------------------------------------------- checkpoint
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A reloaded model is always a trained one: its teacher stays frozen."""
        super().on_load_checkpoint(checkpoint)
        self.model.freeze_teacher()
        self._teacher_frozen = True
