"""Multi-process fit and prediction (Lightning DDP on CPU, gloo): N processes give the model one process gives.

One ``torchrun --nproc-per-node 2`` launch (``distributed_worker.py``) fits every family on 2 processes, tests it
and predicts over a folder; this module fits the same families on one process and compares. ``ddp_spawn`` (the
strategy of the issue's first attempt) is checked through the CLI command itself on TileOutlier, and every model
and callback is checked to pickle, which is what ``ddp_spawn`` adds. Tiny data: 13 training images of 64 px
(odd, so the sampler pads one rank with a repeated image), 40 test images (anomalib's MVTecAD keeps half for
validation: 8 normal and 12 defective test images).

Tolerance: fit-only models must agree to 1e-4 (relative) in every fitted tensor and every test score: they see
the same images in other batches, so only float rounding differs. Every family's 2-process test metrics must
reach ``MIN_TEST_AUROC``; random or constant scores give 0.5 (image AUROC >= 0.9 by chance: about 0.2 % on 8
normal and 12 defective images; pixel AUROC of a random map: 0.50 +- 0.01).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed_worker import CATEGORY, FAMILIES, FIT_ONLY, IMAGE_SIZE, TRAIN_IMAGES, build, datamodule

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
GRADIENT = tuple(family for family in FAMILIES if family not in FIT_ONLY)
TEST_GOOD, TEST_PER_DEFECT = 16, 6  # 40 test images; half of them go to validation
# floors for the 2-process test metrics, below what each family reached (2 processes, then 1 process), far above
# a random model (0.5); Dfkdm's backbone mode gives no map. TeacherStudent's student, 3 short epochs on 13 images,
# ranks whole images barely above chance (image AUROC 0.59, pixel 0.67 measured), so only its map has a bar.
MIN_TEST_AUROC: dict[str, dict[str, float]] = {
    "tile_outlier": {"image_AUROC": 0.9, "pixel_AUROC": 0.9},
    "dfkdm": {"image_AUROC": 0.9},
    "fused": {"image_AUROC": 0.9, "pixel_AUROC": 0.9},
    "dfkdm_lake": {"image_AUROC": 0.7, "pixel_AUROC": 0.8},  # measured 0.79 / 0.90 on 2 processes
    "template_ssim": {"image_AUROC": 0.9, "pixel_AUROC": 0.9},
    "reconstruction": {"image_AUROC": 0.9, "pixel_AUROC": 0.9},
    "teacher_student": {"pixel_AUROC": 0.6},
}


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from anomalib_ext.data.synthetic import make_mvtec_dataset

    root = tmp_path_factory.mktemp("ddp_data")
    make_mvtec_dataset(
        root,
        category=CATEGORY,
        image_size=IMAGE_SIZE,
        n_train=TRAIN_IMAGES,
        n_test_good=TEST_GOOD,
        n_test_per_defect=TEST_PER_DEFECT,
    )
    return root


# what torch's c10d store prints when the port it picked was taken meanwhile (parallel test workers)
PORT_CLASH = ("Address already in use", "EADDRINUSE", "DistNetworkError")


@pytest.fixture(scope="module")
def two_processes(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every family fitted, tested (and TileOutlier predicted twice) by one 2-process torchrun launch."""
    out = tmp_path_factory.mktemp("ddp_run")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [str(REPO / "tests" / "distributed_worker.py"), str(out), str(data_root)]
    for _attempt in range(2):  # a second launch only when the first lost its rendezvous port to another process
        done = subprocess.run(command, cwd=REPO, env=_environment(), capture_output=True, text=True, timeout=900)  # noqa: S603
        if done.returncode == 0 or not any(sign in done.stderr for sign in PORT_CLASH):
            break
    errors = [line for line in done.stderr.splitlines() if "Error" in line or 'File "' in line]
    assert done.returncode == 0, "\n".join(errors[-40:]) + done.stderr[-2000:]
    return out


