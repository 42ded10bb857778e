"""anomalib's CLI as ``anomalib-ext`` runs it: same subcommands and flags, plus two guards around the Engine.

- The datamodule's folders are checked for existence (``check_data_paths``) right after parsing, when the model is
  one of ours with ``check_data`` on: a wrong ``root`` or a misspelt ``category`` is one line and exit status 2,
  before the model is built, before the Engine makes a results folder and before anomalib's ``MVTecAD`` would
  download the public dataset into the missing root. (Through plain ``anomalib train``, our models run the same
  check later, in ``configure_callbacks``.)
- ``fit``/``train`` keep ``latest`` on the newest run that wrote a checkpoint (``anomalib_ext.workspace``): anomalib
  moves it to every new ``v<N>`` before training starts, so a failed run broke
  ``.../latest/weights/lightning/model.ckpt``. A failed run's version folder is removed when it holds no file.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalib.cli import cli as anomalib_cli
from anomalib.cli.cli import AnomalibCLI
from jsonargparse import Namespace
from jsonargparse.typing import import_object

import anomalib_ext  # noqa: F401  (registers our models as AnomalibModule subclasses)
from anomalib_ext.data.datamodule_checks import exit_on_bad_data
from anomalib_ext.models.components import ExtModelMixin
from anomalib_ext.workspace import runs_folder, settle_latest, version_folders

# subcommands whose Engine method makes a new v<N> folder and moves `latest` to it
VERSIONING_SUBCOMMANDS = ("fit", "train")


class ExtAnomalibCLI(AnomalibCLI):
    """``AnomalibCLI`` with the data paths checked before the Engine runs and ``latest`` kept on a checkpoint."""

    def before_instantiate_classes(self) -> None:
        """The data paths, from the parsed config, before the model is built (a backbone takes seconds to load)."""
        super().before_instantiate_classes()
        section = self.config.get(self.subcommand) or self.config
        datamodule = _datamodule_for_checking(section.get("model"), section.get("data"))
        if datamodule is not None:
            exit_on_bad_data(datamodule, paths_only=True)

    def instantiate_classes(self) -> None:
        """The same check on the built datamodule (for a config ``before_instantiate_classes`` could not read)."""
        super().instantiate_classes()
        datamodule, model = getattr(self, "datamodule", None), getattr(self, "model", None)
        if datamodule is not None and isinstance(model, ExtModelMixin) and model.check_data:
            exit_on_bad_data(datamodule, paths_only=True)

    def _runs(self) -> Path | None:
        """Where this ``fit``/``train`` puts its ``v<N>`` folder; ``None`` for other subcommands."""
        datamodule, model = getattr(self, "datamodule", None), getattr(self, "model", None)
        if self.subcommand not in VERSIONING_SUBCOMMANDS or model is None or not hasattr(datamodule, "name"):
            return None
        root = self.config[self.subcommand].get("default_root_dir") or "results"
        return runs_folder(root, model.name, datamodule.name, getattr(datamodule, "category", None))

    def _run_subcommand(self) -> None:
        runs = self._runs()
        before = set(version_folders(runs)) if runs is not None else set()
        try:
            super()._run_subcommand()
        except BaseException:
            if runs is not None:
                self._settle_latest(runs, before, failed=True)
            raise
        if runs is not None:
            self._settle_latest(runs, before, failed=False)

    @staticmethod
    def _settle_latest(runs: Path, before: set[Path], failed: bool) -> None:
        """``settle_latest`` for the one version folder this run made (several new ones: another run writes there
        too, and its folders are not ours to touch)."""
        new = [version for version in version_folders(runs) if version not in before]
        if len(new) != 1:
            return
        target = settle_latest(runs, new[0])
        if failed and new[0].is_dir() and target is not None and target.resolve() != new[0].resolve():
            print(  # noqa: T201
                f"{runs / 'latest'} still points at {target.name}, the newest run with a checkpoint; "
                f"this run's files are in {new[0].name}",
                file=sys.stderr,
            )


def _datamodule_for_checking(model: Any, data: Any) -> Any:  # noqa: ANN401
    """A throw-away datamodule built from the config's ``data`` section when ``model`` is one of ours with
    ``check_data`` on; ``None`` otherwise, or when the section does not build on its own (nested classes): then
    ``instantiate_classes`` checks the real one. Datamodules read nothing from disk when built."""
    if not isinstance(model, Namespace) or not isinstance(data, Namespace) or "class_path" not in data:
        return None
    try:
        model_class, data_class = import_object(model.class_path), import_object(data.class_path)
        if not (isinstance(model_class, type) and issubclass(model_class, ExtModelMixin)):
            return None
        if model.get("init_args") is not None and model.init_args.get("check_data") is False:
            return None
        arguments = data.init_args.as_dict() if data.get("init_args") is not None else {}
        return data_class(**arguments)
    except Exception:  # noqa: BLE001  (anything unusual is checked after instantiation instead)
        return None


def main(arguments: Sequence[str]) -> None:
    """``anomalib <arguments>`` with the guards above (what ``anomalib.cli.cli.main`` does, on our CLI class)."""
    anomalib_cli.configure_logger()  # looked up now: anomalib_ext.quiet may have replaced it
    ExtAnomalibCLI(args=list(arguments))
