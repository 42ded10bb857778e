"""TemplateSsim in plain torch: templates, pose search, SSIM map, per-class normalisation.

Fitting (``fit``) is ordinary Python over a capped sample of normal images; inference (``forward``) is a fixed
graph (every template x every angle x a shift window), so it exports to OpenVINO as is.
"""

from __future__ import annotations

import logging
import math

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components.base import DynamicBufferMixin
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_ext.models.components import SSIMMap, gaussian_window, topk_mean
from anomalib_ext.models.components.alignment import NccPoseSearch, to_image_frame, to_reference_frame

logger = logging.getLogger(__name__)

NO_CLASS = -1
_MIN_SCALE = 1e-3


class _ResizableSearch(DynamicBufferMixin, NccPoseSearch):
    """Pose search whose reference buffers take the checkpoint's shape on load."""


class TemplateSsimModel(DynamicBufferMixin, nn.Module):
    """Match each image to its best template and pose; map = smoothed 1 - local SSIM, normalised per class.

    Args:
        angles: rotations searched, degrees (fixed grid).
        max_shift: shifts searched, pixels in each direction.
        coarse_factor: downsampling of the exhaustive search pass.
        ssim_window, ssim_sigma: Gaussian SSIM window.
        map_sigma: Gaussian smoothing of the map (0 = none).
        topk_fraction: image score = mean of this fraction of the highest map pixels.
        alignment_iterations: align-and-average rounds when building a template.
        min_calibration: classes with fewer held-out normals borrow the pooled statistics.
        grayscale: compare in grey levels (1-channel templates, inputs averaged over channels). ``None`` =
            decide at fit time: grey when every training image has identical channels (3x cheaper SSIM).
        pixel_statistics: standardise the map per pixel (template frame) with half of the held-out normals;
            the other half then gives the per-class score statistics.
        photometric: before comparing, map the image's grey levels onto the overlaid template's by one gain and
            offset per image and channel (least squares over the image), so lighting set-ups compare.
        residual: add a second map channel, the absolute intensity difference to the template (after the
            photometric matching); with pixel statistics each channel is standardised on its own, then the
            channels are averaged.
        illumination_sigma: > 0 removes the smooth part of the image-template difference (Gaussian of this
            sigma, pixels) before comparing: shading and broad highlights go, marks narrower than that stay.
        max_gain: bound of the photometric gain (and of its inverse).
        gain_trend: with ``photometric``, let each class's typical normal score follow the image's photometric
            gain (a robust straight line fitted on held-out normals, gain clamped to the range they cover): a
            darker lighting session is noisier once mapped onto the template, so its normals score higher
            everywhere; the trend takes that lighting effect out of the per-class normalisation.
    """

    _GAIN_BUFFERS = ("gain_reference", "gain_slope", "gain_low", "gain_high")

    def __init__(
        self,
        angles: list[float],
        max_shift: int = 10,
        coarse_factor: int = 4,
        ssim_window: int = 7,
        ssim_sigma: float = 1.5,
        map_sigma: float = 2.0,
        topk_fraction: float = 0.002,
        alignment_iterations: int = 2,
        min_calibration: int = 5,
        grayscale: bool | None = None,
        pixel_statistics: bool = False,
        photometric: bool = False,
        residual: bool = False,
        illumination_sigma: float = 0.0,
        max_gain: float = 2.0,
        gain_trend: bool = False,
    ) -> None:
        super().__init__()
        if not 0 < topk_fraction <= 1:
            msg = f"topk_fraction must be in (0, 1], got {topk_fraction}"
            raise ValueError(msg)
        self.angle_grid = [float(a) for a in angles]
        self.max_shift = max_shift
        self.coarse_factor = coarse_factor
        self.topk_fraction = topk_fraction
        self.alignment_iterations = alignment_iterations
        self.min_calibration = min_calibration
        self.grayscale = grayscale
        self.search = _ResizableSearch(self.angle_grid, max_shift, coarse_factor)
        self.ssim = SSIMMap(ssim_window, ssim_sigma)
        self.smoothing_size = 2 * math.ceil(3 * map_sigma) + 1 if map_sigma > 0 else 0
        if self.smoothing_size:  # separable: two 1-D passes
            kernel_1d = gaussian_window(self.smoothing_size, map_sigma).sum(dim=-1, keepdim=True)
            self.register_buffer("smoothing_y", kernel_1d, persistent=False)  # (1, 1, k, 1)
            self.register_buffer("smoothing_x", kernel_1d.transpose(-1, -2).contiguous(), persistent=False)
        # learned at fit time (shapes change, DynamicBufferMixin resizes them on load)
        self.register_buffer("templates", torch.empty(0))  # (K, C, H, W) in [0, 1]
        self.register_buffer("template_class", torch.empty(0, dtype=torch.long))  # (K,) index into class stats
        self.register_buffer("class_center", torch.empty(0))  # (num_classes,) typical normal score
        self.register_buffer("class_scale", torch.empty(0))  # (num_classes,) spread of normal scores
        self.register_buffer("pixel_mean", torch.empty(0))  # (K, M, H, W) normal map channels per template (optional)
        self.register_buffer("pixel_std", torch.empty(0))  # (K, M, H, W) their spread, regularised
        # (num_classes,) each: normal score = class_center + gain_slope * (clamped gain - gain_reference)
        for name in self._GAIN_BUFFERS:
            self.register_buffer(name, torch.empty(0))
        self.gain_trend = gain_trend
        self.pixel_statistics = pixel_statistics
        self.photometric = photometric
        self.residual = residual
        self.max_gain = max_gain
        self.illumination_size = 2 * math.ceil(3 * illumination_sigma) + 1 if illumination_sigma > 0 else 0
        if self.illumination_size:
            kernel_1d = gaussian_window(self.illumination_size, illumination_sigma).sum(dim=-1, keepdim=True)
            self.register_buffer("illumination_y", kernel_1d, persistent=False)
            self.register_buffer("illumination_x", kernel_1d.transpose(-1, -2).contiguous(), persistent=False)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        """Checkpoints from before the gain trend load without it (empty buffers = no trend)."""
        for name in self._GAIN_BUFFERS:
            state_dict.setdefault(prefix + name, torch.empty(0))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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

    def raw_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map before per-class normalisation (N, 1, H, W) and chosen template index (N,).

        With pixel statistics, the map is standardised per pixel by the spread normal images show there (in
        the template's frame, warped along with the template), so places that vary in normal images (rims,
        highlights) count less than places that never do.
        """
        anomaly_map, template_index, _, _ = self._maps_pose_gain(images)
        return anomaly_map, template_index

    def _maps_pose_gain(self, images: torch.Tensor):
        """Channel-averaged map, template index, pose and photometric gain (N,) (ones without ``photometric``)."""
        maps, template_index, pose, gain = self._channel_maps(images)
        return maps.mean(dim=1, keepdim=True), template_index, pose, gain

    def match_photometry(self, images: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
        """Images with their grey levels mapped onto the template's: ``(image - offset) / gain``."""
        return self._match_photometry(images, template)[0]

    def _match_photometry(self, images: torch.Tensor, template: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Matched images and the gain (N, C, 1, 1).

        ``image ~= gain * template + offset`` by least squares over each image and channel (a lighting change is
        close to such a global map; an anomaly covers too few pixels to move it much). The gain is clamped to
        ``[1 / max_gain, max_gain]`` so that a flat template cannot blow the image up.
        """
        image_mean = images.mean(dim=(-2, -1), keepdim=True)
        template_mean = template.mean(dim=(-2, -1), keepdim=True)
        centred_template = template - template_mean
        covariance = ((images - image_mean) * centred_template).mean(dim=(-2, -1), keepdim=True)
        variance = (centred_template * centred_template).mean(dim=(-2, -1), keepdim=True)
        gain = (covariance / (variance + 1e-6)).clamp(1.0 / self.max_gain, self.max_gain)
        offset = image_mean - gain * template_mean
        return (images - offset) / gain, gain

    @staticmethod
    def _blur(maps: torch.Tensor, kernel_y: torch.Tensor, kernel_x: torch.Tensor) -> torch.Tensor:
        """Separable blur of (N, M, H, W) maps with reflect padding (same size out)."""
        batch, count, height, width = maps.shape
        flat = maps.reshape(batch * count, 1, height, width)
        pad_y, pad_x = kernel_y.shape[-2] // 2, kernel_x.shape[-1] // 2
        flat = F.conv2d(F.pad(flat, (0, 0, pad_y, pad_y), mode="reflect"), kernel_y)
        flat = F.conv2d(F.pad(flat, (pad_x, pad_x, 0, 0), mode="reflect"), kernel_x)
        return flat.reshape(batch, count, height, width)

    def _channel_maps(self, images: torch.Tensor, use_pixel_stats: bool = True):
        """Map channels (N, M, H, W) (1 - SSIM, optionally the intensity residual), template index, pose, gain."""
        images = self._as_template_channels(images)
        pose = self.search(images)
        channels = self.templates.shape[1]
        with_stats = use_pixel_stats and self.pixel_mean.numel() > 0
        layers = self.templates
        if with_stats:
            layers = torch.cat([self.templates, self.pixel_mean, self.pixel_std], dim=1)
        overlay = to_image_frame(layers[pose.reference_index], pose.angle, pose.shift)
        template = overlay[:, :channels]
        gain = images.new_ones(images.shape[0])
        if self.photometric:
            images, channel_gain = self._match_photometry(images, template)
            gain = channel_gain.mean(dim=(1, 2, 3))
        if self.illumination_size:  # remove the smooth part of the difference (highlights, shading)
            images = images - self._blur(images - template, self.illumination_y, self.illumination_x)
        maps = [1.0 - self.ssim(images, template)]
        if self.residual:
            maps.append((images - template).abs().mean(dim=1, keepdim=True))
        anomaly_map = torch.cat(maps, dim=1) if len(maps) > 1 else maps[0]
        if self.smoothing_size:
            anomaly_map = self._blur(anomaly_map, self.smoothing_y, self.smoothing_x)
        if with_stats:
            count = anomaly_map.shape[1]
            if self.pixel_mean.shape[1] != count:  # static shapes: traces away
                msg = (
                    f"TemplateSsim pixel statistics hold {self.pixel_mean.shape[1]} map channel(s) but the model "
                    f"computes {count}: set residual={self.pixel_mean.shape[1] == 2} as when it was fitted (a "
                    "checkpoint from before the residual channel needs residual=False)"
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
        coarse = search._downsample(images.mean(dim=1, keepdim=True))
        kernel_h, kernel_w = search.coarse_kernels.shape[-2:]
        norms = search._window_norms(coarse, kernel_h, kernel_w)
        rows = []
        for chunk, chunk_norms in zip(coarse.split(32), norms.split(32), strict=True):
            correlation = F.conv2d(chunk, search.coarse_kernels) / chunk_norms  # (c, n*A, S, S)
            rows.append(correlation.reshape(len(chunk), len(images), -1).max(dim=-1).values)
        similarity = torch.cat(rows)
        return torch.maximum(similarity, similarity.T)

    @staticmethod
    def k_medoids(distance: torch.Tensor, count: int, iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministic k-medoids (farthest-point start, alternate assign/update): medoids and assignment."""
        total = distance.shape[0]
        count = min(count, total)
        medoids = [int(distance.sum(dim=1).argmin())]
        while len(medoids) < count:
            nearest = distance[:, medoids].min(dim=1).values
            nearest[medoids] = -1.0  # distinct medoids even when images are duplicates (all distances 0)
            medoids.append(int(nearest.argmax()))
        medoid_tensor = torch.tensor(medoids)
        for _ in range(iterations):
            assignment = distance[:, medoid_tensor].argmin(dim=1)
            updated = medoid_tensor.clone()
            for cluster in range(count):
                members = (assignment == cluster).nonzero().flatten()
                if len(members) > 0:
                    within = distance[members][:, members].sum(dim=1)
                    updated[cluster] = members[within.argmin()]
            if torch.equal(updated, medoid_tensor):
                break
            medoid_tensor = updated
        return medoid_tensor, distance[:, medoid_tensor].argmin(dim=1)

    @torch.no_grad()
    def fit(
        self,
        template_images: list[torch.Tensor],
        calibration_images: list[torch.Tensor],
        num_templates: int = 1,
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
                medoids, assignment = self.k_medoids(1.0 - similarity, count)
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
        held_out = [images for images in calibration_images if len(images)]
        if not held_out:
            logger.warning("TemplateSsim: no held-out normals; normalising with the template images' own scores")
            held_out = template_images
        self.calibrate(held_out)
        return template_source

    @torch.no_grad()
    def calibrate(self, held_out: list[torch.Tensor]) -> None:
        """Per-pixel (optional) and per-class statistics from held-out normals, scored as at inference."""
        num_classes = int(self.template_class.max()) + 1
        self.class_center = torch.zeros(num_classes, device=self.templates.device)
        self.class_scale = torch.ones(num_classes, device=self.templates.device)
        self.pixel_mean, self.pixel_std = torch.empty(0), torch.empty(0)
        if self.pixel_statistics:
            pixel_sets = [images[: len(images) // 2] for images in held_out]
            held_out = [images[len(images) // 2 :] for images in held_out if len(images) > len(images) // 2]
            self._fit_pixel_statistics(torch.cat(pixel_sets))
        scores, classes, gains = [], [], []
        for images in held_out:
            for chunk in images.split(64):
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
                reference, slope = class_gains.median(), _robust_slope(class_gains, class_scores)
                class_scores = class_scores - slope * (class_gains - reference)
                self.gain_reference[class_index], self.gain_slope[class_index] = reference, slope
                self.gain_low[class_index], self.gain_high[class_index] = class_gains.min(), class_gains.max()
                slopes.append(float(slope))
            self.class_center[class_index], self.class_scale[class_index] = self._robust_stats(class_scores)
        if slopes:
            logger.info("TemplateSsim: normal score vs photometric gain, slopes %s", [round(s, 2) for s in slopes])

    @torch.no_grad()
    def _fit_pixel_statistics(self, images: torch.Tensor) -> None:
        """Per template: mean and spread of each normal map channel in the template frame, spread regularised."""
        count = len(self.templates)
        sums = squares = None
        hits = torch.zeros(count, device=self.templates.device)
        for chunk in images.split(64):
            anomaly_map, template_index, pose, _ = self._channel_maps(chunk, use_pixel_stats=False)
            aligned = to_reference_frame(anomaly_map, pose.angle, pose.shift)
            if sums is None:
                sums = aligned.new_zeros((count, *aligned.shape[1:]))
                squares = torch.zeros_like(sums)
            sums.index_add_(0, template_index, aligned)
            squares.index_add_(0, template_index, aligned * aligned)
            hits.index_add_(0, template_index, torch.ones_like(template_index, dtype=hits.dtype))
        pooled_mean = sums.sum(0, keepdim=True) / hits.sum()
        pooled_square = squares.sum(0, keepdim=True) / hits.sum()
        weight = (hits / (hits + 5.0)).view(-1, 1, 1, 1)  # few hits: lean on the pooled maps
        mean = weight * sums / hits.clamp_min(1).view(-1, 1, 1, 1) + (1 - weight) * pooled_mean
        square = weight * squares / hits.clamp_min(1).view(-1, 1, 1, 1) + (1 - weight) * pooled_square
        std = (square - mean * mean).clamp_min(0).sqrt()
        floor = std.flatten(2).median(dim=2).values[..., None, None]  # per template and channel
        self.pixel_mean = mean
        self.pixel_std = std + floor + _MIN_SCALE

    @staticmethod
    def _robust_stats(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Median and a spread that survives a stray outlier: max(1.4826 MAD, std / 2), floored."""
        center = scores.median()
        mad = (scores - center).abs().median() * 1.4826
        std = scores.std() if len(scores) > 1 else torch.zeros_like(center)
        return center, torch.maximum(torch.maximum(mad, std / 2), torch.tensor(_MIN_SCALE, device=scores.device))


def _robust_slope(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Straight-line slope that a few outliers do not bend: the median of all pairwise slopes, each weighted by
    how far apart its two x lie (Sievers-Scholz weighting of Theil-Sen).

    The weights matter when x comes in clusters (two lighting sessions): pairs from the same cluster have
    nearly equal x, so their slopes are noise, and unweighted they would pull the median towards 0.
    """
    first, second = torch.triu_indices(len(x), len(x), offset=1, device=x.device)
    run = x[second] - x[first]
    weight = run.abs()
    if float(weight.sum()) < 1e-6:  # every x equal: no trend to see
        return torch.zeros((), device=x.device)
    slopes = (y[second] - y[first]) / torch.where(weight > 0, run, torch.ones_like(run))
    order = slopes.argsort()
    cumulative = weight[order].cumsum(0)
    return slopes[order][torch.searchsorted(cumulative, cumulative[-1] / 2)]
