"""anomalib's results folders, kept usable after a failed run: ``latest`` points at the newest run with a checkpoint.

anomalib's ``Engine.fit`` makes ``<default_root_dir>/<Model>/<Data>/<category>/v<N>`` and moves the ``latest`` link
to it before training starts, so a run that fails (wrong data, a bad option, an interrupt) leaves an empty
``v<N>`` and a ``latest`` that no longer holds ``weights/lightning/model.ckpt``: the path the README gives for
export and prediction breaks. ``settle_latest`` repairs that after a run; ``discard_empty_run`` does it from inside a
run that stops before writing anything. Never deletes a file: only version folders that hold none (and a runs
folder left with no version).
"""

from __future__ import annotations

import re
from pathlib import Path

LATEST = "latest"
CHECKPOINT_FOLDER = Path("weights") / "lightning"
_VERSION = re.compile(r"v(\d+)")


def runs_folder(default_root_dir: str | Path, model_name: str, data_name: str, category: str | None) -> Path:
    """Where ``Engine.fit`` puts the ``v<N>`` folders (anomalib 2.7's ``Engine._setup_workspace``)."""
    return Path(default_root_dir) / model_name / data_name / (category or "")


def version_folders(runs: Path) -> list[Path]:
    """The ``v<N>`` folders of ``runs``, oldest first (by number: ``v10`` after ``v9``)."""
    if not runs.is_dir():
        return []
    found = [entry for entry in runs.iterdir() if entry.is_dir() and not entry.is_symlink()]
    versions = [entry for entry in found if _VERSION.fullmatch(entry.name)]
    return sorted(versions, key=lambda entry: int(entry.name[1:]))


def has_checkpoint(version: Path) -> bool:
    """The run in ``version`` wrote a Lightning checkpoint (what ``latest/weights/lightning/model.ckpt`` needs)."""
    folder = version / CHECKPOINT_FOLDER
    return folder.is_dir() and any(folder.glob("*.ckpt"))


def holds_no_file(folder: Path) -> bool:
    """``folder`` and its sub-folders contain no file and no link (a run that stopped before writing)."""
    return all(entry.is_dir() and not entry.is_symlink() for entry in folder.rglob("*"))


def remove_empty_tree(folder: Path) -> None:
    """Remove ``folder`` when it holds no file (deepest sub-folders first); never removes a file."""
    if not folder.is_dir() or not holds_no_file(folder):
        return
    for sub in sorted(folder.rglob("*"), key=lambda entry: len(entry.parts), reverse=True):
        sub.rmdir()
    folder.rmdir()


def latest_target(runs: Path) -> Path | None:
    """The version folder ``runs/latest`` points at (``None``: no link, or it points nowhere)."""
    link = runs / LATEST
    if not link.is_symlink():
        return None
    target = link.resolve()
    return target if target.is_dir() else None


def point_latest(runs: Path, version: Path | None) -> None:
    """Make ``runs/latest`` a relative link to ``version`` (remove it when ``version`` is ``None``)."""
    link = runs / LATEST
    if link.is_symlink() or link.exists():
        if not link.is_symlink():
            return  # a real folder named latest is someone's data: leave it
        link.unlink()
    if version is not None:
        link.symlink_to(version.name, target_is_directory=True)


def settle_latest(runs: Path, this_run: Path | None = None) -> Path | None:
    """After a run: drop ``this_run``'s version folder if it holds no file, and if ``latest`` points at this run
    (or nowhere), point it at the newest version with a checkpoint (else the newest version; else no link).

    ``this_run`` is the version folder the run made (``None``: unknown, then no folder is removed and ``latest``
    is only moved when it points at a version without a checkpoint). A ``latest`` that points at another run's
    folder (one started later, maybe still running) is left alone. Returns where ``latest`` points.
    """
    current = latest_target(runs)
    if this_run is not None:
        this_run = this_run.resolve()
        remove_empty_tree(this_run)
        if current is not None and current != this_run:
            return current
    elif current is not None and has_checkpoint(current):
        return current
    versions = version_folders(runs)
    if not versions:
        if (runs / LATEST).is_symlink():
            point_latest(runs, None)
        if runs.is_dir() and not any(runs.iterdir()):
            runs.rmdir()  # the folder of a misspelt category: made by this run, holds nothing
        return None
    with_checkpoint = [version for version in versions if has_checkpoint(version)]
    target = (with_checkpoint or versions)[-1]
    if target.resolve() != current:
        point_latest(runs, target)
    return target


def discard_empty_run(run_folder: str | Path) -> None:
    """From inside a run that stops before writing anything: ``run_folder`` is the run's ``default_root_dir`` as
    anomalib's Engine sets it (``<runs>/v<N>``; ``<runs>/latest`` before anomalib 2.7); remove it if it holds no
    file and settle ``latest`` (``settle_latest``). A folder of another shape is left alone."""
    folder = Path(run_folder)
    if folder.name == LATEST and folder.is_symlink():
        folder = folder.resolve()
    if _VERSION.fullmatch(folder.name) and folder.is_dir():
        runs = folder.parent
        settle_latest(runs, folder)
        # the Engine made <root>/<Model>/<Data>/<category> for this run: drop the levels that now hold nothing
        for level in (runs, runs.parent, runs.parent.parent, runs.parent.parent.parent):
            if not level.is_dir():
                continue  # settle_latest removed the category's folder already
            if any(level.iterdir()):
                break
            level.rmdir()
