"""One rank of the 2-process run of ``tests/test_distributed.py``, launched by ``torchrun --nproc-per-node 2``.

One launch (one start-up cost) fits every model family with Lightning's ``ddp`` strategy on CPU (gloo), tests
it, and predicts over a folder with ``PredictionWriter`` twice (the second run resumes). Each rank writes what the
test compares into ``OUT/<family>/rank<N>.json``: a digest of its fitted state (every rank must hold the same
model), the checkpoint path (rank 0) and the test metrics. The test fits the same families on one process.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py OUT DATA_ROOT
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

CATEGORY = "synthetic"
IMAGE_SIZE = 64
TRAIN_IMAGES = 13  # odd: the DistributedSampler pads one rank with a repeated image
TRAIN_BATCH = 4
# every family small enough to fit in seconds; caps below the 13 training images, so they must hold for the
# whole training set, not per rank
FAMILIES: dict[str, dict[str, Any]] = {
    "tile_outlier": {
        "class": "TileOutlier",
        "init": {"tiling": {"tile_size": 16, "stride": 16}, "memory_bank": {"max_tiles": 48, "max_fit_tiles": 16 * 8}},
        "epochs": 1,
    },
    "dfkdm": {"class": "Dfkdm", "init": {"density": {"max_training_points": 9, "n_components": 4}}, "epochs": 1},
    # cross-fitted on the 13 images merged from both ranks (folds by key order): the same on every rank
    "fused": {"class": "Fused", "init": {"tile_size": 16, "stride": 16, "max_bank_tiles": 48}, "epochs": 1},
    "dfkdm_lake": {
        "class": "DfkdmLake",
        "init": {
            "latent_dim": 8,
            "base_channels": 16,
            "num_downsamples": 3,
            "learning_rate": 3e-3,
            # tiny data: PCA would drop informative latent directions (DfkdmLake's default density, spelled out)
            "density": {"kind": "kde", "n_components": 0},
        },
        "epochs": 4,
    },
    "template_ssim": {
        "class": "TemplateSsim",
        "init": {"pose_search": {"angles": [0.0], "max_shift": 2}, "num_templates": 2, "max_images_per_class": 8},
        "epochs": 1,
    },
    "reconstruction": {
        "class": "Reconstruction",
        "init": {"latent_dim": 16, "base_channels": 8, "num_downsamples": 3, "learning_rate": 3e-3},
        "epochs": 3,
    },
    # the student on the ImageNet teacher (the default): one epoch of teacher fine-tuning on 13 images left the
    # maps at chance on 2 processes (pixel AUROC 0.47; 0.68 on one process), the student alone reaches 0.67
    "teacher_student": {"class": "TeacherStudent", "init": {}, "epochs": 3},
}
# the gradient families trained long enough to detect the planted defects (tests/test_distributed.py's floors)
FIT_ONLY = ("tile_outlier", "dfkdm", "fused", "template_ssim")


def build(family: str):  # noqa: ANN201
    """The family's model, seeded the same way in both runs."""
    from lightning.pytorch import seed_everything

    import anomalib_ext.models as models

    seed_everything(0, verbose=False)
    spec = FAMILIES[family]
    model = getattr(models, spec["class"])(image_size=IMAGE_SIZE, check_data=False, **spec["init"])
    if hasattr(model, "min_steps"):  # the epochs above are the budget; the 50-step floor: tests/test_few_normals.py
        model.min_steps = 0
    return model


def datamodule(root: Path):  # noqa: ANN201
    from anomalib.data import MVTecAD

    return MVTecAD(root=root, category=CATEGORY, train_batch_size=TRAIN_BATCH, eval_batch_size=8, num_workers=0, seed=0)


def state_digest(model) -> str:  # noqa: ANN001
    """A digest of every fitted tensor (rounded: bit-identical ranks agree, and so do float-noise ones)."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        if hasattr(value, "detach") and value.is_floating_point():
            digest.update(name.encode() + value.detach().cpu().double().mul(1e4).round().numpy().tobytes())
    return digest.hexdigest()


def main(out: Path, root: Path) -> None:
    warnings.filterwarnings("ignore")
    from anomalib.engine import Engine

    from anomalib_ext.prediction import PredictionWriter

    rank = int(os.environ["RANK"])
    for family, spec in FAMILIES.items():
        folder = out / family
        # anomalib's Engine.fit makes a new versioned folder (v0, v1, ...) on every rank; torchrun starts the ranks
        # together, so two of them can race for the same v0 and one stops with FileExistsError (seen once in CI).
        # Rank 0's folder is the one that counts: Lightning broadcasts its checkpoint folder to every rank.
        workspace = folder if rank == 0 else folder / f"rank{rank}-workspace"
        model = build(family)
        engine = Engine(
            default_root_dir=workspace,
            logger=False,
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            max_epochs=spec["epochs"],
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        engine.fit(model=model, datamodule=datamodule(root))
        checkpoint = (
            engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
        )
        metrics = engine.test(model=model, datamodule=datamodule(root), verbose=False)[0]
        record = {"digest": state_digest(model), "checkpoint": checkpoint, "metrics": metrics}
        (folder / f"rank{rank}.json").write_text(json.dumps(record))
        if family == "tile_outlier":  # predict twice into one folder: the second run resumes (nothing to do)
            for _ in range(2):
                writer = PredictionWriter(out / "predictions")
                engine = Engine(
                    default_root_dir=workspace / "predict",
                    logger=False,
                    accelerator="cpu",
                    devices=2,
                    strategy="ddp",
                    callbacks=[writer],
                    enable_progress_bar=False,
                )
                engine.predict(model=model, data_path=root / CATEGORY / "test", return_predictions=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
