"""tools/benchmark.py: arguments, the dice protocol (anomalib_ext.data.Dice), fault isolation and exit status,
progress, seeds, validation draws, the speed routine, studies and reports.

Synthetic data only. The end-to-end runs with OpenVINO exports (``--quick``, ``--export-precision``) are in
tests/test_benchmark_openvino.py, so that pytest-xdist, which gives a worker whole files, runs them beside these.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.harness.benchmark_runs import REPO, run_benchmark

sys.path.insert(0, str(REPO / "tools"))

from benchmarking import report, speed, studies  # noqa: E402
from benchmarking.specs import SpecError, parse_dataset, parse_model, resolve_config_family  # noqa: E402


# ------------------------------------------------------------------------------------------------ specs
@pytest.mark.parametrize("name", ["padim", "patchcore", "stfpm", "dfkde", "dfm"])
def test_short_names_build_anomalib_models_on_the_offline_backbone(name: str) -> None:
    """Each short name a user types gives anomalib's model of that name, built offline on the pretrained backbone
    whose weights are on disk, with feature layers that exist in that backbone (a name timm does not know, or a
    backbone whose weights would be downloaded, fails here)."""
    import anomalib.models
    import timm
    import torch

    from anomalib_ext.weights import ensure_pretrained

    spec = parse_model(name)
    model_class = getattr(anomalib.models, spec.class_path.rsplit(".", 1)[1])
    assert spec.class_path.startswith("anomalib.models.") and model_class.__name__.lower() == name
    backbone = spec.init_args["backbone"]
    ensure_pretrained(backbone)  # the offline weights: anything else would need the network
    layers = spec.init_args.get("layers") or [spec.init_args["layer"]]
    trunk = timm.create_model(backbone, features_only=True, pretrained=False)
    assert set(layers) <= {info["module"] for info in trunk.feature_info.get_dicts()}, layers
    pretrained_stem = timm.create_model(backbone, pretrained=True, features_only=True).conv_stem.weight
    model = model_class(**spec.init_args)
    stems = [module.conv_stem.weight for module in model.modules() if hasattr(module, "conv_stem")]
    assert any(torch.equal(stem, pretrained_stem) for stem in stems), "the model does not use the pretrained trunk"


def test_model_options_label_and_class_path() -> None:
    spec = parse_model("small=padim:{n_features: 20, layers: [blocks.1, blocks.2]}")
    assert spec.label == "small"
    assert spec.init_args["n_features"] == 20
    assert spec.init_args["layers"] == ["blocks.1", "blocks.2"]
    assert spec.init_args["backbone"] == "tf_efficientnet_lite0"  # defaults kept
    spec = parse_model("anomalib.models.Dfm:{layer: blocks.4}")
    assert (spec.label, spec.init_args["layer"]) == ("dfm", "blocks.4")


def test_config_file_takes_the_model_section_and_ignores_data(tmp_path: Path) -> None:
    config = tmp_path / "mvtec.yaml"
    config.write_text(
        textwrap.dedent(
            """
            data:
              class_path: anomalib.data.MVTecAD
              init_args: {root: /nowhere, category: bottle}
            model:
              class_path: anomalib.models.Dfm
              init_args: {backbone: tf_efficientnet_lite0, layer: blocks.6}
            trainer: {max_epochs: 3, accelerator: gpu}
            """
        )
    )
    spec = parse_model(str(config))
    assert spec.class_path == "anomalib.models.Dfm"
    assert spec.init_args == {"backbone": "tf_efficientnet_lite0", "layer": "blocks.6"}
    assert spec.trainer == {"max_epochs": 3}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("no_such_model", "unknown model 'no_such_model'"), ("padim:{n_features: [1,", "not a YAML mapping")],
)
def test_bad_model_arguments_say_what_is_wrong(text: str, fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment.replace("[", r"\[")):
        parse_model(text)


def test_config_family_picks_the_dataset_config_or_falls_back_to_mvtec() -> None:
    assert resolve_config_family("template_ssim", "dice", "dice").name == "dice.yaml"
    assert resolve_config_family("tile_outlier", "dice", "my_dice").name == "mvtec.yaml"  # no dice config
    with pytest.raises(SpecError, match="pass the config file explicitly"):
        resolve_config_family("dfkdm", "dice", "dice")  # backbone.yaml or lake.yaml: the user must choose


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        parse_model(str(tmp_path / "missing.yaml"))


def test_dataset_layouts_are_detected(mvtec_root: Path, dice_root: Path, tmp_path: Path) -> None:
    assert parse_dataset(str(mvtec_root / "synthetic")).kind == "mvtec"
    assert parse_dataset(str(dice_root)).kind == "dice"
    (tmp_path / "good").mkdir()
    assert parse_dataset(f"mine={tmp_path}:{{image_size: 64}}").to_dict() == {
        "label": "mine",
        "kind": "folder",
        "path": str(tmp_path.resolve()),
        "options": {"image_size": 64},
    }
    with pytest.raises(SpecError, match="unknown layout"):
        parse_dataset(str(tmp_path / "good"))
    with pytest.raises(SpecError, match="is not a directory"):
        parse_dataset(str(tmp_path / "absent"))


# ------------------------------------------------------------------------------------------ dice protocol
def _dice_without_test(dice_root: Path, tmp_path: Path, copy_train: bool = False) -> Path:
    """Like the real dice set: train/good/<class>/ and val/anomalous/, no test/ (links unless copied)."""
    import shutil

    source = tmp_path / "dice"
    source.mkdir()
    if copy_train:
        shutil.copytree(dice_root / "train", source / "train")
    else:
        (source / "train").symlink_to(dice_root / "train", target_is_directory=True)
    (source / "val").symlink_to(dice_root / "val", target_is_directory=True)
    return source


def test_dice_options_sessions_and_train_cap(dice_root: Path, tmp_path: Path) -> None:
    from anomalib_ext.data import Dice
    from anomalib_ext.data.dice import session_from_path

    source = _dice_without_test(dice_root, tmp_path)
    tables = Dice(
        root=source,
        holdout_sessions=["16_09_21"],
        val_sessions=["25_10_21"],
        max_train_per_class=3,
        val_split_ratio=0.5,
    ).split_samples()
    train, val, test = tables["train"], tables["val"], tables["test"]
    test_normals, val_normals = test[test.label_index == 0], val[val.label_index == 0]
    assert len(test_normals) and {session_from_path(p) for p in test_normals.image_path} == {"16_09_21"}
    assert len(val_normals) and {session_from_path(p) for p in val_normals.image_path} == {"25_10_21"}
    assert train.groupby("class_name").size().max() == 3
    assert train.class_name.nunique() == 11
    assert not set(train.image_path) & (set(val.image_path) | set(test.image_path))
    assert not set(val.image_path) & set(test.image_path)
    bright = Dice(root=source, holdout_sessions=["16_09_21"], train_sessions=["25_10_21", "26_01_22"]).split_samples()
    assert len(bright["train"]) and set(bright["train"].session) == {"25_10_21", "26_01_22"}
    # the same test and validation as without the option: only training loses the other sessions
    plain = Dice(root=source, holdout_sessions=["16_09_21"]).split_samples()
    assert list(bright["test"].image_path) == list(plain["test"].image_path)
    assert list(bright["val"].image_path) == list(plain["val"].image_path)
    assert set(bright["train"].image_path) < set(plain["train"].image_path)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"val_sessions": "16_09_21"}, "val_sessions must be a list"),
        ({"holdout_sessions": ["sept"]}, "holdout_sessions must be a list"),
        ({"max_train_per_class": 0}, "max_train_per_class must be a positive integer"),
        ({"val_sessions": ["01_01_20"]}, "no training-pool normal of val_sessions"),
        ({"train_sessions": ["01_01_20"]}, "no training normal of train_sessions"),
        ({"train_sessions": "25_10_21"}, "train_sessions must be a list"),
    ],
)
def test_dice_rejects_bad_options(dice_root: Path, options: dict, fragment: str) -> None:
    from anomalib_ext.data import Dice

    with pytest.raises(ValueError, match=fragment):
        Dice(root=dice_root, **options).split_samples()


def test_dice_keeps_copies_of_test_images_out_of_train_and_validation(dice_root: Path, tmp_path: Path) -> None:
    """The real set repeats images byte for byte across sessions: a held-out image must not be trained on."""
    import shutil

    from anomalib_ext.data import Dice
    from anomalib_ext.data.duplicates import file_digest

    source = _dice_without_test(dice_root, tmp_path, copy_train=True)
    for image in sorted((source / "train" / "good").rglob("*_16_09_21_*")):
        for session in ("25_10_21", "26_01_22"):
            shutil.copy(image, image.with_name(f"copy_{image.stem.replace('16_09_21', session)}{image.suffix}"))
    tables = Dice(root=source, holdout_sessions=["16_09_21"]).split_samples()
    digests = {name: {file_digest(path) for path in table.image_path} for name, table in tables.items()}
    assert digests["test"] and not digests["test"] & (digests["train"] | digests["val"])


def test_benchmark_names_an_unknown_dataset_option(dice_root: Path, tmp_path: Path, capsys) -> None:
    import benchmark

    code = benchmark.main(["--dataset", f"{dice_root}:{{train_per_clas: 3}}", "--out", str(tmp_path / "o")])
    assert code == benchmark.EXIT_USAGE
    assert "unknown option(s) ['train_per_clas']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_edge_tool_suffixes_equal_the_package_list() -> None:
    """tools/infer_openvino.py must stay free of torch/anomalib, so it keeps a copy of the list."""
    import infer_openvino

    from anomalib_ext.data.validation import IMAGE_SUFFIXES

    assert infer_openvino.IMAGE_SUFFIXES == IMAGE_SUFFIXES


# ------------------------------------------------------------------------------------------ speed, studies
def test_speed_routine_reports_threads_and_load_and_clamps_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Images/s is the timed calls over the time they took (a fake clock: 0.25 s per call), the load is the one
    read at timing, the scores are the model's own, and every input is clamped to [0, 1]."""
    import torch

    seen = []

    class Model(torch.nn.Module):
        def forward(self, image: torch.Tensor):  # noqa: ANN202
            seen.append(image)
            clock.now += 0.25
            return type("Out", (), {"pred_score": image.mean(dim=(1, 2, 3))})()

    clock = type("Clock", (), {"now": 100.0})()
    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock.now)
    monkeypatch.setattr(speed.os, "getloadavg", lambda: (3.25, 9.0, 9.0))
    images = [torch.full((3, 8, 8), 1.0000001), torch.full((3, 8, 8), -0.5)] * 3
    result = speed.torch_speed(Model(), images, threads=1)
    assert result["torch_threads"] == 1
    assert result["torch_load_average_1min"] == 3.25
    assert result["torch_images_per_s"] == pytest.approx(len(images) / (0.25 * len(images)))
    assert result["torch_scores"] == pytest.approx([1.0, 0.0] * 3)  # the clamped images' means, in order
    assert len(seen) == speed.WARMUP_CALLS + len(images)  # same warm-up for every model
    assert all(float(image.max()) <= 1.0 and float(image.min()) >= 0.0 for image in seen)


