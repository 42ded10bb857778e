"""Benchmark TeacherStudent variants against anomalib's Stfpm on one MVTec category, same backbone and epochs.

Each variant is one ``Engine.fit`` + ``Engine.test`` run; results (image/pixel AUROC, seconds per stage) are
appended as JSON lines to ``--out``. Run variants as separate processes to run them side by side::

    .venv/bin/python tools/bench_teacher_student.py --variant stfpm --epochs 4 --image-size 128
    .venv/bin/python tools/bench_teacher_student.py --variant ts_finetune --epochs 4 --image-size 128

Variants: ``stfpm`` (anomalib's Stfpm), ``ts`` (ImageNet teacher, no fine-tuning), ``ts_finetune`` (teacher
fine-tuned for ``--teacher-epochs``), ``ts_finetune_histaugan`` / ``ts_histaugan`` (the same with HistAuGAN
restyling, needs ``--histaugan``), ``single_template`` (one train image + ``--samples-per-epoch`` variations).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import Callback

VARIANTS = ("stfpm", "ts", "ts_finetune", "ts_histaugan", "ts_finetune_histaugan", "single_template")


class StageTimer(Callback):
    """Wall-clock and process-CPU seconds of every training epoch (teacher epochs come first).

    The machine is shared, so wall-clock depends on everyone else's load; CPU seconds much less so.
    """

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self.epoch_cpu_seconds: list[float] = []
        self._start = 0.0
        self._cpu_start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.epoch_seconds.append(time.perf_counter() - self._start)
        self.epoch_cpu_seconds.append(time.process_time() - self._cpu_start)
        print(f"epoch {trainer.current_epoch}: {self.epoch_seconds[-1]:.0f} s wall", flush=True)


def build_model(args: argparse.Namespace):  # noqa: ANN201
    """The model of one variant, at ``args.image_size``."""
    if args.variant == "stfpm":
        from anomalib.models import Stfpm

        from anomalib_ext.weights import ensure_pretrained

        ensure_pretrained(args.backbone)
        return Stfpm(
            backbone=args.backbone,
            layers=args.layers,
            pre_processor=Stfpm.configure_pre_processor((args.image_size, args.image_size)),
        )
    from anomalib_ext.models import TeacherStudent

    uses_histaugan = "histaugan" in args.variant
    if uses_histaugan and not args.histaugan:
        msg = f"variant '{args.variant}' needs --histaugan <generator checkpoint>"
        raise SystemExit(msg)
    finetune = "finetune" in args.variant or args.variant == "single_template"
    template = None
    if args.variant == "single_template":
        template = str(sorted((Path(args.root) / args.category / "train" / "good").glob("*.png"))[args.template_index])
    return TeacherStudent(
        backbone=args.backbone,
        layers=args.layers,
        amap_mode=args.amap_mode,
        teacher_epochs=args.teacher_epochs if finetune else 0,
        histaugan_checkpoint=args.histaugan if (uses_histaugan or args.variant == "single_template") else None,
        single_template=template,
        samples_per_epoch=args.samples_per_epoch,
        image_size=args.image_size,
        blur_sigma=4.0 * args.image_size / 256,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--root", default="../shared/data/mvtec_ad")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--epochs", type=int, default=4, help="total epoch budget (teacher + student)")
    parser.add_argument("--teacher-epochs", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=["blocks.1", "blocks.2", "blocks.4"])
    parser.add_argument("--amap-mode", default="mul", choices=("mul", "sum"))
    parser.add_argument("--histaugan", default=None, help="HistAuGAN generator checkpoint")
    parser.add_argument("--samples-per-epoch", type=int, default=64)
    parser.add_argument("--template-index", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/teacher_student/bench.jsonl")
    args = parser.parse_args()
    if not (Path(args.root) / args.category).is_dir():
        raise SystemExit(f"no dataset at {Path(args.root) / args.category}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = out.parent / "runs" / args.variant
    datamodule = MVTecAD(
        root=args.root,
        category=args.category,
        train_batch_size=args.batch_size,
        eval_batch_size=16,
        num_workers=0,
        val_split_mode="same_as_test",
        seed=args.seed,
    )
    model = build_model(args)
    timer = StageTimer()
    engine = Engine(
        max_epochs=args.epochs,
        default_root_dir=workdir,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        check_val_every_n_epoch=args.epochs,  # validate once, at the end (threshold/normalisation stats)
        callbacks=[timer],
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    metrics = engine.test(model=model, datamodule=datamodule)[0]
    teacher_epochs = getattr(model, "teacher_epochs", 0)
    record = {
        "variant": args.variant,
        "category": args.category,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "teacher_epochs": teacher_epochs,
        "histaugan": args.histaugan if "histaugan" in args.variant or args.variant == "single_template" else None,
        "image_AUROC": round(float(metrics["image_AUROC"]), 4),
        "pixel_AUROC": round(float(metrics["pixel_AUROC"]), 4),
        "teacher_stage_s": round(sum(timer.epoch_seconds[:teacher_epochs]), 1),
        "student_stage_s": round(sum(timer.epoch_seconds[teacher_epochs:]), 1),
        "teacher_stage_cpu_s": round(sum(timer.epoch_cpu_seconds[:teacher_epochs]), 1),
        "student_stage_cpu_s": round(sum(timer.epoch_cpu_seconds[teacher_epochs:]), 1),
        "fit_s": round(fit_seconds, 1),
        "threads": args.threads,
        "load_average_1min_at_end": round(os.getloadavg()[0], 1),
    }
    with out.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
