"""Write a synthetic dataset in MVTec AD or dice layout (same seed, same bytes).

python tools/make_dataset.py mvtec datasets/synthetic --category synthetic --image-size 128
python tools/make_dataset.py dice datasets/synthetic_dice
python tools/make_dataset.py mvtec datasets/flecks --category part --image-size 512 --defects speck  # 4-6 px flecks
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from anomalib_ext.data.synthetic import MVTEC_DEFECTS, SMALL_DEFECTS, make_dice_dataset, make_mvtec_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layout", choices=["mvtec", "dice"])
    parser.add_argument("root", type=Path, help="output folder (MVTec: the category folder goes inside it)")
    parser.add_argument("--category", default="synthetic", help="MVTec category name")
    parser.add_argument("--kind", default="object", choices=["object", "texture"], help="MVTec: object or texture")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--train", type=int, default=None, help="MVTec: train images; dice: per class")
    parser.add_argument("--test-good", type=int, default=None, help="MVTec: good test images; dice: per class")
    parser.add_argument("--test-per-defect", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--defects",
        nargs="+",
        choices=[*MVTEC_DEFECTS, *SMALL_DEFECTS],
        help=f"MVTec: defect types (default {' '.join(MVTEC_DEFECTS)}; speck: a 4-6 px fleck at any image size)",
    )
    args = parser.parse_args(argv)
    if args.image_size < 32:
        parser.error(f"--image-size must be at least 32, got {args.image_size}")
    counts = {
        key: value
        for key, value in {
            "n_train" if args.layout == "mvtec" else "n_train_per_class": args.train,
            "n_test_good" if args.layout == "mvtec" else "n_test_good_per_class": args.test_good,
            "n_test_per_defect": args.test_per_defect,
        }.items()
        if value is not None
    }
    if args.layout == "mvtec":
        if args.defects:
            counts["defects"] = tuple(args.defects)
        out = make_mvtec_dataset(args.root, args.category, args.image_size, kind=args.kind, seed=args.seed, **counts)
    else:
        out = make_dice_dataset(args.root, args.image_size, seed=args.seed, **counts)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
