"""A wrong data root or a misspelt category stops training with one line and exit status 2 (no download, nothing
created), and ``latest`` keeps pointing at the newest run that wrote a checkpoint after a run fails."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "anomalib_ext" / "configs"
# every config of `anomalib train` (histaugan/ configs are for `python -m anomalib_ext.augment.histaugan`)
TRAIN_CONFIGS = sorted(path for path in CONFIGS.glob("*/*.yaml") if path.parent.name != "histaugan")
BIN = Path(sys.executable).parent
CHECKPOINT = Path("weights") / "lightning" / "model.ckpt"
# start-up records of anomalib and Lightning (quieted elsewhere); anything else but warnings counts as error output
INFO_RECORD = re.compile(r"^(\d{4}-\d\d-\d\d [\d:,]+ - \S+ - INFO - |GPU available|TPU available|HPU available|💡)")
WARNING_LINE = re.compile(r"^\S+:\d+: \w*Warning: ")


def _error_lines(stderr: str) -> list[str]:
    """stderr without blank lines, Python warnings (and the source line each shows) and start-up info records."""
    kept, lines = [], stderr.splitlines()
    skip_next = False
    for line in lines:
        if skip_next:
            skip_next = False
            continue
        if WARNING_LINE.match(line):
            skip_next = True
            continue
        if line.strip() and not INFO_RECORD.match(line):
            kept.append(line)
    return kept


def _assert_one_line_exit(code: int | None, stdout: str, stderr: str, path: Path, expected: str) -> None:
    """Exit status 2, and the only error output is one last line naming ``path`` and what was expected there."""
    output = stdout + stderr
    assert code == 2, output[-3000:]
    errors = _error_lines(stderr)
    assert len(errors) == 1, output[-3000:]  # a traceback is hundreds of lines
    assert errors[0] == [line for line in stderr.splitlines() if line.strip()][-1], output[-3000:]
    assert errors[0].startswith(f"error: {path}: "), errors[0]
    assert expected in errors[0], errors[0]
    assert "download" not in output.lower(), output[-3000:]
    assert "Traceback" not in output and "╭" not in output, output[-3000:]


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MVTec-layout category ``synthetic`` (64 px): enough to train TemplateSsim in seconds."""
    from anomalib_ext.data.synthetic import make_mvtec_dataset

    root = tmp_path_factory.mktemp("mvtec")
    make_mvtec_dataset(root, category="synthetic", image_size=64, n_train=12, n_test_good=4, n_test_per_defect=2)
    return root


def _cli_args(config: Path, *options: str) -> list[str]:
    return ["train", "--config", str(config), "--data.init_args.num_workers", "0", *options]


def _has_category(config: Path) -> bool:
    return "category" in yaml.safe_load(config.read_text())["data"]["init_args"]


# one case per config (each costs a model build): a misspelt category for every other MVTec-layout config
CONFIG_CASES = [
    (config, "category" if index % 2 and _has_category(config) else "root")
    for index, config in enumerate(TRAIN_CONFIGS)
]


@pytest.mark.parametrize(
    ("config", "case"), CONFIG_CASES, ids=[f"{c.parent.name}/{c.stem}-{k}" for c, k in CONFIG_CASES]
)
def test_every_shipped_config_stops_on_a_wrong_root_or_category(tmp_path: Path, config: Path, case: str) -> None:
    """``anomalib train`` (anomalib's CLI class, in this process: the imports are paid once): a missing root or a
    misspelt category exits 2 with the path in one line; no data folder is created and no results folder left."""
    from anomalib.cli.cli import AnomalibCLI

    from anomalib_ext.data.synthetic import make_mvtec_dataset

    results = tmp_path / "results"
    if case == "root":
        path = tmp_path / "missing"
        options, expected = ["--data.init_args.root", str(path)], "data root folder not found"
    else:
        (tmp_path / "data" / "bottle").mkdir(parents=True)
        path = tmp_path / "data" / "botle"
        options = ["--data.init_args.root", str(tmp_path / "data"), "--data.init_args.category", "botle"]
        expected = "did you mean 'bottle'?"
    if "single_template" in yaml.safe_load(config.read_text())["model"]["init_args"]:  # the model reads it at init
        template = make_mvtec_dataset(
            tmp_path / "template", image_size=32, n_train=1, n_test_good=1, n_test_per_defect=1
        )
        options += ["--model.init_args.single_template.path", str(next((template / "train" / "good").iterdir()))]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as stopped:
        AnomalibCLI(args=_cli_args(config, *options, "--default_root_dir", str(results)))
    _assert_one_line_exit(stopped.value.code, stdout.getvalue(), stderr.getvalue(), path, expected)
    assert not path.exists()
    # the Engine made this run's <Model>/<Data>/<category>/v<N> before the model could check: the model removed
    # every level it made again
    assert not results.exists(), sorted(results.rglob("*"))


def _run(entry_point: str, *arguments: str) -> subprocess.CompletedProcess:
    command = [str(BIN / entry_point), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)  # noqa: S603


