"""The dependency direction of README's layout section, checked on the source (every import, function bodies too).

``tools/`` -> ``anomalib_ext.models`` -> ``models/components`` (and ``augment/``) -> ``data/`` -> ``weights``:
components, ``augment/`` and ``data/`` import no model, ``data/`` imports nothing else of the package, no model
imports another model, no module reaches for another module's ``_private`` name, ``tools/infer_openvino.py``
imports neither torch nor anomalib, and there is no import cycle among the package's modules nor among
``tools/benchmarking``'s. Static (``ast``), so an import hidden in a function body counts like any other; the
checker itself is tested on a small planted tree that breaks every rule.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "anomalib_ext"
EDGE_TOOL = "tools.infer_openvino"
EDGE_FORBIDDEN = ("torch", "torchvision", "anomalib", "anomalib_ext", "lightning", "timm")
# what each layer of the package may import from the package (itself always included); the root package,
# ``cli`` and ``prediction`` sit above the models and may import anything
MAY_IMPORT: dict[str, set[str]] = {
    "version": set(),
    "weights": set(),
    "workspace": set(),
    "quiet": set(),
    "data": {"version"},
    "augment": {"data", "weights", "version"},
    "components": {"data", "augment", "weights", "version", "workspace", "quiet"},
    "family": {"components", "data", "augment", "weights", "version"},
    "models": {"family", "components"},
}


@dataclass
class SourceModule:
    """One ``.py`` file: its dotted name and every import in it (anywhere in the file)."""

    name: str
    path: str  # relative to the repository
    is_package: bool
    imports: list[tuple[str, int]] = field(default_factory=list)  # (dotted target, line)
    private_uses: list[tuple[str, int]] = field(default_factory=list)  # ("module._name", line)


def module_name(path: Path, root: Path) -> str:
    """``anomalib_ext/data/dice.py`` -> ``anomalib_ext.data.dice``; ``tools/benchmarking/cell.py`` ->
    ``benchmarking.cell`` (tools put their own folder on ``sys.path``); other tools -> ``tools.<name>``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if parts[:2] == ["tools", "benchmarking"]:
        parts = parts[1:]
    return ".".join(parts)


def source_files(root: Path) -> Iterator[Path]:
    yield from sorted((root / PACKAGE).rglob("*.py"))
    yield from sorted((root / "tools").rglob("*.py"))


def resolve_relative(module: SourceModule, level: int, target: str | None) -> str:
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    base = package[: len(package) - (level - 1)] if level > 1 else package
    return ".".join([*base, target] if target else base)


