"""Compare anomaly models on your own datasets in one command: accuracy, speed, memory, exported size, plots.

Every (dataset, model, seed) run is a cell in its own process with a time limit; each finished cell is saved
at once, so a long run can be stopped and resumed (``--resume DIR``) and a failing or hung model is recorded
with its error while the others continue (the exit status is then 1). Every dataset is checked file by file
before the first cell runs, so a bad image is named at once instead of failing each cell. Studies
(``--study sessions|augmentation|scaling|fewshot|lighting|light_changes``) run on the same cells. See
``docs/benchmark.md``.

Examples::

    .venv/bin/python tools/benchmark.py --quick
    .venv/bin/python tools/benchmark.py --dataset ../shared/data/mvtec_ad/bottle --dataset ../shared/data/dice \\
        --model padim --model patchcore --model configs/tile_outlier/mvtec.yaml --time-limit 900
    .venv/bin/python tools/benchmark.py --dataset ../shared/data/mvtec_ad/bottle --model padim --seeds 3 --val-draws 5
    .venv/bin/python tools/benchmark.py --dataset ../shared/data/dice --model template_ssim --study sessions
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmarking import studies  # noqa: E402
from benchmarking.report import write_reports  # noqa: E402
from benchmarking.specs import (  # noqa: E402
    REPO_ROOT,
    DatasetSpec,
    SpecError,
    cell_id,
    parse_dataset,
    parse_model,
    resolve_config_family,
)

DEFAULT_MODELS = ("padim", "patchcore", "stfpm", "dfkde", "dfm")
QUICK_MODELS = ("padim", "dfm")
MANIFEST = "benchmark.json"
# settings that change the numbers: a resumed run must use the same ones
RESULT_SETTINGS = (
    *("image_size", "max_epochs", "seed", "batch_size", "speed_images", "openvino", "quick", "threads"),
    *("val_split", "val_draws", "speed_only", "study", "train_counts", "augmented_views", "export_precisions"),
    *("devices", "strategy", "histaugan_minutes"),
)
EXIT_FAILED_CELLS = 1  # some cell failed or timed out (its row says why)
EXIT_USAGE = 2  # bad arguments or data: nothing ran


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        help="[label=]PATH[:{yaml options}] in MVTec, folder or dice layout (repeatable). Options: image_size, "
        "val_split_ratio; dice: anomalib_ext.data.Dice's holdout_sessions, holdout_fraction, val_sessions, "
        "val_split_ratio, test_split_ratio, max_train_per_class",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="[label=]MODEL[:{yaml init args}]: a short name (padim, patchcore, stfpm, dfkde, dfm: offline "
        "tf_efficientnet_lite0 settings), a class path, a config file, or a configs/<family> name (repeatable; "
        f"default: {', '.join(DEFAULT_MODELS)})",
    )
    parser.add_argument("--out", type=Path, help="results folder (default: results/benchmark/<UTC time>)")
    parser.add_argument("--resume", type=Path, help="continue the run in this results folder; done cells are kept")
    parser.add_argument("--retry-failed", action="store_true", help="on --resume, also rerun failed/timed-out cells")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="with --resume: rebuild results.csv/.md and plots from the finished cells, run nothing",
    )
    parser.add_argument(
        "--figures",
        type=Path,
        help="also write one figure per (dataset, model) into this folder: the normal and defective visualizer "
        "images of its first seed (what the model READMEs open with)",
    )
    parser.add_argument("--quick", action="store_true", help="synthetic MVTec-layout data, padim + dfm, small")
    parser.add_argument("--time-limit", type=float, default=1200.0, help="seconds per cell before it is killed")
    parser.add_argument("--image-size", type=int, help="resize side for every model (default: each model's own)")
    parser.add_argument(
        "--max-epochs",
        type=int,
        default=10,
        help="epochs for gradient-trained models; configs asking for more are capped to this (default 10)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--speed-images", type=int, default=32, help="test images timed at batch size 1")
    parser.add_argument("--visuals", type=int, default=4, help="visualizer images saved per cell")
    parser.add_argument("--no-openvino", action="store_true", help="skip OpenVINO export and timing")
    parser.add_argument(
        "--export-precision",
        default="fp32",
        help="comma-separated OpenVINO export precisions, e.g. fp32,int8 (int8 = anomalib's INT8_PTQ, calibrated "
        "on the validation images): per cell and precision the OpenVINO throughput, the image/pixel AUROC of the "
        "exported model itself, and the bare backbone trunk's throughput (one results.csv row each; default fp32)",
    )
    parser.add_argument("--seed", type=int, default=0, help="first seed (model init, data split, synthetic anomalies)")
    parser.add_argument(
        "--seeds", type=int, default=1, help="run every cell with seeds SEED .. SEED+N-1; reports mean and spread"
    )
    parser.add_argument(
        "--val-split",
        choices=("synthetic", "same_as_test"),
        default="synthetic",
        help="where thresholds come from: 'synthetic' = held-out validation (MVTec/folder: held-out normals + "
        "synthetic anomalies; dice: Dice's validation split), or 'same_as_test' = anomalib's MVTecAD default, "
        "thresholds picked ON THE TEST IMAGES (F1 inflated; only to compare with figures quoted that way)",
    )
    parser.add_argument(
        "--val-draws",
        type=int,
        default=1,
        help="re-draw the synthetic validation anomalies N times (same fitted model): threshold and test F1 per draw",
    )
    parser.add_argument("--speed-only", action="store_true", help="fit, then time torch/OpenVINO; no test metrics")
    parser.add_argument("--study", choices=sorted(studies.STUDIES), help="a named study on the same cells")
    parser.add_argument(
        "--train-counts",
        type=int,
        nargs="+",
        default=[],
        help="--study scaling: training-set sizes; --study fewshot: training normals (0 = all); one cell each",
    )
    parser.add_argument(
        "--augmented-views", type=int, default=8, help="--study augmentation: views per training image (default 8)"
    )
    parser.add_argument(
        "--histaugan-minutes",
        type=float,
        default=10.0,
        help="--study lighting: wall-clock budget of the run's HistAuGAN training (default 10)",
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        metavar="ARM",
        help="--study lighting: arms to run (all bright bright+jitter bright+histaugan bright+recalibration "
        "bright+per_image bright+recalibration+bank; default the first four); --study light_changes: model arms "
        "(none per_image flat_field; default the first two)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch and OpenVINO in each cell (default 1: on a shared machine more threads "
        "spin-wait and distort every speed)",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=1,
        help="fit each cell on N CPU processes with Lightning DDP (default 1); test, speed and export then run on "
        "the fitted model in the cell process, so results compare across N. results.csv gets the fit's peak RSS "
        "of every process (fit_peak_rss_mb_per_process)",
    )
    parser.add_argument(
        "--strategy",
        default="ddp_spawn",
        help="Lightning strategy for --devices > 1 (default ddp_spawn: the processes start inside the cell)",
    )
    parser.add_argument("--run-cell", type=Path, help=argparse.SUPPRESS)  # internal: child process entry point
    args = parser.parse_args(argv)
    for name in ("time_limit", "max_epochs", "batch_size", "speed_images", "threads", "seeds", "val_draws", "devices"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.image_size is not None and args.image_size < 32:
        parser.error(f"--image-size must be at least 32 pixels, got {args.image_size}")
    if args.visuals < 0:
        parser.error(f"--visuals must be >= 0, got {args.visuals}")
    if args.val_split == "same_as_test" and args.val_draws > 1:
        parser.error("--val-split same_as_test has no synthetic validation to re-draw: drop --val-draws")
    if args.study == "scaling" and (not args.train_counts or min(args.train_counts) < 1):
        parser.error("--study scaling needs --train-counts N [N ...] (positive training-set sizes)")
    if args.study == "fewshot" and (not args.train_counts or min(args.train_counts) < 0):
        parser.error("--study fewshot needs --train-counts N [N ...] (training normals; 0 = all of them)")
    if args.arms and args.study not in ("lighting", "light_changes"):
        parser.error("--arms picks the arms of --study lighting or --study light_changes")
    if args.augmented_views < 1:
        parser.error(f"--augmented-views must be positive, got {args.augmented_views}")
    precisions = [name.strip().lower() for name in args.export_precision.split(",") if name.strip()]
    unknown = sorted(set(precisions) - {"fp32", "int8"})
    if not precisions or unknown or len(set(precisions)) != len(precisions):
        parser.error(f"--export-precision takes fp32 and/or int8, comma-separated, got {args.export_precision!r}")
    if args.no_openvino and precisions != ["fp32"]:
        parser.error("--export-precision needs the OpenVINO export: drop --no-openvino")
    # fp32 first: the int8 speed-up and the backbone fraction are relative to it
    args.export_precisions = sorted(set(precisions) | {"fp32"}, key=("fp32", "int8").index)
    if args.report_only and not args.resume:
        parser.error("--report-only needs --resume DIR (the results folder to rebuild)")
    if args.resume and args.out and args.resume.resolve() != args.out.resolve():
        parser.error("give either --resume DIR or --out DIR, not two different folders")
    return args


def machine_description() -> dict[str, Any]:
    """What the speeds were measured on; the load average matters on a shared machine."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_1_5_15": [round(value, 2) for value in load],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": "none used (accelerator=cpu)",
    }


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    quick = bool(args.quick)
    return {
        "image_size": args.image_size or (128 if quick else None),
        "max_epochs": 1 if quick else args.max_epochs,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "speed_images": 8 if quick else args.speed_images,
        "n_visuals": 2 if quick else args.visuals,
        "openvino": not args.no_openvino,
        "export_precisions": args.export_precisions,
        "quick": quick,
        "time_limit": args.time_limit,
        "threads": args.threads,
        "seeds": args.seeds,
        "val_split": args.val_split,
        "val_draws": args.val_draws,
        "speed_only": args.speed_only,
        "study": args.study,
        "train_counts": sorted(args.train_counts) if args.study in ("scaling", "fewshot") else [],
        "augmented_views": args.augmented_views if args.study == "augmentation" else None,
        "histaugan_minutes": args.histaugan_minutes if args.study == "lighting" else None,
        "arms": args.arms if args.study in ("lighting", "light_changes") else None,
        "devices": args.devices,
        "strategy": args.strategy if args.devices > 1 else None,
    }