class SeededModel:
    """Stands in for a model class with its own ``seed`` (TemplateSsim's sampler)."""

    def __init__(self, seed: int | None = None, image_size: tuple[int, int] | None = None) -> None:
        self.seed, self.image_size = seed, image_size


def test_model_builder_gives_the_run_seed_to_a_model_seed_unless_set() -> None:
    from benchmarking.builders import build_model

    spec = {"class_path": f"{__name__}.SeededModel", "init_args": {}}
    model = build_model(spec, 64, seed=3)
    assert (model.seed, model.image_size) == (3, (64, 64))
    assert build_model({**spec, "init_args": {"seed": 7}}, None, seed=3).seed == 7


def test_studies_expand_cells() -> None:
    datasets = [{"label": "d", "kind": "mvtec", "path": "/x", "options": {}}]
    models = [{"label": "dfkdm", "class_path": "anomalib_ext.models.Dfkdm", "init_args": {}}]
    _, augmented = studies.expand("augmentation", datasets, models, {"augmented_views": 4})
    assert [model["label"] for model in augmented] == [f"dfkdm+{name}" for name in studies.augmentation.AUGMENTATIONS]
    assert augmented[0]["train_views"] == 1 and augmented[1]["train_views"] == 4
    scaled, _ = studies.expand("scaling", datasets, models, {"train_counts": [4, 8]})
    assert [(d["label"], d["train_images"]) for d in scaled] == [("d@4", 4), ("d@8", 8)]
    cut, _ = studies.expand("fewshot", datasets, models, {"train_counts": [0, 10]})
    assert [(d["label"], d["fewshot_normals"], d["scaling_of"]) for d in cut] == [("d@all", 0, "d"), ("d@10", 10, "d")]
    with pytest.raises(ValueError, match="MVTec or folder"):
        studies.expand("fewshot", [{**datasets[0], "kind": "dice"}], models, {"train_counts": [10]})


