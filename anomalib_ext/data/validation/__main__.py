"""``python -m anomalib_ext.data.validation ROOT [--category C | --dice]``: list every bad file of a dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .files import DataValidationError, check_image_folder
from .layouts import check_dice_layout, check_mvtec_layout


def main(argv: list[str] | None = None) -> int:
    """Report every bad file of an MVTec category, a dice root or any image folder; exit status 2 if there is one."""
    parser = argparse.ArgumentParser(
        prog="python -m anomalib_ext.data.validation",
        description="Check an anomaly dataset before training; list every bad file.",
    )
    parser.add_argument("root", type=Path, help="MVTec root (with --category), dice root (--dice), or any folder")
    parser.add_argument("--category", help="MVTec category under root")
    parser.add_argument("--dice", action="store_true", help="root is in dice layout")
    parser.add_argument("--min-size", type=int, help="smallest acceptable image side")
    args = parser.parse_args(argv)
    try:
        if args.category:
            check_mvtec_layout(args.root, args.category, min_size=args.min_size)
        elif args.dice:
            check_dice_layout(args.root, min_size=args.min_size)
        else:
            check_image_folder(args.root, role="image", min_size=args.min_size)
    except DataValidationError as error:
        print(f"error: {error}", file=sys.stderr)  # noqa: T201
        return 2
    print(f"{args.root}: ok")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
