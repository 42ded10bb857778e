"""Benchmark TemplateSsim on the real dice set (cross-session hold-out) and MVTec bottle; measure throughput.

Dice protocol (nothing is tuned on the test split):
  train      = train/good normals of the sessions NOT held out, minus the validation share
  validation = ``--val-split-ratio`` of those normals (per class) + half of val/anomalous (stratified PNG/JPEG)
  test       = every normal of the held-out sessions (16_09_21, 17_11_21: darker lighting) + the other half of
               val/anomalous
The image threshold is anomalib's F1-adaptive threshold computed on validation; test F1 uses it unchanged.

    .venv/bin/python tools/bench_template_ssim.py dice --out results/template_ssim
    .venv/bin/python tools/bench_template_ssim.py bottle --out results/template_ssim
    .venv/bin/python tools/bench_template_ssim.py speed --out results/template_ssim
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def _f1(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    true_positive = int(((predicted == 1) & (labels == 1)).sum())
    false_positive = int(((predicted == 1) & (labels == 0)).sum())
    false_negative = int(((predicted == 0) & (labels == 1)).sum())
    precision = true_positive / max(1, true_positive + false_positive)
    recall = true_positive / max(1, true_positive + false_negative)
    f1 = 2 * precision * recall / max(1e-12, precision + recall)
    return {
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "false_positives": false_positive,
        "false_negatives": false_negative,
    }


def _engine(workdir: Path):
    from anomalib.engine import Engine

    return Engine(
        max_epochs=1, default_root_dir=workdir, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False
    )


def _predict(engine, model, dataloader) -> dict[str, np.ndarray]:
    batches = engine.predict(model=model, dataloaders=dataloader)
    return {
        "path": np.array([str(p) for b in batches for p in b.image_path]),
        "score": torch.cat([b.pred_score.flatten() for b in batches]).numpy(),
        "predicted": torch.cat([b.pred_label.flatten() for b in batches]).int().numpy(),
        "label": torch.cat([b.gt_label.flatten() for b in batches]).int().numpy(),
    }


def _summary(split: dict[str, np.ndarray], keep: np.ndarray | None = None) -> dict:
    keep = np.ones_like(split["label"], bool) if keep is None else keep
    labels, scores, predicted = split["label"][keep], split["score"][keep], split["predicted"][keep]
    return {
        "images": int(keep.sum()),
        "anomalous": int(labels.sum()),
        "auroc": _auroc(labels, scores),
        **_f1(labels, predicted),
    }


def _template_classes(model, paths: list[str]) -> list[str]:
    """Which class's template each image matched (for the failure analysis)."""
    from anomalib.data.utils import read_image

    classes = []
    for start in range(0, len(paths), 64):
        images = torch.stack([read_image(p, as_tensor=True) for p in paths[start : start + 64]])
        images = model.pre_processor.transform(images)
        with torch.no_grad():
            _, template_index = model.model.raw_maps(model.model._as_template_channels(images))
        class_index = model.model.template_class[template_index]
        classes += [model.class_names[int(i)] for i in class_index]
    return classes


def _pixel_hash(path: str) -> str:
    """Hash of an image's decoded pixels (finds copies saved under another name)."""
    import hashlib

    import cv2

    return hashlib.sha1(cv2.imread(str(path), cv2.IMREAD_UNCHANGED).tobytes()).hexdigest()


# TemplateSsim arguments taken from the command line under the same name; every task builds its model (and
# records it) with these, so a model and its result file cannot disagree
MAP_OPTIONS = ("photometric", "residual", "gain_trend", "illumination_sigma")
SCORING_OPTIONS = ("topk_fraction", "map_sigma", "max_shift", "max_images_per_class", "pixel_statistics", *MAP_OPTIONS)


