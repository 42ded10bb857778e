"""Benchmark TileOutlier on an MVTec-layout category: fit time, image/pixel AUROC, throughput, fit scaling.

Examples (from the repo root):
    .venv/bin/python tools/bench_tile_outlier.py accuracy --root ../shared/data/mvtec_ad --category bottle
    .venv/bin/python tools/bench_tile_outlier.py accuracy --set embed=crop --set stride=16
    .venv/bin/python tools/bench_tile_outlier.py throughput
    .venv/bin/python tools/bench_tile_outlier.py scaling --counts 26 52 104 208

Results are appended as JSON lines to ``results/tile_outlier/<mode>.jsonl``. Timings are wall clock on
whatever machine runs this; on a shared machine they carry the load of everything else running.
"""

from __future__ import annotations

import argparse
import ast
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path("results/tile_outlier")


def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            sys.exit(f"--set expects key=value, got '{pair}'")
        key, value = pair.split("=", 1)
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


def _write(mode: str, record: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / f"{mode}.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=1))


def _build(overrides: dict[str, Any]):  # noqa: ANN202
    from anomalib_ext.models import TileOutlier

    return TileOutlier(visualizer=False, **overrides)


def _datamodule(root: str, category: str, batch: int):  # noqa: ANN202
    from anomalib.data import MVTecAD

    return MVTecAD(root=root, category=category, train_batch_size=batch, eval_batch_size=batch, num_workers=0)


def _engine(work_dir: str):  # noqa: ANN202
    from anomalib.engine import Engine

    return Engine(default_root_dir=work_dir, logger=False, enable_progress_bar=False, devices=1)


def run_accuracy(args: argparse.Namespace) -> None:
    """Fit on train/good (timed: wall and process CPU), test on test/: image and pixel AUROC.

    ``engine.fit`` also runs anomalib's validation pass (MVTecAD validates on the test split), so the fit time
    is an upper bound on fitting alone; ``scaling`` times fitting alone.
    """
    overrides = _parse_overrides(args.set)
    model = _build(overrides)
    datamodule = _datamodule(args.root, args.category, args.batch_size)
    with tempfile.TemporaryDirectory() as work_dir:
        engine = _engine(work_dir)
        start, cpu_start = time.perf_counter(), time.process_time()
        engine.fit(model=model, datamodule=datamodule)
        fit_seconds, fit_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    _write(
        "accuracy",
        {
            "category": args.category,
            "overrides": overrides,
            "fit_seconds": round(fit_seconds, 1),
            "fit_cpu_seconds": round(fit_cpu_seconds, 1),
            "image_AUROC": round(float(metrics["image_AUROC"]), 4),
            "pixel_AUROC": round(float(metrics["pixel_AUROC"]), 4),
            "bank_tiles": model.model.bank_tiles,
            "tiles_per_image": model.model.grid.num_tiles,
            "torch_threads": torch.get_num_threads(),
        },
    )


def run_throughput(args: argparse.Namespace) -> None:
    """Fit, export to OpenVINO, time torch and OpenVINO on single 256x256 images (batch 1)."""
    import numpy as np
    from anomalib.deploy import ExportType, OpenVINOInferencer

    overrides = _parse_overrides(args.set)
    model = _build(overrides)
    datamodule = _datamodule(args.root, args.category, args.batch_size)
    size = model.model.image_size
    with tempfile.TemporaryDirectory() as work_dir:
        engine = _engine(work_dir)
        engine.fit(model=model, datamodule=datamodule)
        export_path = engine.export(model, ExportType.OPENVINO, export_root=work_dir, input_size=size)
        inferencer = OpenVINOInferencer(path=export_path, device="CPU")
        images = torch.rand(args.images, 3, *size)
        model.eval()
        with torch.no_grad():
            model(images[:1])
            start = time.perf_counter()
            for image in images:
                torch_out = model(image[None])
            torch_rate = len(images) / (time.perf_counter() - start)
        inferencer.predict(images[0])
        start = time.perf_counter()
        for image in images:
            ov_out = inferencer.predict(image)
        ov_rate = len(images) / (time.perf_counter() - start)
        map_diff = float(
            np.abs(np.asarray(ov_out.anomaly_map).squeeze() - torch_out.anomaly_map.numpy().squeeze()).max()
        )
        score_diff = float(abs(np.asarray(ov_out.pred_score).ravel()[0] - torch_out.pred_score.ravel()[0].item()))
    _write(
        "throughput",
        {
            "overrides": overrides,
            "image_size": size,
            "torch_images_per_s": round(torch_rate, 1),
            "openvino_images_per_s": round(ov_rate, 1),
            "last_image_max_abs_diff": {"anomaly_map": map_diff, "pred_score": score_diff},
            "torch_threads": torch.get_num_threads(),
        },
    )


def run_scaling(args: argparse.Namespace) -> None:
    """Fit time and peak memory growth as the number of training images doubles (a subprocess per count)."""
    import subprocess

    for count in args.counts:
        command = [sys.executable, __file__, "_fit_once", "--root", args.root, "--category", args.category]
        command += ["--count", str(count), "--batch-size", str(args.batch_size)]
        for pair in args.set:
            command += ["--set", pair]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        _write("scaling", {"overrides": _parse_overrides(args.set), **json.loads(output)})


def _fit_once(args: argparse.Namespace) -> None:
    """Fit on the first ``count`` training images (repeated when there are fewer); print time and peak RSS.

    Data loading and pre-processing are inside the timing, Lightning is not: the same work as a training epoch.
    """
    from anomalib.data import MVTecAD

    from anomalib_ext.models import TileOutlier

    datamodule = MVTecAD(root=args.root, category=args.category, num_workers=0, train_batch_size=args.batch_size)
    datamodule.setup("fit")
    dataset = datamodule.train_data
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, collate_fn=dataset.collate_fn, shuffle=False
    )
    model = TileOutlier(visualizer=False, **_parse_overrides(args.set))
    model.eval()
    start, cpu_start = time.perf_counter(), time.process_time()
    seen = 0
    while seen < args.count:
        for batch in loader:
            take = min(args.count - seen, len(batch.image))
            images = model.pre_processor.transform(batch.image[:take])
            model._reservoir.add(model._embed(images))  # noqa: SLF001  (the training step without Lightning)
            seen += take
            if seen >= args.count:
                break
    model.fit()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record = {"train_images": args.count, "fit_seconds": round(seconds, 1), "fit_cpu_seconds": round(cpu_seconds, 1)}
    print(json.dumps({**record, "peak_rss_mb": round(peak_mb), "bank_tiles": model.model.bank_tiles}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["accuracy", "throughput", "scaling", "_fit_once"])
    parser.add_argument("--root", default="../shared/data/mvtec_ad")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--set", action="append", default=[], help="TileOutlier init arg, key=value (repeatable)")
    parser.add_argument("--images", type=int, default=40, help="throughput: images timed")
    parser.add_argument("--counts", type=int, nargs="+", default=[26, 52, 104, 208], help="scaling: train sizes")
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (Path(args.root) / args.category).is_dir():
        sys.exit(f"no dataset at {Path(args.root) / args.category}")
    {"accuracy": run_accuracy, "throughput": run_throughput, "scaling": run_scaling, "_fit_once": _fit_once}[args.mode](
        args
    )


if __name__ == "__main__":
    main()
