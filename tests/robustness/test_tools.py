"""Bad input and earlier results against the tools: tools/benchmark.py, tools/fastdup_tiles.py, tools/train.py.

``tools/infer_openvino.py`` has its own tests (unreadable images reported, no overwrite); the conversion of image
modes it shares with anomalib is checked in ``test_validation.py``.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.robustness.files import BAD_FILES, rgb_pattern, write_gray16, write_modes, write_png
from tests.robustness.tools import load_tool


@pytest.fixture(scope="module")
def small_mvtec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from anomalib_ext.data.synthetic import make_mvtec_dataset

    root = tmp_path_factory.mktemp("tools_mvtec")
    make_mvtec_dataset(root, category="synthetic", image_size=32, n_train=4, n_test_good=2, n_test_per_defect=1)
    return root


def _broken_copy(small_mvtec: Path, tmp_path: Path, kind: str = "truncated_png") -> tuple[Path, Path]:
    root = tmp_path / "data"
    shutil.copytree(small_mvtec, root)
    bad = BAD_FILES[kind][0](root / "synthetic" / "train" / "good" / "zz_bad")
    return root, bad


# --- tools/fastdup_tiles.py ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audit_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    tool = load_tool("fastdup_tiles")
    folder = tmp_path_factory.mktemp("audit_in")
    for index in range(3):
        write_png(folder / f"good_{index}.png", rgb_pattern(32, seed=index))
    bad = {kind: writer(folder / f"bad_{kind}") for kind, (writer, _) in BAD_FILES.items()}
    modes = write_modes(folder / "modes", rgb_pattern(32, seed=9))
    modes["gray16"] = write_gray16(folder / "modes" / "gray16.png", rgb_pattern(32, seed=9)[..., 0])
    modes["tiny"] = write_png(folder / "tiny.png", rgb_pattern(1))  # smaller than the 2x2 grid
    out = tmp_path_factory.mktemp("audit_out") / "run"
    tool.audit(folder, out, 2, "torch", 0.2, 4)
    return out, bad, modes


@pytest.mark.parametrize("kind", sorted(set(BAD_FILES) - {"unsupported_extension"}))
def test_audit_reports_each_unreadable_file(audit_run, kind: str) -> None:
    out, bad, _ = audit_run
    skipped = (out / "skipped.txt").read_text()
    assert str(bad[kind]) in skipped, skipped
    assert str(bad[kind]) not in set(_column(out / "tile_scores.csv", "image"))


def test_audit_reads_every_mode_and_scores_are_finite(audit_run) -> None:
    out, _, modes = audit_run
    text = (out / "tile_scores.csv").read_text()
    for name in ("rgb", "gray", "rgba", "la", "palette", "jpeg", "bmp", "rgb16", "gray16"):
        assert str(modes[name]) in text, f"{name} image missing from tile_scores.csv"
    assert str(modes["tiny"]) in (out / "skipped.txt").read_text()
    scores = np.array([float(value) for value in _column(out / "tile_scores.csv", "score")])
    assert np.isfinite(scores).all()


def _column(path: Path, name: str) -> list[str]:
    with path.open() as handle:
        return [row[name] for row in csv.DictReader(handle)]


def test_audit_of_constant_duplicates_gives_finite_scores(tmp_path: Path) -> None:
    tool = load_tool("fastdup_tiles")
    for index in range(4):
        write_png(tmp_path / "in" / f"{index}.png", np.zeros((32, 32, 3), np.uint8))
    tool.audit(tmp_path / "in", tmp_path / "out", 2, "torch", 0.2, 4)
    scores = np.array([float(value) for value in _column(tmp_path / "out" / "tile_scores.csv", "score")])
    assert scores.size == 16
    assert np.isfinite(scores).all()


def test_audit_never_overwrites_an_earlier_run(tmp_path: Path) -> None:
    tool = load_tool("fastdup_tiles")
    for index in range(2):
        write_png(tmp_path / "in" / f"{index}.png", rgb_pattern(32, seed=index))
    earlier = write_png(tmp_path / "out" / "contact_sheet.png", rgb_pattern(8))
    (tmp_path / "out" / "tile_scores.csv").write_text("earlier run\n")
    before = earlier.read_bytes()
    try:
        tool.audit(tmp_path / "in", tmp_path / "out", 2, "torch", 0.2, 4)
    except SystemExit as error:
        assert "out" in str(error.code)
    assert (tmp_path / "out" / "tile_scores.csv").read_text() == "earlier run\n"
    assert earlier.read_bytes() == before


# --- tools/train.py ------------------------------------------------------------------------------------------


def _train_args(data: Path, checkpoint: Path) -> list[str]:
    return [
        *("--data_path", str(data), "--ckpt_path", str(checkpoint), "--epochs", "1", "--batch_size", "4"),
        *("--size", "32", "--latent_dim", "8", "--base_channels", "8", "--no_test"),
    ]


def test_train_names_a_bad_training_file(small_mvtec: Path, tmp_path: Path, capsys) -> None:
    tool = load_tool("train")
    root, bad = _broken_copy(small_mvtec, tmp_path)
    code = tool.main(_train_args(root / "synthetic", tmp_path / "out" / "model.ckpt"))
    assert code == 2
    assert str(bad) in capsys.readouterr().err


def test_train_missing_or_empty_train_good_is_a_one_line_error(small_mvtec: Path, tmp_path: Path, capsys) -> None:
    tool = load_tool("train")
    root = tmp_path / "data"
    shutil.copytree(small_mvtec, root)
    shutil.rmtree(root / "synthetic" / "train" / "good")
    assert tool.main(_train_args(root / "synthetic", tmp_path / "out" / "model.ckpt")) == 2
    assert "train/good" in capsys.readouterr().err


def test_train_never_overwrites_an_earlier_checkpoint(small_mvtec: Path, tmp_path: Path, capsys) -> None:
    tool = load_tool("train")
    checkpoint = tmp_path / "out" / "model.ckpt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"earlier run")
    code = tool.main(_train_args(small_mvtec / "synthetic", checkpoint))
    assert checkpoint.read_bytes() == b"earlier run"
    assert code == 2
    assert str(checkpoint) in capsys.readouterr().err


# --- tools/benchmark.py --------------------------------------------------------------------------------------


def test_benchmark_refuses_a_non_empty_out_folder(small_mvtec: Path, tmp_path: Path, capsys) -> None:
    tool = load_tool("benchmark")
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.md").write_text("earlier run\n")
    code = tool.main(["--dataset", str(small_mvtec / "synthetic"), "--model", "padim", "--out", str(out)])
    assert code == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "results.md").read_text() == "earlier run\n"


def test_benchmark_names_a_bad_dataset_file_before_running_cells(
    small_mvtec: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = load_tool("benchmark")
    root, bad = _broken_copy(small_mvtec, tmp_path)
    cells: list[Path] = []

    def fake_cell(cell_dir: Path, spec: dict, time_limit: float) -> dict:
        cells.append(cell_dir)
        return {"status": "error", "error": "not run", "dataset": "d", "model": "m"}

    monkeypatch.setattr(tool, "run_one_cell", fake_cell)
    monkeypatch.setattr(tool, "write_reports", lambda *args, **kwargs: [])
    code = tool.main(["--dataset", str(root / "synthetic"), "--model", "padim", "--out", str(tmp_path / "out")])
    assert not cells, "cells ran on a dataset with an unreadable file"
    assert code == 2
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "a failed check left an empty --out folder behind"


# --- tools/infer_openvino.py (its reader; the rest has its own tests) ----------------------------------------


@pytest.mark.parametrize("kind", sorted(set(BAD_FILES) - {"unsupported_extension"}))
def test_edge_reader_names_each_bad_file(tmp_path: Path, kind: str) -> None:
    tool = load_tool("infer_openvino")
    bad = BAD_FILES[kind][0](tmp_path / "bad")
    with pytest.raises(tool.InferenceError) as caught:
        tool.read_rgb(bad)
    assert str(bad) in str(caught.value)
