"""Gathering fit data across DDP ranks, so N processes fit the same model as one.

Lightning's DDP gives every rank a shard of the training set (its ``DistributedSampler`` pads the shards to equal
length by repeating images). A fit-only model that fitted on its own shard would keep only part of the data, and
each rank would hold a different model (anomalib issues #2673 and #3038 for PatchCore). The helpers here merge
what every rank collected before fitting, identically on every rank, and drop the padding repeats by image path:

- ``gather_reservoir``: the bottom-k reservoirs of all ranks merged into the reservoir one process would have
  filled (the smallest keys of the union). Only the winning items travel, so the transfer is bounded by the
  reservoir's capacity whatever the number of ranks;
- ``gather_rows``: rows of every rank (any length) concatenated, with their ids, sorted by id and de-duplicated;
- ``sum_across_ranks``: running sums (map statistics) added up.

On one process (no initialised process group) every helper returns its input unchanged, so models call them
unconditionally. Every helper is a collective: all ranks must call it, in the same order.

``ddp_spawn`` pickles the trainer, callbacks included. anomalib's CLI adds Lightning's ``SaveConfigCallback``,
which holds the jsonargparse parser (local lambdas: ``Can't pickle local object``); importing this module makes
that callback picklable (``make_save_config_callback_picklable``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import distributed as dist
from torch import nn

from .sampling import ReservoirSampler


def world_size() -> int:
    """Processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_distributed() -> bool:
    return world_size() > 1


def gather_objects(value: Any) -> list[Any]:  # noqa: ANN401
    """Every rank's picklable ``value``, in rank order (``[value]`` on one process)."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _gather_padded(tensor: torch.Tensor, counts: Sequence[int], device: torch.device) -> list[torch.Tensor]:
    """Each rank's ``tensor`` (first axes ``counts``, same trailing shape and dtype): padded, gathered, trimmed."""
    longest = max(counts)
    padded = tensor.new_zeros((longest, *tensor.shape[1:])).to(device)
    padded[: len(tensor)] = tensor.to(device)
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return [part[:count].to(tensor.device) for part, count in zip(gathered, counts, strict=True)]


def with_image_paths(ids: list[str] | None, image_paths: Sequence[Any] | None) -> list[str] | None:
    """The image paths collected so far plus a batch's, the ids ``gather_rows`` merges ranks by (``None`` once a
    batch comes without paths)."""
    if ids is None or image_paths is None:
        return None
    return [*ids, *(str(path) for path in image_paths)]


def gather_rows(
    rows: torch.Tensor, ids: Sequence[str] | None, device: torch.device | str
) -> tuple[torch.Tensor, list[str] | None]:
    """All ranks' ``rows`` (first axis), with their ``ids``, the same on every rank.

    With ``ids`` (image paths) the result is sorted by id and each id kept once, so it does not depend on how the
    sampler split or padded the data, nor on the number of ranks (one process is sorted too). Without ids, the
    rows are concatenated in rank order. ``rows`` may be empty on a rank but must have the same trailing shape.
    """
    if ids is not None and len(ids) != len(rows):
        msg = f"gather_rows: {len(ids)} ids for {len(rows)} rows"
        raise ValueError(msg)
    if is_distributed():
        meta = gather_objects((len(rows), list(ids) if ids is not None else None))
        counts = [count for count, _ in meta]
        rows = torch.cat(_gather_padded(rows, counts, torch.device(device)))
        ids = None if any(part is None for _, part in meta) else [name for _, part in meta for name in part]
    if ids is None:
        return rows, None
    first: dict[str, int] = {}
    for index, name in enumerate(ids):
        first.setdefault(name, index)
    order = sorted(first, key=str)
    keep = torch.tensor([first[name] for name in order], dtype=torch.long, device=rows.device)
    return rows[keep], order


