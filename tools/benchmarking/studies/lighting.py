"""``--study lighting``: does HistAuGAN make a model hold on acquisition sessions with other lighting?

The dice sessions differ in lighting: ``16_09_21`` and ``17_11_21`` are about 10 grey levels darker than
``25_10_21`` and ``26_01_22``. Every ``--model`` becomes four arms, all tested on the **dark sessions only** (the
held-out normals of ``Dice``'s protocol and every dark-session anomaly) and validated on bright normals:

- ``@all``: trained on every session: the reference, the shift was seen in training;
- ``@bright``: trained on the bright sessions only, no photometric augmentation;
- ``@bright+jitter``: bright only, plus colour/brightness jitter, the cheap alternative every user tries first;
- ``@bright+histaugan``: bright only, plus HistAuGAN re-renderings into the style of every session;
- ``@bright+recalibration``: bright only, then recalibrated (``anomalib_ext.commands.recalibrate``: thresholds and
  normalisation from normal images, no gradient step) on ``RECALIBRATION_NORMALS`` dark-session normals of the
  training pool (those ``Dice``'s protocol keeps out of test, which the bright arms never train on), drawn with the
  cell's seed;
- ``@bright+recalibration+bank``: as ``@bright+recalibration``, and the same dark normals also join the model's
  memory bank (``anomalib-ext recalibrate --extend-bank``; models with a bank: TileOutlier, Fused). The cell's speed
  and OpenVINO stages then time the extended model: the edge cost of the larger bank;
- ``@bright+per_image``: bright only, the model's ``input_normalization: per_image`` (each image standardised by its
  own per-channel mean and std before the backbone; models with that option).

``--arms`` picks a subset (default: the first four, as before 0.6.0); HistAuGAN is trained only when
``bright+histaugan`` is among them.

HistAuGAN is trained once per run (``<out>/histaugan/generator.pt``, seeded, ``--histaugan-minutes`` of wall time)
with ``configs/histaugan/dice.yaml``'s settings, the four sessions as domains, on the normals of ``Dice``'s
training pool, never on a test image: it sees dark images, for their style, which the bright arms' models never
do. A plant has such images when a new camera or lamp arrives; the study asks whether their style alone, carried
onto the bright normals, is worth as much as training on them.

How an augmentation reaches a model: a model with its own (an ``augmentation`` argument with ``color_jitter`` and
``histaugan_checkpoint`` fields, TeacherStudent) gets them set (jitter 0 in ``@all``, ``@bright``,
``@bright+histaugan``); any other model (a fit-only one) gets its normal set extended: the training split
repeated ``VIEWS`` times, each view through the augmentation with probability 0.5, and the plain arms keep one
view. In both augmentation arms every model's **validation** images (normals and anomalies) go through the same
augmentation with probability 0.5 (since 0.10.0): the threshold is picked on images rendered as the light may
shift, as the augmentation promises the model will meet them.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from benchmarking.builders import import_class
from benchmarking.specs import CONFIG_ROOT
from benchmarking.studies.arms import chosen_arms

BRIGHT_SESSIONS = ("25_10_21", "26_01_22")
ARMS = (
    "all",
    "bright",
    "bright+jitter",
    "bright+histaugan",
    "bright+recalibration",
    "bright+per_image",
    "bright+recalibration+bank",
)
DEFAULT_ARMS = ARMS[:4]
RECALIBRATION_NORMALS = 10
VIEWS = 4  # training views of each normal in the fit-only arms with an augmentation
AUGMENT_P = 0.5  # share of those views (and of TeacherStudent's HistAuGAN samples) that are re-rendered
JITTER = 0.15  # brightness and contrast jitter: TeacherStudent's default ``augmentation.color_jitter``
HISTAUGAN_CONFIG = CONFIG_ROOT / "histaugan" / "dice.yaml"  # the shipped dice generator: sessions as domains
METRICS = ("image_auroc", "image_f1", "pixel_auroc")
MIN_GAP = 0.002  # an AUROC gap below this is no gap (the spread of repeated fits is larger)


def generator_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / "histaugan" / "generator.pt"


def expand(
    datasets: list[dict[str, Any]], models: list[dict[str, Any]], settings: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Four arms per model on the dice datasets; trains the run's HistAuGAN generator first (once)."""
    if not datasets or any(dataset["kind"] != "dice" for dataset in datasets):
        msg = "--study lighting needs dice-layout datasets (their file names carry the acquisition session)"
        raise ValueError(msg)
    chosen = chosen_arms(settings, ARMS, DEFAULT_ARMS, "lighting")
    generator = generator_path(settings["out_dir"])
    for dataset in datasets:
        if (Path(dataset["path"]) / "val").is_dir():  # validation normals from the bright sessions only
            dataset["options"] = {**dataset["options"], "val_sessions": list(BRIGHT_SESSIONS)}
        if "bright+histaugan" in chosen and not generator.is_file():
            train_generator(dataset, settings["seed"], generator, settings.get("histaugan_minutes") or 10.0)
    arms = []
    for model in models:
        for arm in (name for name in ARMS if name in chosen):
            options = {} if arm == "all" else {"train_sessions": list(BRIGHT_SESSIONS)}
            remedy = arm.partition("+")[2] or None
            augmentation = remedy if remedy in ("jitter", "histaugan") else None
            arms.append(
                {
                    **model,
                    "label": f"{model['label']}@{arm}",
                    "dataset_options": options,
                    "lighting_augmentation": augmentation,
                    "lighting_validation_augmentation": augmentation,
                    "histaugan_checkpoint": str(generator) if augmentation == "histaugan" else None,
                    "lighting_recalibration": remedy in ("recalibration", "recalibration+bank"),
                    "lighting_extend_bank": remedy == "recalibration+bank",
                    "lighting_per_image": remedy == "per_image",
                }
            )
    return datasets, arms


