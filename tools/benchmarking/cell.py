"""One benchmark cell (one model on one dataset), run in its own process by ``tools/benchmark.py``.

Stages, each saved to ``partial.json`` as soon as it starts and when it is done, so that a crash or a time-out
keeps what was already measured: fit (anomalib Engine; the PostProcessor picks the thresholds on the validation
set), accuracy on the test set (``measures.evaluate``), torch speed, OpenVINO export + speed
(``speed.openvino_stage``), a few visualizer images. The final ``result.json`` is written only when every stage
has finished. What is built comes from ``builders``, what is measured from ``measures`` and ``speed``; this
module only orders the stages.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarking import speed
from benchmarking.builders import build_datamodule, build_model
from benchmarking.measures import cpu_seconds, evaluate, first_test_images, peak_rss_mb
from benchmarking.studies import augmentation, fewshot, light_changes, lighting, scaling, sessions


class CellRecord:
    """The cell's result so far: saved to ``partial.json`` as each stage starts, to ``result.json`` at the end."""

    def __init__(self, cell_dir: Path, values: dict[str, Any]) -> None:
        self.cell_dir = cell_dir
        self.values = values

    def save(self, name: str = "partial.json") -> None:
        self.values["peak_rss_mb"] = peak_rss_mb()
        (self.cell_dir / name).write_text(json.dumps(self.values, indent=2))

    def stage(self, name: str) -> None:
        """Start stage ``name``; saved at once, so that a time-out names the right one."""
        self.values["stage"] = name
        self.save()


def setup_datamodule(datamodule, draw_seed: int, model_spec: dict[str, Any], dataset: dict[str, Any]) -> None:  # noqa: ANN001
    """Set the datamodule up now (Engine.fit reuses it): synthetic anomalies are drawn from the global generators
    seeded with ``draw_seed``; a study's training-set changes (augmented views, a train size, few normals) are
    applied here.
    """
    from lightning.pytorch import seed_everything
    from lightning.pytorch.trainer.states import TrainerFn

    from anomalib_ext.data.seeded_split import mark_drawn_with_seed

    augmentation.apply_before_setup(datamodule, model_spec)
    lighting.apply_before_setup(datamodule, model_spec)
    fewshot.apply_before_setup(datamodule, dataset)  # cuts the normals before anomalib's validation split
    seed_everything(draw_seed, workers=True, verbose=False)
    datamodule.setup(TrainerFn.FITTING)
    mark_drawn_with_seed(datamodule, draw_seed)  # our models keep this draw (they would redraw an unseeded one)
    augmentation.apply_after_setup(datamodule, model_spec)
    lighting.apply_after_setup(datamodule, model_spec)
    scaling.apply_after_setup(datamodule, dataset)


def validation_draws(engine, model, spec: dict[str, Any], seed: int, draws: int, visual_dir: Path) -> dict[str, Any]:  # noqa: ANN001
    """Threshold and test F1 on ``draws`` synthetic validation draws, same fitted model and same normal split.

    Draw ``d`` seeds the global generators with ``seed + 1000 * d`` before anomalib makes the synthetic anomalies
    (draw 0 is the one the model was fitted with); ``Engine.validate`` recomputes the PostProcessor's thresholds.
    """
    settings = spec["settings"]
    thresholds, f1_scores = [], []
    for draw in range(draws):
        datamodule = build_datamodule(spec["dataset"], seed, settings["batch_size"], settings["val_split"])
        setup_datamodule(datamodule, seed + 1000 * draw, spec["model"], spec["dataset"])
        engine.validate(model=model, datamodule=datamodule, verbose=False)
        metrics, _ = evaluate(model, datamodule, 0, visual_dir)
        thresholds.append(metrics["image_threshold"])
        f1_scores.append(metrics["image_f1"])
    return {"image_threshold_draws": thresholds, "image_f1_draws": f1_scores}


