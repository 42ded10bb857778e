"""What a benchmark cell measures on a fitted model, apart from speed (``speed.py``): accuracy on the test set
through the model's full forward, the same scores under other thresholds, AUROCs of the raw outputs, and the
process's memory and CPU time.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def squeeze_map(tensor, like):  # noqa: ANN001, ANN202 (torch tensors)
    """Bring an anomaly map or mask to (B, H, W) at the size of ``like`` (``None``: keep its size)."""
    import torch.nn.functional as functional

    if tensor.dim() == 3:
        tensor = tensor[:, None]
    if like is not None and tensor.shape[-2:] != like.shape[-2:]:
        tensor = functional.interpolate(tensor.float(), size=like.shape[-2:], mode="nearest")
    return tensor[:, 0]


def evaluate(  # noqa: ANN001 (model, datamodule)
    model, datamodule, n_visuals: int, visual_dir: Path, rule_thresholds: dict[str, float] | None = None
) -> tuple[dict[str, Any], list]:
    """Accuracy on the test set through the model's full forward (pre-process, model, post-process).

    This is the same graph OpenVINO exports, so the numbers describe what would be deployed. Image F1 uses
    ``pred_label``, i.e. the PostProcessor's threshold that was computed on the validation set during fit. From the
    same predictions (the torch model's raw scores, caught by a forward hook) come two more image F1s:
    ``image_f1_f1_optimal`` with the plain F1-optimal validation threshold (anomalib's rule, which our
    ``RobustThresholdPostProcessor`` clamps into the normal scores' window; equal to ``image_f1`` for anomalib's
    models) and ``image_f1_test_optimal`` with the best threshold on the test set itself (anomalib's default
    ``same_as_test`` protocol: an upper bound, not an honest F1). ``rule_thresholds`` (raw-score thresholds by
    recalibration rule) add ``image_f1_by_rule``, from the same raw scores.
    """
    import torch
    from anomalib.metrics import AUPRO, AUROC, F1Score
    from anomalib.visualization import ImageVisualizer

    image_auroc = AUROC(fields=["pred_score", "gt_label"])
    image_f1 = F1Score(fields=["pred_label", "gt_label"])
    pixel_auroc = AUROC(fields=["anomaly_map", "gt_mask"])
    pixel_pro = AUPRO(fields=["anomaly_map", "gt_mask"])
    scores, labels, predicted, paths = [], [], [], []
    speed_images: list[torch.Tensor] = []
    has_masks = False
    visuals_wanted = {0: (n_visuals + 1) // 2, 1: n_visuals // 2}
    visualizer = model.visualizer if isinstance(model.visualizer, ImageVisualizer) else ImageVisualizer()
    visual_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    raw_scores: list[torch.Tensor] = []
    raw_maps: list[torch.Tensor] = []
    raw_masks: list[torch.Tensor] = []

    def keep_raw_outputs(_module, _inputs, output) -> None:  # noqa: ANN001
        raw_scores.append(raw_image_score(output))
        if getattr(output, "anomaly_map", None) is not None:
            raw_maps.append(squeeze_map(output.anomaly_map.detach().float().cpu(), None))

    hook = model.model.register_forward_hook(keep_raw_outputs)
    with torch.inference_mode():
        for batch in datamodule.test_dataloader():
            output = model(batch.image)
            gt_label = batch.gt_label.int()
            pred_label = getattr(output, "pred_label", None)
            scores.append(output.pred_score.flatten().float())
            labels.append(gt_label)
            paths.extend(str(p) for p in batch.image_path)
            image_auroc.update(SimpleNamespace(pred_score=output.pred_score.flatten(), gt_label=gt_label))
            if pred_label is not None:
                predicted.append(pred_label.flatten().int())
                image_f1.update(SimpleNamespace(pred_label=pred_label.flatten().int(), gt_label=gt_label))
            if batch.gt_mask is not None and output.anomaly_map is not None and batch.gt_mask.any():
                has_masks = True
            if batch.gt_mask is not None and output.anomaly_map is not None:
                anomaly_map = squeeze_map(output.anomaly_map, output.anomaly_map)
                gt_mask = squeeze_map(batch.gt_mask.int(), anomaly_map).bool()
                pixel_update = SimpleNamespace(anomaly_map=anomaly_map, gt_mask=gt_mask)
                raw_masks.append(gt_mask.cpu())
                pixel_auroc.update(pixel_update)
                pixel_pro.update(pixel_update)
            speed_images.extend(batch.image[: max(0, 64 - len(speed_images))])
            updated = batch.update(**output._asdict())
            for item in updated:
                label = int(item.gt_label)
                if visuals_wanted.get(label, 0) > 0:
                    visuals_wanted[label] -= 1
                    image = visualizer.visualize(item)
                    if image is not None:
                        source = Path(item.image_path)
                        kind = "anomalous" if label else "normal"
                        image.save(visual_dir / f"{kind}_{source.parent.name}_{source.stem}.png")
    hook.remove()
    all_scores, all_labels = torch.cat(scores), torch.cat(labels)
    metrics: dict[str, Any] = {
        "image_auroc": float(image_auroc.compute()),
        "image_f1": float(image_f1.compute()) if predicted else None,
        "pixel_auroc": float(pixel_auroc.compute()) if has_masks else None,
        "pixel_pro": float(pixel_pro.compute()) if has_masks else None,
        "n_test": len(all_labels),
        "n_test_anomalous": int(all_labels.sum()),
    }
    threshold = getattr(model.post_processor, "image_threshold", None)
    metrics["image_threshold"] = float(threshold) if threshold is not None else None
    all_raw_scores = torch.cat(raw_scores) if raw_scores else None
    if all_raw_scores is not None and len(all_raw_scores) == len(all_labels):
        metrics.update(threshold_comparison(model.post_processor, all_raw_scores, all_labels, rule_thresholds))
        metrics.update(raw_aurocs(all_raw_scores, all_labels, raw_maps, raw_masks if has_masks else []))
        pred_labels = torch.cat(predicted) if predicted else None
        metrics["per_defect"] = per_defect_metrics(
            paths, all_labels, all_raw_scores, pred_labels, raw_maps, raw_masks if has_masks else []
        )
    # PNG-only anomalies: a model must not win through JPEG artefacts (dice caveat); cheap from the scores.
    png = torch.tensor([Path(p).suffix.lower() == ".png" for p in paths])
    keep = png | (all_labels == 0)
    if bool((~png & (all_labels == 1)).any()) and bool((keep & (all_labels == 1)).any()):
        subset_auroc = AUROC(fields=["pred_score", "gt_label"])
        subset_auroc.update(SimpleNamespace(pred_score=all_scores[keep], gt_label=all_labels[keep]))
        metrics["image_auroc_png"] = float(subset_auroc.compute())
        if predicted:
            subset_f1 = F1Score(fields=["pred_label", "gt_label"])
            subset_f1.update(SimpleNamespace(pred_label=torch.cat(predicted)[keep], gt_label=all_labels[keep]))
            metrics["image_f1_png"] = float(subset_f1.compute())
        metrics["n_test_anomalous_png"] = int((keep & (all_labels == 1)).sum())
    return metrics, speed_images


def raw_image_score(output):  # noqa: ANN001, ANN201 (torch model output -> 1-D tensor)
    """The torch model's image scores before post-processing (the map's maximum when it gives no score)."""
    import torch

    score = getattr(output, "pred_score", None)
    if score is None:
        score = torch.amax(output.anomaly_map, dim=(-2, -1))
    return score.detach().flatten().float().cpu()


def unit_interval(values):  # noqa: ANN001, ANN201 (torch tensor -> float64 tensor)
    """``values`` rescaled into [0, 1], order kept, in float64. torchmetrics reads scores outside [0, 1] as logits
    and squashes them with a sigmoid, which ties raw scores such as 1000 and 2000."""
    values = values.double()
    return (values - values.min()) / (values.max() - values.min()).clamp_min(1e-300)


def raw_aurocs(raw_scores, labels, raw_maps, masks) -> dict[str, Any]:  # noqa: ANN001
    """Image and pixel AUROC of the torch model's raw scores and maps (``image_auroc_raw``, ``pixel_auroc_raw``).

    ``image_auroc``/``pixel_auroc`` score the post-processed outputs, as anomalib's evaluator does; those are
    normalised around the validation threshold and clamped to [0, 1], so test scores beyond the validation range
    tie at 0 or 1 and the AUROC moves with the threshold. The raw ones depend on the model alone.
    """
    import torch
    from torchmetrics.functional.classification import binary_auroc

    def auroc(values: torch.Tensor, truth: torch.Tensor) -> float | None:
        if not (truth.any() and not truth.all()):
            return None
        return float(binary_auroc(unit_interval(values.flatten()), truth.flatten().long()))

    result: dict[str, Any] = {"image_auroc_raw": auroc(raw_scores, labels.bool()), "pixel_auroc_raw": None}
    if masks and len(raw_maps) == len(masks):
        maps = torch.cat([squeeze_map(m[:, None], mask) for m, mask in zip(raw_maps, masks, strict=True)])
        result["pixel_auroc_raw"] = auroc(maps, torch.cat(masks))
    return result


def per_defect_metrics(paths, labels, raw_scores, pred_labels, raw_maps, masks) -> dict[str, dict[str, Any]]:  # noqa: ANN001
    """Per defect type (the anomalous image's folder): image AUROC of that type against every normal image, pixel
    AUROC over that type's images and the normal ones (raw maps), and recall (share flagged by the validation
    threshold). Small defects (``broken_small``) drown in the overall figures, which large ones dominate."""
    import torch

    kinds = [Path(path).parent.name for path in paths]
    normal = labels == 0
    maps = None
    if masks and len(raw_maps) == len(masks):  # each batch's maps at its masks' size, as ``raw_aurocs`` does
        maps = torch.cat([squeeze_map(m[:, None], mask) for m, mask in zip(raw_maps, masks, strict=True)])
    truth = torch.cat(masks) if maps is not None else None
    result: dict[str, dict[str, Any]] = {}
    for kind in sorted({kind for kind, label in zip(kinds, labels.tolist(), strict=True) if label == 1}):
        chosen = torch.tensor([k == kind for k in kinds]) & (labels == 1)
        keep = chosen | normal
        entry: dict[str, Any] = {"n": int(chosen.sum())}
        entry.update(
            {
                "image_auroc": raw_aurocs(raw_scores[keep], labels[keep], [], [])["image_auroc_raw"],
                "recall": float(pred_labels[chosen].float().mean()) if pred_labels is not None else None,
                "pixel_auroc": None,
            }
        )
        if maps is not None and truth is not None and len(maps) == len(labels):
            entry["pixel_auroc"] = raw_aurocs(raw_scores[keep], labels[keep], [maps[keep]], [truth[keep]])[
                "pixel_auroc_raw"
            ]
        result[kind] = entry
    return result


def threshold_comparison(post_processor, raw_scores, labels, rule_thresholds=None) -> dict[str, Any]:  # noqa: ANN001
    """Image F1 of the same raw test scores under the plain F1-optimal validation threshold, the best threshold
    on test and each of ``rule_thresholds`` (see ``evaluate``)."""
    import torch
    from torchmetrics.functional.classification import binary_f1_score, binary_precision_recall_curve

    labels = labels.int()
    f1_optimal = getattr(post_processor, "f1_optimal_image_threshold", None)
    if f1_optimal is None or bool(torch.isnan(f1_optimal)):
        f1_optimal = getattr(post_processor, "image_threshold", None)  # anomalib's own: already F1-optimal
    result: dict[str, Any] = {}
    if f1_optimal is not None and not bool(torch.isnan(torch.as_tensor(f1_optimal))):
        f1_optimal = float(f1_optimal)
        result["image_threshold_f1_optimal"] = f1_optimal
        result["image_f1_f1_optimal"] = float(binary_f1_score((raw_scores > f1_optimal).int(), labels))
    if bool(labels.any()) and not bool(labels.all()):
        # rescaled into [0, 1]: monotone, so the same F1 per threshold
        precision, recall, _ = binary_precision_recall_curve(unit_interval(raw_scores), labels)
        result["image_f1_test_optimal"] = float((2 * precision * recall / (precision + recall + 1e-12)).max())
    if rule_thresholds:
        result["image_f1_by_rule"] = {
            rule: float(binary_f1_score((raw_scores > value).int(), labels)) for rule, value in rule_thresholds.items()
        }
    lower, upper = (getattr(post_processor, name, None) for name in ("normal_score_lower", "normal_score_upper"))
    if lower is not None and upper is not None:
        result["image_threshold_window"] = [float(lower), float(upper)]
    return result


def peak_rss_mb() -> float:
    """Max resident set size of this cell process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the DDP processes of a ``--devices N`` fit)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def first_test_images(datamodule, count: int) -> list:  # noqa: ANN001
    """The first ``count`` real test images (what ``--speed-only`` times without measuring accuracy)."""
    images: list = []
    for batch in datamodule.test_dataloader():
        images.extend(batch.image[: count - len(images)])
        if len(images) >= count:
            break
    return images


def raw_test_scores(model, datamodule):  # noqa: ANN001, ANN201 (-> two 1-D torch tensors)
    """The torch model's raw image scores on the test set (the full forward, as ``measures.evaluate``) and labels."""
    import torch

    caught: list[torch.Tensor] = []
    hook = model.model.register_forward_hook(lambda _module, _inputs, output: caught.append(raw_image_score(output)))
    labels = []
    model.eval()
    try:
        with torch.inference_mode():
            for batch in datamodule.test_dataloader():
                model(batch.image)
                labels.append(batch.gt_label.int().flatten())
    finally:
        hook.remove()
    return torch.cat(caught).float(), torch.cat(labels)


def scored(scores, labels, threshold: float) -> dict[str, Any]:  # noqa: ANN001
    """Image AUROC of the raw scores and F1 of ``scores > threshold`` (the post-processor's labelling)."""
    from torchmetrics.functional.classification import binary_auroc, binary_f1_score

    return {
        "image_auroc": float(binary_auroc(unit_interval(scores), labels.long())),
        "image_f1": float(binary_f1_score((scores > threshold).int(), labels)),
        "image_threshold": threshold,
    }