def choose_out_dir(args: argparse.Namespace) -> tuple[Path, bool]:
    """The results folder and whether it continues an earlier run; never reuse a folder silently."""
    if args.resume:
        out = args.resume
        if not (out / MANIFEST).is_file():
            msg = f"--resume {out}: no {MANIFEST} there, so it is not a benchmark results folder"
            raise SpecError(msg)
        return out, True
    if args.out:
        if args.out.exists() and any(args.out.iterdir()):
            msg = f"--out {args.out} already exists and is not empty; pass --resume {args.out} to continue it"
            raise SpecError(msg)
        return args.out, False
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = REPO_ROOT / "results" / "benchmark" / stamp
    suffix = 1
    while out.exists():
        out = REPO_ROOT / "results" / "benchmark" / f"{stamp}-{suffix}"
        suffix += 1
    return out, False


def check_dataset(spec: DatasetSpec) -> None:
    """Read every file of a dataset once, before any cell: inside a cell anomalib meets a bad file only after the
    time spent on the cells before it, in every cell, often without its name (``image file is truncated``).
    """
    from anomalib_ext.data.validation import (
        DataValidationError,
        check_dice_layout,
        check_image_folder,
        check_mvtec_layout,
    )

    path = Path(spec.path)
    listing = "python -m anomalib_ext.data.validation " + {
        "mvtec": f"{path.parent} --category {path.name}",
        "dice": f"{path} --dice",
    }.get(spec.kind, str(path))
    try:
        if spec.kind == "mvtec":
            check_mvtec_layout(path.parent, path.name, require_masks=(path / "ground_truth").is_dir())
        elif spec.kind == "dice":
            check_dice_layout(path)
        else:  # folder / split: every image folder under the root (files beside them are not data)
            for folder in sorted(child for child in path.iterdir() if child.is_dir()):
                check_image_folder(folder, role=folder.name, allow_empty=True)
    except DataValidationError as error:
        msg = f"--dataset {spec.label}: {error.first_problem(listing)}"
        raise SpecError(msg) from None


