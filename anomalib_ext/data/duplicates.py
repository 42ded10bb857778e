"""Exact duplicate files across splits: a test image whose copy was trained or validated on is not held out.

The real dice set holds 457 byte-identical pairs across its two darker sessions (``16_09_21`` and
``17_11_21``, same frame numbers): any split that puts one copy in test and the other in train or validation
leaks. Files are compared by content hash, which is cheap (no decoding) and exact.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)


def file_digest(path: str | Path) -> str:
    """SHA-1 of the file's bytes."""
    return hashlib.sha1(Path(path).read_bytes(), usedforsecurity=False).hexdigest()


def without_copies_of(candidates: list[Path], held_out: Iterable[Path], what: str = "") -> list[Path]:
    """``candidates`` minus every file whose content equals a file of ``held_out``; says how many it dropped."""
    held = {file_digest(path) for path in held_out}
    kept = [path for path in candidates if file_digest(path) not in held]
    if len(kept) < len(candidates):
        logger.info(
            "dropped %d %s image(s) that are byte-identical copies of held-out images",
            len(candidates) - len(kept),
            what,
        )
    return kept
