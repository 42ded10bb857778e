"""``anomalib-ext``: anomalib's own CLI with our models registered, plus ``config`` to get the shipped configs.

``anomalib train --config`` already finds our models by full class path
(``class_path: anomalib_ext.models.TileOutlier``). Short names (``--model TileOutlier``) need the class to be
imported before jsonargparse resolves it; anomalib has no plugin entry point, so this wrapper imports
``anomalib_ext`` first and then hands over to anomalib's CLI (same subcommands, same flags), with the data folders
checked before anything is written or downloaded and ``latest`` kept on the newest run with a checkpoint
(``anomalib_ext.anomalib_cli``).

``anomalib-ext config list|show|path`` reads the configs that ship inside the package (a ``pip install``ed
package has no ``configs/`` folder of its own): ``anomalib-ext config show tile_outlier/mvtec > my.yaml``.
``anomalib-ext --version`` prints this package's version and anomalib's.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from anomalib_ext.quiet import configure_cli
from anomalib_ext.version import package_version

CONFIG_FOLDER = "configs"
VERSION_FLAGS = ("--version", "-V")


def config_root() -> Path:
    """The package's ``configs`` folder, found without importing the package (which loads torch and anomalib)."""
    spec = importlib.util.find_spec("anomalib_ext")
    if spec is None or not spec.submodule_search_locations:
        msg = "anomalib-ext config: error: the anomalib_ext package is not installed"
        raise SystemExit(msg)
    return Path(next(iter(spec.submodule_search_locations))) / CONFIG_FOLDER


def shipped_configs() -> dict[str, Path]:
    """Every shipped config by name, ``<family>/<name>`` (e.g. ``tile_outlier/mvtec``)."""
    root = config_root()
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    for family in sorted(root.iterdir(), key=lambda entry: entry.name):
        if not family.is_dir():
            continue
        for config in sorted(family.iterdir(), key=lambda entry: entry.name):
            if config.name.endswith(".yaml"):
                found[f"{family.name}/{config.name.removesuffix('.yaml')}"] = config
    return found


# names that stand for a shipped config: the one to run on a part when nothing says which family suits it
CONFIG_ALIASES = {"recommended": "fused/mvtec"}


def _find_config(name: str) -> Path:
    configs = shipped_configs()
    key = name.removesuffix(".yaml")
    key = CONFIG_ALIASES.get(key, key)
    if key not in configs:
        msg = f"no shipped config '{name}'; available: {', '.join(configs) or 'none'}"
        raise SystemExit(f"anomalib-ext config: error: {msg}")
    return configs[key]


def config_command(argv: list[str]) -> int:
    """``anomalib-ext config list | show NAME | path NAME``."""
    parser = argparse.ArgumentParser(
        prog="anomalib-ext config",
        description="The configs shipped with anomalib-ext. Set data.init_args.root to your dataset before training.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="list the shipped configs as <family>/<name> ('recommended' is fused/mvtec)")
    show = sub.add_parser("show", help="print a config (redirect it to a file to edit it)")
    show.add_argument("name", help="<family>/<name>, e.g. tile_outlier/mvtec, or recommended (fused/mvtec)")
    path = sub.add_parser("path", help="print where a shipped config lives (read-only inside site-packages)")
    path.add_argument("name")
    args = parser.parse_args(argv)
    if args.action == "list":
        for name in shipped_configs():
            print(name)  # noqa: T201
    elif args.action == "show":
        sys.stdout.write(_find_config(args.name).read_text())
    else:
        print(_find_config(args.name))  # noqa: T201
    return 0


def version_line() -> str:
    """``anomalib-ext 0.4.0 (anomalib 2.7.0)``, from the installed metadata."""
    try:
        anomalib_version = version("anomalib")
    except PackageNotFoundError:
        anomalib_version = "not installed"
    return f"anomalib-ext {package_version()} (anomalib {anomalib_version})"


# our own subcommands (each module has ``main(argv) -> int``); everything else goes to anomalib's CLI unchanged
OWN_COMMANDS = {
    "score": "anomalib_ext.commands.score",
    "doctor": "anomalib_ext.commands.doctor",
    "recalibrate": "anomalib_ext.commands.recalibrate",
}


def main(argv: list[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["config"]:
        sys.exit(config_command(arguments[1:]))
    if arguments[:1] and arguments[0] in OWN_COMMANDS:
        command = importlib.import_module(OWN_COMMANDS[arguments[0]])
        sys.exit(command.main(arguments[1:]))
    if arguments[:1] and arguments[0] in VERSION_FLAGS:
        print(version_line())  # noqa: T201
        sys.exit(0)

    configure_cli(arguments)  # quiet logs unless --verbose; an INT8 export without --data stops here
    from anomalib_ext.anomalib_cli import main as anomalib_main  # imports torch and anomalib: only here

    anomalib_main(arguments)


if __name__ == "__main__":
    main()
