"""The five-minute tour: synthetic data -> train -> test -> OpenVINO export -> edge inference -> overlays.

Run by ``make demo``. Everything happens offline on the CPU; results go to a fresh folder under ``results/demo/``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Small, fast settings per model for the demo's 128 px synthetic bottle.
DEMO_MODELS: dict[str, dict] = {
    "Fused": {},
    "TileOutlier": {},
    "TemplateSsim": {},
    "Dfkdm": {},
    "Reconstruction": {"variant": "ae"},
    "TeacherStudent": {},
    "Padim": {"backbone": "tf_efficientnet_lite0", "layers": ["blocks.1", "blocks.2", "blocks.4"], "n_features": 50},
}
DEFAULT_MODEL = "Fused"  # the recommended default (configs/fused/mvtec.yaml)


def build_model(name: str, init_args: dict):  # noqa: ANN201 (AnomalibModule)
    """The demo model through the benchmark's one builder (offline backbone weights included)."""
    if name not in DEMO_MODELS:
        msg = f"unknown demo model '{name}'; choose one of {', '.join(DEMO_MODELS)}"
        raise SystemExit(msg)
    sys.path.insert(0, str(REPO / "tools"))
    from benchmarking.builders import build_model as build

    class_path = "anomalib.models.Padim" if name == "Padim" else f"anomalib_ext.models.{name}"
    return build({"class_path": class_path, "init_args": init_args})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(DEMO_MODELS))
    parser.add_argument("--epochs", type=int, default=None, help="override the model's default epochs")
    parser.add_argument("--data", type=Path, default=REPO / "datasets" / "demo", help="where to write the data")
    parser.add_argument("--results", type=Path, default=REPO / "results" / "demo")
    args = parser.parse_args(argv)

    from anomalib.data import MVTecAD
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine

    from anomalib_ext.data.synthetic import make_mvtec_dataset
    from anomalib_ext.models.components import EXPORT_OPSET

    run_dir = args.results / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=False)
    print(f"[1/5] synthetic MVTec-layout data -> {args.data / 'synthetic'}")
    make_mvtec_dataset(args.data, category="synthetic", image_size=128, n_train=48, n_test_good=10, n_test_per_defect=4)

    print(f"[2/5] training {args.model} through anomalib's Engine")
    model = build_model(args.model, DEMO_MODELS[args.model])
    datamodule = MVTecAD(
        root=args.data,
        category="synthetic",
        train_batch_size=16,
        eval_batch_size=16,
        num_workers=0,
        val_split_mode="from_test",
        val_split_ratio=0.5,
        seed=0,
    )
    engine_kwargs = {"max_epochs": args.epochs} if args.epochs else {}
    engine = Engine(default_root_dir=run_dir, accelerator="cpu", devices=1, logger=False, **engine_kwargs)
    started = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - started

    print("[3/5] testing (metrics and anomalib visualizer images)")
    metrics = engine.test(model=model, datamodule=datamodule)[0]

    print("[4/5] exporting to OpenVINO")
    xml = engine.export(
        model=model,
        export_type=ExportType.OPENVINO,
        export_root=run_dir / "export",
        input_size=(128, 128),
        onnx_kwargs={"opset_version": EXPORT_OPSET},
    )

    print("[5/5] edge inference with tools/infer_openvino.py (OpenVINO + NumPy + OpenCV only)")
    edge_dir = run_dir / "edge"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "infer_openvino.py"),
            "--model",
            str(xml),
            "--input",
            str(args.data / "synthetic" / "test"),
            "--output",
            str(edge_dir),
        ],
        check=True,
    )
    summary = {
        "model": args.model,
        "fit_seconds": round(fit_seconds, 1),
        "metrics": {key: round(float(value), 4) for key, value in metrics.items()},
        "openvino_model": str(xml),
        "edge_predictions": str(edge_dir / "predictions.csv"),
        "overlays": str(edge_dir / "overlays"),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"\nDone. Open {edge_dir / 'overlays'} for the result images.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
