"""Load the scripts under tools/ as modules (they are not part of the package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` as a module (loaded once per test session)."""
    path = TOOLS / f"{name}.py"
    key = f"_robustness_tool_{name}"
    if key in sys.modules:
        return sys.modules[key]
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))  # benchmark.py imports its sibling package ``benchmarking``
    spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module
