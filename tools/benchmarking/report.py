"""Collect the cells' ``result.json`` files into ``results.csv``, ``results.md`` and plots.

Rebuilt from disk after every cell, so a run stopped at any moment still has a complete report of what was
measured so far.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

COLUMNS = (
    "dataset",
    "model",
    "seed",
    "status",
    "image_auroc",
    "image_auroc_raw",
    "image_f1",
    "image_f1_f1_optimal",
    "image_f1_test_optimal",
    "pixel_auroc",
    "pixel_auroc_raw",
    "pixel_pro",
    "image_auroc_png",
    "image_f1_png",
    "image_f1_draws",
    "image_threshold_draws",
    "fit_seconds",
    "fit_cpu_seconds",
    "fit_peak_rss_mb",
    "devices",
    "fit_peak_rss_mb_per_process",
    "torch_images_per_s",
    "openvino_precision",
    "openvino_images_per_s",
    "backbone_img_per_s",
    "openvino_fraction_of_backbone",
    "openvino_speedup_vs_fp32",
    "backbone_int8_img_per_s",
    "backbone_int8_speedup",
    "openvino_image_auroc",
    "openvino_image_f1",
    "openvino_pixel_auroc",
    "backbone_layer",
    "peak_rss_mb",
    "baseline_rss_mb",
    "openvino_model_mb",
    "openvino_batch",
    "openvino_max_score_diff",
    "image_threshold",
    "image_threshold_f1_optimal",
    "image_threshold_window",
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
    "torch_load_average_1min",
    "openvino_threads",
    "openvino_load_average_1min",
    "openvino_timed_passes",
    "backbone_load_average_1min",
    "openvino_inference_precision",
    "load_average_1min",
    "val_split",
    "error",
)
MARKDOWN_COLUMNS = (
    ("model", "model", None),
    ("image_auroc", "image AUROC", 3),
    ("image_f1", "image F1 (val thr.)", 3),
    ("image_f1_f1_optimal", "image F1 (plain F1-optimal val thr.)", 3),
    ("image_f1_test_optimal", "image F1 (thr. on test)", 3),
    ("pixel_auroc", "pixel AUROC", 3),
    ("pixel_pro", "PRO (AUPRO@0.3)", 3),
    ("image_auroc_raw", "image AUROC, raw scores", 3),
    ("pixel_auroc_raw", "pixel AUROC, raw maps", 3),
    ("image_auroc_png", "image AUROC, PNG anomalies", 3),
    ("fit_seconds", "fit s", 1),
    ("torch_images_per_s", "torch img/s", 1),
    ("openvino_images_per_s", "OpenVINO img/s", 1),
    ("peak_rss_mb", "peak RSS MB", 0),
    ("openvino_model_mb", "OpenVINO MB", 1),
)
# summarised across seeds (mean, std, min, max) in results.md and results_summary.csv
SUMMARY_METRICS = (
    ("image_auroc", "image AUROC", 3),
    ("image_f1", "image F1", 3),
    ("image_f1_f1_optimal", "image F1, plain F1-optimal val thr.", 3),
    ("image_f1_test_optimal", "image F1, thr. on test", 3),
    ("pixel_auroc", "pixel AUROC", 3),
    ("pixel_pro", "PRO", 3),
    ("fit_seconds", "fit s", 1),
    ("torch_images_per_s", "torch img/s", 1),
    ("openvino_images_per_s", "OpenVINO img/s", 1),
)
ACCURACY_METRICS = (("image_auroc", "image AUROC"), ("image_f1", "image F1"), ("pixel_auroc", "pixel AUROC"))
# the per-precision OpenVINO table (``--export-precision``): one row per cell and export
EXPORT_COLUMNS = (
    ("openvino_precision", "export", None),
    ("openvino_images_per_s", "OpenVINO img/s", 1),
    ("openvino_speedup_vs_fp32", "x fp32", 2),
    ("backbone_img_per_s", "backbone trunk img/s", 1),
    ("openvino_fraction_of_backbone", "fraction of trunk", 2),
    ("backbone_int8_speedup", "trunk INT8 x fp32", 2),
    ("openvino_image_auroc", "OpenVINO image AUROC", 3),
    ("openvino_image_f1", "OpenVINO image F1 (its threshold)", 3),
    ("openvino_pixel_auroc", "OpenVINO pixel AUROC", 3),
    ("image_auroc", "torch image AUROC", 3),
    ("image_f1", "torch image F1", 3),
    ("openvino_load_average_1min", "load (1 min)", 1),
)


def load_results(cells_dir: Path, order: list[str] | None = None) -> list[dict[str, Any]]:
    """Every finished or failed run (``cells/<cell>/seed<k>/result.json``): those named in ``order``
    (``<cell>/seed<k>``) first, in that order, then any others.
    """
    paths = sorted(cells_dir.glob("*/seed*/result.json"))
    rank = {name: index for index, name in enumerate(order or [])}

    def run_name(path: Path) -> str:
        return f"{path.parent.parent.name}/{path.parent.name}"

    paths.sort(key=lambda path: (rank.get(run_name(path), len(rank)), run_name(path)))
    rows = []
    for path in paths:
        try:
            rows.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as error:
            rows.append({"dataset": "?", "model": run_name(path), "status": "error", "error": str(error)})
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (dataset, model): runs, ok runs, and mean / std / min / max of every ``SUMMARY_METRICS`` over seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["model"]), []).append(row)
    summary = []
    for (dataset, model), members in groups.items():
        ok = [row for row in members if row.get("status") == "ok"]
        entry: dict[str, Any] = {"dataset": dataset, "model": model, "runs": len(members), "ok_runs": len(ok)}
        entry["seeds"] = " ".join(str(row.get("seed", "")) for row in members)
        for key, _, _ in SUMMARY_METRICS:
            values = [number for row in ok if (number := _number(row.get(key))) is not None]
            if values:
                entry[f"{key}_mean"] = statistics.fmean(values)
                entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
                entry[f"{key}_min"], entry[f"{key}_max"] = min(values), max(values)
        summary.append(entry)
    return summary


def write_summary_csv(summary: list[dict[str, Any]], path: Path) -> None:
    stats = [f"{key}_{stat}" for key, _, _ in SUMMARY_METRICS for stat in ("mean", "std", "min", "max")]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["dataset", "model", "runs", "ok_runs", "seeds", *stats])
        writer.writeheader()
        writer.writerows({key: entry.get(key, "") for key in writer.fieldnames} for entry in summary)


def summary_table(summary: list[dict[str, Any]]) -> list[str]:
    """Markdown: mean ± std (min–max) over seeds, per (dataset, model)."""
    lines = ["## Across seeds: mean ± std (min–max)", ""]
    lines.append("| dataset | model | runs ok | " + " | ".join(title for _, title, _ in SUMMARY_METRICS) + " |")
    lines.append("|---|---|---:|" + "---:|" * len(SUMMARY_METRICS))
    for entry in summary:
        cells = []
        for key, _, digits in SUMMARY_METRICS:
            if f"{key}_mean" not in entry:
                cells.append("–")
                continue
            mean, std = entry[f"{key}_mean"], entry[f"{key}_std"]
            low, high = entry[f"{key}_min"], entry[f"{key}_max"]
            cells.append(f"{mean:.{digits}f} ± {std:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})")
        lines.append(
            f"| {entry['dataset']} | {entry['model']} | {entry['ok_runs']}/{entry['runs']} | "
            + " | ".join(cells)
            + " |"
        )
    return [*lines, ""]


def _draws(row: dict[str, Any]) -> str:
    draws = [value for value in row.get("image_f1_draws") or [] if value is not None]
    if not draws:
        return "–"
    return f"{statistics.fmean(draws):.3f} [{min(draws):.3f}, {max(draws):.3f}] ({len(draws)})"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not math.isnan(float(value)) else None


def _format(value: Any, digits: int | None) -> str:
    number = _number(value)
    if digits is None or number is None:
        return "–" if value in (None, "") else str(value)
    return f"{number:.{digits}f}"


def export_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run and OpenVINO export precision (``openvino_exports``); runs without exports stay one row.

    Results from before ``--export-precision`` kept the inference precision hint (``f32``) in
    ``openvino_precision``: they are fp32 exports.
    """
    expanded = []
    for row in rows:
        exports = row.get("openvino_exports") or []
        if not exports:
            if row.get("openvino_precision") in ("f32", "bf16", "f16"):
                row = {**row, "openvino_inference_precision": row["openvino_precision"], "openvino_precision": "fp32"}
            expanded.append(row)
            continue
        expanded.extend({**row, **entry} for entry in exports)
    return expanded


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in export_rows(rows):
            writer.writerow({key: _csv_value(row.get(key)) for key in COLUMNS})