def parse_modules(root: Path) -> dict[str, SourceModule]:
    """Every module of the package and of ``tools/`` with its imports resolved to dotted names."""
    modules: dict[str, SourceModule] = {}
    trees: dict[str, ast.AST] = {}
    for path in source_files(root):
        name = module_name(path, root)
        modules[name] = SourceModule(name, path.relative_to(root).as_posix(), path.name == "__init__.py")
        trees[name] = ast.parse(path.read_text(), filename=str(path))
    for name, tree in trees.items():
        module = modules[name]
        module_aliases: dict[str, str] = {}  # local name -> internal module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    module.imports.append((alias.name, node.lineno))
                    if alias.name in modules:
                        module_aliases[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.ImportFrom):
                source = resolve_relative(module, node.level, node.module) if node.level else node.module or ""
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    if submodule in modules:
                        module.imports.append((submodule, node.lineno))
                        module_aliases[alias.asname or alias.name] = submodule
                        continue
                    if (source, node.lineno) not in module.imports:
                        module.imports.append((source, node.lineno))
                    if is_private(alias.name) and source in modules and source != name:
                        module.private_uses.append((f"{source}.{alias.name}", node.lineno))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and is_private(node.attr):
                owner = dotted(node.value)
                target = module_aliases.get(owner or "", owner if owner in modules else None)
                if target is not None and target != name:
                    module.private_uses.append((f"{target}.{node.attr}", node.lineno))
    return modules


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a chain of names and attributes, else ``None``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = dotted(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def internal_target(target: str, modules: dict[str, SourceModule]) -> str | None:
    """The module of ours that ``target`` names (``a.b.C`` -> ``a.b``), or ``None`` for a third-party one."""
    parts = target.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def layer(name: str) -> str | None:
    """The README layer of a package module; ``None`` above the models (the root, ``cli``, ``prediction``) and in
    tools."""
    parts = name.split(".")
    if parts[0] != PACKAGE or len(parts) == 1:
        return None
    if parts[1] in {"version", "weights", "workspace", "quiet", "data", "augment"}:
        return parts[1]
    if parts[1] == "models":
        if len(parts) == 2:
            return "models"
        return "components" if parts[2] == "components" else "family"
    return None


def family_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if layer(name) == "family" else None


def direction_violations(modules: dict[str, SourceModule]) -> list[str]:
    problems = []
    for module in modules.values():
        own = layer(module.name)
        if own is None:
            continue
        for target, line in module.imports:
            found = internal_target(target, modules)
            if found is None or found == module.name:
                continue
            theirs = layer(found)
            where = f"{module.path}:{line}"
            if theirs is None:
                problems.append(f"{where}: {module.name} ({own}) imports {found}, which imports every model")
            elif theirs == "family" and own == "family" and family_of(found) != family_of(module.name):
                problems.append(f"{where}: model {module.name} imports another model, {found}")
            elif theirs != own and theirs not in MAY_IMPORT[own]:
                problems.append(f"{where}: {module.name} ({own}) imports {found} ({theirs})")
    return problems


def private_violations(modules: dict[str, SourceModule]) -> list[str]:
    return [
        f"{module.name}:{line}: uses another module's private name {used}"
        for module in modules.values()
        for used, line in module.private_uses
    ]


def edge_tool_violations(modules: dict[str, SourceModule]) -> list[str]:
    module = modules[EDGE_TOOL]
    return [
        f"{module.path}:{line}: imports {target}"
        for target, line in module.imports
        if target.split(".")[0] in EDGE_FORBIDDEN
    ]


def import_cycles(modules: dict[str, SourceModule], prefix: str) -> list[list[str]]:
    """Strongly connected groups of more than one module (or a module importing itself) among ``prefix*``."""
    graph = {
        name: sorted(
            {
                found
                for target, _ in module.imports
                if (found := internal_target(target, modules)) is not None and found.startswith(prefix)
            }
        )
        for name, module in modules.items()
        if name.startswith(prefix)
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for neighbour in graph.get(node, []):
            if neighbour not in index:
                visit(neighbour)
                low[node] = min(low[node], low[neighbour])
            elif neighbour in on_stack:
                low[node] = min(low[node], index[neighbour])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, []):
                cycles.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return cycles


@pytest.fixture(scope="module")
def modules() -> dict[str, SourceModule]:
    return parse_modules(REPO)


def test_dependencies_point_one_way(modules: dict[str, SourceModule]) -> None:
    assert direction_violations(modules) == []


def test_no_module_uses_another_modules_private_names(modules: dict[str, SourceModule]) -> None:
    assert private_violations(modules) == []


def test_no_import_cycles(modules: dict[str, SourceModule]) -> None:
    assert import_cycles(modules, f"{PACKAGE}.") == []
    assert import_cycles(modules, "benchmarking") == []


def test_edge_tool_imports_neither_torch_nor_anomalib(modules: dict[str, SourceModule]) -> None:
    assert edge_tool_violations(modules) == []
    script = (
        "import runpy, sys\n"
        f"runpy.run_path({str(REPO / 'tools' / 'infer_openvino.py')!r}, run_name='not_main')\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {EDGE_FORBIDDEN!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)  # noqa: S603
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_checks_catch_planted_violations(tmp_path: Path) -> None:
    """A tree that breaks each rule once: every rule must name its break (a checker that passes everything fails)."""
    files = {
        "anomalib_ext/__init__.py": "from anomalib_ext import models\n",
        "anomalib_ext/weights.py": "",
        "anomalib_ext/version.py": "",
        "anomalib_ext/data/__init__.py": "",
        "anomalib_ext/data/dice.py": "def late():\n    from anomalib_ext.models.components import base\n",
        "anomalib_ext/models/__init__.py": "from .alpha import Alpha\n",
        "anomalib_ext/models/components/__init__.py": "",
        "anomalib_ext/models/components/base.py": "from anomalib_ext.data import dice\n_hidden = 1\n",
        "anomalib_ext/models/alpha/__init__.py": "from anomalib_ext.models.beta import torch_model\n",
        "anomalib_ext/models/beta/__init__.py": "",
        "anomalib_ext/models/beta/torch_model.py": (
            "from anomalib_ext.models.components import base\nvalue = base._hidden\n"
        ),
        "tools/infer_openvino.py": "def run():\n    import torch\n",
        "tools/benchmarking/__init__.py": "",
        "tools/benchmarking/cell.py": "from benchmarking.speed import x\n",
        "tools/benchmarking/speed.py": "def y():\n    from benchmarking.cell import z\n",
    }
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(textwrap.dedent(text))
    planted = parse_modules(tmp_path)
    direction = "\n".join(direction_violations(planted))
    assert "anomalib_ext.data.dice (data) imports anomalib_ext.models.components.base (components)" in direction
    assert "model anomalib_ext.models.alpha imports another model, anomalib_ext.models.beta.torch_model" in direction
    assert private_violations(planted) == [
        "anomalib_ext.models.beta.torch_model:2: uses another module's private name "
        "anomalib_ext.models.components.base._hidden"
    ]
    assert edge_tool_violations(planted) == ["tools/infer_openvino.py:2: imports torch"]
    cycle = ["anomalib_ext.data.dice", "anomalib_ext.models.components.base"]
    assert import_cycles(planted, "anomalib_ext.") == [cycle]
    assert import_cycles(planted, "benchmarking") == [["benchmarking.cell", "benchmarking.speed"]]
