"""Passes ``ANOMALIB_EXT_BROKEN_MODEL`` on to child processes (see tests/harness/broken.py); only on
``PYTHONPATH`` while that variable is set."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_anomalib_ext_broken", Path(__file__).resolve().parents[1] / "broken.py"
)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
_module.install_from_environment()