def cell_dataset(spec: dict[str, Any]) -> dict[str, Any]:
    """The cell's dataset spec, with the options a study gave this model (``dataset_options``) merged in."""
    dataset = spec["dataset"]
    return {**dataset, "options": {**dataset["options"], **spec["model"].get("dataset_options", {})}}


def build_engine(cell_dir: Path, settings: dict[str, Any], max_epochs: int):  # noqa: ANN201 (anomalib Engine)
    """anomalib's Engine on the CPU; ``--devices N`` gives N processes (DDP). Test, speed and export then run in
    this process on the fitted model that the strategy hands back, so they measure the same thing for any N."""
    from anomalib.engine import Engine

    from benchmarking.ranks import RankPeakMemory  # imports Lightning, like anomalib above

    devices = int(settings.get("devices", 1))
    parallel = {"strategy": settings.get("strategy") or "ddp_spawn"} if devices > 1 else {}
    return Engine(
        default_root_dir=cell_dir / "engine",
        logger=False,
        accelerator="cpu",
        devices=devices,
        enable_progress_bar=False,
        max_epochs=max_epochs,
        callbacks=[RankPeakMemory(cell_dir)],
        **parallel,
    )


def fit_stage(record: CellRecord, engine, model, datamodule) -> None:  # noqa: ANN001
    """``Engine.fit`` with its wall and CPU time and memory; thresholds set even when validation never ran."""
    import torch

    from benchmarking.ranks import RankPeakMemory

    result = record.values
    record.stage("fit")
    fit_start, fit_cpu_start = time.perf_counter(), cpu_seconds()
    engine.fit(model=model, datamodule=datamodule)
    result["fit_seconds"] = time.perf_counter() - fit_start
    # CPU seconds of every thread of the cell (and of its DDP processes): the load-independent fit cost
    result["fit_cpu_seconds"] = cpu_seconds() - fit_cpu_start
    result["fit_peak_rss_mb"] = peak_rss_mb()
    result["fit_peak_rss_mb_per_process"] = RankPeakMemory.collect(record.cell_dir)
    threshold = getattr(model.post_processor, "image_threshold", None)
    if threshold is not None and bool(torch.isnan(torch.as_tensor(threshold))):
        # validation never ran during fit (e.g. check_val_every_n_epoch > epochs): set the thresholds now
        engine.validate(model=model, datamodule=datamodule)
        result["validated_after_fit"] = True
    result["n_train"] = len(datamodule.train_data)
    result["n_val"] = len(datamodule.val_data)
    record.save()


def accuracy_stage(record: CellRecord, model, datamodule, settings: dict[str, Any]) -> list:  # noqa: ANN001
    """Accuracy on the test set (and the sessions study); returns the images the speed stages time."""
    if settings.get("speed_only"):
        return first_test_images(datamodule, settings["speed_images"])
    result = record.values
    record.stage("test")
    test_start = time.perf_counter()
    metrics, speed_images = evaluate(
        model,
        datamodule,
        settings["n_visuals"],
        record.cell_dir / "visuals",
        result.get("recalibration_thresholds_by_rule"),  # --study lighting's bright+recalibration
    )
    result.update(metrics)
    result["test_seconds"] = time.perf_counter() - test_start
    record.save()
    if settings.get("study") == "sessions":
        record.stage("sessions study")
        result["sessions"] = sessions.validation_scores_by_session(model, datamodule)
        record.save()
    return speed_images[: settings["speed_images"]]