def train_generator(dataset: dict[str, Any], seed: int, path: Path, minutes: float) -> None:
    """HistAuGAN with one domain per session, on the normals the dataset's test split never holds."""
    import yaml
    from anomalib.data.utils import LabelName
    from lightning.pytorch import Trainer, seed_everything

    from anomalib_ext.augment.histaugan import HistAuGAN, HistAuGANDataModule
    from anomalib_ext.data import Dice

    # the whole training pool (no per-class cap: it is there to bound the anomaly models' fit time)
    uncapped = {"max_train_per_class", "train_sessions"}
    options = {
        key: value
        for key, value in dataset["options"].items()
        if key in inspect.signature(Dice).parameters and key not in uncapped
    }
    tables = Dice(root=dataset["path"], seed=seed, **options).split_samples()
    normals = [
        path
        for table in (tables["train"], tables["val"])
        for path in table[table.label_index == LabelName.NORMAL].image_path
    ]
    pool = path.parent / "pool"  # links, so the generator's datamodule reads exactly these files
    pool.mkdir(parents=True, exist_ok=True)
    for source in normals:
        link = pool / Path(source).name
        if not link.exists():
            link.symlink_to(Path(source).resolve())
    print(f"lighting study: training HistAuGAN on {len(normals)} normals, {minutes:g} min", flush=True)  # noqa: T201
    # the shipped dice config's generator and data settings; this run's images, seed, budget and export path
    config = yaml.safe_load(HISTAUGAN_CONFIG.read_text())
    data_options = {key: value for key, value in config["data"].items() if key != "root"}
    model_options = {key: value for key, value in config["model"].items() if key != "export_path"}
    seed_everything(seed, workers=True, verbose=False)
    data = HistAuGANDataModule(root=pool, seed=seed, **data_options)
    gan = HistAuGAN(num_domains=data.num_domains, image_size=data.image_size, export_path=str(path), **model_options)
    Trainer(
        accelerator="auto",
        devices=1,
        max_epochs=1000,
        max_time={"seconds": minutes * 60},
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=path.parent,
    ).fit(gan, datamodule=data)
    write_figure(path, pool, path.parent / "restyled_dice.png", seed)


def write_figure(generator: Path, images: Path, out: Path, seed: int) -> None:
    """Bright normals re-rendered into every session's style (``histaugan.figure``'s grid)."""
    import cv2
    import numpy as np

    from anomalib_ext.augment.histaugan import HistAuGANAugment
    from anomalib_ext.augment.histaugan.figure import make_figure, read_image

    bright = sorted(
        path for path in images.iterdir() if any(f"_{session}_" in path.name for session in BRIGHT_SESSIONS)
    )
    picks = np.random.default_rng(seed).permutation(len(bright))[:4]
    augment = HistAuGANAugment(generator, p=1.0)
    grid = make_figure(augment, [read_image(bright[index]) for index in picks], augment.num_domains, 96, seed)
    cv2.imwrite(str(out), grid, [cv2.IMWRITE_PNG_COMPRESSION, 9])


