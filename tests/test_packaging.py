"""What a user gets from ``pip install anomalib-ext``: the configs inside the wheel, and a wheel that trains.

The wheel test builds the wheel from this checkout, installs it (not ``-e``) into a fresh virtual environment
outside the checkout and trains a shipped config on synthetic data through ``anomalib-ext train``. The fresh
environment borrows torch, anomalib and the other dependencies from the test environment (a path entry, not a
reinstall of several GB), so what is tested is the wheel itself: its modules, configs, entry points and
metadata.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from anomalib_ext import cli

REPO = Path(__file__).resolve().parents[1]


def test_config_list_names_every_shipped_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.config_command(["list"]) == 0
    listed = capsys.readouterr().out.split()
    on_disk = sorted(f"{path.parent.name}/{path.stem}" for path in (REPO / "configs").glob("*/*.yaml"))
    assert listed == on_disk
    assert "tile_outlier/mvtec" in listed


def test_config_show_prints_the_file_and_unknown_names_list_the_known(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.config_command(["show", "tile_outlier/mvtec"]) == 0
    assert capsys.readouterr().out == (REPO / "configs" / "tile_outlier" / "mvtec.yaml").read_text()
    assert cli.config_command(["show", "recommended"]) == 0  # the README's first example
    assert capsys.readouterr().out == (REPO / "configs" / "fused" / "mvtec.yaml").read_text()
    with pytest.raises(SystemExit, match="no shipped config 'tile_outlier/nope'.*tile_outlier/mvtec"):
        cli.config_command(["show", "tile_outlier/nope"])


def test_shipped_configs_point_at_no_developer_path() -> None:
    for config in (REPO / "configs").glob("*/*.yaml"):
        assert "shared/data" not in config.read_text(), f"{config}: a user's dataset root must be set, not ours"


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)  # noqa: S603
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def test_wheel_installed_outside_the_checkout_trains_a_shipped_config(tmp_path: Path, mvtec_root: Path) -> None:
    wheels = tmp_path / "wheels"
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO), "-w", str(wheels)],
        tmp_path,
        env,
    )
    wheel = next(wheels.glob("anomalib_ext-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    # the dependencies come from this environment; its .pth files (our editable install) are not processed
    site_packages = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env
        ).stdout.strip()
    )
    (site_packages / "test_environment_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp_path, env)

    work = tmp_path / "user"  # a user's folder: no checkout, no configs/ beside it
    work.mkdir()
    location = _run([str(python), "-c", "import anomalib_ext; print(anomalib_ext.__file__)"], work, env).stdout
    assert location.strip().startswith(str(venv)), location
    listed = _run([str(venv / "bin" / "anomalib-ext"), "config", "list"], work, env).stdout.split()
    assert "tile_outlier/mvtec" in listed and "template_ssim/dice" in listed
    config = work / "my.yaml"
    config.write_text(
        _run([str(venv / "bin" / "anomalib-ext"), "config", "show", "tile_outlier/mvtec"], work, env).stdout
    )
    _run(
        [
            str(venv / "bin" / "anomalib-ext"),
            "train",
            "--config",
            str(config),
            "--data.init_args.root",
            str(mvtec_root),
            "--data.init_args.category",
            "synthetic",
            "--data.init_args.train_batch_size",
            "8",
            "--model.init_args.image_size",
            "64",
            "--model.init_args.tiling.tile_size",
            "16",
            "--data.init_args.num_workers",
            "0",
            "--default_root_dir",
            str(work / "results"),
        ],
        work,
        env,
    )
    assert list((work / "results").rglob("*.ckpt")), "anomalib-ext train wrote no checkpoint"
