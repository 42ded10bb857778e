"""Synthetic anomalies that depend on the datamodule's ``seed`` only, so a threshold picked on them is reproducible.

anomalib's ``val_split_mode: synthetic`` (and ``test_split_mode: synthetic``) turns half of the held-out normal
images into Perlin-noise anomalies (``SyntheticAnomalyDataset``). The datamodule's ``seed`` only seeds which
normals are held out: which of them become anomalies (``DataFrame.sample``: numpy's global generator) and what
the anomalies look like (``PerlinAnomalyGenerator``: torch's global generator) come from the global random
state. anomalib 2.7's CLI accepts ``seed_everything`` but never calls it, so ``anomalib train --config`` with
``seed_everything: 42`` drew different anomalies, hence a different F1-optimal threshold, on every run (the same
Dfkdm config gave image F1 0.129, 0.188, 0.222 and 0.767 at an unchanged AUROC).

Here the anomalies are drawn with every global generator (``random``, numpy, torch) seeded from the datamodule's
``seed`` and restored afterwards: the draw is the one ``seed_everything(seed)`` followed by ``setup`` gives, it
does not depend on what ran before (model initialisation, another model in the same process) and it does not
change the random stream of training. Every anomalib-ext model does this for the datamodule it is fitted with
(``ExtModelMixin.prepare_data`` / ``setup``); ``tools/benchmark.py`` uses it for every model, anomalib's too.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.data.utils.synthetic import SyntheticAnomalyDataset

# attribute set on a SyntheticAnomalyDataset drawn here: the seed it was drawn with
DRAWN_WITH_SEED = "anomalib_ext_anomaly_seed"
SPLITS = ("val_data", "test_data")


@contextmanager
def seeded_generators(seed: int) -> Iterator[None]:
    """Seed Python's, numpy's and torch's (CPU) global generators as ``seed_everything(seed)`` does; restore after."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)  # noqa: NPY002  (anomalib draws from the global generator)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def draws_synthetic_anomalies(datamodule: Any) -> bool:  # noqa: ANN401
    """Whether ``datamodule.setup`` makes synthetic anomalies (validation or test split mode ``synthetic``)."""
    modes = (getattr(datamodule, "val_split_mode", None), getattr(datamodule, "test_split_mode", None))
    return any(str(getattr(mode, "value", mode)) == "synthetic" for mode in modes)


def is_set_up(datamodule: Any) -> bool:  # noqa: ANN401
    """``setup`` already ran (anomalib's own test: a split exists)."""
    return any(hasattr(datamodule, split) for split in ("train_data", *SPLITS))


def mark_drawn_with_seed(datamodule: Any, seed: int) -> None:  # noqa: ANN401
    """Record that the datamodule's synthetic splits were drawn right after seeding every generator with ``seed``
    (what ``setup_with_seeded_anomalies`` does), so that the models keep them instead of drawing them again."""
    for split in SPLITS:
        dataset = getattr(datamodule, split, None)
        if isinstance(dataset, SyntheticAnomalyDataset):
            setattr(dataset, DRAWN_WITH_SEED, seed)


def setup_with_seeded_anomalies(datamodule: Any, stage: Any = "fit", seed: int | None = None) -> None:  # noqa: ANN401
    """``datamodule.setup(stage)`` with the synthetic anomalies drawn from ``seed`` (default: the datamodule's).

    Pass a ``TrainerFn`` as ``stage`` so that the trainer's own ``setup`` call later reuses these splits.
    Without any seed (``seed=None`` and no datamodule seed) this is a plain ``setup``.
    """
    seed = getattr(datamodule, "seed", None) if seed is None else seed
    if seed is None or not draws_synthetic_anomalies(datamodule):
        datamodule.setup(stage)
        return
    with seeded_generators(int(seed)):
        datamodule.setup(stage)
    mark_drawn_with_seed(datamodule, int(seed))


def ensure_seeded_anomalies(datamodule: Any) -> list[str]:  # noqa: ANN401
    """Redraw, from the datamodule's seed, every synthetic split that ``setup_with_seeded_anomalies`` did not draw.

    For a datamodule that was set up before the model saw it (by hand, or on a DDP rank other than 0, where
    Lightning skips ``prepare_data``). Drawing again costs what the first draw cost (about a second per 900 px
    image). Returns the names of the splits redrawn.
    """
    seed = getattr(datamodule, "seed", None)
    redrawn: list[str] = []
    if seed is None:
        return redrawn
    for split in SPLITS:
        dataset = getattr(datamodule, split, None)
        if not isinstance(dataset, SyntheticAnomalyDataset) or hasattr(dataset, DRAWN_WITH_SEED):
            continue
        with seeded_generators(int(seed)):
            fresh = SyntheticAnomalyDataset(
                augmentations=dataset.augmentations,
                source_samples=dataset.source_samples,
                dataset_name=Path(dataset.root).parent.name,
            )
        setattr(fresh, DRAWN_WITH_SEED, int(seed))
        setattr(datamodule, split, fresh)
        redrawn.append(split)
    return redrawn
