"""TemplateSsim in plain torch: templates, pose search, SSIM map, per-class normalisation.

Fitting (``fit``) is ordinary Python over a capped sample of normal images; inference (``forward``) is a fixed
graph (every template x every angle x a shift window), so it exports to OpenVINO as is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components.base import DynamicBufferMixin
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_ext.models.components import (
    GaussianBlur,
    MapMoments,
    MapStandardizer,
    SSIMMap,
    fold_indices,
    k_medoids,
    robust_center_scale,
    topk_mean,
    weighted_theil_sen_slope,
)
from anomalib_ext.models.components.alignment import NccPoseSearch, to_image_frame, to_reference_frame
from anomalib_ext.models.components.stats import check_topk_fraction

logger = logging.getLogger(__name__)

NO_CLASS = -1
_MIN_SCALE = 1e-3
# normals held out for the statistics, with the templates they are held out from (None: the fitted templates)
HeldOut = tuple[torch.Tensor | None, torch.Tensor]


class _ResizableSearch(DynamicBufferMixin, NccPoseSearch):
    """Pose search whose reference buffers take the checkpoint's shape on load."""


def match_photometry(
    images: torch.Tensor, template: torch.Tensor, max_gain: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with their grey levels mapped onto the template's, ``(image - offset) / gain``, and the gain (N, C, 1, 1).

    ``image ~= gain * template + offset`` by least squares over each image and channel (a lighting change is close
    to such a global map; an anomaly covers too few pixels to move it much). The gain is clamped to
    ``[1 / max_gain, max_gain]`` so that a flat template cannot blow the image up.
    """
    image_mean = images.mean(dim=(-2, -1), keepdim=True)
    template_mean = template.mean(dim=(-2, -1), keepdim=True)
    centred_template = template - template_mean
    covariance = ((images - image_mean) * centred_template).mean(dim=(-2, -1), keepdim=True)
    variance = (centred_template * centred_template).mean(dim=(-2, -1), keepdim=True)
    gain = (covariance / (variance + 1e-6)).clamp(1.0 / max_gain, max_gain)
    offset = image_mean - gain * template_mean
    return (images - offset) / gain, gain


class TemplateSsimModel(DynamicBufferMixin, nn.Module):
    """Match each image to its best template and pose; map = smoothed 1 - local SSIM, normalised per class.

    The arguments without a default are ``TemplateSsim``'s, its settings groups flattened (documented there and in
    ``PoseSearchSettings``, ``AnomalyMapSettings`` and ``LightingSettings``, with their defaults); ``map_sigma`` is
    ``AnomalyMapSettings.smoothing_sigma``. The others:

    Args:
        alignment_iterations: align-and-average rounds when building a template.
        min_calibration: classes with fewer held-out normals borrow the pooled statistics.
        grayscale: compare in grey levels (1-channel templates, inputs averaged over channels). ``None`` =
            decide at fit time: grey when every training image has identical channels (3x cheaper SSIM).
        max_gain: bound of the photometric gain (and of its inverse).
    """

    _GAIN_BUFFERS = ("gain_reference", "gain_slope", "gain_low", "gain_high")

    def __init__(
        self,
        *,
        angles: list[float],
        max_shift: int,
        coarse_factor: int,
        ssim_window_size: int,
        ssim_sigma: float,
        map_sigma: float,
        topk_fraction: float,
        pixel_statistics: bool,
        photometric: bool,
        residual: bool,
        illumination_sigma: float,
        gain_trend: bool,
        alignment_iterations: int = 2,
        min_calibration: int = 5,
        grayscale: bool | None = None,
        max_gain: float = 2.0,
    ) -> None:
        super().__init__()
        self.angle_grid = [float(a) for a in angles]
        self.max_shift = max_shift
        self.coarse_factor = coarse_factor
        self.topk_fraction = check_topk_fraction(topk_fraction)
        self.alignment_iterations = alignment_iterations
        self.min_calibration = min_calibration
        self.grayscale = grayscale
        self.search = _ResizableSearch(self.angle_grid, max_shift, coarse_factor)
        self.ssim = SSIMMap(ssim_window_size, ssim_sigma)
        self.smoothing = GaussianBlur(map_sigma)
        self.illumination = GaussianBlur(illumination_sigma)
        # learned at fit time (shapes change, DynamicBufferMixin resizes them on load)
        self.register_buffer("templates", torch.empty(0))  # (K, C, H, W) in [0, 1]
        self.register_buffer("template_class", torch.empty(0, dtype=torch.long))  # (K,) index into class stats
        self.register_buffer("class_center", torch.empty(0))  # (num_classes,) typical normal score
        self.register_buffer("class_scale", torch.empty(0))  # (num_classes,) spread of normal scores
        # (K, M, H, W) mean and regularised spread of normal map channels per template (optional); classes with
        # few normals lean on the statistics pooled over all templates
        self.pixel_stats = MapStandardizer(floor="median", min_scale=_MIN_SCALE, prior_count=5.0)
        # (num_classes,) each: normal score = class_center + gain_slope * (clamped gain - gain_reference)
        for name in self._GAIN_BUFFERS:
            self.register_buffer(name, torch.empty(0))
        self.gain_trend = gain_trend
        self.pixel_statistics = pixel_statistics
        self.photometric = photometric
        self.residual = residual
        self.max_gain = max_gain

    # ------------------------------------------------------------------------------------------- inference
    def check_input(self, images: torch.Tensor) -> None:
        """Clear error when images and templates disagree (shapes are static, so this traces away)."""
        if self.templates.numel() == 0:
            msg = "TemplateSsim has no templates yet: fit the model (engine.fit) before inference"
            raise RuntimeError(msg)
        if images.dim() != 4:
            msg = f"TemplateSsim expects images of shape (N, C, H, W), got {tuple(images.shape)}"
            raise ValueError(msg)
        channels, height, width = self.templates.shape[1:]
        size_ok = tuple(images.shape[-2:]) == (height, width)
        channels_ok = channels == 1 or images.shape[1] == channels
        if not (size_ok and channels_ok):
            msg = (
                f"TemplateSsim templates are (C, H, W) = {(channels, height, width)} but the images are "
                f"{tuple(images.shape[1:])}: use the pre-processor size and channel count the model was fitted with"
            )
            raise ValueError(msg)

    def _as_template_channels(self, images: torch.Tensor) -> torch.Tensor:
        """Grey templates compare with the channel mean of any input; colour templates with the input itself."""
        if self.templates.shape[1] == 1 and images.shape[1] != 1:
            return images.mean(dim=1, keepdim=True)
        return images

    def _maps_pose_gain(self, images: torch.Tensor):
        """Channel-averaged map (N, 1, H, W) before the per-class normalisation, template index (N,), pose and
        photometric gain (N,) (ones without ``photometric``).

        With pixel statistics, the map is standardised per pixel by the spread normal images show there (in the
        template's frame, warped along with the template), so places that vary in normal images (rims,
        highlights) count less than places that never do.
        """
        maps, template_index, pose, gain = self._channel_maps(images)
        return maps.mean(dim=1, keepdim=True), template_index, pose, gain

    def _channel_maps(self, images: torch.Tensor, use_pixel_stats: bool = True):
        """Map channels (N, M, H, W) (1 - SSIM, optionally the intensity residual), template index, pose, gain."""
        images = self._as_template_channels(images)
        pose = self.search(images)
        channels = self.templates.shape[1]
        with_stats = use_pixel_stats and self.pixel_stats.is_fitted
        layers = self.templates
        if with_stats:
            layers = torch.cat([self.templates, self.pixel_stats.mean, self.pixel_stats.scale], dim=1)
        overlay = to_image_frame(layers[pose.reference_index], pose.angle, pose.shift)
        template = overlay[:, :channels]
        gain = images.new_ones(images.shape[0])
        if self.photometric:
            images, channel_gain = match_photometry(images, template, self.max_gain)
            gain = channel_gain.mean(dim=(1, 2, 3))
        if self.illumination.radius:  # remove the smooth part of the difference (highlights, shading)
            images = images - self.illumination(images - template)
        maps = [1.0 - self.ssim(images, template)]
        if self.residual:
            maps.append((images - template).abs().mean(dim=1, keepdim=True))
        anomaly_map = torch.cat(maps, dim=1) if len(maps) > 1 else maps[0]
        anomaly_map = self.smoothing(anomaly_map)
        if with_stats:
            count = anomaly_map.shape[1]
            fitted_count = self.pixel_stats.mean.shape[1]
            if fitted_count != count:  # static shapes: traces away
                msg = (
                    f"TemplateSsim pixel statistics hold {fitted_count} map channel(s) but the model computes "
                    f"{count}: set residual={fitted_count == 2} as when it was fitted"
                )
                raise RuntimeError(msg)
            mean = overlay[:, channels : channels + count]
            spread = overlay[:, channels + count : channels + 2 * count]
            anomaly_map = (anomaly_map - mean) / spread
        return anomaly_map, pose.reference_index, pose, gain

    def normal_center(self, class_index: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        """Typical normal score (N,) of each image's class, at its lighting when the gain trend is fitted."""
        center = self.class_center[class_index]
        if self.gain_slope.numel() == 0:  # static: traces away
            return center
        clamped = torch.maximum(torch.minimum(gain, self.gain_high[class_index]), self.gain_low[class_index])
        return center + self.gain_slope[class_index] * (clamped - self.gain_reference[class_index])

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        self.check_input(images)
        anomaly_map, template_index, _, gain = self._maps_pose_gain(images)
        class_index = self.template_class[template_index]
        center = self.normal_center(class_index, gain).view(-1, 1, 1, 1)
        scale = self.class_scale[class_index].view(-1, 1, 1, 1)
        normalised = (anomaly_map - center) / scale
        return InferenceBatch(pred_score=topk_mean(normalised, self.topk_fraction), anomaly_map=normalised)

    # ------------------------------------------------------------------------------------------------- fit
    @torch.no_grad()
    def build_template(self, images: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """Align ``images`` (n, C, H, W) to a reference and take their pixel-wise median, a few rounds."""
        template = images.median(dim=0).values if reference is None else reference
        search = NccPoseSearch(self.angle_grid, self.max_shift, self.coarse_factor).to(images.device)
        for _ in range(max(1, self.alignment_iterations)):
            search.set_references(template[None])
            aligned = []
            for chunk in images.split(64):
                pose = search(chunk)
                aligned.append(to_reference_frame(chunk, pose.angle, pose.shift))
            template = torch.cat(aligned).median(dim=0).values
        return template

    @torch.no_grad()
    def pairwise_similarity(self, images: torch.Tensor) -> torch.Tensor:
        """Best coarse NCC over the pose grid between every pair of images: (n, n)."""
        search = NccPoseSearch(self.angle_grid, self.max_shift, self.coarse_factor).to(images.device)
        search.set_references(images)
        coarse = search.downsample(images.mean(dim=1, keepdim=True))
        kernel_h, kernel_w = search.coarse_kernels.shape[-2:]
        norms = search.window_norms(coarse, kernel_h, kernel_w)
        rows = []
        for chunk, chunk_norms in zip(coarse.split(32), norms.split(32), strict=True):
            correlation = F.conv2d(chunk, search.coarse_kernels) / chunk_norms  # (c, n*A, S, S)
            rows.append(correlation.reshape(len(chunk), len(images), -1).max(dim=-1).values)
        similarity = torch.cat(rows)
        return torch.maximum(similarity, similarity.T)

    @torch.no_grad()
    def fit(
        self,
        template_images: list[torch.Tensor],
        calibration_images: list[torch.Tensor],
        num_templates: int = 1,
        cross_fit_folds: int = 0,
    ) -> list[int]:
        """Build templates and per-group score statistics.

        Args:
            template_images: per class, the (n, C, H, W) normals that build its template(s). Class-less data is
                one entry.
            calibration_images: per class, normals NOT used for the templates; their scores (with the full
                search, as at inference) give each statistics group its centre and spread.
            num_templates: templates per entry. 1 = the aligned median of the entry, and the class is the
                statistics group; k > 1 = k-medoids inside the entry (e.g. lighting regimes, or the kinds of a
                class-less set) and every template is its own statistics group.
            cross_fit_folds: with one template per entry, an entry with no calibration images (too few normals to
                hold some out) is calibrated on cross-fitted maps instead: its images in this many interleaved folds,
                each fold scored against a template built from the others. Every image then builds the template and
                every image calibrates it (bottle at 10 normals: 8 and 8 instead of 4 and 2 + 2). 0 = never.

        Returns:
            for each template, the index of the entry (class) it was built from.
        """
        grayscale = self.grayscale
        if grayscale is None:
            grayscale = all(bool((images == images[:, :1]).all()) for images in [*template_images, *calibration_images])
        if grayscale:
            template_images = [images.mean(dim=1, keepdim=True) for images in template_images]
            calibration_images = [images.mean(dim=1, keepdim=True) for images in calibration_images]
        templates, template_class, template_source = [], [], []
        for class_index, images in enumerate(template_images):
            count = min(num_templates, len(images))
            if count > 1:
                similarity = self.pairwise_similarity(images)
                medoids, assignment = k_medoids(1.0 - similarity, count)
                for cluster, medoid in enumerate(medoids.tolist()):
                    members = images[assignment == cluster]
                    if len(members) == 0:  # duplicates of another medoid: ties go to the first cluster
                        continue
                    templates.append(self.build_template(members, reference=images[medoid]))
                    template_class.append(len(templates) - 1)  # each cluster is its own statistics group
                    template_source.append(class_index)
                logger.info(
                    "TemplateSsim: k-medoids cluster sizes %s", torch.bincount(assignment, minlength=count).tolist()
                )
            else:
                templates.append(self.build_template(images))
                template_class.append(class_index)
                template_source.append(class_index)
        if num_templates > 1:  # groups are templates: renumber densely
            template_class = list(range(len(templates)))
        self.templates = torch.stack(templates)
        self.template_class = torch.tensor(template_class, dtype=torch.long, device=self.templates.device)
        self.search.set_references(self.templates)
        held_out: list[HeldOut] = [(None, images) for images in calibration_images if len(images)]
        if cross_fit_folds > 0 and num_templates == 1:  # template index == entry index
            held_out += self._cross_fitted_folds(template_images, calibration_images, cross_fit_folds)
        if not held_out:
            logger.warning("TemplateSsim: no held-out normals; normalising with the template images' own scores")
            held_out = [(None, images) for images in template_images]
        self._calibrate(held_out)
        return template_source

    def _cross_fitted_folds(
        self, template_images: list[torch.Tensor], calibration_images: list[torch.Tensor], folds: int
    ) -> list[HeldOut]:
        """Each fold of an entry without calibration images, with the fitted templates but that entry's rebuilt
        from its other folds."""
        held_out: list[HeldOut] = []
        for entry, (images, calibration) in enumerate(zip(template_images, calibration_images, strict=True)):
            if len(calibration) or len(images) < 2:
                continue
            for fold in fold_indices(len(images), min(folds, len(images))):
                kept = torch.ones(len(images), dtype=torch.bool)
                kept[fold] = False
                templates = self.templates.clone()
                templates[entry] = self.build_template(images[kept.to(images.device)])
                held_out.append((templates, images[fold.to(images.device)]))
        return held_out

    def _held_out_chunks(self, held_out: list[HeldOut]) -> Iterator[torch.Tensor]:
        """The held-out images in chunks of 64, each scored with the templates it is held out from in place: the
        fitted ones first, the pose search's references changed only when the templates change (that is what
        costs), the fitted ones back at the end."""
        fitted, current = self.templates, None
        try:
            for templates, images in sorted(held_out, key=lambda pair: pair[0] is not None):
                if templates is not current:
                    self.templates = fitted if templates is None else templates
                    self.search.set_references(self.templates)
                    current = templates
                yield from (chunk for chunk in images.split(64) if len(chunk))
        finally:
            if current is not None:
                self.templates = fitted
                self.search.set_references(fitted)

    @torch.no_grad()
    def _calibrate(self, held_out: list[HeldOut]) -> None:
        """Per-pixel (optional) and per-class statistics from held-out normals, scored as at inference.

        Normals held out from the fitted templates are split: the first half sets the per-pixel statistics, the
        second the score scale (disjoint, so the scale sees the pixel statistics as a new image would).
        Cross-fitted folds serve both: they are there because the entry has too few images to split.
        """
        num_classes = int(self.template_class.max()) + 1
        self.class_center = torch.zeros(num_classes, device=self.templates.device)
        self.class_scale = torch.ones(num_classes, device=self.templates.device)
        self.pixel_stats.reset()
        if self.pixel_statistics:
            pixel_sets = [
                (templates, images[: len(images) // 2] if templates is None else images)
                for templates, images in held_out
            ]
            held_out = [
                (templates, images[len(images) // 2 :] if templates is None else images)
                for templates, images in held_out
            ]
            self._fit_pixel_statistics(pixel_sets)
        scores, classes, gains = [], [], []
        for chunk in self._held_out_chunks(held_out):
            anomaly_map, template_index, _, gain = self._maps_pose_gain(chunk)
            scores.append(topk_mean(anomaly_map, self.topk_fraction))
            classes.append(self.template_class[template_index])
            gains.append(gain)
        all_scores, all_classes, all_gains = torch.cat(scores), torch.cat(classes), torch.cat(gains)
        trend = self.gain_trend and self.photometric
        for name in self._GAIN_BUFFERS:
            setattr(self, name, torch.zeros(num_classes if trend else 0, device=self.templates.device))
        pooled_center, pooled_scale = self._robust_stats(all_scores)
        slopes = []
        for class_index in range(num_classes):
            member = all_classes == class_index
            class_scores, class_gains = all_scores[member], all_gains[member]
            if len(class_scores) < self.min_calibration:
                self.class_center[class_index], self.class_scale[class_index] = pooled_center, pooled_scale
                continue
            if trend:
                reference, slope = class_gains.median(), weighted_theil_sen_slope(class_gains, class_scores)
                class_scores = class_scores - slope * (class_gains - reference)
                self.gain_reference[class_index], self.gain_slope[class_index] = reference, slope
                self.gain_low[class_index], self.gain_high[class_index] = class_gains.min(), class_gains.max()
                slopes.append(float(slope))
            self.class_center[class_index], self.class_scale[class_index] = self._robust_stats(class_scores)
        if slopes:
            logger.info("TemplateSsim: normal score vs photometric gain, slopes %s", [round(s, 2) for s in slopes])

    @torch.no_grad()
    def _fit_pixel_statistics(self, held_out: list[HeldOut]) -> None:
        """Per template: mean and spread of each normal map channel in the template frame, spread regularised."""
        moments = MapMoments(groups=len(self.templates))
        for chunk in self._held_out_chunks(held_out):
            anomaly_map, template_index, pose, _ = self._channel_maps(chunk, use_pixel_stats=False)
            moments.add(to_reference_frame(anomaly_map, pose.angle, pose.shift), template_index)
        self.pixel_stats.fit(moments)

    @staticmethod
    def _robust_stats(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Median and a spread that survives a stray outlier: max(1.4826 MAD, std / 2), floored."""
        return robust_center_scale(scores, min_scale=_MIN_SCALE, std_fraction=0.5)