def gather_reservoir(
    reservoir: ReservoirSampler | None, device: torch.device | str, capacity: int | None = None, seed: int = 0
) -> ReservoirSampler | None:
    """The reservoir one process would have filled from the union of every rank's items (same on every rank).

    Bottom-k sampling merges exactly: the ``capacity`` smallest keys of the union are the smallest among each
    rank's kept ones. Items offered with ids (image paths) are kept once per id, so the sampler's padding repeats
    count once. A rank may have no reservoir (``None``: e.g. a class it never saw) when ``capacity``/``seed`` say
    what to build; ``None`` is returned only when no rank has one.
    """
    if not is_distributed():
        return reservoir
    entries = reservoir.entries() if reservoir is not None and reservoir.seen else None
    local_keys = entries[1].tolist() if entries is not None else []
    local_ids = entries[2] if entries is not None else []
    shape_dtype = (tuple(entries[0].shape[1:]), entries[0].dtype) if entries is not None else None
    setup = (reservoir.capacity, reservoir.seed) if reservoir is not None else None
    meta = gather_objects((local_keys, local_ids, shape_dtype, setup, reservoir.seen if reservoir else 0))
    capacity = capacity or next((part[3][0] for part in meta if part[3] is not None), None)
    seed = next((part[3][1] for part in meta if part[3] is not None), seed)
    shapes = [part[2] for part in meta if part[2] is not None]
    if capacity is None or not shapes:
        return None
    # every rank ranks the same candidates the same way: by key, then rank, then position
    candidates = [
        (key, rank, index, ids[index] if ids else None)
        for rank, (keys, ids, *_) in enumerate(meta)
        for index, key in enumerate(keys)
    ]
    candidates.sort(key=lambda entry: entry[:3])
    winners, taken = [], set()
    for key, rank, index, name in candidates:
        if name is not None and name in taken:
            continue
        taken.add(name)
        winners.append((key, rank, index, name))
        if len(winners) == capacity:
            break
    rank_here = dist.get_rank()
    mine = [index for _, rank, index, _ in winners if rank == rank_here]
    counts = [sum(1 for _, rank, _, _ in winners if rank == other) for other in range(len(meta))]
    item_shape, dtype = shapes[0]
    local = entries[0][mine] if entries is not None else torch.empty((0, *item_shape), dtype=dtype)
    parts = _gather_padded(local, counts, torch.device(device))
    # the winners of each rank arrive in that rank's key order, which is their order in ``winners`` too
    offsets = [0] * len(meta)
    items = []
    for _, rank, _, _ in winners:
        items.append(parts[rank][offsets[rank]])
        offsets[rank] += 1
    merged = ReservoirSampler(capacity, seed=seed)
    names = [name for *_, name in winners]
    merged.load(
        torch.stack(items),
        torch.tensor([key for key, *_ in winners], dtype=torch.long),
        names if all(name is not None for name in names) else None,
        seen=sum(part[4] for part in meta),
    )
    return merged


def sum_across_ranks(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` summed over all ranks (a copy; the input itself on one process)."""
    if not is_distributed():
        return tensor
    total = tensor.detach().to(device).clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(tensor.device)


class DdpAnchor(nn.Module):
    """One trainable scalar that never enters the state dict, for models without any trainable parameter.

    ``DistributedDataParallel`` refuses to wrap a module none of whose parameters requires a gradient, and Lightning
    wraps every model it fits under DDP; a gradient-free model (TemplateSsim) holds one of these. It is not in the
    state dict (checkpoints stay as they were) and not used by ``forward`` (the export does not see it).
    """

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def _save_to_state_dict(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        del args, kwargs

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        del args, kwargs


def fresh_storage_for_resized_buffers(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:  # noqa: ANN401
    """``load_state_dict`` pre-hook: buffers whose shape the state dict changes get a new tensor first.

    anomalib's ``DynamicBufferMixin`` resizes such buffers in place (``resize_``). After ``ddp_spawn`` the launching
    process's tensors live in shared memory (pickling them for the spawned processes moved them there), which cannot
    be resized: loading the fitted model back crashed the process (a segmentation fault for Dfkdm's densities).
    A fresh tensor of the new shape leaves nothing to resize. Register it with ``register_load_state_dict_pre_hook``
    on the top module (a module-level function, so the model still pickles).
    """
    del args
    for name, buffer in list(module.named_buffers()):
        value = state_dict.get(prefix + name)
        if isinstance(value, torch.Tensor) and buffer is not None and buffer.shape != value.shape:
            owner_path, _, attribute = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            setattr(owner, attribute, torch.empty(value.shape, dtype=buffer.dtype, device=buffer.device))


# ------------------------------------------------------------------------------------- ddp_spawn pickling
class _RenderedConfig:
    """Stands in for the CLI parser after pickling: writes the config text rendered before the spawn."""

    def __init__(self, text: str) -> None:
        self.text = text

    def save(self, _config: Any, path: str, **_kwargs: Any) -> None:  # noqa: ANN401
        Path(path).write_text(self.text)

    def dump(self, _config: Any, **_kwargs: Any) -> str:  # noqa: ANN401
        return self.text


def _save_config_state(callback: Any) -> dict[str, Any]:  # noqa: ANN401
    state = dict(callback.__dict__)
    parser = state.get("parser")
    if parser is not None and not isinstance(parser, _RenderedConfig):
        state["parser"] = _RenderedConfig(parser.dump(callback.config, skip_none=False))
    return state


def make_save_config_callback_picklable() -> None:
    """Give Lightning's ``SaveConfigCallback`` a ``__getstate__`` that replaces the parser by the rendered config.

    ``anomalib train ... --trainer.strategy ddp_spawn`` otherwise fails with ``Can't pickle local object
    'ActionTypeHint.prepare_add_argument.<locals>.<lambda>'``: anomalib's CLI hands the callback its jsonargparse
    parser, and ``ddp_spawn`` pickles every callback. The spawned rank 0 then writes the same ``config.yaml``.
    """
    from lightning.pytorch.cli import SaveConfigCallback

    if "__getstate__" not in SaveConfigCallback.__dict__:
        SaveConfigCallback.__getstate__ = _save_config_state  # type: ignore[attr-defined]


make_save_config_callback_picklable()