def check_options(spec: DatasetSpec) -> None:
    """Name an unknown dataset option at once, with the ones this layout accepts."""
    from benchmarking.builders import DATASET_OPTIONS

    known = DATASET_OPTIONS.get(spec.kind, ())
    unknown = sorted(set(spec.options) - set(known))
    if unknown:
        extra = " (the seed comes from --seed/--seeds)" if "seed" in unknown else ""
        msg = (
            f"--dataset {spec.label}: unknown option(s) {unknown} for a {spec.kind} layout; known: {list(known)}{extra}"
        )
        raise SpecError(msg)


def prepare_datasets(specs: list[DatasetSpec], seed: int) -> list[dict[str, Any]]:
    """Check every dataset (files and options) before any cell runs; dice splits are counted with ``Dice``.

    A dice-layout dataset is ``anomalib_ext.data.Dice`` with its own protocol (``Dice``'s defaults) and
    the dataset's options: building its split here names a bad option or an empty split before any cell runs.
    """
    for spec in specs:
        check_options(spec)
        check_dataset(spec)
    prepared = []
    for spec in specs:
        entry = spec.to_dict()
        if spec.kind == "dice":
            from benchmarking.builders import build_dice

            try:
                tables = build_dice(Path(spec.path), spec.options, seed).split_samples()
            except (TypeError, ValueError, FileNotFoundError) as error:
                msg = f"--dataset {spec.label}: {error}"
                raise SpecError(msg) from None
            counts = {name: len(table) for name, table in tables.items()}
            counts["val_anomalous"] = int((tables["val"].label_index == 1).sum())
            counts["test_anomalous"] = int((tables["test"].label_index == 1).sum())
            print(f"dataset {spec.label}: anomalib_ext.data.Dice split (seed {seed}): {counts}", flush=True)
            entry["split_counts"] = counts
        prepared.append(entry)
    return prepared


