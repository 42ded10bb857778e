"""Exact duplicate files across splits: a test image whose copy was trained or validated on is not held out.

The real dice set holds 457 byte-identical pairs across its two darker sessions (``16_09_21`` and
``17_11_21``, same frame numbers): any split that puts one copy in test and the other in train or validation
leaks. Files are compared by content hash, which is cheap (no decoding) and exact.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeVar

logger = logging.getLogger(__name__)
PathLike = TypeVar("PathLike", str, Path)


def file_digest(path: str | Path) -> str:
    """SHA-1 of the file's bytes.

    Cached on (path, modification time, size): a split filters one set against several others, and each file is
    then read once; a file changed on disk gets a new key.
    """
    stat = os.stat(path)
    return _digest(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=65536)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    del mtime_ns, size  # only part of the cache key
    return hashlib.sha1(Path(path).read_bytes(), usedforsecurity=False).hexdigest()


def without_copies_of(candidates: Sequence[PathLike], held_out: Iterable[str | Path], what: str = "") -> list[PathLike]:
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
