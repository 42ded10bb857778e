"""Train an AE or VAE on an MVTec AD category with the origin project's arguments, through anomalib's Engine.

The AE/VAE defect-segmentation project this family comes from was driven by
``train.py --model {ae,vae} --epochs --batch_size --learning_rate --size --data_path --ckpt_path``. This script
keeps those arguments (so its users need not relearn anything) and runs the same training as
``anomalib train --config configs/reconstruction/{ae,vae}.yaml``: the ``Reconstruction`` model, anomalib's
``MVTecAD`` datamodule, Engine, and its test metrics (image and pixel AUROC on the whole test split).

Before training, every file of the category is checked (a bad image is named in one line, instead of surfacing
minutes into the run without its name), and an existing checkpoint is refused unless ``--overwrite`` is given.

Examples::

    .venv/bin/python tools/train.py --model ae --epochs 30 --batch_size 16 --learning_rate 1e-3 --size 128 \\
        --data_path ../shared/data/mvtec_ad/bottle --ckpt_path results/reconstruction/ae_bottle.ckpt
    .venv/bin/python tools/train.py --model vae --data_path ../shared/data/mvtec_ad --category bottle \\
        --ckpt_path results/reconstruction/
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/benchmarking: the one model builder


class UsageError(ValueError):
    """Bad command-line input: reported as one line, without a stack trace."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("ae", "vae"), default="ae", help="autoencoder or variational AE")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs")
    parser.add_argument("--batch_size", type=int, default=16, help="training batch size")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--size", type=int, default=128, help="side length the images are resized to")
    parser.add_argument(
        "--data_path",
        required=True,
        help="an MVTec AD category folder (with train/good), or the dataset root together with --category",
    )
    parser.add_argument("--category", default=None, help="category under --data_path (when it is the root)")
    parser.add_argument(
        "--ckpt_path",
        default="results/reconstruction",
        help="checkpoint file (*.ckpt) or a folder that receives <model>_<category>.ckpt",
    )
    parser.add_argument("--latent_dim", type=int, default=128, help="size of the bottleneck code")
    parser.add_argument("--base_channels", type=int, default=32, help="width of the first encoder stage")
    parser.add_argument("--num_downsamples", type=int, default=None, help="encoder stages (default: by size)")
    parser.add_argument("--beta", type=float, default=1e-4, help="KL weight of the VAE")
    parser.add_argument("--num_workers", type=int, default=0, help="dataloader workers")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--no_test", action="store_true", help="skip the test-set evaluation after training")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint and its .json")
    return parser.parse_args(argv)


def resolve_dataset(data_path: str, category: str | None) -> tuple[Path, str]:
    """(root, category) for ``MVTecAD`` from either a category folder or a root plus ``--category``."""
    path = Path(data_path).expanduser()
    if not path.is_dir():
        msg = f"--data_path {path}: no such folder"
        raise UsageError(msg)
    if category is None:
        if not (path / "train" / "good").is_dir():
            msg = (
                f"--data_path {path}: expected an MVTec AD category folder containing train/good, "
                "or pass the dataset root with --category NAME"
            )
            raise UsageError(msg)
        return path.parent, path.name
    if not (path / category / "train" / "good").is_dir():
        msg = f"--data_path {path} --category {category}: {path / category / 'train' / 'good'} does not exist"
        raise UsageError(msg)
    return path, category


def check_data(root: Path, category: str, need_test: bool) -> None:
    """Read every file of ``root/category`` once before training: anomalib meets a bad file only inside a
    dataloader, minutes in, often without its name (``OSError: image file is truncated``).
    """
    from anomalib_ext.data.validation import DataValidationError, check_mvtec_layout

    try:
        check_mvtec_layout(root, category, require_anomalies=need_test)
    except DataValidationError as error:
        listing = f"python -m anomalib_ext.data.validation {root} --category {category}"
        raise UsageError(error.first_problem(listing)) from None


def resolve_checkpoint(ckpt_path: str, model: str, category: str, overwrite: bool = False) -> Path:
    """The checkpoint file to write; an existing one (or its .json summary) is an earlier run, kept unless
    ``overwrite``. Checked before training so that no time is spent on a run whose result cannot be saved.
    """
    path = Path(ckpt_path).expanduser()
    checkpoint = path if path.suffix == ".ckpt" else path / f"{model}_{category}.ckpt"
    if not overwrite:
        for existing in (checkpoint, checkpoint.with_suffix(".json")):
            if existing.exists():
                msg = f"{existing}: file exists (an earlier run); choose another --ckpt_path or pass --overwrite"
                raise UsageError(msg)
    return checkpoint


def default_downsamples(size: int) -> int:
    """Bottleneck grid of 8 px on the side: 4 stages at 128 px, 5 at 256 px."""
    stages = 1
    while size % 2 ** (stages + 1) == 0 and size // 2 ** (stages + 1) >= 8:
        stages += 1
    return stages


def check_numbers(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "size", "latent_dim", "base_channels"):
        if getattr(args, name) < 1:
            msg = f"--{name} must be >= 1, got {getattr(args, name)}"
            raise UsageError(msg)
    if args.learning_rate <= 0:
        msg = f"--learning_rate must be > 0, got {args.learning_rate}"
        raise UsageError(msg)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train (and test) one model; returns the summary also written next to the checkpoint as JSON."""
    check_numbers(args)
    root, category = resolve_dataset(args.data_path, args.category)
    checkpoint = resolve_checkpoint(args.ckpt_path, args.model, category, overwrite=args.overwrite)
    check_data(root, category, need_test=not args.no_test)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    num_downsamples = args.num_downsamples or default_downsamples(args.size)

    import torch
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from benchmarking.builders import build_model
    from lightning.pytorch import seed_everything

    seed_everything(args.seed, workers=True)
    init_args = {
        "variant": args.model,
        "image_size": args.size,
        "latent_dim": args.latent_dim,
        "base_channels": args.base_channels,
        "num_downsamples": num_downsamples,
        "loss_weights": {"kl": args.beta},
        "learning_rate": args.learning_rate,
    }
    try:  # the benchmark's builder: one way to build a model in tools/
        model = build_model(  # the layout check above read every file
            {"class_path": "anomalib_ext.models.Reconstruction", "init_args": init_args}, data_checked=True
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    datamodule = MVTecAD(
        root=root,
        category=category,
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_workers=args.num_workers,
        seed=args.seed,
    )
    engine = Engine(
        max_epochs=args.epochs,
        default_root_dir=checkpoint.parent / f"{checkpoint.stem}_run",
        accelerator="auto",
        devices=1,
        logger=False,
        enable_progress_bar=sys.stderr.isatty(),
    )
    started = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    train_seconds = time.perf_counter() - started
    engine.trainer.save_checkpoint(checkpoint)
    summary: dict[str, Any] = {
        "model": args.model,
        "category": category,
        "data_root": str(root),
        "checkpoint": str(checkpoint),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "size": args.size,
        "latent_dim": args.latent_dim,
        "base_channels": args.base_channels,
        "num_downsamples": num_downsamples,
        "train_seconds": round(train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }
    if not args.no_test:
        results = engine.test(model=model, datamodule=datamodule, verbose=False)
        # like the origin, evaluate on the whole test split; only threshold-free AUROCs are kept, because
        # F1 thresholds would come from those same test images (MVTecAD's default validation = test)
        metrics = results[0] if results else {}
        summary["test"] = {key: round(float(value), 4) for key, value in metrics.items() if "AUROC" in key}
    checkpoint.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except UsageError as error:  # only this: a SIGTERM'd fit ends in SystemExit(143), which must reach the shell
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