def make_quick_dataset(out: Path) -> DatasetSpec:
    """Small synthetic MVTec-layout data (planted defects with masks) for the smoke test."""
    from anomalib_ext.data.synthetic import make_mvtec_dataset

    root = out / "datasets" / "synthetic"
    category = make_mvtec_dataset(root, category="quick", image_size=128, n_train=30, n_test_good=8)
    return DatasetSpec(label="synthetic-mvtec", kind="mvtec", path=str(category.resolve()))


def resolve_cell_model(model: dict[str, Any], dataset: dict[str, Any]) -> dict[str, Any]:
    """A model spec with a concrete class path for this dataset (config families pick their config here)."""
    if not model.get("config_family"):
        return model
    config = resolve_config_family(model["config_family"], dataset["kind"], dataset.get("scaling_of", dataset["label"]))
    parsed = parse_model(str(config)).to_dict()
    # a study's own keys (training views, dataset options) stay; the config's class and trainer come in
    resolved = {**model, **parsed, "label": model["label"]}
    resolved["init_args"] = {**parsed["init_args"], **model["init_args"]}
    return resolved


def kill_process_group(child: subprocess.Popen) -> None:
    """SIGKILL the cell's process group, which may have ended by itself meanwhile (a SIGTERM sent to every process
    of the machine reaches the cell too): the parent's own interrupt must not end in ``ProcessLookupError``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)


def run_one_cell(cell_dir: Path, spec: dict[str, Any], time_limit: float) -> dict[str, Any]:
    """Run the cell in a child process group; kill the whole group when it exceeds ``time_limit``."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("result.json", "partial.json"):
        (cell_dir / stale).unlink(missing_ok=True)
    spec_path = cell_dir / "cell.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    threads = str(spec["settings"]["threads"])
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    with (cell_dir / "log.txt").open("w") as log:
        child = subprocess.Popen(  # noqa: S603  (our own interpreter and script)
            [sys.executable, str(Path(__file__).resolve()), "--run-cell", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=environment,
        )
        try:
            child.wait(timeout=time_limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            kill_process_group(child)
            child.wait()
            timed_out = True
        except BaseException:  # Ctrl-C or SIGTERM of the parent: take the cell (its own session) down too
            kill_process_group(child)
            raise
    result_path = cell_dir / "result.json"
    if result_path.is_file() and not timed_out:
        return json.loads(result_path.read_text())
    partial_path = cell_dir / "partial.json"
    result = json.loads(partial_path.read_text()) if partial_path.is_file() else {}
    result.update(dataset=spec["dataset"]["label"], model=spec["model"]["label"], seed=spec["seed"])
    stage = result.get("stage", "setup")
    if timed_out:
        result.update(status="timeout", error=f"killed after the {time_limit:.0f} s time limit in stage '{stage}'")
    else:
        tail = (cell_dir / "log.txt").read_text(errors="replace").strip().splitlines()[-5:]
        result.update(
            status="error", error=f"cell process exited with code {child.returncode} in stage '{stage}': {tail}"
        )
    result_path.write_text(json.dumps(result, indent=2))
    return result


def summary(result: dict[str, Any]) -> str:
    if result.get("status") != "ok":
        return f"{result.get('status')}: {str(result.get('error', '')).splitlines()[0][:200]}"
    parts = [f"image AUROC {result['image_auroc']:.3f}"] if result.get("image_auroc") is not None else []
    if result.get("image_f1") is not None:
        parts.append(f"F1 {result['image_f1']:.3f}")
    if result.get("pixel_auroc") is not None:
        parts.append(f"pixel AUROC {result['pixel_auroc']:.3f}")
    if result.get("image_f1_draws"):
        parts.append("F1 per val draw " + "/".join(f"{value:.3f}" for value in result["image_f1_draws"]))
    parts.append(f"fit {result['fit_seconds']:.1f} s")
    if result.get("torch_images_per_s"):
        parts.append(f"torch {result['torch_images_per_s']:.1f} img/s")
    for export in result.get("openvino_exports") or [{"openvino_precision": "", **result}]:
        if export.get("openvino_images_per_s"):
            auroc, f1 = export.get("openvino_image_auroc"), export.get("openvino_image_f1")
            name = " ".join(filter(None, ("OpenVINO", export["openvino_precision"])))
            accuracy = [f"image AUROC {auroc:.3f}"] if auroc is not None else []
            accuracy += [f"F1 {f1:.3f}"] if f1 is not None else []
            speed = f"{name} {export['openvino_images_per_s']:.1f} img/s"
            parts.append(speed + (f" ({', '.join(accuracy)})" if accuracy else ""))
    if result.get("backbone_img_per_s"):
        parts.append(f"backbone trunk {result['backbone_img_per_s']:.1f} img/s")
    return "ok: " + ", ".join(parts)


def header_lines(manifest: dict[str, Any]) -> list[str]:
    machine = manifest["machine"]
    settings = manifest["settings"]
    return [
        "# Benchmark results",
        "",
        f"- Command: `{manifest['command']}`",
        f"- Started: {manifest['started']} (UTC)",
        *(f"- Resumed {entry['at']} (UTC): `{entry['command']}`" for entry in manifest.get("resumed", [])),
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, no GPU; load average at start "
        f"{machine['load_average_1_5_15']} — shared with other jobs, so speeds are pessimistic and noisy",
        f"- Settings: image size {settings['image_size'] or 'model default'}, max epochs "
        f"{settings['max_epochs']} (gradient models), speed on {settings['speed_images']} test images at "
        f"batch size 1 with {settings['threads']} CPU thread(s) for torch and OpenVINO, time limit "
        f"{settings['time_limit']:.0f} s per cell; each speed is reported with the load average when it was timed"
        + (
            f"; fit on {settings['devices']} CPU processes ({settings.get('strategy')}, results.csv: "
            "fit_peak_rss_mb_per_process)"
            if settings.get("devices", 1) > 1
            else ""
        ),
        f"- Seeds: {settings['seed']}..{settings['seed'] + settings.get('seeds', 1) - 1}"
        + (f"; {settings['val_draws']} synthetic validation draws per run" if settings.get("val_draws", 1) > 1 else "")
        + (f"; study: {settings['study']}" if settings.get("study") else "")
        + ("; speed only (no test metrics)" if settings.get("speed_only") else ""),
        "- Image F1 uses the threshold the PostProcessor chose on the validation split (never the test split; ours "
        "clamp the F1-optimal one into the normal validation scores' window, docs/thresholds.md); the same run's "
        "raw scores also give the F1 of the plain F1-optimal validation threshold (anomalib's rule) and of the best "
        "threshold on the test images (anomalib's same_as_test protocol: optimistic, not a deployable F1); "
        "peak RSS is the cell process's max resident memory (fit, test, export and OpenVINO inference)"
        if settings.get("val_split", "synthetic") == "synthetic"
        else "- **--val-split same_as_test: thresholds were picked on the TEST images** (anomalib's MVTecAD default); "
        "image F1 is optimistic and not comparable with held-out F1",
    ]


def command_line(argv: list[str] | None) -> str:
    """The command as typed, quoted so it can be pasted back into a shell."""
    arguments = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "tools/benchmark.py", *arguments])