@pytest.mark.parametrize(
    ("entry_point", "config"),
    [("anomalib", "reconstruction/ae"), ("anomalib-ext", "template_ssim/dice")],
)
def test_wrong_paths_through_the_user_commands(tmp_path: Path, entry_point: str, config: str) -> None:
    """The commands a user types: a misspelt category (an MVTec AD config) through ``anomalib train``, a missing
    dice root through ``anomalib-ext train`` (checked before the Engine makes any results folder)."""
    results = tmp_path / "results"
    if _has_category(CONFIGS / f"{config}.yaml"):
        (tmp_path / "data" / "bottle").mkdir(parents=True)
        options = ["--data.init_args.root", str(tmp_path / "data"), "--data.init_args.category", "botle"]
        path, expected = tmp_path / "data" / "botle", f"category folder not found under root {tmp_path / 'data'}"
    else:
        path, expected = tmp_path / "no" / "dice", "data root folder not found (expected"
        options = ["--data.init_args.root", str(path)]
    result = _run(entry_point, *_cli_args(CONFIGS / f"{config}.yaml", *options, "--default_root_dir", str(results)))
    _assert_one_line_exit(result.returncode, result.stdout, result.stderr, path, expected)
    assert not path.exists() and not (tmp_path / "no").exists()
    assert not results.exists(), sorted(results.rglob("*"))


def test_latest_stays_on_the_last_run_with_a_checkpoint(tmp_path: Path, mvtec_root: Path) -> None:
    """A run that trains, then two that fail after anomalib made their version folder: ``latest`` still holds the
    first run's checkpoint (the README's ``.../latest/weights/lightning/model.ckpt``), no empty folder is left."""
    results = tmp_path / "results"
    config = CONFIGS / "template_ssim" / "mvtec.yaml"
    common = ["--model.init_args.image_size", "64", "--default_root_dir", str(results)]
    data = ["--data.init_args.root", str(mvtec_root), "--data.init_args.category", "synthetic"]
    trained = _run("anomalib-ext", *_cli_args(config, *common, *data))
    assert trained.returncode == 0, trained.stderr[-3000:]
    runs = results / "TemplateSsim" / "MVTecAD" / "synthetic"
    assert (runs / "latest").resolve() == runs / "v0"

    # fails in the model's file check (prepare_data), after the Engine made v1 and moved latest to it
    broken = tmp_path / "broken"
    shutil.copytree(mvtec_root / "synthetic", broken / "synthetic")
    (broken / "synthetic" / "train" / "good" / "zz_broken.png").write_bytes(b"")
    data = ["--data.init_args.root", str(broken), "--data.init_args.category", "synthetic"]
    failed = _run("anomalib-ext", *_cli_args(config, *common, *data))
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "zz_broken.png: empty file" in failed.stderr
    assert (runs / "latest").resolve() == runs / "v0"
    assert (runs / "latest" / CHECKPOINT).is_file()
    assert sorted(path.name for path in runs.iterdir()) == ["latest", "v0"]


def test_settle_latest_keeps_a_failed_runs_files(tmp_path: Path) -> None:
    """A failed run that wrote files (logs, its config) keeps them; ``latest`` goes back to the checkpoint."""
    from anomalib_ext.workspace import point_latest, settle_latest

    runs = tmp_path / "runs"
    (runs / "v0" / CHECKPOINT).parent.mkdir(parents=True)
    (runs / "v0" / CHECKPOINT).write_bytes(b"checkpoint")
    (runs / "v1" / "weights" / "lightning").mkdir(parents=True)  # empty: removed
    (runs / "v2").mkdir()
    (runs / "v2" / "config.yaml").write_text("seed_everything: 0\n")
    point_latest(runs, runs / "v2")
    assert settle_latest(runs, runs / "v2") == runs / "v0"
    assert (runs / "latest").resolve() == (runs / "v0").resolve()
    assert (runs / "v2" / "config.yaml").is_file()
    settle_latest(runs, runs / "v1")  # latest no longer points at v1: v1 is removed, latest stays
    assert not (runs / "v1").exists()
    assert (runs / "latest").resolve() == (runs / "v0").resolve()


def test_settle_latest_leaves_another_runs_latest_alone(tmp_path: Path) -> None:
    """``latest`` moved on to a newer run (started later, maybe still training): a failed older run does not move it
    back; with no checkpoint anywhere it points at the newest version."""
    from anomalib_ext.workspace import point_latest, settle_latest

    runs = tmp_path / "runs"
    for version in ("v0", "v1"):
        (runs / version).mkdir(parents=True)
        (runs / version / "log.txt").write_text("x")
    point_latest(runs, runs / "v1")
    assert settle_latest(runs, runs / "v0") == (runs / "v1").resolve()
    assert settle_latest(runs, runs / "v1") == runs / "v1"
    assert (runs / "latest").resolve() == (runs / "v1").resolve()