def model_for_cell(model_spec: dict[str, Any]) -> dict[str, Any]:
    """The arm's augmentation as the model's own options when it has them (TeacherStudent), else as views."""
    if "lighting_augmentation" not in model_spec:
        return model_spec
    augmentation = model_spec["lighting_augmentation"]
    model_class = import_class(model_spec["class_path"])
    parameters = inspect.signature(model_class.__init__).parameters
    spec = {**model_spec, "init_args": dict(model_spec.get("init_args") or {})}
    if model_spec.get("lighting_extend_bank") and not callable(getattr(model_class, "extend_bank", None)):
        msg = f"{model_spec['class_path']} has no memory bank: no bright+recalibration+bank arm for it"
        raise ValueError(msg)
    if model_spec.get("lighting_per_image"):
        if "input_normalization" not in parameters:
            msg = f"{model_spec['class_path']} has no input_normalization option: no bright+per_image arm for it"
            raise ValueError(msg)
        spec["init_args"]["input_normalization"] = "per_image"
    if "augmentation" in parameters:  # TeacherStudent's ``Augmentation`` (a mapping of its fields here)
        spec["init_args"]["augmentation"] = {
            **(spec["init_args"].get("augmentation") or {}),
            "color_jitter": JITTER if augmentation == "jitter" else 0.0,
            "histaugan_checkpoint": spec["histaugan_checkpoint"],
            "histaugan_p": AUGMENT_P,
        }
        spec["lighting_augmentation"] = None  # the model varies its normals itself
    elif augmentation:
        spec["train_views"] = VIEWS
    return spec


def augmentation_transform(augmentation: str, histaugan_checkpoint: str | None):  # noqa: ANN201 (a v2 transform)
    """The arm's photometric augmentation, applied to a share ``AUGMENT_P`` of the images."""
    from torchvision.transforms import v2

    if augmentation == "jitter":
        transform = v2.ColorJitter(brightness=JITTER, contrast=JITTER)
    else:
        from anomalib_ext.augment.histaugan import HistAuGANAugment

        transform = HistAuGANAugment(histaugan_checkpoint, p=1.0)
    return v2.RandomApply([transform], p=AUGMENT_P)


def apply_before_setup(datamodule, model_spec: dict[str, Any]) -> None:  # noqa: ANN001
    """Augmentation arms: the fit-only models' training views go through the augmentation, and every model's
    validation images do too (its threshold is picked on normals and anomalies rendered as the light may shift)."""
    training, validation = model_spec.get("lighting_augmentation"), model_spec.get("lighting_validation_augmentation")
    if not (training or validation):
        return
    if training and validation and training != validation:
        msg = f"lighting: an arm has one augmentation, got {training!r} for training and {validation!r} for validation"
        raise ValueError(msg)
    # one transform for both (the arm's one augmentation): a HistAuGAN generator is loaded once
    transform = augmentation_transform(validation or training, model_spec.get("histaugan_checkpoint"))
    if training:
        datamodule.train_augmentations = transform
    if validation:
        datamodule.val_augmentations = transform


def apply_after_setup(datamodule, model_spec: dict[str, Any]) -> None:  # noqa: ANN001
    """Test on the dark sessions only: their held-out normals and every dark-session anomaly (those ``Dice``
    put in validation move to test, so validation keeps bright normals and anomalies of no dark session)."""
    if "lighting_augmentation" not in model_spec:
        return
    import pandas as pd
    from anomalib.data.utils import LabelName

    from anomalib_ext.data.dice import HOLDOUT_SESSIONS

    test, val = datamodule.test_data.samples, datamodule.val_data.samples
    test_attrs, val_attrs = dict(test.attrs), dict(val.attrs)  # anomalib keeps the task there; pandas drops it
    if "session" in val.columns:  # Dice's own validation (a synthetic one has no sessions and no real anomaly)
        dark_anomalies = val[(val.label_index == LabelName.ABNORMAL) & val.session.isin(HOLDOUT_SESSIONS)]
        val = val.drop(dark_anomalies.index).reset_index(drop=True)
        val.attrs.update(val_attrs)
        datamodule.val_data.samples = val
        test = pd.concat([test, dark_anomalies], ignore_index=True)
    test = test[test.session.isin(HOLDOUT_SESSIONS)].reset_index(drop=True)
    test.attrs.update(test_attrs)
    datamodule.test_data.samples = test


