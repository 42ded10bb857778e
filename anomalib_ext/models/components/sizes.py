"""Image-size arguments, accepted the same way by every model (an int or a (height, width) pair)."""

from __future__ import annotations

from collections.abc import Sequence


def as_pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``128`` -> ``(128, 128)``; ``(96, 128)`` stays; anything else is a clear error."""
    if isinstance(image_size, int):
        return image_size, image_size
    if len(image_size) != 2:
        msg = f"image_size must be an int or (height, width), got {image_size!r}"
        raise ValueError(msg)
    return int(image_size[0]), int(image_size[1])
