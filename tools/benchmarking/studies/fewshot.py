"""``--study fewshot``: accuracy from few training normals (``--train-counts``), one cell per count and draw.

Each MVTec/folder dataset becomes one dataset per count, ``<label>@<count>``: its ``train/good`` normals are cut to
``count`` images drawn at random with the cell's seed (so ``--seeds 3`` gives three draws), and only then does
anomalib split off the validation normals (``val_split_ratio``, half of them turned into synthetic anomalies): a
plant that owns ``count`` good images holds out a fifth of them for the threshold, as every benchmark cell does.
The test set is the dataset's own, the same for every count. Count 0 is the full-data reference, ``<label>@all``.

The cut wraps ``_create_val_split`` on the one datamodule instance (anomalib's ``setup`` calls ``_setup``, then
``_create_test_split``, then ``_create_val_split``), so anomalib's own split code runs unchanged on fewer normals
and a test split that borrows training normals (a folder without test normals) is made from the full set first.

Report: per dataset, model and count, mean ± std over draws of image AUROC (raw scores), pixel AUROC and image F1
(the model's own validation threshold), the F1 of flagging every test image, and each figure's drop from the
full-data reference when the run has one.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

FULL_DATA = 0  # --train-counts 0: every training normal (the reference the drops are measured from)
KINDS = ("mvtec", "folder")  # layouts whose training split is a plain folder of normals


def count_label(count: int) -> str:
    return "all" if count == FULL_DATA else str(count)


def expand(
    datasets: list[dict[str, Any]], models: list[dict[str, Any]], settings: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    counts = settings.get("train_counts") or []
    if not counts or min(counts) < 0:
        msg = "--study fewshot needs --train-counts N [N ...] (training normals; 0 = all of them)"
        raise ValueError(msg)
    unsupported = [dataset["label"] for dataset in datasets if dataset["kind"] not in KINDS]
    if unsupported:
        msg = f"--study fewshot cuts train/good of MVTec or folder layouts only; not {unsupported}"
        raise ValueError(msg)
    cut = [
        {
            **dataset,
            "label": f"{dataset['label']}@{count_label(count)}",
            "fewshot_normals": count,
            "scaling_of": dataset["label"],  # the dataset a config family is picked for
        }
        for dataset in datasets
        for count in counts
    ]
    return cut, models


def cut_normals(datamodule, count: int, seed: int) -> None:  # noqa: ANN001 (anomalib datamodule)
    """Keep ``count`` of the training normals, drawn at random with ``seed`` (the order stays the file order)."""
    samples = datamodule.train_data.samples
    if count > len(samples):
        msg = f"--study fewshot: {count} training normals asked, the dataset has {len(samples)}"
        raise ValueError(msg)
    chosen = samples.sample(n=count, random_state=seed).sort_index()
    datamodule.train_data.samples = chosen.reset_index(drop=True)


def apply_before_setup(datamodule, dataset: dict[str, Any]) -> None:  # noqa: ANN001
    """Cut the normals to ``dataset['fewshot_normals']`` right before anomalib's validation split.

    Wraps ``_create_val_split`` on this instance only; the draw uses the datamodule's ``seed`` (the cell's seed),
    so every re-setup (a second validation draw of the same cell) keeps the same normals.
    """
    count = dataset.get("fewshot_normals")
    if not count:
        return
    create_val_split = datamodule._create_val_split  # noqa: SLF001 (anomalib's split step, see the module doc)

    def cut_then_split() -> None:
        cut_normals(datamodule, count, int(datamodule.seed))
        create_val_split()

    datamodule._create_val_split = cut_then_split  # noqa: SLF001


def flag_everything_f1(row: dict[str, Any]) -> float | None:
    """F1 of calling every test image anomalous: recall 1, precision the anomalous fraction."""
    total, anomalous = row.get("n_test"), row.get("n_test_anomalous")
    if not total or anomalous is None:
        return None
    precision = anomalous / total
    return 2 * precision / (1 + precision) if precision else 0.0


def _mean_std(values: list[float]) -> tuple[float, float] | None:
    values = [value for value in values if value is not None and not math.isnan(value)]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(stats: tuple[float, float] | None, reference: tuple[float, float] | None) -> str:
    if stats is None:
        return "–"
    text = f"{stats[0]:.3f} ± {stats[1]:.3f}"
    if reference is not None and stats is not reference:
        text += f" ({stats[0] - reference[0]:+.3f})"
    return text


METRICS = (("image_auroc_raw", "image AUROC"), ("pixel_auroc_raw", "pixel AUROC"), ("image_f1", "image F1"))


def report(rows: list[dict[str, Any]]) -> list[str]:
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    failed: dict[tuple[str, str, int], int] = {}
    for row in rows:
        base, _, count_text = str(row["dataset"]).rpartition("@")
        count = FULL_DATA if count_text == "all" else int(count_text)
        key = (base, row["model"], count)
        if row.get("status") == "ok":
            groups.setdefault(key, []).append(row)
        else:
            failed[key] = failed.get(key, 0) + 1
    lines = ["## Study: few training normals", ""]
    lines += [
        "Training normals cut to N images drawn at random with each seed (one draw per seed) before the validation "
        "split (a fifth held out for the threshold, half of it synthetic anomalies); same test set for every N. "
        "Mean ± std over draws; in brackets the change from the full-data figure (`all`) when the run has it. "
        "Image AUROC on the raw scores; F1 at the model's own validation threshold; *flag all* is the F1 of calling "
        "every test image anomalous.",
        "",
        "| dataset | model | N | draws | train / val images | image AUROC | pixel AUROC | image F1 | flag all F1 |",
        "|---|---|---:|---:|---|---|---|---|---:|",
    ]

    def order(key: tuple[str, str, int]) -> tuple[str, str, float]:
        return key[0], key[1], math.inf if key[2] == FULL_DATA else key[2]

    for key in sorted(set(groups) | set(failed), key=order):
        base, model, count = key
        cells = groups.get(key, [])
        reference_rows = groups.get((base, model, FULL_DATA), [])
        stats, references = [], []
        for metric, _ in METRICS:
            stats.append(_mean_std([row.get(metric) for row in cells]))
            references.append(_mean_std([row.get(metric) for row in reference_rows]))
        if count == FULL_DATA:
            references = [None] * len(METRICS)
        figures = " | ".join(_cell(value, ref) for value, ref in zip(stats, references, strict=True))
        sizes = sorted({f"{row.get('n_train')} / {row.get('n_val')}" for row in cells}) or ["–"]
        flag_all = _mean_std([flag_everything_f1(row) for row in cells])
        draws = f"{len(cells)}" + (f" (+{failed[key]} failed)" if key in failed else "")
        lines.append(
            f"| {base} | {model} | {count_label(count)} | {draws} | {', '.join(sizes)} | {figures} | "
            f"{'–' if flag_all is None else f'{flag_all[0]:.3f}'} |"
        )
    return [*lines, ""]