def dark_training_normals(datamodule, seed: int) -> list[str]:  # noqa: ANN001 (anomalib_ext.data.Dice)
    """``RECALIBRATION_NORMALS`` dark-session normals of the training pool (never a test image), a seeded draw.

    They are the dark normals ``Dice``'s protocol keeps for training (``holdout_fraction``), which ``train_sessions``
    then drops from the bright arms; the tables are re-split without that filter and without the per-class cap.
    """
    import numpy as np
    from anomalib.data.utils import LabelName

    from anomalib_ext.data.dice import HOLDOUT_SESSIONS

    kept = datamodule.train_sessions, datamodule.max_train_per_class
    datamodule.train_sessions, datamodule.max_train_per_class = (), None
    try:
        tables = datamodule.split_samples()
    finally:
        datamodule.train_sessions, datamodule.max_train_per_class = kept
    test_paths = set(tables["test"].image_path)
    pool = tables["train"]
    dark = pool[(pool.label_index == LabelName.NORMAL) & pool.session.isin(HOLDOUT_SESSIONS)]
    paths = sorted(path for path in dark.image_path if path not in test_paths)
    if len(paths) < RECALIBRATION_NORMALS:
        msg = f"lighting: {len(paths)} dark training-pool normals, recalibration takes {RECALIBRATION_NORMALS}"
        raise ValueError(msg)
    picks = np.random.default_rng(seed).permutation(len(paths))[:RECALIBRATION_NORMALS]
    return [paths[index] for index in sorted(picks)]


def before_test(model, datamodule, model_spec: dict[str, Any], seed: int) -> dict[str, Any]:  # noqa: ANN001
    """``bright+recalibration``: recalibrate the fitted model on dark training-pool normals before the test (by the
    default rule; the threshold every rule gives from the same normals goes to ``measures.evaluate``).
    ``bright+recalibration+bank``: the normals join the model's memory bank too."""
    if not model_spec.get("lighting_recalibration"):
        return {}
    import copy

    from anomalib_ext.commands.recalibrate import image_thresholds_by_rule, memory_banks, recalibrate

    def bank_values() -> int:  # the size of the banks the OpenVINO export carries
        return sum(bank.numel() for bank in memory_banks(model).values())

    extend_bank = bool(model_spec.get("lighting_extend_bank"))
    normals = dark_training_normals(datamodule, seed)
    fitted = copy.deepcopy(model.post_processor)  # for the other rules' thresholds
    bank_before = bank_values()
    recalibration = recalibrate(model, normals, extend_bank=extend_bank)
    return {
        "recalibration_normals": len(normals),
        "recalibration_bank_images": recalibration.bank_images,
        "memory_bank_values_before": bank_before,
        "memory_bank_values_after": bank_values(),
        "recalibration_rule": recalibration.rule,
        "recalibration_threshold_before": recalibration.before["_image_threshold"],
        "recalibration_threshold_after": recalibration.after["_image_threshold"],
        "recalibration_normals_flagged_before": recalibration.flagged("before"),
        "recalibration_thresholds_by_rule": image_thresholds_by_rule(fitted, recalibration.normals),
    }


def _mean_and_range(values: list[float]) -> str:
    if not values:
        return "–"
    mean = sum(values) / len(values)
    return f"{mean:.3f} [{min(values):.3f}, {max(values):.3f}]" if len(values) > 1 else f"{mean:.3f}"


def _gap_closed(by_arm: dict[str, list[dict[str, Any]]], arm: str, key: str) -> str:
    """``(arm - bright) / (all - bright)`` of the seed means of ``key``; "–" when there is no gap to close."""
    reference, bright, value = (_mean(by_arm.get(name, []), key) for name in ("all", "bright", arm))
    if None in (reference, bright, value) or reference - bright <= MIN_GAP:
        return "–"
    return f"{(value - bright) / (reference - bright):.0%}"


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if row.get(key) is not None]
    return sum(values) / len(values) if values else None


