"""``anomalib-ext``: anomalib's own CLI with our models registered, so short names work.

``anomalib train --config`` already finds our models by full class path
(``class_path: anomalib_ext.models.TileOutlier``). Short names (``--model TileOutlier``) need the class to be
imported before jsonargparse resolves it; anomalib has no plugin entry point, so this wrapper imports
``anomalib_ext`` first and then hands over to anomalib's CLI unchanged (same subcommands, same flags).
"""

from __future__ import annotations


def main() -> None:
    from anomalib.cli.cli import main as anomalib_main

    import anomalib_ext  # noqa: F401  (registers our models as AnomalibModule subclasses)

    anomalib_main()


if __name__ == "__main__":
    main()
