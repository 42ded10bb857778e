"""``anomalib-ext doctor``: one line per check, ``ok`` here; a broken torch/torchvision pair and missing weights are
``FAIL`` lines that name the fix, with exit status 1.

The broken pair is simulated as users met it: a ``torchvision`` whose import raises ``operator torchvision::nms does
not exist`` (a package of that name first on ``PYTHONPATH``). Every ``import anomalib_ext`` then fails, so this also
checks that the doctor still runs and that any other command says so in one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
NMS_ERROR = "operator torchvision::nms does not exist"


def _run(arguments: list[str], env_changes: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "ANOMALIB_EXT_VERBOSE"}
    env.update(env_changes or {})
    return subprocess.run(  # noqa: S603
        [str(BIN / "anomalib-ext"), *arguments], capture_output=True, text=True, env=env, timeout=900, check=False
    )


@pytest.fixture(scope="module")
def broken_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A torchvision that fails at import as a CUDA torchvision does next to a CPU torch, and an empty hub cache."""
    root = tmp_path_factory.mktemp("broken_env")
    fake = root / "site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"raise RuntimeError({NMS_ERROR!r})\n")
    (root / "empty_cache").mkdir()
    return {"PYTHONPATH": str(root / "site"), "HF_HUB_CACHE": str(root / "empty_cache")}


def test_doctor_passes_here() -> None:
    done = _run(["doctor"])
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for subject in ("torchvision", "anomalib ", "OpenVINO", "offline weights tf_efficientnet_lite0"):
        assert any(line.startswith("ok") and subject in line for line in lines), (subject, done.stdout)
    assert not any(line.startswith("FAIL") for line in lines), done.stdout
    assert any(line.startswith("info") and "CUDA" in line for line in lines), done.stdout
    assert lines[-1] == "all checks passed"
    assert "Warning" not in done.stderr, done.stderr


def test_doctor_names_the_fix_for_a_broken_pair_and_missing_weights(broken_env: dict[str, str]) -> None:
    done = _run(["doctor"], broken_env)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    pair = next(index for index, line in enumerate(lines) if line.startswith("FAIL") and "torchvision" in line)
    assert NMS_ERROR in lines[pair]
    fixes = "\n".join(lines[pair + 1 : pair + 5])
    assert "pip install torch==" in fixes
    assert "torchvision==" in fixes
    assert "--index-url https://download.pytorch.org/whl/" in fixes
    assert "--find-links" in fixes  # the way round an unreachable index
    weights = next(index for index, line in enumerate(lines) if line.startswith("FAIL") and "weights" in line)
    assert broken_env["HF_HUB_CACHE"] in lines[weights]
    assert "anomalib-ext-weights install" in lines[weights + 1]
    assert any(line.startswith("ok") and "OpenVINO" in line for line in lines), done.stdout
    assert lines[-1] == "3 check(s) failed"
    assert "Traceback" not in done.stdout + done.stderr


def test_other_commands_fail_in_one_line_on_a_broken_pair(broken_env: dict[str, str]) -> None:
    done = _run(["train", "--help"], broken_env)
    assert done.returncode == 1
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert NMS_ERROR in done.stderr
    assert "anomalib-ext doctor" in done.stderr