def test_fewshot_study_cuts_the_normals_with_the_seed_before_the_validation_split(mvtec_root: Path) -> None:
    """Each seed draws its own N normals; anomalib's split then holds out a fifth of those N; the test set stays."""
    from benchmarking.builders import build_datamodule
    from benchmarking.cell import setup_datamodule

    def split(count: int, seed: int) -> tuple[set[str], set[str], set[str]]:
        dataset = {"label": "d", "kind": "mvtec", "path": str(mvtec_root / "synthetic"), "options": {}}
        [cut], _ = studies.expand("fewshot", [dataset], [], {"train_counts": [count]})
        datamodule = build_datamodule(cut, seed, 8)
        setup_datamodule(datamodule, seed, {}, cut)
        val_normals = datamodule.val_data.samples
        val_normals = val_normals[val_normals.label_index == 0]
        return tuple(  # type: ignore[return-value]
            {Path(path).name for path in table.image_path}
            for table in (datamodule.train_data.samples, val_normals, datamodule.test_data.samples)
        )

    full_train, full_val, full_test = split(0, 0)
    assert len(full_train) + len(full_val) > 20  # count 0: every normal (32 here)
    train, val, test = split(10, 0)
    # cut first, split second: 10 normals in all, 8 to train and 2 held out (1 normal + 1 turned synthetic)
    assert (len(train), len(val)) == (8, 1)
    assert train.isdisjoint(val)
    assert test == full_test
    assert split(10, 0)[0] == train  # the same seed draws the same normals
    other_train, other_val, _ = split(10, 1)
    assert other_train | other_val != train | val  # another seed, another draw (10 of 32 normals)


