"""Check an existing HistAuGAN generator the way the training command does after fit.

    python -m anomalib_ext.augment.histaugan.check --checkpoint results/histaugan/dice/generator.pt \\
        --images ../shared/data/dice/train/good --domain-regex '_(\\d\\d_\\d\\d_\\d\\d)_' --max-images 1200

The images and their domains are read as the training datamodule reads them (same seed: same subset and the
same held-out images), renderings into each domain are compared with its real images (``style_check``), the
table and a warning per domain that is off are printed, and ``<checkpoint>.domain_stats.json`` is written.
Exit status: 0 when every domain is within tolerance, 1 when one is off, 2 on bad input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .checkpoint import HistAuGANCheckpointError
from .data import HistAuGANDataModule
from .style_check import DEFAULT_TOLERANCE, check_domain_styles, report_lines, stats_path, warning_lines, write_report
from .transform import HistAuGANAugment


def main(argv: list[str] | None = None) -> int:
    """Run the check on ``argv`` (default: ``sys.argv``); returns the exit status."""
    parser = argparse.ArgumentParser(description="HistAuGAN style check: renderings into each domain vs its images")
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--images", required=True, type=Path, help="the training images' root (data.root)")
    parser.add_argument("--domain-regex", default=None, help="data.domain_regex, when domains come from file names")
    parser.add_argument("--max-images", type=int, default=None, help="data.max_images")
    parser.add_argument("--check-images", type=int, default=16, help="data.check_images")
    parser.add_argument("--seed", type=int, default=0, help="data.seed")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="grey levels")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default: <checkpoint>.domain_stats.json)")
    args = parser.parse_args(argv)
    try:
        augment = HistAuGANAugment(args.checkpoint, p=1.0)
        data = HistAuGANDataModule(
            args.images,
            image_size=int(augment.config["image_size"]),
            num_domains=None if args.domain_regex else augment.num_domains,
            domain_regex=args.domain_regex,
            max_images=args.max_images,
            seed=args.seed,
            check_images=args.check_images,
        )
        if data.num_domains != augment.num_domains:
            msg = f"'{args.images}' gives {data.num_domains} domains, '{args.checkpoint}' has {augment.num_domains}"
            raise ValueError(msg)
        report = check_domain_styles(
            augment.render, data.images, data.domains, data.check_mask, augment.domain_names, args.tolerance, args.seed
        )
    except (OSError, ValueError, HistAuGANCheckpointError) as error:
        print(f"error: {error}")  # noqa: T201
        return 2
    report["checkpoint"] = str(args.checkpoint)
    written = write_report(report, args.out or stats_path(args.checkpoint))
    for line in [*report_lines(report), *warning_lines(report, args.checkpoint), f"style check written to {written}"]:
        print(line)  # noqa: T201
    return 0 if report["all_within_tolerance"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
