"""``tools/benchmark.py`` run as a user runs it, for the tests of the benchmark."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "benchmark.py"


def run_benchmark(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """The benchmark in a fresh interpreter from the repository root, its output captured."""
    return subprocess.run(  # noqa: S603  (our own interpreter and script)
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )
