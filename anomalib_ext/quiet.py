"""Quiet logs by default: one line per message, no warnings the user cannot act on, errors in one line.

Before this, every ``anomalib-ext`` command printed two FutureWarnings from anomalib's own imports, every log line
twice (anomalib's ``configure_logger`` gives the root logger ``basicConfig``'s handler *and* a Rich handler),
timm's "Loading pretrained weights from Hugging Face hub" while our weights load from disk, the ONNX exporter's
~700 per-initializer lines and NNCF's per-operation lines. Everything here is targeted: a warning by category and
message, a log record by logger and message, a third-party logger's INFO level for the duration of one step;
errors and our own warnings always show. ``ANOMALIB_EXT_VERBOSE=1`` (or ``--verbose`` anywhere on an
``anomalib-ext`` command line) turns every filter off.

Imports nothing heavy and nothing of the package: ``anomalib_ext/__init__`` calls :func:`quiet_library` before it
imports the models, ``anomalib-ext`` calls :func:`configure_cli` before anomalib's CLI, and the export code wraps
the exporter and NNCF in :func:`quiet_loggers`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

VERBOSE_ENV = "ANOMALIB_EXT_VERBOSE"
VERBOSE_FLAG = "--verbose"
PROGRAM = "anomalib-ext"
# anomalib's console format (anomalib.loggers.configure_logger): one line per record, greppable in a log file
LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"

# (category, message regex): deprecation notices raised inside anomalib's and Lightning's own code, whoever
# imports them; nothing a user of anomalib-ext can change
DEPENDENCY_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # anomalib's CFM and Dinomaly modules, imported by ``anomalib.models`` whatever model runs
    (FutureWarning, r"Importing from timm\.models\.layers is deprecated"),
    (FutureWarning, r"The anomalib\.models\.components\.dinov2 package is deprecated"),
    # Lightning's pytree helper on torch >= 2.10
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
)
# Lightning's warnings that are false alarms for anomaly models (``anomalib-ext`` commands only): fit-only models
# (memory bank, density, templates) have no optimiser, and every family keeps its pretrained backbone frozen
COMMAND_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (UserWarning, r"`LightningModule\.configure_optimizers` returned `None`"),
    (UserWarning, r"Found \d+ module\(s\) in eval mode at the start of training"),
)
# INFO records of Lightning's rank-zero logger about anomalib's set-up, not the user's run; that logger is the one
# of whichever Lightning package was imported last (lightning.pytorch, lightning.fabric or lightning_fabric)
LIGHTNING_RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
)
LIGHTNING_SETUP_INFO = (
    "💡 Tip: For seamless cloud logging",
    "The following callbacks returned in `LightningModule.configure_callbacks` will override",
)
# torch's C++-extension probe (runs when NNCF loads its torch backend): on a CPU machine it always says this
CUDA_PROBE_LOGGER = "torch.utils.cpp_extension"
CUDA_PROBE_MESSAGE = "No CUDA runtime is found"
# the ONNX exporter's INFO detail (one line per deduplicated initializer, folded constant, removed node)
EXPORTER_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx")
NNCF_LOGGER = "nncf"
# timm, while it loads our offline weights (anomalib_ext.weights) from the local hub cache
TIMM_LOGGERS = ("timm.models._builder", "timm.models._hub")
# the keys of the classification head that a ``features_only`` backbone does not have: their absence is expected
HEAD_KEY = re.compile(r"^(conv_head|bn2|classifier)\.")
UNEXPECTED_KEYS = re.compile(r"^Unexpected keys \((?P<keys>[^)]*)\) found while loading pretrained weights")

# compression types whose quantisation calibrates on the datamodule (anomalib's CompressionType)
CALIBRATED_COMPRESSION = ("INT8_PTQ", "INT8_ACQ")
DATA_ARGUMENT_EXAMPLE = "--data anomalib.data.MVTecAD --data.root DIR --data.category NAME"
# what stopped ``import anomalib_ext`` from importing the models, kept for ``anomalib-ext doctor``
import_failure: BaseException | None = None


def is_verbose() -> bool:
    """``ANOMALIB_EXT_VERBOSE`` set to anything but empty/``0``/``false``/``no``, or ``--verbose`` on the command
    line (read here too: the package is imported, and its import-time filters set, before ``anomalib-ext`` parses
    its arguments)."""
    if os.environ.get(VERBOSE_ENV, "").strip().lower() not in {"", "0", "false", "no"}:
        return True
    return VERBOSE_FLAG in sys.argv[1:] and sys.argv[1:2] != ["install"]


class _DropMessages(logging.Filter):
    """Drop records whose message starts with one of ``prefixes`` (unless verbose)."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return is_verbose() or not record.getMessage().startswith(self.prefixes)


class _OfflineWeightsFilter(logging.Filter):
    """timm's messages about our offline weights: "Loading pretrained weights from Hugging Face hub" (they come
    from the local cache: ``anomalib_ext.weights``), its safetensors note, and "Unexpected keys" when every key is
    the classification head that a ``features_only`` backbone does not have. Any other timm message shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        if is_verbose():
            return True
        message = record.getMessage()
        if record.levelno <= logging.INFO and ("Hugging Face hub" in message or "Safe alternative" in message):
            return False
        unexpected = UNEXPECTED_KEYS.match(message)
        if unexpected:
            keys = [key.strip() for key in unexpected.group("keys").split(",")]
            return not all(HEAD_KEY.match(key) for key in keys)
        return True


def _add_filter_once(logger: logging.Logger, log_filter: logging.Filter) -> None:
    if not any(type(existing) is type(log_filter) for existing in logger.filters):
        logger.addFilter(log_filter)


def _ignore_warnings(rules: tuple[tuple[type[Warning], str], ...]) -> None:
    for category, message in rules:
        warnings.filterwarnings("ignore", message=message, category=category)


def quiet_library() -> None:
    """What importing ``anomalib_ext`` quiets, whoever runs it (``anomalib train`` with our model, a script): the
    dependencies' deprecation notices, timm's messages about our offline weights, the CUDA probe. Handlers and
    levels are left as they are."""
    for name in TIMM_LOGGERS:
        _add_filter_once(logging.getLogger(name), _OfflineWeightsFilter())
    _add_filter_once(logging.getLogger(CUDA_PROBE_LOGGER), _DropMessages((CUDA_PROBE_MESSAGE,)))
    if not is_verbose():
        _ignore_warnings(DEPENDENCY_WARNINGS)


@contextmanager
def quiet_loggers(names: tuple[str, ...], level: int = logging.WARNING) -> Iterator[None]:
    """Raise ``names``' levels to ``level`` for the block (unless verbose): the ONNX exporter, NNCF. Warnings and
    errors still show; the levels are put back afterwards."""
    if is_verbose():
        yield
        return
    loggers = [logging.getLogger(name) for name in names]
    previous = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(level, logger.level))
    try:
        yield
    finally:
        for logger, old_level in zip(loggers, previous, strict=True):
            logger.setLevel(old_level)


def configure_console_logging(level: int | str = logging.INFO) -> None:
    """anomalib's ``configure_logger`` with one handler: anomalib adds a Rich handler next to ``basicConfig``'s, so
    every record printed twice. Same format and level; Lightning keeps its own handler."""
    logging.basicConfig(format=LOG_FORMAT, level=level)


def _split_verbose(arguments: list[str]) -> bool:
    """Remove ``--verbose`` from ``arguments`` (anomalib's parser does not know it, except ``install``'s own, which
    is left alone); True when it was there."""
    if arguments[:1] == ["install"]:
        return False
    found = VERBOSE_FLAG in arguments
    while VERBOSE_FLAG in arguments:
        arguments.remove(VERBOSE_FLAG)
    return found


def _option_values(arguments: list[str], name: str) -> list[str]:
    """The values of ``--name VALUE`` and ``--name=VALUE``."""
    values = []
    for index, argument in enumerate(arguments):
        if argument == name and index + 1 < len(arguments):
            values.append(arguments[index + 1])
        elif argument.startswith(name + "="):
            values.append(argument.split("=", 1)[1])
    return values


def _config_keys(paths: list[str]) -> dict[str, object]:
    """Top-level keys of the ``--config`` files (later files win); an unreadable one is anomalib's to report."""
    import yaml

    keys: dict[str, object] = {}
    for path in paths:
        try:
            content = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(content, dict):
            keys.update(content)
    return keys


