"""Collect the cells' ``result.json`` files into ``results.csv``, ``results.md`` and plots.

Rebuilt from disk after every cell, so a run stopped at any moment still has a complete report of what was
measured so far.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

COLUMNS = (
    "dataset",
    "model",
    "status",
    "image_auroc",
    "image_f1",
    "pixel_auroc",
    "pixel_pro",
    "image_auroc_png",
    "image_f1_png",
    "fit_seconds",
    "fit_cpu_seconds",
    "fit_peak_rss_mb",
    "torch_images_per_s",
    "openvino_images_per_s",
    "peak_rss_mb",
    "baseline_rss_mb",
    "openvino_model_mb",
    "openvino_batch",
    "openvino_max_score_diff",
    "image_threshold",
    "n_train",
    "n_val",
    "n_test",
    "n_test_anomalous",
    "n_test_anomalous_png",
    "setup_seconds",
    "test_seconds",
    "export_and_openvino_seconds",
    "cell_seconds",
    "torch_threads",
    "load_average_1min",
    "error",
)
MARKDOWN_COLUMNS = (
    ("model", "model", None),
    ("image_auroc", "image AUROC", 3),
    ("image_f1", "image F1 (val thr.)", 3),
    ("pixel_auroc", "pixel AUROC", 3),
    ("pixel_pro", "PRO (AUPRO@0.3)", 3),
    ("image_auroc_png", "image AUROC, PNG anomalies", 3),
    ("fit_seconds", "fit s", 1),
    ("torch_images_per_s", "torch img/s", 1),
    ("openvino_images_per_s", "OpenVINO img/s", 1),
    ("peak_rss_mb", "peak RSS MB", 0),
    ("openvino_model_mb", "OpenVINO MB", 1),
)
ACCURACY_METRICS = (("image_auroc", "image AUROC"), ("image_f1", "image F1"), ("pixel_auroc", "pixel AUROC"))


def load_results(cells_dir: Path, order: list[str] | None = None) -> list[dict[str, Any]]:
    """Every finished or failed cell: those named in ``order`` first, in that order, then any others."""
    paths = sorted(cells_dir.glob("*/result.json"))
    rank = {name: index for index, name in enumerate(order or [])}
    paths.sort(key=lambda path: (rank.get(path.parent.name, len(rank)), path.parent.name))
    rows = []
    for path in paths:
        try:
            rows.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as error:
            rows.append({"dataset": "?", "model": path.parent.name, "status": "error", "error": str(error)})
    return rows


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not math.isnan(float(value)) else None


def _format(value: Any, digits: int | None) -> str:
    number = _number(value)
    if digits is None or number is None:
        return "–" if value in (None, "") else str(value)
    return f"{number:.{digits}f}"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key, "") if row.get(key) is not None else "" for key in COLUMNS})


def markdown_tables(rows: list[dict[str, Any]], header_lines: list[str]) -> str:
    """One table per dataset; failed cells show their status and error instead of numbers."""
    lines = [*header_lines, ""]
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        dataset_rows = [row for row in rows if row["dataset"] == dataset]
        first = next((row for row in dataset_rows if row.get("n_test")), {})
        counts = ""
        if first:
            counts = (
                f" (train {first.get('n_train')}, validation {first.get('n_val')}, "
                f"test {first.get('n_test')} of which {first.get('n_test_anomalous')} anomalous)"
            )
        lines += [f"### {dataset}{counts}", ""]
        lines.append("| " + " | ".join(title for _, title, _ in MARKDOWN_COLUMNS) + " |")
        lines.append("|" + "|".join("---" if key == "model" else "---:" for key, _, _ in MARKDOWN_COLUMNS) + "|")
        for row in dataset_rows:
            cells = [_format(row.get(key), digits) for key, _, digits in MARKDOWN_COLUMNS]
            if row.get("status") != "ok":
                error = str(row.get("error", "")).splitlines()[0][:160].replace("|", "/")
                cells[0] = f"{row['model']} (**{row.get('status')}**: {error})"
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _plot_name(dataset: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in dataset)


def write_plots(rows: list[dict[str, Any]], plots_dir: Path) -> list[Path]:
    """Per dataset: image AUROC vs OpenVINO throughput, and per-model bars of accuracy, fit time and speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        measured = [row for row in rows if row["dataset"] == dataset and _number(row.get("image_auroc")) is not None]
        if not measured:
            continue
        figure, axis = plt.subplots(figsize=(6, 4.5))
        for row in measured:
            speed = _number(row.get("openvino_images_per_s"))
            hollow = speed is None
            speed = speed if speed is not None else _number(row.get("torch_images_per_s"))
            if speed is None:
                continue
            axis.scatter(speed, row["image_auroc"], s=60, facecolors="none" if hollow else None, edgecolors="C0")
            axis.annotate(row["model"], (speed, row["image_auroc"]), textcoords="offset points", xytext=(5, 4))
        axis.set_xscale("log")
        axis.set_xlabel("OpenVINO images/s, batch 1, CPU (log; hollow = torch, no export)")
        axis.set_ylabel("image AUROC (test)")
        axis.set_title(f"{dataset}: accuracy vs throughput")
        axis.grid(True, alpha=0.3)
        figure.tight_layout()
        path = plots_dir / f"accuracy_vs_openvino_{_plot_name(dataset)}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)

        names = [row["model"] for row in measured]
        positions = range(len(names))
        figure, axes = plt.subplots(1, 3, figsize=(14, 4.2))
        width = 0.8 / len(ACCURACY_METRICS)
        for index, (key, title) in enumerate(ACCURACY_METRICS):
            values = [_number(row.get(key)) or 0.0 for row in measured]
            axes[0].bar([p + index * width for p in positions], values, width, label=title)
        axes[0].set_ylim(0, 1.05)
        axes[0].set_title("accuracy on test (F1 at validation threshold)")
        axes[0].legend(fontsize=8, loc="lower right")
        axes[1].bar(list(positions), [_number(row.get("fit_seconds")) or 0.0 for row in measured], color="C3")
        axes[1].set_title("fit seconds (incl. validation)")
        for index, (key, title) in enumerate((("torch_images_per_s", "torch"), ("openvino_images_per_s", "OpenVINO"))):
            values = [_number(row.get(key)) or 0.0 for row in measured]
            axes[2].bar([p + index * 0.4 for p in positions], values, 0.4, label=title)
        axes[2].set_title("images/s, batch 1, CPU")
        axes[2].legend(fontsize=8)
        for axis in axes:
            axis.set_xticks([p + 0.25 for p in positions], names, rotation=30, ha="right", fontsize=8)
        figure.suptitle(f"{dataset} (speeds measured on a shared, loaded machine)")
        figure.tight_layout()
        path = plots_dir / f"bars_{_plot_name(dataset)}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def write_reports(out_dir: Path, header_lines: list[str], order: list[str] | None = None) -> list[dict[str, Any]]:
    """Rewrite ``results.csv``, ``results.md`` and ``plots/`` from every cell's ``result.json``."""
    rows = load_results(out_dir / "cells", order)
    write_csv(rows, out_dir / "results.csv")
    (out_dir / "results.md").write_text(markdown_tables(rows, header_lines))
    if rows:
        write_plots(rows, out_dir / "plots")
    return rows