def _interrupt(signum: int, _frame: object) -> None:
    """Turn SIGTERM into KeyboardInterrupt so the running cell is killed with the parent."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_cell:
        from benchmarking.cell import run_cell

        return run_cell(args.run_cell)
    created_out: Path | None = None
    try:
        out, resuming = choose_out_dir(args)
        settings = settings_from(args)
        manifest_path = out / MANIFEST
        if resuming:
            manifest = json.loads(manifest_path.read_text())
            manifest["settings"].setdefault("export_precisions", ["fp32"])  # runs from before the option
            manifest["settings"].setdefault("devices", 1)  # runs from before --devices
            manifest["settings"].setdefault("strategy", None)
            manifest["settings"].setdefault("histaugan_minutes", None)  # runs from before --study lighting
            changed = [
                f"{key}: was {manifest['settings'].get(key)!r}, now {settings.get(key)!r}"
                for key in RESULT_SETTINGS
                if manifest["settings"].get(key) != settings.get(key)
            ]
            if changed and not args.report_only:  # a report runs nothing: it takes the run's own settings
                msg = f"--resume {out}: settings differ from the original run ({'; '.join(changed)})"
                raise SpecError(msg)
            manifest["settings"]["time_limit"] = settings["time_limit"]
            # more seeds on resume only add runs; fewer keep the runs already made
            manifest["settings"]["seeds"] = max(settings["seeds"], manifest["settings"].get("seeds", 1))
            settings = manifest["settings"]
            if not args.report_only:
                manifest.setdefault("resumed", []).append(
                    {"command": command_line(argv), "at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M")}
                )
        else:
            if not out.exists():
                created_out = out
            out.mkdir(parents=True, exist_ok=True)
            manifest = {
                "command": command_line(argv),
                "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
                "machine": machine_description(),
                "settings": settings,
                "datasets": [],
                "models": [],
            }
        if args.dataset or args.model or not resuming:
            models = [parse_model(text) for text in (args.model or (QUICK_MODELS if args.quick else DEFAULT_MODELS))]
            if args.quick and not args.dataset:
                dataset_specs = [make_quick_dataset(out)]
            else:
                dataset_specs = [parse_dataset(text) for text in args.dataset]
            if not dataset_specs:
                msg = "no --dataset given (or use --quick for synthetic data)"
                raise SpecError(msg)
            manifest["datasets"], manifest["models"] = studies.expand(
                settings["study"],
                prepare_datasets(dataset_specs, settings["seed"]),
                [model.to_dict() for model in models],
                {**settings, "out_dir": str(out)},  # where a study keeps what its cells share
            )
        manifest_path.write_text(json.dumps(manifest, indent=2))
    except (SpecError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        if created_out is not None and not (created_out / MANIFEST).exists():
            # nothing ran: remove the folder this call made (only the quick data), so a rerun may use it
            shutil.rmtree(created_out, ignore_errors=True)
        return EXIT_USAGE
    return run_cells(args, out, manifest)


def run_cells(args: argparse.Namespace, out: Path, manifest: dict[str, Any]) -> int:
    """Run every (dataset, model, seed) cell not yet done, with progress and an estimate of the time left."""
    settings = manifest["settings"]
    signal.signal(signal.SIGTERM, _interrupt)
    seeds = range(settings["seed"], settings["seed"] + settings["seeds"])
    cells = [
        (dataset, model, seed) for dataset in manifest["datasets"] for model in manifest["models"] for seed in seeds
    ]
    order = [f"{cell_id(dataset['label'], model['label'])}/seed{seed}" for dataset, model, seed in cells]

    def report() -> list[dict[str, Any]]:
        return write_reports(out, header_lines(manifest), order, lambda rows: studies.report(settings["study"], rows))

    print(f"benchmark: {len(cells)} cells -> {out}", flush=True)
    started = time.perf_counter()
    cell_seconds: list[float] = []
    for index, (dataset, model, seed) in enumerate(cells, start=1):
        cell_dir = out / "cells" / order[index - 1]
        previous = cell_dir / "result.json"
        prefix = f"[{index}/{len(cells)}] {dataset['label']} x {model['label']} (seed {seed})"
        if args.report_only:
            continue
        if previous.is_file():
            status = json.loads(previous.read_text()).get("status")
            if status == "ok" or not args.retry_failed:
                print(f"{prefix}: kept from earlier run ({status})", flush=True)
                continue
        print(f"{prefix}: running (limit {settings['time_limit']:.0f} s) ...", flush=True)
        spec = {"cell_dir": str(cell_dir.resolve()), "dataset": dataset, "settings": settings, "seed": seed}
        cell_start = time.perf_counter()
        try:
            spec["model"] = resolve_cell_model(model, dataset)
        except SpecError as error:
            cell_dir.mkdir(parents=True, exist_ok=True)
            result = {"dataset": dataset["label"], "model": model["label"], "seed": seed}
            result.update(status="error", error=str(error))
            previous.write_text(json.dumps(result, indent=2))
        else:
            result = run_one_cell(cell_dir, spec, settings["time_limit"])
        cell_seconds.append(time.perf_counter() - cell_start)
        print(f"{prefix}: {summary(result)}", flush=True)
        print(progress_line(index, len(cells), time.perf_counter() - started, cell_seconds), flush=True)
        report()
    rows = report()
    if args.figures:
        from benchmarking.figures import write_figures

        print(f"figures: {len(write_figures(out, args.figures))} written to {args.figures}", flush=True)
    failed = [row for row in rows if row.get("status") != "ok"]
    print(f"done: {len(rows) - len(failed)} ok, {len(failed)} failed; see {out / 'results.md'}", flush=True)
    for row in failed:
        print(f"  {row.get('status')}: {row['dataset']} x {row['model']} (seed {row.get('seed')})", flush=True)
    return EXIT_FAILED_CELLS if failed else 0


def progress_line(done: int, total: int, elapsed: float, cell_seconds: list[float]) -> str:
    """``progress: done/total cells, elapsed, ETA`` from the mean time of the cells run by this call."""
    remaining = total - done
    eta = remaining * sum(cell_seconds) / len(cell_seconds) if cell_seconds else 0.0
    return (
        f"progress: {done}/{total} cells, {elapsed / 60:.1f} min elapsed, ETA {eta / 60:.1f} min "
        f"({remaining} left at {sum(cell_seconds) / max(1, len(cell_seconds)):.0f} s per cell)"
    )


if __name__ == "__main__":
    sys.exit(main())
