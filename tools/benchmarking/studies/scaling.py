"""``--study scaling``: fit cost as the training set grows (``--train-counts``), one cell per size.

Each dataset becomes one dataset per count, ``<label>@<count>``: its training split cut to the first ``count``
images (repeated when there are fewer), everything else unchanged. Report: fit CPU seconds (load-independent),
CPU ms per training image and peak RSS during fit, per model and count.
"""

from __future__ import annotations

from typing import Any


def expand(
    datasets: list[dict[str, Any]], models: list[dict[str, Any]], settings: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    counts = settings.get("train_counts") or []
    if not counts:
        msg = "--study scaling needs --train-counts N [N ...]"
        raise ValueError(msg)
    scaled = [
        {**dataset, "label": f"{dataset['label']}@{count}", "train_images": count, "scaling_of": dataset["label"]}
        for dataset in datasets
        for count in counts
    ]
    return scaled, models


def apply_after_setup(datamodule, dataset: dict[str, Any]) -> None:  # noqa: ANN001
    """Cut (or repeat) the training split to ``dataset['train_images']`` images."""
    import pandas as pd

    count = dataset.get("train_images")
    if not count:
        return
    samples = datamodule.train_data.samples
    repeats = -(-count // len(samples))
    datamodule.train_data.samples = pd.concat([samples] * repeats, ignore_index=True).iloc[:count]


def report(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["## Study: fit cost as the training set grows", ""]
    lines += [
        "| dataset | model | seed | train images | fit CPU s | CPU ms per image | fit s (wall) | fit peak RSS MB |"
    ]
    lines += ["|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: (r["model"], str(r["dataset"]).rsplit("@", 1)[0], r.get("n_train") or 0)):
        if row.get("status") != "ok":
            continue
        per_image = 1000 * row["fit_cpu_seconds"] / max(1, row["n_train"])
        lines.append(
            f"| {str(row['dataset']).rsplit('@', 1)[0]} | {row['model']} | {row.get('seed', '')} | {row['n_train']} | "
            f"{row['fit_cpu_seconds']:.1f} | {per_image:.1f} | {row['fit_seconds']:.1f} | "
            f"{row['fit_peak_rss_mb']:.0f} |"
        )
    return [*lines, ""]
