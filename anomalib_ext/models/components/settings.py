"""``Settings``: the base of the frozen dataclasses that group related model arguments into one nested config key.

A group keeps a model's ``__init__`` short (``tiling: {tile_size: 32, stride: 8}`` instead of five flat arguments).
jsonargparse (``anomalib train --config``) builds the dataclass from the YAML mapping, fills the keys left out with
their defaults and accepts dotted overrides (``--model.init_args.tiling.stride 16``); Python callers and the
benchmark pass a plain mapping, which ``coerce`` turns into the same dataclass with the same unknown-key check.

Lightning keeps the groups in the checkpoint's hyper-parameters, and torch loads checkpoints with
``weights_only=True``, which unpickles only allow-listed classes: every ``Settings`` subclass allow-lists itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Self

import torch


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of ``@dataclass(frozen=True)`` argument groups: ``coerce`` from an instance or a mapping.

    A dataclass itself (with no fields): jsonargparse treats a dataclass whose bases are all dataclasses as a plain
    nested group; any other base would make it a subclass type (``class_path``/``init_args`` in saved configs).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init_subclass__(**kwargs)
        torch.serialization.add_safe_globals([cls])  # checkpoints hold the groups (module docstring)

    @classmethod
    def coerce(cls, value: Self | Mapping[str, Any] | None, defaults: Self | None = None) -> Self:
        """``value`` itself, ``defaults`` (the class's own when not given) for ``None``, or ``defaults`` with the
        fields a mapping names replaced: a partial mapping from Python (the benchmark's ``{density: {kind: kde}}``)
        keeps the model's defaults for the fields it leaves out, as jsonargparse does for a config."""
        if isinstance(value, cls):
            return value
        if value is None:
            return cls() if defaults is None else defaults
        if not isinstance(value, Mapping):
            msg = f"{cls.__name__}: expected a {cls.__name__} or a mapping of its fields, got {value!r}"
            raise TypeError(msg)
        known = [field.name for field in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(value) - set(known))
        if unknown:
            msg = f"{cls.__name__}: unknown keys {unknown}; known: {known}"
            raise ValueError(msg)
        # a group may have required fields (``single_template.path``): no default instance without the mapping
        return cls(**value) if defaults is None else dataclasses.replace(defaults, **value)
