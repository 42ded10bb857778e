"""TemplateSsim: per-class templates, pose search by NCC, anomaly map = 1 - local SSIM, per-class scores.

No gradient training: one epoch collects a capped, seeded sample of normal images per class (reservoir), then
``fit`` builds the templates and each class's score statistics from held-out normals.

Where the class comes from: the path of each training image (``.../good/<class>/<name>``, see
``anomalib_ext.models.components.class_from_path``), because anomalib's batches have no class field. Images in a flat
``good/`` folder (MVTec, Folder) have no class: the model then finds ``num_templates`` templates by k-medoids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule, MemoryBankMixin
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer

from anomalib_ext.models.components import (
    CROSS_FIT_FOLDS,
    DdpAnchor,
    ExtModelMixin,
    ImageSize,
    class_from_path,
    gather_objects,
    gather_reservoir,
    is_distributed,
)
from anomalib_ext.models.components.sampling import ReservoirSampler
from anomalib_ext.models.components.settings import Settings

from .torch_model import TemplateSsimModel

logger = logging.getLogger(__name__)

# small rotations only: the dice classes 01/02, 03/04 and 07-10 are 90-degree rotations of each other, so a
# search over quarter turns would let one class's template explain another's images.
DEFAULT_ANGLES = (-8.0, -6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0, 8.0)
# share of each class's sample held out from its template for the score (and per-pixel) statistics
CALIBRATION_FRACTION = 0.5
# k-medoids templates when the training images carry no class folder (``num_templates: null``)
CLASS_LESS_TEMPLATES = 3


@dataclass(frozen=True)
class PoseSearchSettings(Settings):
    """The pose search (NCC over every template x angle x shift), at inference and when aligning training images.

    Args:
        angles: rotations searched, degrees (counter-clockwise). Add quarter turns (90, 180, 270) only when classes
            are not rotations of each other.
        max_shift: shifts searched, pixels (each direction) at the pre-processed size.
        coarse_factor: downsampling of the exhaustive search pass (refined at full resolution).
    """

    angles: tuple[float, ...] = DEFAULT_ANGLES
    max_shift: int = 10
    coarse_factor: int = 4


@dataclass(frozen=True)
class AnomalyMapSettings(Settings):
    """How an image is compared with its overlaid template.

    Args:
        ssim_window_size: Gaussian SSIM window, odd size in pixels.
        ssim_sigma: sigma of that window.
        smoothing_sigma: Gaussian smoothing of the map (0 = none).
        residual: add the absolute intensity difference to the template as a second map channel (standardised on
            its own with pixel statistics), averaged with 1 - SSIM.
        pixel_statistics: standardise the map per pixel by the spread of held-out normal maps (in the template
            frame) before the per-class score normalisation; uses half of the held-out images.
    """

    ssim_window_size: int = 7
    ssim_sigma: float = 1.5
    smoothing_sigma: float = 2.0
    residual: bool = True
    pixel_statistics: bool = True


@dataclass(frozen=True)
class LightingSettings(Settings):
    """What keeps a change of lighting set-up from looking like an anomaly.

    Args:
        photometric: map each image's grey levels onto its overlaid template's (one gain and offset per image and
            channel) before comparing.
        illumination_sigma: remove the smooth part of the image-template difference (Gaussian sigma, pixels at the
            pre-processed size; 0 = off) before comparing: shading and broad highlights, not thin marks. Only for
            defects narrower than a few sigma (4 at 128 px suits the dice; it hurts the large defects of MVTec
            bottle).
        gain_trend: with ``photometric``, fit per class how the normal score moves with the photometric gain
            (darker sessions are noisier after matching, so their normals score higher) and normalise by the score
            expected at each image's lighting; the gain is clamped to the range the held-out normals cover.
    """

    photometric: bool = True
    illumination_sigma: float = 0.0
    gain_trend: bool = False


class TemplateSsim(ExtModelMixin, MemoryBankMixin, AnomalibModule):
    """Template matching + SSIM anomaly detector (see README.md).

    Args:
        pose_search: ``PoseSearchSettings`` or a mapping of its keys (``angles``, ``max_shift``, ``coarse_factor``).
        class_folders: read the class from ``.../good/<class>/`` in the image path; ``False`` = class-less.
        num_templates: k-medoids templates per class, each with its own score statistics (class-less data is one
            class); ``None`` = 1 per class folder, 3 without class folders.
        max_images_per_class: reservoir cap per class (half builds the template, half gives the statistics).
        anomaly_map: ``AnomalyMapSettings`` or a mapping of its keys (``ssim_window_size``, ``ssim_sigma``,
            ``smoothing_sigma``, ``residual``, ``pixel_statistics``).
        lighting: ``LightingSettings`` or a mapping of its keys (``photometric``, ``illumination_sigma``,
            ``gain_trend``).
        topk_fraction: image score = mean of the top fraction of the (normalised) map, in (0, 1].
        seed: seed of the reservoir sampling and of the template / held-out split.
        image_size: pre-processor resize, ``H`` or ``(H, W)``, when ``pre_processor`` is ``True`` (default 256).
        check_data: read every file of the datamodule before fitting and stop with exit status 2 naming the first
            bad one (``False`` skips the check).
        pre_processor, post_processor, evaluator, visualizer: as in every anomalib model.
    """

    # INT8_PTQ leaves the whole graph in float: it has no learnt convolution, and the pose search, SSIM and the
    # per-class score normalisation compare small differences that 8 bits would move (README, "Export and INT8")
    int8_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        pose_search: PoseSearchSettings = PoseSearchSettings(),  # noqa: B008  (frozen: a shared default is safe)
        class_folders: bool = True,
        num_templates: int | None = None,
        max_images_per_class: int = 128,
        anomaly_map: AnomalyMapSettings = AnomalyMapSettings(),  # noqa: B008
        lighting: LightingSettings = LightingSettings(),  # noqa: B008
        topk_fraction: float = 0.002,
        seed: int = 0,
        image_size: ImageSize | None = None,
        check_data: bool = True,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(image_size, check_data, pre_processor, post_processor, evaluator, visualizer)
        if num_templates is not None and num_templates < 1:
            msg = f"TemplateSsim: num_templates must be >= 1 (or null), got {num_templates}"
            raise ValueError(msg)
        if max_images_per_class < 2:
            msg = f"TemplateSsim: max_images_per_class must be >= 2, got {max_images_per_class}"
            raise ValueError(msg)
        search, comparison, light = (
            PoseSearchSettings.coerce(pose_search),
            AnomalyMapSettings.coerce(anomaly_map),
            LightingSettings.coerce(lighting),
        )
        self.num_templates = num_templates
        self.class_folders = class_folders
        self.max_images_per_class = max_images_per_class
        self.seed = seed
        self.model = TemplateSsimModel(
            angles=list(search.angles),
            max_shift=search.max_shift,
            coarse_factor=search.coarse_factor,
            ssim_window_size=comparison.ssim_window_size,
            ssim_sigma=comparison.ssim_sigma,
            map_sigma=comparison.smoothing_sigma,
            residual=comparison.residual,
            pixel_statistics=comparison.pixel_statistics,
            photometric=light.photometric,
            illumination_sigma=light.illumination_sigma,
            gain_trend=light.gain_trend,
            topk_fraction=topk_fraction,
        )
        self.class_names: list[str] = []
        self._reservoir: dict[str, ReservoirSampler] = {}
        self._ddp_anchor = DdpAnchor()  # lets Lightning wrap this gradient-free model in DDP (not in checkpoints)

    @staticmethod
    def configure_optimizers() -> None:
        """No gradient training."""
        return

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ONE_CLASS

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        return {"max_epochs": 1, "gradient_clip_val": 0, "num_sanity_val_steps": 0}

    # --------------------------------------------------------------------------------------------- training
    def _class_of(self, image_path: str | None) -> str:
        if not self.class_folders or image_path is None:
            return ""
        return class_from_path(image_path) or ""

    def training_step(self, batch: Batch, *args, **kwargs) -> torch.Tensor:
        """Keep a seeded sample of each class's images (uint8: 4x less memory) that ignores the loader's order."""
        del args, kwargs
        paths = batch.image_path if batch.image_path is not None else [None] * len(batch.image)
        images = (batch.image.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        names = [self._class_of(path) for path in paths]
        for name in dict.fromkeys(names):
            if name not in self._reservoir:
                self._reservoir[name] = ReservoirSampler(self.max_images_per_class, seed=self.seed)
            members = torch.tensor([member == name for member in names])
            ids = None
            if batch.image_path is not None:
                ids = [str(path) for path, member in zip(paths, names, strict=True) if member == name]
            self._reservoir[name].add(images[members], ids=ids)  # ids: DDP's padding repeats count once
        return torch.tensor(0.0, requires_grad=True, device=self.device)

    def fit(self) -> None:
        """Templates and per-class statistics from the reservoir (template and calibration images disjoint).

        Under DDP every rank first merges, class by class, all ranks' reservoirs (a rank may not have seen every
        class), so the cap is per class over the whole training set and every rank fits the same templates.
        """
        self._reservoir = self._gather_reservoirs()
        if not self._reservoir:
            msg = "TemplateSsim.fit: no training images were seen (is the train dataloader empty?)"
            raise RuntimeError(msg)
        named = sorted(self._reservoir)
        if "" in named and len(named) > 1:
            msg = (
                "TemplateSsim: some training images sit in class folders (good/<class>/) and some directly in "
                "good/; put all in class folders or none (or set class_folders=False)"
            )
            raise ValueError(msg)
        class_less = named == [""]
        per_entry = self.num_templates or (CLASS_LESS_TEMPLATES if class_less else 1)
        cross_fit = per_entry == 1  # a class too small to split is cross-fitted instead (one template per class)
        generator = torch.Generator().manual_seed(self.seed)
        template_sets, calibration_sets = [], []
        for name in named:
            images = self._reservoir[name].samples().float().div(255).to(self.device)
            order = torch.randperm(len(images), generator=generator).to(self.device)
            held = round(len(images) * CALIBRATION_FRACTION) if len(images) >= 4 else 0
            if cross_fit and self._split_is_thin(held):
                held = 0
            calibration_sets.append(images[order[:held]])
            template_sets.append(images[order[held:]])
        self._warn_when_calibration_is_thin(named, template_sets, calibration_sets, cross_fit)
        folds = CROSS_FIT_FOLDS if cross_fit else 0
        template_source = self.model.fit(template_sets, calibration_sets, per_entry, cross_fit_folds=folds)
        # one name per statistics group (a class, or a template when an entry has several)
        if class_less:
            self.class_names = [f"template_{index}" for index in range(len(template_source))]
        elif per_entry > 1:
            self.class_names = [named[source] for source in template_source]
        else:
            self.class_names = named
        logger.info("TemplateSsim fitted %d templates, statistics groups %s", len(template_source), self.class_names)
        self._reservoir = {}

    def _split_is_thin(self, held: int) -> bool:
        """Whether ``held`` held-out normals are too few: half of them set the per-pixel spread
        (``pixel_statistics``), the rest the score scale, each wanting ``min_calibration`` images."""
        wanted = self.model.min_calibration
        pixel = held // 2 if self.model.pixel_statistics else 0
        return held - pixel < wanted or (self.model.pixel_statistics and pixel < wanted)

    def _warn_when_calibration_is_thin(
        self,
        names: list[str],
        template_sets: list[torch.Tensor],
        calibration_sets: list[torch.Tensor],
        cross_fit: bool,
    ) -> None:
        """One line when held-out normals are too few for the statistics. With one template per class such a class
        is cross-fitted (bottle at 10 normals: image AUROC 0.87 from a 4 + 2 + 2 split, docs/choosing_a_model.md);
        with several, it keeps the thin split."""
        thin = [
            (name, len(templates), len(held))
            for name, templates, held in zip(names, template_sets, calibration_sets, strict=True)
            if (cross_fit and not len(held)) or self._split_is_thin(len(held))
        ]
        if not thin:
            return
        name, templates, held = min(thin, key=lambda entry: entry[1] + entry[2])
        which = repr(name) if name else "class-less"
        if cross_fit:
            logger.warning(
                "TemplateSsim: %d of %d class(es) have too few training images to hold min_calibration=%d out for "
                "each statistic; the fewest, %s: %d images: every image builds the template and the statistics come "
                "from %d-fold cross-fitted maps (each image against a template built without it)",
                len(thin),
                len(names),
                self.model.min_calibration,
                which,
                templates,
                min(CROSS_FIT_FOLDS, templates),
            )
            return
        pixel = held // 2 if self.model.pixel_statistics else 0
        logger.warning(
            "TemplateSsim: %d of %d class(es) have too few training images for their statistics; the fewest, %s: "
            "%d build the template, %d the per-pixel statistics and %d the score scale (min_calibration=%d each)",
            len(thin),
            len(names),
            which,
            templates,
            pixel,
            held - pixel,
            self.model.min_calibration,
        )

    def _gather_reservoirs(self) -> dict[str, ReservoirSampler]:
        """Each class's reservoir merged over the DDP ranks (unchanged on one process)."""
        if not is_distributed():
            return self._reservoir
        names = sorted({name for part in gather_objects(sorted(self._reservoir)) for name in part})
        merged = {}
        for name in names:  # the same order on every rank: each gather is a collective
            reservoir = gather_reservoir(self._reservoir.get(name), self.device, self.max_images_per_class, self.seed)
            if reservoir is not None:
                merged[name] = reservoir
        return merged

    # -------------------------------------------------------------------------------------------- checkpoint
    def get_extra_state(self) -> dict[str, Any]:
        """The class names travel in the state dict: ``ddp_spawn`` hands the fitted model back to the launching
        process through ``load_state_dict`` only, and a checkpoint keeps them under the same key."""
        return {"class_names": list(self.class_names)}

    def set_extra_state(self, state: Any) -> None:  # noqa: ANN401
        if isinstance(state, dict):
            self.class_names = list(state.get("class_names", []))