def _fit_one_process(family: str, data_root: Path, out: Path):  # noqa: ANN202
    from anomalib.engine import Engine

    model = build(family)
    engine = Engine(
        default_root_dir=out / family,
        logger=False,
        accelerator="cpu",
        devices=1,
        max_epochs=FAMILIES[family]["epochs"],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    engine.fit(model=model, datamodule=datamodule(data_root))
    return model


@pytest.fixture(scope="module")
def one_process(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("one_process")
    return {family: _fit_one_process(family, data_root, out) for family in FIT_ONLY}


def _rank_records(run: Path, family: str) -> list[dict]:
    return [json.loads((run / family / f"rank{rank}.json").read_text()) for rank in range(2)]


def _load_checkpoint(family: str, path: str):  # noqa: ANN202
    """A fresh model of the family with the 2-process checkpoint loaded (the checkpoint must hold it all)."""
    model = build(family)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def _raw_outputs(model, data_root: Path) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """The torch model's scores and maps on the test images (before the post-processor's normalisation), and the
    images' labels and masks."""
    loader_source = datamodule(data_root)
    loader_source.setup("test")
    scores, maps, labels, masks = [], [], [], []
    with torch.no_grad():
        for batch in loader_source.test_dataloader():
            output = model.model(model.pre_processor(batch.image) if model.pre_processor else batch.image)
            scores.append(output.pred_score.flatten())
            labels.append(batch.gt_label.flatten())
            masks.append(batch.gt_mask.reshape(len(batch.image), *batch.image.shape[-2:]))
            if output.anomaly_map is not None:
                maps.append(output.anomaly_map)
    return torch.cat(scores), torch.cat(maps) if maps else None, torch.cat(labels), torch.cat(masks)


def _close(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Equal within ``TOLERANCE`` relative to the larger magnitude; NaNs (thresholds never set) must match."""
    first, second = first.double(), second.double()
    if not torch.equal(first.isnan(), second.isnan()):
        return False
    first, second = first.nan_to_num(0.0), second.nan_to_num(0.0)
    if first.numel() == 0:
        return True
    scale = max(float(first.abs().max()), float(second.abs().max()), 1.0)
    return float((first - second).abs().max()) <= TOLERANCE * scale


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_rank_holds_the_whole_model(two_processes: Path, family: str) -> None:
    """Fitted on shards of the data, both ranks end with the same state (a per-rank fit would differ), and the
    test run on 2 processes detects the planted defects (``MIN_TEST_AUROC``)."""
    first, second = _rank_records(two_processes, family)
    assert first["digest"] == second["digest"]
    assert first["checkpoint"] and Path(first["checkpoint"]).is_file()
    for metric, floor in MIN_TEST_AUROC[family].items():
        assert first["metrics"][metric] >= floor, f"{family}: {metric} {first['metrics'][metric]:.3f} < {floor}"


@pytest.mark.parametrize("family", FIT_ONLY)
def test_fit_only_models_match_one_process(
    two_processes: Path, one_process: dict, data_root: Path, family: str
) -> None:
    """Same seed and data: the 2-process checkpoint equals the 1-process fit, tensor by tensor and score by score.

    The caps (TileOutlier's reservoir of 8 images, Dfkdm's 9 density points, TemplateSsim's 8 images per class)
    are below the 13 training images, so they must apply to the whole training set, not to each rank's half.
    """
    single = one_process[family].eval()
    merged = _load_checkpoint(family, _rank_records(two_processes, family)[0]["checkpoint"])
    single_state, merged_state = single.state_dict(), merged.state_dict()
    assert sorted(single_state) == sorted(merged_state)
    for name, value in single_state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert value.shape == merged_state[name].shape, name  # bank / statistics sizes
            assert _close(value, merged_state[name]), name
    if family == "tile_outlier":
        assert single.model.bank_tiles == merged.model.bank_tiles == 16 * 3  # 3 per grid position from 8 images
    if family == "template_ssim":
        assert merged.class_names == single.class_names != []
    single_scores, single_maps, _, _ = _raw_outputs(single, data_root)
    merged_scores, merged_maps, _, _ = _raw_outputs(merged, data_root)
    assert _close(single_scores, merged_scores)
    if single_maps is not None:
        assert merged_maps is not None
        assert _close(single_maps, merged_maps)


@pytest.mark.parametrize("family", GRADIENT)
def test_gradient_models_train_test_and_export_on_two_processes(
    two_processes: Path, data_root: Path, tmp_path: Path, family: str
) -> None:
    """The 2-process checkpoint holds a trained model (weights moved, statistics set): reloaded alone, it detects
    the planted defects as the 2-process test run did, and it exports."""
    from sklearn.metrics import roc_auc_score

    record = _rank_records(two_processes, family)[0]
    trained = _load_checkpoint(family, record["checkpoint"])
    untrained = build(family)
    moved = [
        name
        for name, value in trained.state_dict().items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.shape == untrained.state_dict()[name].shape
        and not torch.equal(value, untrained.state_dict()[name])
    ]
    assert moved, "no weight changed: the 2-process run did not train"
    scores, maps, labels, masks = _raw_outputs(trained, data_root)
    floors = MIN_TEST_AUROC[family]
    if "image_AUROC" in floors:
        auroc = roc_auc_score(labels.numpy(), scores.numpy())
        assert auroc >= floors["image_AUROC"], f"the reloaded checkpoint's image AUROC is {auroc:.3f}"
    if "pixel_AUROC" in floors:
        maps = torch.nn.functional.interpolate(maps.reshape(len(maps), 1, *maps.shape[-2:]), size=masks.shape[-2:])
        auroc = roc_auc_score(masks.flatten().int().numpy(), maps.flatten().numpy())
        assert auroc >= floors["pixel_AUROC"], f"the reloaded checkpoint's pixel AUROC is {auroc:.3f}"
    if family != "teacher_student":  # its export takes a minute on 2 cores; test_edge.py exports it
        onnx = trained.to_onnx(tmp_path, input_size=(IMAGE_SIZE, IMAGE_SIZE))
        assert Path(onnx).is_file()


def test_distributed_prediction_writes_every_image_once(two_processes: Path, data_root: Path) -> None:
    """Two predictions into one folder (the second resumes): each test image appears exactly once."""
    folder = two_processes / "predictions"
    lines = (folder / "predictions.jsonl").read_text().splitlines()
    paths = [json.loads(line)["image_path"] for line in lines]
    expected = {str(path) for path in (data_root / CATEGORY / "test").rglob("*.png")}
    assert len(paths) == len(set(paths)) == len(expected)
    assert set(paths) == expected
    assert not list(folder.glob("part-rank*.jsonl"))


def test_merge_predictions_keeps_each_image_once(tmp_path: Path) -> None:
    """A killed run's parts (a repeat, a half-written line) merge into one record per image; merging is idempotent."""
    from anomalib_ext.prediction import merge_predictions, written_paths

    def record(name: str) -> str:
        return json.dumps({"image_path": name, "pred_score": 0.5, "pred_label": False}) + "\n"

    (tmp_path / "predictions.jsonl").write_text(record("a.png"))
    (tmp_path / "part-rank00000.jsonl").write_text(record("b.png") + record("a.png") + '{"image_path": "c.p')
    (tmp_path / "part-rank00001.jsonl").write_text(record("b.png") + record("d.png"))
    assert written_paths(tmp_path) == {"a.png", "b.png", "d.png"}
    for _ in range(2):
        merged = merge_predictions(tmp_path)
        names = [json.loads(line)["image_path"] for line in merged.read_text().splitlines()]
        assert names == ["a.png", "b.png", "d.png"]
    assert not list(tmp_path.glob("part-*"))


def test_models_and_callbacks_pickle_for_ddp_spawn(tmp_path: Path) -> None:
    """``ddp_spawn`` pickles the model, datamodule and callbacks into each process: no local closures or lambdas."""
    from anomalib.cli import AnomalibCLI
    from lightning.pytorch.cli import SaveConfigCallback

    from anomalib_ext.augment.histaugan import HistAuGAN
    from anomalib_ext.prediction import PredictionWriter

    objects = [build(family) for family in ("template_ssim", "reconstruction", "teacher_student")]
    objects += [HistAuGAN(), PredictionWriter(tmp_path), datamodule(tmp_path)]
    cli = AnomalibCLI(
        [
            "train",
            "--config",
            str(REPO / "configs" / "tile_outlier" / "mvtec.yaml"),
            "--data.init_args.root",
            str(tmp_path),
        ],
        run=False,
    )
    objects += [
        callback for callback in cli.engine._cache.args["callbacks"] if isinstance(callback, SaveConfigCallback)
    ]
    for item in objects:
        pickle.loads(pickle.dumps(item))  # noqa: S301  (our own objects)


def test_ddp_spawn_cli_trains_tile_outlier(data_root: Path, tmp_path: Path) -> None:
    """The issue's first attempt plus tiny-data overrides: 2 spawned CPU processes, no device override.

    ``fit`` rather than the issue's ``train`` (fit + test): the same CLI, callbacks and spawn, one spawn fewer.
    """
    command = [str(Path(sys.executable).parent / "anomalib"), "fit", "--config"]
    command += [str(REPO / "configs" / "tile_outlier" / "mvtec.yaml"), "--trainer.accelerator", "cpu"]
    command += ["--trainer.devices", "2", "--trainer.strategy", "ddp_spawn", "--data.init_args.root", str(data_root)]
    command += ["--data.init_args.category", CATEGORY, "--data.init_args.train_batch_size", "4"]
    command += [f"--model.init_args.{key}={value}" for key, value in FAMILIES["tile_outlier"]["init"].items()]
    command += ["--model.init_args.image_size", str(IMAGE_SIZE), "--model.init_args.check_data", "false"]
    done = subprocess.run(command, cwd=tmp_path, env=_environment(), capture_output=True, text=True, timeout=600)  # noqa: S603
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "Overriding devices" not in output
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert checkpoints, output[-2000:]
    model = _load_checkpoint("tile_outlier", str(checkpoints[0]))
    assert model.model.bank_tiles == 16 * 3  # the whole training set's 8-image reservoir, not one rank's
    assert list(tmp_path.rglob("config.yaml"))  # the pickled SaveConfigCallback still wrote the config