def export_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: per dataset, model and export precision, OpenVINO speed beside the backbone trunk and the
    exported model's own AUROC (only when some run has ``openvino_exports``)."""
    exported = [row for row in export_rows(rows) if row.get("openvino_exports")]
    if not exported:
        return []
    lines = [
        "## OpenVINO exports: speed beside the backbone trunk, accuracy of the exported model",
        "",
        "Batch 1, f32 inference precision, the run's threads; the trunk (the model's timm backbone, features only, "
        "up to its deepest layer; with INT8 also the trunk quantised whole) and the exports are timed interleaved, one "
        "call of each per image, so their ratios are measured under one load. "
        "'trunk INT8 x fp32' is the network alone's INT8 speed-up: the ceiling of a model's. "
        "AUROCs are computed from the exported model's own outputs on every test image.",
        "",
        "| dataset | model | " + " | ".join(title for _, title, _ in EXPORT_COLUMNS) + " |",
        "|---|---|" + "---:|" * len(EXPORT_COLUMNS),
    ]
    for row in exported:
        cells = [_format(row.get(key), digits) for key, _, digits in EXPORT_COLUMNS]
        lines.append(f"| {row['dataset']} | {row['model']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list):
        return json.dumps(value)
    return value


def markdown_tables(rows: list[dict[str, Any]], header_lines: list[str], extra: list[str] | None = None) -> str:
    """One table per dataset (one row per run; ``(seed k)`` when a model ran with several seeds), then the
    across-seed summary when there is one, then ``extra`` (a study's section). Failed runs show their status
    and error instead of numbers.
    """
    lines = [*header_lines, ""]
    with_draws = any(row.get("image_f1_draws") for row in rows)
    columns = [*MARKDOWN_COLUMNS]
    if with_draws:
        columns.insert(3, ("image_f1_draws", "F1 mean [min, max] over val draws", None))
    seeds_per_model: dict[tuple[str, str], int] = {}
    for row in rows:
        seeds_per_model[(row["dataset"], row["model"])] = seeds_per_model.get((row["dataset"], row["model"]), 0) + 1
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
        lines.append("| " + " | ".join(title for _, title, _ in columns) + " |")
        lines.append("|" + "|".join("---" if key == "model" else "---:" for key, _, _ in columns) + "|")
        for row in dataset_rows:
            cells = [
                _draws(row) if key == "image_f1_draws" else _format(row.get(key), digits) for key, _, digits in columns
            ]
            if seeds_per_model[(row["dataset"], row["model"])] > 1:
                cells[0] = f"{row['model']} (seed {row.get('seed')})"
            if row.get("status") != "ok":
                error = str(row.get("error", "")).splitlines()[0][:160].replace("|", "/")
                cells[0] = f"{cells[0]} (**{row.get('status')}**: {error})"
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if any(count > 1 for count in seeds_per_model.values()):
        lines += summary_table(summarise(rows))
    lines += export_table(rows)
    lines += per_defect_table(rows)
    lines += extra or []
    return "\n".join(lines)


def per_defect_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: per defect type, mean over seeds of image AUROC, pixel AUROC (raw) and recall, per (dataset,
    model). Small defects (bottle's ``broken_small``) are a few percent of the test pixels: the overall pixel AUROC
    hardly moves when a model misses them, this table does."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        for kind, entry in (row.get("per_defect") or {}).items() if row.get("status") == "ok" else ():
            groups.setdefault((row["dataset"], row["model"], kind), []).append(entry)
    if not groups:
        return []
    lines = ["## Per defect type: mean over seeds (raw scores and maps; recall at the validation threshold)", ""]
    lines += [
        "| dataset | model | defect | images | seeds | image AUROC | pixel AUROC | recall |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for (dataset, model, kind), entries in groups.items():
        cells = []
        for key in ("image_auroc", "pixel_auroc", "recall"):
            values = [number for entry in entries if (number := _number(entry.get(key))) is not None]
            cells.append(f"{statistics.fmean(values):.3f}" if values else "–")
        lines.append(
            f"| {dataset} | {model} | {kind} | {entries[0].get('n')} | {len(entries)} | " + " | ".join(cells) + " |"
        )
    return [*lines, ""]


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


def write_reports(
    out_dir: Path, header_lines: list[str], order: list[str] | None = None, extra: Any = None
) -> list[dict[str, Any]]:
    """Rewrite ``results.csv`` (one row per run), ``results_summary.csv`` (per dataset and model, over seeds),
    ``results.md`` and ``plots/`` from every run's ``result.json``; ``extra(rows)`` adds Markdown lines.
    """
    rows = load_results(out_dir / "cells", order)
    write_csv(rows, out_dir / "results.csv")
    write_summary_csv(summarise(rows), out_dir / "results_summary.csv")
    (out_dir / "results.md").write_text(markdown_tables(rows, header_lines, extra(rows) if extra else None))
    if rows:
        write_plots(rows, out_dir / "plots")
    return rows