def missing_calibration_data(arguments: list[str]) -> str | None:
    """The one-line error for ``export --compression_type INT8_PTQ|INT8_ACQ`` with no ``--data`` (anomalib exports
    the ONNX graph first and fails with a traceback half a minute later); ``None`` when nothing is missing."""
    if arguments[:1] != ["export"]:
        return None
    configs = _config_keys(_option_values(arguments, "--config"))
    compression = (_option_values(arguments, "--compression_type") or [str(configs.get("compression_type", ""))])[-1]
    if compression.upper() not in CALIBRATED_COMPRESSION:
        return None
    if configs.get("data") or any(
        argument == "--data" or argument.startswith(("--data.", "--data=")) for argument in arguments
    ):
        return None
    return (
        f"{PROGRAM} export: error: --compression_type {compression} calibrates on images: add --data "
        f"(e.g. {DATA_ARGUMENT_EXAMPLE})"
    )


def configure_cli(arguments: list[str]) -> None:
    """Set up an ``anomalib-ext`` command that runs anomalib's CLI, before that CLI is imported. ``arguments`` are
    the command's (no program name); ``--verbose`` is removed from them in place. Exits 2 with one line when an
    INT8 export has no calibration data."""
    if _split_verbose(arguments):
        os.environ[VERBOSE_ENV] = "1"  # child processes (DDP ranks, dataloader workers) inherit it
    error = missing_calibration_data(arguments)
    if error is not None:
        print(error, file=sys.stderr)  # noqa: T201
        raise SystemExit(2)
    quiet_library()
    if not is_verbose():
        _ignore_warnings(COMMAND_WARNINGS)
        for name in LIGHTNING_RANK_ZERO_LOGGERS:
            _add_filter_once(logging.getLogger(name), _DropMessages(LIGHTNING_SETUP_INFO))
    # anomalib's CLI calls ``configure_logger`` first thing: whoever imports it after this point gets ours
    import anomalib.cli.cli
    import anomalib.loggers

    anomalib.loggers.configure_logger = configure_console_logging
    anomalib.cli.cli.configure_logger = configure_console_logging


def _running_command() -> str | None:
    """The ``anomalib-ext`` subcommand this process runs (``doctor``, ``train``, ...); ``None`` outside it."""
    program = Path(sys.argv[0]).name if sys.argv else ""
    if program != PROGRAM and not (program == "cli.py" and "anomalib_ext" in sys.argv[0]):
        return None
    return sys.argv[1] if len(sys.argv) > 1 else ""


def explain_import_failure(error: BaseException) -> None:
    """``import anomalib_ext`` failed while importing torch, torchvision or anomalib (a CPU torch with a CUDA
    torchvision: ``operator torchvision::nms does not exist``). ``anomalib-ext doctor`` carries on and reports it;
    any other ``anomalib-ext`` command says so in one line (the traceback with ``ANOMALIB_EXT_VERBOSE=1``); a
    Python import re-raises, with a note pointing at the doctor."""
    global import_failure  # noqa: PLW0603  (one value per process, read by the doctor)
    import_failure = error
    command = _running_command()
    if command == "doctor":
        return
    if command is not None and not is_verbose():
        first_line = (str(error).strip().splitlines() or [""])[0]
        print(  # noqa: T201
            f"{PROGRAM}: error: the installed packages do not import ({type(error).__name__}: {first_line}); "
            f"run '{PROGRAM} doctor' for the fix ({VERBOSE_ENV}=1 shows the traceback)",
            file=sys.stderr,
        )
        raise SystemExit(1)
    error.add_note(f"Run '{PROGRAM} doctor' to check that torch and torchvision import as a pair.")
    raise error
