"""``anomalib-ext score``: a folder of images of any size into predictions.csv, bad files into errors.csv, resumable.

One TileOutlier is fitted on small synthetic images; the command then scores a nested folder holding normal images
of several sizes and modes, planted-defect images and three unreadable files. Its scores must be the scores
anomalib's own ``Engine.predict`` gives for the same files.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anomalib_ext.cli import main as cli_main
from tests.harness.runner import fit_small_tile_outlier

IMAGE_SIZE = 64
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TileOutlier fitted on 16 synthetic normal images, copied to a path that does not name its class."""
    return fit_small_tile_outlier(tmp_path_factory.mktemp("score_fit"), n_test_good=5)


@pytest.fixture(scope="module")
def images(checkpoint: Path) -> tuple[Path, list[Path], list[Path], list[Path], list[Path]]:
    """``root`` with ``normal/`` (normal images, some enlarged), ``odd/`` (non-square, grayscale JPEG),
    ``defects/<kind>/`` (planted defects) and ``junk/`` (unreadable files), nested at several depths."""
    from PIL import Image

    test = checkpoint.parent / "synthetic" / "test"
    root = checkpoint.parent / "to_score"
    normal, odd, defective = [], [], []
    resized = {1: ("normal/deep/twice.png", (128, 128), "RGB"), 3: ("normal/deep/x1.5.png", (96, 96), "RGB")}
    # distorted ones are not normal any more (a colour model sees grey as a colour defect): scored, not ranked
    resized |= {2: ("odd/wide.png", (96, 80), "RGB"), 4: ("odd/small_gray.jpg", (40, 48), "L")}
    for index, path in enumerate(sorted((test / "good").glob("*.png"))):
        name, size, mode = resized.get(index, (f"normal/{path.name}", None, "RGB"))
        image = Image.open(path).convert(mode)
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (image.resize(size) if size else image).save(target)
        (odd if name.startswith("odd") else normal).append(target)
    for path in sorted(test.glob("*/*.png")):
        if path.parent.name != "good":
            target = root / "defects" / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
            defective.append(target)
    junk = root / "junk"
    junk.mkdir()
    (junk / "empty.png").write_bytes(b"")
    (junk / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    whole = normal[0].read_bytes()
    (junk / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return root, normal, odd, defective, sorted(junk.iterdir())


def score(*args: str | Path) -> subprocess.CompletedProcess:
    command = [str(BIN / "anomalib-ext"), "score", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)  # noqa: S603


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def engine_scores(checkpoint: Path, paths: list[Path]) -> dict[str, float]:
    """anomalib's own ``Engine.predict`` over ``paths`` (one at a time, at their original size)."""
    from anomalib.data import PredictDataset
    from anomalib.engine import Engine
    from torch.utils.data import DataLoader

    from anomalib_ext.models import TileOutlier

    dataset = PredictDataset(paths[0])
    dataset.image_filenames = list(paths)
    engine = Engine(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=checkpoint.parent)
    model = TileOutlier.load_from_checkpoint(checkpoint, visualizer=False)
    batches = engine.predict(model=model, dataloaders=DataLoader(dataset, collate_fn=dataset.collate_fn))
    return {str(batch.image_path[0]): float(batch.pred_score) for batch in batches}


def run_cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """``anomalib-ext score ...`` through the CLI's own dispatcher, in this process (no second import of torch);
    the exit status, stdout and stderr."""
    with pytest.raises(SystemExit) as stopped:
        cli_main(["score", *map(str, args)])
    captured = capsys.readouterr()
    return int(stopped.value.code), captured.out, captured.err


@pytest.mark.usefixtures("keep_torch_threads")
def test_scores_a_folder_like_engine_predict_skips_bad_files_and_resumes(
    checkpoint: Path, images, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, normal, odd, defective, junk = images
    output = tmp_path / "scores"
    first = score("--ckpt_path", checkpoint, "--input", root, "--output", output, "--quiet")
    assert first.returncode == 0, first.stderr[-2000:]

    rows = read_rows(output / "predictions.csv")
    paths = [row["image_path"] for row in rows]
    good = {str(path) for path in normal + odd + defective}
    assert sorted(paths) == sorted(good), "every readable image exactly once"
    errors = {row["image_path"]: row["error"] for row in read_rows(output / "errors.csv")}
    assert set(errors) == {str(path) for path in junk}
    assert "empty" in errors[str(junk[0])] and "text file" in errors[str(junk[1])]
    assert "truncated" in errors[str(junk[2])]

    by_path = {row["image_path"]: row for row in rows}
    scores = {path: float(row["pred_score"]) for path, row in by_path.items()}
    assert all(0.0 <= value <= 1.0 for value in scores.values())
    worst_normal = max(scores[str(path)] for path in normal)
    least_defect = min(scores[str(path)] for path in defective)
    assert least_defect > worst_normal + 0.05, (worst_normal, least_defect)
    threshold = json.loads((output / "score.json").read_text())["normalized_image_threshold"]
    for path, value in scores.items():
        if abs(value - threshold) > 1e-6:  # anomalib labels a score above the normalised threshold anomalous
            assert by_path[path]["pred_label"] == str(int(value > threshold)), (path, value)
    assert {by_path[str(path)]["pred_label"] for path in defective} == {"1"}
    assert float(by_path[str(defective[0])]["raw_score"]) > float(by_path[str(normal[0])]["raw_score"])

    expected = engine_scores(checkpoint, normal + odd + defective)
    assert len(expected) == len(good)
    for path, value in expected.items():
        assert scores[path] == pytest.approx(value, abs=1e-5), path

    # the same command again (in this process, through the CLI's dispatcher): nothing new, nothing rewritten
    before = (output / "predictions.csv").read_bytes()
    status, out, _ = run_cli(capsys, "--ckpt_path", checkpoint, "--input", root, "--output", output, "--workers", "0")
    assert status == 0 and "scored 0 images" in out, out
    assert (output / "predictions.csv").read_bytes() == before

    # two rows deleted and a third cut short as by a killed run: exactly those three are scored again, with maps
    lines = before.decode().splitlines(keepends=True)
    dropped = [lines[2], lines[5], lines[-1]]
    kept = [line for line in lines if line not in dropped]
    (output / "predictions.csv").write_text("".join(kept) + lines[-1][: len(lines[-1]) // 2])
    resumed = score("--ckpt_path", checkpoint, "--input", root, "--output", output, "--maps", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "scored 3 images" in resumed.stdout, resumed.stdout
    rows_after = read_rows(output / "predictions.csv")
    assert sorted(row["image_path"] for row in rows_after) == sorted(good)
    rescored = {line.split(",")[0] for line in dropped}
    for row in rows_after:
        assert float(row["pred_score"]) == pytest.approx(scores[row["image_path"]], abs=1e-5)
    maps = sorted((output / "maps").rglob("*.png"))
    assert len(maps) == len(rescored) and len(list((output / "overlays").rglob("*.png"))) == len(rescored)


@pytest.mark.usefixtures("keep_torch_threads")
def test_wrong_paths_and_a_foreign_output_folder_are_one_line_errors(
    checkpoint: Path, images, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, normal, _, _, _ = images
    output = tmp_path / "scores"
    cases = {
        "checkpoint not found": ("--ckpt_path", tmp_path / "missing.ckpt", "--input", root, "--output", output),
        "no such file or folder": ("--ckpt_path", checkpoint, "--input", tmp_path / "nowhere", "--output", output),
    }
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    cases["holds no images"] = ("--ckpt_path", checkpoint, "--input", tmp_path / "empty", "--output", output)
    for expected, args in cases.items():
        status, _, err = run_cli(capsys, *args)
        assert status == 2 and expected in err and len(err.strip().splitlines()) == 1, err

    single = ("--input", normal[0], "--output", output, "--workers", "0", "--quiet")
    assert run_cli(capsys, "--ckpt_path", checkpoint, *single)[0] == 0
    other = tmp_path / "other.ckpt"  # another checkpoint of the same class: a different file
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    saved["epoch"] += 1
    torch.save(saved, other)
    status, _, err = run_cli(capsys, "--ckpt_path", other, *single)
    assert status == 2 and "another checkpoint" in err and len(err.strip().splitlines()) == 1, err
    assert run_cli(capsys, "--ckpt_path", other, *single, "--overwrite")[0] == 0
    assert json.loads((output / "score.json").read_text())["checkpoint"] == str(other)
    assert [row["image_path"] for row in read_rows(output / "predictions.csv")] == [str(normal[0])]