def test_fewshot_study_reports_each_count_against_full_data(mvtec_root: Path, tmp_path: Path) -> None:
    """Through the benchmark command: one cell per count, labelled <dataset>@N and @all, and the study's table."""
    out = tmp_path / "fewshot"
    completed = run_benchmark(
        *("--dataset", f"d={mvtec_root / 'synthetic'}", "--model", "dfm", "--study", "fewshot"),
        *("--train-counts", "10", "0", "--no-openvino", "--visuals", "0", "--speed-images", "2", "--out", str(out)),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = {row["dataset"]: row for row in csv.DictReader((out / "results.csv").open())}
    assert sorted(rows) == ["d@10", "d@all"]
    assert int(rows["d@10"]["n_train"]) + int(rows["d@10"]["n_val"]) == 10
    assert int(rows["d@all"]["n_train"]) + int(rows["d@all"]["n_val"]) == 32
    section = (out / "results.md").read_text().split("## Study: few training normals")[1]
    # 12 of 20 test images are anomalous: flagging every one scores F1 2 * 0.6 / 1.6 = 0.750
    assert "| d | dfm | 10 | 1 | 8 / 2 |" in section and "| 0.750 |" in section
    assert "| d | dfm | all | 1 | 26 / 6 |" in section
    few = next(line for line in section.splitlines() if line.startswith("| d | dfm | 10 |"))
    assert few.count(" (+") + few.count(" (-") == 3  # each figure's change from the full-data one


# ------------------------------------------------------------------------------------------------ report
def test_report_keeps_failed_cells_and_writes_every_file(tmp_path: Path) -> None:
    cells = tmp_path / "cells"
    good = {"dataset": "d", "model": "a", "status": "ok", "image_auroc": 0.9, "image_f1": 0.8, "fit_seconds": 1.0}
    good.update(torch_images_per_s=10.0, openvino_images_per_s=20.0, n_test=10, n_train=5, n_val=4)
    bad = {"dataset": "d", "model": "b", "status": "timeout", "error": "killed after the 5 s time limit"}
    for name, row in (("d__a/seed0", good), ("d__b/seed0", bad)):
        (cells / name).mkdir(parents=True)
        (cells / name / "result.json").write_text(json.dumps(row))
    rows = report.write_reports(tmp_path, ["# title"], order=["d__b/seed0", "d__a/seed0"])
    assert [row["model"] for row in rows] == ["b", "a"]
    table = (tmp_path / "results.md").read_text()
    assert "b (**timeout**: killed after the 5 s time limit)" in table
    assert "| a | 0.900 | 0.800 |" in table
    assert (tmp_path / "plots" / "accuracy_vs_openvino_d.png").stat().st_size > 0
    assert (tmp_path / "plots" / "bars_d.png").stat().st_size > 0
    assert len(list(csv.DictReader((tmp_path / "results.csv").open()))) == 2


def test_resume_refuses_settings_that_change_the_numbers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import benchmark

    settings = benchmark.settings_from(benchmark.parse_args(["--max-epochs", "3"]))
    (tmp_path / benchmark.MANIFEST).write_text(json.dumps({"settings": settings, "datasets": [], "models": []}))
    assert benchmark.main(["--resume", str(tmp_path), "--max-epochs", "5"]) == 2
    assert "max_epochs: was 3, now 5" in capsys.readouterr().err
    assert benchmark.main(["--resume", str(tmp_path / "elsewhere")]) == 2
    assert "not a benchmark results folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------- process isolation
FAULTY_MODELS = """
import time


class Broken:
    def __init__(self, **kwargs):
        raise RuntimeError("this model is broken on purpose")


class Hangs:
    def __init__(self, **kwargs):
        time.sleep(600)
"""


def test_failing_and_hung_cells_are_recorded_and_the_exit_status_is_1(mvtec_root: Path, tmp_path: Path) -> None:
    (tmp_path / "faulty_models.py").write_text(FAULTY_MODELS)
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    out = tmp_path / "out"
    completed = run_benchmark(
        "--dataset",
        str(mvtec_root / "synthetic"),
        "--model",
        "faulty_models.Broken",
        "--model",
        "faulty_models.Hangs",
        "--time-limit",
        "20",
        "--out",
        str(out),
        env=env,
    )
    assert completed.returncode == 1, completed.stderr[-3000:]
    rows = {row["model"]: row for row in csv.DictReader((out / "results.csv").open())}
    assert rows["broken"]["status"] == "error"
    assert "broken on purpose" in rows["broken"]["error"]
    assert rows["hangs"]["status"] == "timeout"
    # progress after each cell: done/total, elapsed and an estimate of the time left
    progress = [line for line in completed.stdout.splitlines() if line.startswith("progress:")]
    assert len(progress) == 2
    assert progress[0].startswith("progress: 1/2 cells,") and "ETA" in progress[0]
    assert "ETA 0.0 min (0 left" in progress[1]
    # the same folder is never reused silently
    again = run_benchmark("--dataset", str(mvtec_root / "synthetic"), "--out", str(out))
    assert again.returncode == 2
    assert "--resume" in again.stderr


def test_killing_a_cell_whose_process_group_already_ended_is_quiet() -> None:
    """A SIGTERM to every process (a container stop) ends the cell and the parent together; the parent's handler
    then kills a group that is gone, and must still leave its finished cells on disk instead of a traceback."""
    from benchmark import kill_process_group

    child = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)  # noqa: S603
    child.wait()
    kill_process_group(child)  # no ProcessLookupError


