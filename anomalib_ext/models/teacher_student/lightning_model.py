"""TeacherStudent: fine-tune a pretrained teacher on normal vs synthetic defects, then distil a student.

Both stages run in one ``anomalib train`` run with manual optimisation: with ``teacher_finetuning``, epochs
``[0, teacher_finetuning.epochs)`` train the teacher as a weighted normal-vs-defective classifier; then the teacher
is frozen and the remaining epochs train the student to match its L2-normalised features (losses in ``loss.py``).
The map is 1 - cosine similarity per layer, combined by product or sum.

Single-template mode: the model makes its own training images from the one template inside ``training_step``:
the first training batch of each epoch only gives the batch size, and that step runs the whole epoch,
``single_template.samples_per_epoch`` samples (the template and its variations) in batches of that size; the rest
of the datamodule's training batches are skipped. The user's datamodule is never modified.
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

from anomalib_ext.models.components import DEFAULT_BACKBONE, DEFAULT_LAYERS, ExtModelMixin, ImageSize
from anomalib_ext.models.components.settings import Settings

from .augment import Augmentation, NormalVariation, SyntheticDefects
from .loss import FeatureMatchingLoss, TeacherClassifierLoss
from .template import SingleTemplate, load_template
from .torch_model import TeacherStudentModel

logger = logging.getLogger(__name__)

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
            randomly initialised. Both see the images standardised with the mean/std of the teacher's pretrained
            weights (timm's ``pretrained_cfg``).
        layers: compared feature layers.
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
            ``path``, ``samples_per_epoch``) trains on that one good image and its variations instead (the
            datamodule's first training batch per epoch only sets the batch size).
        image_size: side (or (height, width)) the default pre-processor resizes to.
        check_data: read every file of the datamodule before fitting and stop with exit status 2 naming the first
            bad one (``False`` skips the check).
        pre_processor, post_processor, evaluator, visualizer: as in every anomalib model.
    """

    # INT8_PTQ quantises the teacher's and the student's convolutions; the cosine map, its blur and the top-k score
    # stay in float (README, "Export and INT8")
    int8_modules: ClassVar[tuple[str, ...]] = ("model.teacher", "model.student")

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str] = DEFAULT_LAYERS,
        anomaly_map_mode: str = "mul",
        map_sigma: float = 4.0,
        topk_fraction: float = 0.01,
        student_learning_rate: float = 0.4,
        augmentation: Augmentation = Augmentation(),  # noqa: B008  (frozen, so sharing the default is safe)
        teacher_finetuning: TeacherFinetuning | None = None,
        single_template: SingleTemplate | None = None,
        image_size: ImageSize = 256,
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
        self.model = TeacherStudentModel(
            backbone=backbone,
            layers=layers,
            anomaly_map_mode=anomaly_map_mode,
            map_sigma=map_sigma,
            topk_fraction=topk_fraction,
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
        """Manual optimisation: Lightning must not clip gradients itself."""
        return {"gradient_clip_val": None, "num_sanity_val_steps": 0}

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
        """Single-template mode: bring the template to the model's input size once."""
        if self._template is None:
            return
        template = self._template[None].to(self.device)
        transform = getattr(self.pre_processor, "transform", None)
        self._template = (transform(template) if transform is not None else template)[0]
        logger.info(
            "single-template mode: %d samples of %s per epoch",
            self.single_template.samples_per_epoch,
            self.single_template.path,
        )

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
                f"max_epochs ({max_epochs}) must exceed teacher_finetuning.epochs ({self.teacher_epochs}): "
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
        if self.single_template is None:
            return {"loss": self._optimisation_step(batch.image)}
        size, total = len(batch.image), self.single_template.samples_per_epoch
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