def run_stages(spec: dict[str, Any], record: CellRecord, seed: int, started: float) -> None:
    """Build, fit, test, time and export one cell, recording each stage in ``record``."""
    import anomalib.models  # noqa: F401  (import cost belongs to the baseline, not the model)
    import torch
    from lightning.pytorch import seed_everything

    import anomalib_ext  # noqa: F401  (registers our models)

    result, settings, cell_dir = record.values, spec["settings"], record.cell_dir
    result["baseline_rss_mb"] = peak_rss_mb()  # python + torch + anomalib imported, no model or data yet
    torch.set_num_threads(settings["threads"])
    seed_everything(seed, workers=True)
    image_size = spec["dataset"]["options"].get("image_size", settings["image_size"])
    # the arm's augmentation or input normalisation, as the model takes it
    spec["model"] = light_changes.model_for_cell(lighting.model_for_cell(spec["model"]))
    model = build_model(spec["model"], image_size, seed, data_checked=True)  # check_dataset ran in the parent
    datamodule = build_datamodule(spec["dataset"], seed, settings["batch_size"], settings["val_split"])
    setup_datamodule(datamodule, seed, spec["model"], spec["dataset"])
    # --max-epochs bounds every model: a config asking for more epochs is capped to it
    config_epochs = spec["model"].get("trainer", {}).get("max_epochs", settings["max_epochs"])
    result["max_epochs"] = min(config_epochs, settings["max_epochs"])
    engine = build_engine(cell_dir, settings, result["max_epochs"])
    result["devices"] = int(settings.get("devices", 1))
    result["setup_seconds"] = time.perf_counter() - started
    result["val_split"] = settings["val_split"]

    fit_stage(record, engine, model, datamodule)
    if spec["model"].get("lighting_recalibration"):
        record.stage("recalibration")  # --study lighting's bright+recalibration: new thresholds before the test
        result.update(lighting.before_test(model, datamodule, spec["model"], seed))
    speed_images = accuracy_stage(record, model, datamodule, settings)
    if settings.get("study") == "light_changes" and not settings.get("speed_only"):
        record.stage("light changes")  # the same fitted model under each lighting change, plain and recalibrated
        result.update(light_changes.measure(model, datamodule, seed, cell_dir))
        record.save()

    record.stage("torch speed")
    torch_result = speed.torch_speed(model, speed_images, settings["threads"])
    torch_scores = torch_result.pop("torch_scores")
    result.update(torch_result)
    record.save()

    if settings["openvino"]:
        record.stage("openvino")
        result.update(speed.openvino_stage(engine, model, datamodule, speed_images, torch_scores, settings, cell_dir))
        record.save()

    draws = settings.get("val_draws", 1)
    if draws > 1 and not settings.get("speed_only") and datamodule.val_split_mode == "synthetic":
        record.stage("validation draws")  # last: it leaves the model with the last draw's thresholds
        result.update(validation_draws(engine, model, spec, seed, draws, cell_dir / "visuals"))


def run_cell(spec_path: Path) -> int:
    """Run every stage of one cell; write ``partial.json`` after each and ``result.json`` at the end."""
    spec = json.loads(spec_path.read_text())
    spec["dataset"] = cell_dataset(spec)
    cell_dir = Path(spec["cell_dir"])
    seed = int(spec.get("seed", spec["settings"]["seed"]))
    record = CellRecord(cell_dir, {"dataset": spec["dataset"]["label"], "model": spec["model"]["label"], "seed": seed})
    result = record.values
    started = time.perf_counter()
    result["load_average_1min"] = os.getloadavg()[0]  # at the start of the cell; each speed has its own
    try:
        run_stages(spec, record, seed, started)
        result["stage"] = "done"
        result["status"] = "ok"
        result["cell_seconds"] = time.perf_counter() - started
        for checkpoint in (cell_dir / "engine").rglob("*.ckpt"):
            checkpoint.unlink()  # checkpoints are not part of the benchmark output and can be large
        record.save("result.json")
        return 0
    except Exception as error:  # noqa: BLE001  (any failure is recorded, the parent carries on)
        result["status"] = "error"
        result["error"] = f"{type(error).__name__} in stage '{result.get('stage', 'setup')}': {error}"
        result["traceback"] = traceback.format_exc()
        result["cell_seconds"] = time.perf_counter() - started
        record.save("result.json")
        return 1
    finally:
        shutil.rmtree(cell_dir / "engine" / "images", ignore_errors=True)
