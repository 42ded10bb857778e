"""``--study sessions``: validation normals' scores per acquisition session (dice file names carry the date).

The PostProcessor normalises scores so that the validation threshold sits at 0.5; a lighting session whose
normals score higher than the others is where false alarms will come from. Reads validation images only.
"""

from __future__ import annotations

from typing import Any


def expand(
    datasets: list[dict[str, Any]], models: list[dict[str, Any]], _settings: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Same cells as the benchmark; each cell adds the per-session validation scores."""
    return datasets, models


def validation_scores_by_session(model, datamodule) -> dict[str, Any]:  # noqa: ANN001
    """Per session: validation normals' count, median and 99th percentile score and the share above threshold."""
    import torch

    from anomalib_ext.data.dice import session_from_path

    scores, labels, paths = [], [], []
    model.eval()
    with torch.inference_mode():
        for batch in datamodule.val_dataloader():
            scores.append(model(batch.image).pred_score.flatten().float())
            labels.append(batch.gt_label.flatten().int())
            paths.extend(str(path) for path in batch.image_path)
    all_scores, all_labels = torch.cat(scores), torch.cat(labels)
    sessions = [session_from_path(path) or "(none)" for path in paths]
    by_session: dict[str, Any] = {}
    for session in sorted(set(sessions)):
        chosen = torch.tensor([s == session for s in sessions]) & (all_labels == 0)
        if not bool(chosen.any()):
            continue
        values = all_scores[chosen]
        by_session[session] = {
            "images": int(chosen.sum()),
            "median": float(values.median()),
            "q99": float(torch.quantile(values, 0.99)),
            "flagged": float((values >= 0.5).float().mean()),
        }
    anomalies = torch.sort(all_scores[all_labels == 1]).values
    return {"validation_normals": by_session, "lowest_validation_anomalies": anomalies[:3].tolist()}


def report(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["## Study: validation normals per acquisition session", ""]
    lines += ["Scores are post-processed (threshold = 0.5); 'flagged' = share of normals at or above it.", ""]
    lines += [
        "| dataset | model | seed | session | normals | median | 99th pct. | flagged |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        for session, entry in (row.get("sessions") or {}).get("validation_normals", {}).items():
            lines.append(
                f"| {row['dataset']} | {row['model']} | {row.get('seed', '')} | {session} | {entry['images']} | "
                f"{entry['median']:.3f} | {entry['q99']:.3f} | {entry['flagged']:.1%} |"
            )
    return [*lines, ""]