def _options(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    return {name: getattr(args, name) for name in names}


def run_dice(args: argparse.Namespace) -> dict:
    from anomalib_ext.data import Dice
    from anomalib_ext.data.dice import class_from_path
    from anomalib_ext.models import TemplateSsim

    datamodule = Dice(
        root=args.data_root / "dice",
        train_batch_size=64,
        eval_batch_size=64,
        num_workers=0,
        val_split_ratio=args.val_split_ratio,
        holdout_sessions=args.holdout_sessions,
        holdout_fraction=args.holdout_fraction,
        seed=args.seed,
    )
    model = TemplateSsim(
        image_size=(128, 128),
        templates_per_class=args.templates_per_class,
        **_options(args, SCORING_OPTIONS),
        visualizer=False,
        seed=args.seed,
    )
    engine = _engine(args.out / "dice_run")
    started = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - started
    validation = _predict(engine, model, datamodule.val_dataloader())
    test = _predict(engine, model, datamodule.test_dataloader())
    result = {
        "protocol": {
            "holdout_sessions": list(args.holdout_sessions),
            "holdout_fraction": args.holdout_fraction,
            "val_split_ratio": args.val_split_ratio,
            "seed": args.seed,
            "train_images": len(datamodule.train_data),
            "fit_seconds_under_shared_load": round(fit_seconds, 1),
        },
        "gain_slopes": dict(zip(model.class_names, model.model.gain_slope.tolist(), strict=False)),
        "threshold_normalised": float(model.post_processor.normalized_image_threshold),
        "model": {"templates_per_class": args.templates_per_class, **_options(args, SCORING_OPTIONS)},
    }
    for name, split in (("validation", validation), ("test", test)):
        is_png = np.char.endswith(np.char.lower(split["path"].astype(str)), ".png")
        result[name] = _summary(split)
        result[f"{name}_png_only"] = _summary(split, (split["label"] == 0) | is_png)
    # most 17_11_21 images are pixel-identical copies of 16_09_21 images: a split that separates a pair leaks
    seen = {_pixel_hash(p) for data in (datamodule.train_data, datamodule.val_data) for p in data.samples.image_path}
    no_twin = np.array([_pixel_hash(p) not in seen for p in test["path"]])
    result["test_without_twins_in_train_or_val"] = _summary(test, no_twin)
    # failure analysis on the test split
    normals = test["label"] == 0
    per_class = {}
    for cls in sorted({class_from_path(p) or "" for p in test["path"][normals]}):
        members = normals & np.array([(class_from_path(p) or "") == cls for p in test["path"]])
        per_class[cls] = {"normals": int(members.sum()), "flagged": int(test["predicted"][members].sum())}
    result["test_false_positives_per_class"] = per_class
    flagged_normals = [str(p) for p in test["path"][normals & (test["predicted"] == 1)]]
    matched = _template_classes(model, flagged_normals) if flagged_normals else []
    result["test_flagged_normals"] = [
        {"path": Path(p).name, "true_class": class_from_path(p), "matched_class": m}
        for p, m in zip(flagged_normals, matched, strict=True)
    ]
    missed = test["path"][(test["label"] == 1) & (test["predicted"] == 0)]
    result["test_missed_anomalies"] = [Path(p).name for p in missed]
    all_normals = [str(p) for p in test["path"][normals]]
    matched_all = _template_classes(model, all_normals)
    wrong = [(Path(p).name, m) for p, m in zip(all_normals, matched_all, strict=True) if class_from_path(p) != m]
    result["test_normals_matched_to_wrong_class"] = {
        "count": len(wrong),
        "of": len(all_normals),
        "examples": wrong[:10],
    }
    np.savez(
        args.out / f"dice_predictions{args.tag}.npz",
        **{f"{k}_{n}": v for n, s in (("val", validation), ("test", test)) for k, v in s.items()},
    )
    return result


def run_bottle(args: argparse.Namespace) -> dict:
    from anomalib.data import MVTecAD

    from anomalib_ext.models import TemplateSsim

    datamodule = MVTecAD(
        root=args.data_root / "mvtec_ad",
        category="bottle",
        train_batch_size=32,
        eval_batch_size=32,
        num_workers=0,
        seed=args.seed,
    )
    model = TemplateSsim(
        image_size=(256, 256),
        num_templates=args.num_templates,
        visualizer=False,
        angles=tuple(float(a) for a in args.angles),
        **_options(args, SCORING_OPTIONS),
        seed=args.seed,
    )
    engine = _engine(args.out / "bottle_run")
    engine.fit(model=model, datamodule=datamodule)
    metrics = engine.test(model=model, datamodule=datamodule)[0]
    return {
        "metrics": {k: float(v) for k, v in metrics.items()},
        "note": "anomalib's MVTecAD default validation split is same_as_test: the F1 threshold is chosen on the "
        "test images themselves, so only the threshold-free AUROCs are comparable",
        "model": {"num_templates": args.num_templates, "angles": args.angles, **_options(args, SCORING_OPTIONS)},
    }


def run_speed(args: argparse.Namespace) -> dict:
    """Images/s of torch and of the exported OpenVINO model at 128x128, full template and pose search.

    Runs on synthetic dice (11 classes, 128 px): the graph, hence the cost, is the one the real set gives
    (11 templates x 9 angles x +-10 px), without reading 6,500 files first.
    """
    import openvino as ov
    from anomalib.deploy import ExportType

    from anomalib_ext.data import Dice, make_dice_dataset
    from anomalib_ext.models import TemplateSsim

    root = args.out / "speed_data"
    if not (root / "train").is_dir():
        make_dice_dataset(root, image_size=128, n_train_per_class=12, n_test_good_per_class=3, seed=args.seed)
    datamodule = Dice(root=root, train_batch_size=64, eval_batch_size=64, num_workers=0, seed=args.seed)
    model = TemplateSsim(
        image_size=(128, 128),
        max_images_per_class=16,
        **_options(args, MAP_OPTIONS),
        seed=args.seed,
        visualizer=False,
    )
    engine = _engine(args.out / "speed_run")
    engine.fit(model=model, datamodule=datamodule)
    model.eval()
    xml = engine.export(
        model=model, export_type=ExportType.OPENVINO, export_root=args.out / "speed_export", input_size=(128, 128)
    )
    images = next(iter(datamodule.test_dataloader())).image[:32]
    result = {
        "templates": int(model.model.templates.shape[0]),
        "angles": model.model.angle_grid,
        "max_shift": model.model.max_shift,
        "load_average_before": os.getloadavg(),
    }

    def rate(run, batch: torch.Tensor, repeats: int) -> float:
        run(batch)
        started = time.perf_counter()
        for _ in range(repeats):
            run(batch)
        return repeats * len(batch) / (time.perf_counter() - started)

    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.no_grad():
            result[f"torch_threads{threads}_batch32_img_per_s"] = rate(model, images, 3)
            result[f"torch_threads{threads}_batch1_img_per_s"] = rate(model, images[:1], 30)
    core = ov.Core()
    for precision in ("f32", "bf16"):
        for streams_threads in (1, 2):
            compiled = core.compile_model(
                str(xml), "CPU", {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": streams_threads}
            )
            key = f"openvino_{precision}_threads{streams_threads}"
            result[f"{key}_batch32_img_per_s"] = rate(lambda b, c=compiled: c(b.numpy()), images, 5)
            result[f"{key}_batch1_img_per_s"] = rate(lambda b, c=compiled: c(b.numpy()), images[:1], 100)
    compiled = core.compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    with torch.no_grad():
        reference = model(images)
    outputs = compiled(images.numpy())
    by_name = {port.get_any_name(): value for port, value in outputs.items()}
    if "pred_score" in by_name and "anomaly_map" in by_name:
        result["openvino_f32_vs_torch_max_score_difference"] = float(
            np.abs(by_name["pred_score"].ravel() - reference.pred_score.numpy().ravel()).max()
        )
        result["openvino_f32_vs_torch_max_map_difference"] = float(
            np.abs(by_name["anomaly_map"].squeeze() - reference.anomaly_map.numpy().squeeze()).max()
        )
    result["load_average_after"] = os.getloadavg()
    return result


def run_speed_openvino(args: argparse.Namespace) -> dict:
    """OpenVINO throughput of an exported model (``--xml``), as wall-clock and as CPU time per image.

    On a shared machine wall-clock rates mostly measure the other users; images per CPU-second of this
    process (all its threads) is the figure that says what the model costs.
    """
    import openvino as ov

    xml = args.xml or args.out / "speed_export" / "weights" / "openvino" / "model.xml"
    if not Path(xml).is_file():
        msg = f"no exported model at {xml}: run the 'speed' task first or pass --xml"
        raise FileNotFoundError(msg)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(32, 3, 128, 128, generator=generator).numpy()
    result = {"xml": str(xml), "load_average_before": os.getloadavg()}
    core = ov.Core()
    for precision in ("f32", "bf16"):
        for threads in (1, 2):
            compiled = core.compile_model(
                str(xml), "CPU", {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads}
            )
            for batch in (1, 32):
                compiled(images[:batch])
                repeats = max(1, 64 // batch)
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(repeats):
                    compiled(images[:batch])
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                key = f"openvino_{precision}_threads{threads}_batch{batch}"
                result[f"{key}_img_per_wall_s"] = repeats * batch / wall
                result[f"{key}_img_per_cpu_s"] = repeats * batch / cpu
    result["load_average_after"] = os.getloadavg()
    return result


def run_sessions(args: argparse.Namespace) -> dict:
    """Validation normal scores per acquisition session, from a dice run's predictions (``--tag`` picks the run).

    The threshold is 0.5 on these normalised scores; a lighting session whose normals sit higher than the others
    is where false alarms come from. Reads only validation images.
    """
    from anomalib_ext.data.dice import session_from_path

    predictions = np.load(args.out / f"dice_predictions{args.tag}.npz")
    paths, scores, labels = predictions["path_val"], predictions["score_val"], predictions["label_val"]
    sessions = np.array([session_from_path(path) for path in paths])
    result: dict = {"validation_normals_by_session": {}}
    for session in sorted(set(sessions[labels == 0])):
        chosen = scores[(labels == 0) & (sessions == session)]
        result["validation_normals_by_session"][session] = {
            "images": len(chosen),
            "median": float(np.median(chosen)),
            "q99": float(np.quantile(chosen, 0.99)),
        }
    result["validation_lowest_anomalies"] = np.sort(scores[labels == 1])[:3].tolist()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["dice", "bottle", "speed", "speed_openvino", "sessions"])
    parser.add_argument("--xml", type=Path, default=None, help="exported model.xml for speed_openvino")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "template_ssim")
    parser.add_argument("--holdout-sessions", nargs="*", default=["16_09_21", "17_11_21"])
    parser.add_argument(
        "--holdout-fraction",
        type=float,
        default=1.0,
        help="share of the held-out sessions' normals moved to test (1 = strict cross-session)",
    )
    parser.add_argument("--templates-per-class", type=int, default=1)
    parser.add_argument("--pixel-statistics", action="store_true", help="standardise maps per pixel")
    parser.add_argument("--photometric", action="store_true", help="match each image's grey levels to its template")
    parser.add_argument("--residual", action="store_true", help="add the intensity-residual map channel")
    parser.add_argument(
        "--gain-trend", action="store_true", help="per-class normal score follows the photometric gain (lighting)"
    )
    parser.add_argument(
        "--illumination-sigma", type=float, default=0.0, help="remove smooth image-template differences (0 = off)"
    )
    parser.add_argument("--val-split-ratio", type=float, default=0.2)
    parser.add_argument("--max-images-per-class", type=int, default=128)
    parser.add_argument("--topk-fraction", type=float, default=0.002)
    parser.add_argument("--map-sigma", type=float, default=2.0)
    parser.add_argument("--max-shift", type=int, default=10)
    parser.add_argument("--num-templates", type=int, default=1)
    parser.add_argument("--angles", nargs="*", type=float, default=[-4.0, -2.0, 0.0, 2.0, 4.0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads for fit/eval (1 is fastest under load)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    args = parser.parse_args()
    if (
        args.task in ("dice", "bottle")
        and not (args.data_root / ("mvtec_ad" if args.task == "bottle" else "dice")).is_dir()
    ):
        parser.error(f"no data under {args.data_root}")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = {
        "dice": run_dice,
        "bottle": run_bottle,
        "speed": run_speed,
        "speed_openvino": run_speed_openvino,
        "sessions": run_sessions,
    }
    result = tasks[args.task](args)
    result["command"] = "python tools/bench_template_ssim.py " + " ".join(os.sys.argv[1:])
    path = args.out / f"{args.task}{args.tag}.json"
    path.write_text(json.dumps(result, indent=2, default=float))
    print(
        json.dumps(
            {k: v for k, v in result.items() if not k.startswith("test_") or k.endswith("class")},
            indent=2,
            default=float,
        )
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
