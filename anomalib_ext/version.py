"""The package's version, read from its installed metadata (``pyproject.toml`` is the one place it is written).

A source tree that was never installed has no metadata; then the version comes from the ``pyproject.toml`` beside
the package, and ``0+unknown`` when that is missing too. Imports nothing heavy: ``anomalib-ext --version`` and
the checkpoint stamp (``models/components/base.py``) read it.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

DISTRIBUTION = "anomalib-ext"
UNKNOWN_VERSION = "0+unknown"


def package_version() -> str:
    """The installed distribution's version, else the source tree's ``pyproject.toml`` version."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        text = pyproject.read_text() if pyproject.is_file() else ""
        found = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
        return found.group(1) if found else UNKNOWN_VERSION


def release_of(version_text: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string (``"0.4.0"`` -> ``(0, 4)``); ``None`` when it has none."""
    found = re.match(r"(\d+)\.(\d+)", version_text)
    return (int(found.group(1)), int(found.group(2))) if found else None


__version__ = package_version()