def report(rows: list[dict[str, Any]]) -> list[str]:
    """Per model and arm: dark-session image AUROC and F1 over seeds; the share of the gap each augmentation closes."""
    ok = [
        {**row, "image_auroc": row.get("image_auroc_raw", row.get("image_auroc"))}  # raw: recalibration rescales
        for row in rows
        if row.get("status") == "ok" and "@" in row["model"]
    ]
    ok += [  # the other recalibration rules, as arms of their own: same fit and test scores, another threshold
        {**row, "model": f"{row['model']}:{rule}", "image_f1": f1}
        for row in ok
        for rule, f1 in (row.get("image_f1_by_rule") or {}).items()
        if rule != row.get("recalibration_rule")
    ]
    lines = ["## Study: lighting shift (train bright sessions, test dark sessions)", ""]
    lines += [
        "Test: dark sessions only (16_09_21, 17_11_21); validation: bright normals. Image AUROC on the raw scores. "
        "Mean [min, max] over seeds. Gap "
        f"closed = (arm - bright) / (all - bright) of the means; '–' where all - bright <= {MIN_GAP}.",
        "",
        "| dataset | model | arm | seeds | train normals | test normals / anomalies | image AUROC | AUROC gap closed "
        "| image F1 | F1 gap closed | flag-everything F1 | pixel AUROC |",
        "|---|---|---|---:|---:|---|---|---:|---|---:|---:|---|",
    ]
    groups: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
    for row in ok:
        base, _, arm = row["model"].rpartition("@")
        groups.setdefault((row["dataset"], base), {}).setdefault(arm, []).append(row)
    verdicts = []
    for (dataset, base), by_arm in groups.items():
        for arm in (*ARMS, *sorted(name for name in by_arm if name not in ARMS)):
            arm_rows = by_arm.get(arm, [])
            if not arm_rows:
                continue
            first = arm_rows[0]
            anomalies, total = first.get("n_test_anomalous") or 0, first.get("n_test") or 0
            share = anomalies / total if total else 0.0
            values = {key: [row[key] for row in arm_rows if row.get(key) is not None] for key in METRICS}
            lines.append(
                f"| {dataset} | {base} | {arm} | {len(arm_rows)} | {first.get('n_train')} | "
                f"{total - anomalies} / {anomalies} | {_mean_and_range(values['image_auroc'])} | "
                f"{_gap_closed(by_arm, arm, 'image_auroc') if arm.startswith('bright+') else '–'} | "
                f"{_mean_and_range(values['image_f1'])} | "
                f"{_gap_closed(by_arm, arm, 'image_f1') if arm.startswith('bright+') else '–'} | "
                f"{2 * share / (1 + share):.3f} | {_mean_and_range(values['pixel_auroc'])} |"
            )
        f1 = {arm: _mean(by_arm.get(arm, []), "image_f1") for arm in ARMS}
        if f1["bright"] is not None and f1["all"] is not None:
            remedies = [
                f"+{arm.partition('+')[2]} {f1[arm]:.3f} ({f1[arm] / f1['all']:.0%} of all-session F1)"
                for arm in ARMS[2:]
                if f1[arm] is not None and f1["all"]
            ]
            verdicts.append(
                f"- {dataset} / {base}, image F1: bright only {f1['bright']:.3f}, all sessions {f1['all']:.3f}"
                + (f"; {', '.join(remedies)}" if remedies else "")
                + "."
            )
        means = {arm: _mean(by_arm.get(arm, []), "image_auroc") for arm in DEFAULT_ARMS}
        if None in means.values():
            continue
        bright, reference = means["bright"], means["all"]
        histaugan, jitter, gap = means["bright+histaugan"], means["bright+jitter"], reference - bright
        figures = (
            f"{dataset} / {base}, image AUROC: bright only {bright:.3f}, all sessions {reference:.3f} "
            f"(gap {gap:+.3f}); +HistAuGAN {histaugan:.3f}, +jitter {jitter:.3f}"
        )
        if gap <= MIN_GAP:
            verdict = "no AUROC gap to close (bright-only training ranks the dark sessions as well)"
        elif histaugan >= bright + gap / 2 and histaugan > jitter:
            verdict = "HistAuGAN closes at least half the gap and beats jitter"
        else:
            verdict = "HistAuGAN does NOT close half the gap and beat jitter"
        better = "above" if histaugan > jitter else "not above"
        verdicts.append(f"- {figures}: {verdict}; HistAuGAN is {better} jitter.")
    return [*lines, "", *verdicts, ""]