# ------------------------------------------------------------------------------------------- end to end
NEGATED_SCORES_MODEL = """
from anomalib.models import Padim

from anomalib_ext.weights import ensure_pretrained


class NegatedScores(Padim):
    \"\"\"The benchmark's ``padim``, fitted the same way, whose test-time scores and maps are negated: a benchmark
    that reads the model's scores must report 1 - PaDiM's AUROC for it.\"\"\"

    def __init__(self, pre_processor=True):
        ensure_pretrained("tf_efficientnet_lite0")
        layers = ["blocks.1", "blocks.2", "blocks.4"]
        super().__init__(backbone="tf_efficientnet_lite0", layers=layers, n_features=100, pre_processor=pre_processor)
        self.model.forward = self._negated_at_test_time(self.model.forward)

    def _negated_at_test_time(self, forward):
        def negated(images):
            output = forward(images)
            if self.model.training:
                return output
            return output._replace(pred_score=-output.pred_score, anomaly_map=-output.anomaly_map)

        return negated
"""


def test_dice_dataset_runs_through_dice_with_the_sessions_study(dice_root: Path, tmp_path: Path) -> None:
    """A dice-layout dataset is anomalib_ext.data.Dice with the benchmark's protocol; --study sessions adds the
    validation normals' scores per acquisition session. Its AUROC follows the model's scores: PaDiM detects the
    planted defects, and the same PaDiM with negated scores is reported at 1 - that AUROC.
    """
    sys.path.insert(0, str(REPO / "tools"))
    from benchmarking.builders import build_dice

    source = _dice_without_test(dice_root, tmp_path)  # like the real set: the protocol's session hold-out applies
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "negated_scores.py").write_text(NEGATED_SCORES_MODEL)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "modules"), env.get("PYTHONPATH")]))
    out = tmp_path / "out"
    completed = run_benchmark(
        *("--dataset", f"dice={source}", "--model", "padim", "--model", "negated=negated_scores.NegatedScores"),
        *("--study", "sessions", "--no-openvino", "--image-size", "64", "--speed-images", "4", "--visuals", "0"),
        *("--max-epochs", "1", "--out", str(out)),
        env=env,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = {row["model"]: row for row in csv.DictReader((out / "results.csv").open())}
    assert sorted(rows) == ["negated", "padim"]
    assert all(row["status"] == "ok" for row in rows.values()), [row["error"] for row in rows.values()]
    row = rows["padim"]
    # every image of the set is used once: training normals, validation and test (counted on disk)
    normals = list((source / "train" / "good").rglob("*.png"))
    anomalies = list((source / "val" / "anomalous").glob("*.png"))
    assert int(row["n_train"]) + int(row["n_val"]) + int(row["n_test"]) == len(normals) + len(anomalies)
    assert 0 < int(row["n_test_anomalous"]) < len(anomalies)
    assert 0 < int(row["n_test"]) - int(row["n_test_anomalous"]) < int(row["n_train"])
    aurocs = {name: float(rows[name]["image_auroc_raw"]) for name in rows}  # raw: no clamping ties
    assert aurocs["padim"] > 0.8, aurocs
    assert aurocs["negated"] == pytest.approx(1 - aurocs["padim"], abs=1e-3), aurocs
    tables = build_dice(source, {}, seed=0).split_samples()
    result = json.loads((out / "cells" / "dice__padim" / "seed0" / "result.json").read_text())
    by_session = result["sessions"]["validation_normals"]
    val_normals = tables["val"][tables["val"].label_index == 0]
    assert sum(entry["images"] for entry in by_session.values()) == len(val_normals)
    assert set(by_session) <= {"16_09_21", "17_11_21", "25_10_21", "26_01_22"}
    assert "## Study: validation normals per acquisition session" in (out / "results.md").read_text()


def test_lighting_study_splits_by_session(dice_root: Path, tmp_path: Path) -> None:
    """Every arm tests on the dark sessions only (their normals and every dark anomaly, also those Dice put in
    validation); the bright arms train on the bright sessions only; augmentations reach TeacherStudent as its own
    options and any other model as extra training views."""
    sys.path.insert(0, str(REPO / "tools"))
    import shutil

    from benchmarking.studies import lighting
    from lightning.pytorch.trainer.states import TrainerFn
    from torchvision.transforms import v2

    from anomalib_ext.data import Dice
    from anomalib_ext.data.dice import HOLDOUT_SESSIONS

    source = tmp_path / "dice"  # like the real set (no test/), with anomalies of a bright and a dark session
    (source / "val" / "anomalous").mkdir(parents=True)
    (source / "train").symlink_to(dice_root / "train", target_is_directory=True)
    for index, path in enumerate(sorted((dice_root / "val" / "anomalous").glob("*.png"))):
        name = path.name if index % 2 else path.name.replace("25_10_21", "17_11_21").replace("26_01_22", "17_11_21")
        shutil.copy(path, source / "val" / "anomalous" / name)
    datamodule = Dice(root=source, train_sessions=list(lighting.BRIGHT_SESSIONS), num_workers=0)
    datamodule.setup(TrainerFn.FITTING)
    samples = [data.samples for data in (datamodule.val_data, datamodule.test_data)]
    anomalies_before = {
        path
        for table in samples
        for path in table[(table.label_index == 1) & table.session.isin(HOLDOUT_SESSIONS)].image_path
    }
    lighting.apply_after_setup(datamodule, {"lighting_augmentation": None})
    test, val = datamodule.test_data.samples, datamodule.val_data.samples
    assert set(test.session) <= set(HOLDOUT_SESSIONS) and (test.label_index == 0).any()
    assert set(test[test.label_index == 1].image_path) == anomalies_before and anomalies_before
    assert not (val.session.isin(HOLDOUT_SESSIONS) & (val.label_index == 1)).any()
    assert set(datamodule.train_data.samples.session) <= set(lighting.BRIGHT_SESSIONS)
    assert test.attrs["task"] == val.attrs["task"]  # anomalib reads the task there

    student = {"class_path": "anomalib_ext.models.TeacherStudent", "init_args": {}, "histaugan_checkpoint": None}
    jitter = lighting.model_for_cell({**student, "lighting_augmentation": "jitter"})
    jittered = jitter["init_args"]["augmentation"]
    assert (jittered["color_jitter"], jittered["histaugan_checkpoint"]) == (lighting.JITTER, None)
    restyled = lighting.model_for_cell({**student, "lighting_augmentation": "histaugan", "histaugan_checkpoint": "g"})
    restyling = restyled["init_args"]["augmentation"]
    assert (restyling["color_jitter"], restyling["histaugan_checkpoint"], restyling["histaugan_p"]) == (0.0, "g", 0.5)
    assert "train_views" not in restyled and restyled["lighting_augmentation"] is None
    fit_only = {"class_path": "anomalib_ext.models.Dfkdm", "init_args": {}, "lighting_augmentation": "histaugan"}
    assert lighting.model_for_cell(fit_only)["train_views"] == lighting.VIEWS
    # the threshold is picked on validation images rendered as the light may shift: for every model
    for model in (student, fit_only):
        spec = lighting.model_for_cell(
            {**model, "lighting_augmentation": "jitter", "lighting_validation_augmentation": "jitter"}
        )
        arm = Dice(root=source, train_sessions=list(lighting.BRIGHT_SESSIONS), num_workers=0)
        lighting.apply_before_setup(arm, spec)
        assert isinstance(arm.val_augmentations.transforms[0], v2.ColorJitter)
        # TeacherStudent varies its training images itself; a fit-only model's training views are augmented
        assert (arm.train_augmentations is None) == (model is student)


def test_lighting_study_runs_four_arms_with_a_histaugan_trained_for_the_run(dice_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"  # the synthetic set's test/ holds dark-session normals and defects
    completed = run_benchmark(
        *("--dataset", f"dice={dice_root}", "--model", "dfkdm=configs/dfkdm/backbone.yaml", "--study", "lighting"),
        *("--histaugan-minutes", "0.05", "--no-openvino", "--image-size", "64", "--speed-images", "2"),
        *("--visuals", "0", "--max-epochs", "1", "--out", str(out)),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = {row["model"]: row for row in csv.DictReader((out / "results.csv").open())}
    assert sorted(rows) == sorted(f"dfkdm@{arm}" for arm in ("all", "bright", "bright+jitter", "bright+histaugan"))
    assert all(row["status"] == "ok" for row in rows.values()), [row["error"] for row in rows.values()]
    bright = int(rows["dfkdm@bright"]["n_train"])
    assert 0 < bright < int(rows["dfkdm@all"]["n_train"])
    assert int(rows["dfkdm@bright+jitter"]["n_train"]) == int(rows["dfkdm@bright+histaugan"]["n_train"]) == 4 * bright
    assert len({(row["n_test"], row["n_test_anomalous"]) for row in rows.values()}) == 1
    assert int(rows["dfkdm@all"]["n_test_anomalous"]) > 0 and float(rows["dfkdm@all"]["image_auroc"]) > 0.8
    assert (out / "histaugan" / "generator.pt").is_file() and (out / "histaugan" / "restyled_dice.png").is_file()
    report = (out / "results.md").read_text()
    assert "## Study: lighting shift" in report and "gap closed" in report
