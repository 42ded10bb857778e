"""The arms a study runs: ``--arms`` checked against the study's own, or its default ones."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def chosen_arms(settings: dict[str, Any], known: Sequence[str], default: Sequence[str], study: str) -> list[str]:
    """``--arms`` (``settings["arms"]``) or ``default``; an arm the study does not know is a one-line error."""
    arms = settings.get("arms") or list(default)
    unknown = sorted(set(arms) - set(known))
    if unknown:
        msg = f"--study {study}: unknown arm(s) {unknown}; its arms are {list(known)}"
        raise ValueError(msg)
    return arms
