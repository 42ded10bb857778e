"""Classes of normal images from their folders: ``.../good/<class>/<name>`` belongs to ``<class>``.

anomalib's batches carry no class field, so models that keep per-class statistics (TemplateSsim) read the class
from the image path. The layout is the data's (the Dice datamodule lays its data out this way), so it lives
here and the models import it from data, never the other way round.
"""

from __future__ import annotations

from pathlib import Path

NORMAL_DIR = "good"


def class_from_path(image_path: str | Path) -> str | None:
    """Class of a normal image stored at ``.../good/<class>/<name>``; ``None`` for a flat ``good/`` folder."""
    path = Path(image_path)
    return path.parent.name if path.parent.parent.name == NORMAL_DIR else None
