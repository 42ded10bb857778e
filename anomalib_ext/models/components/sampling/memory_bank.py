"""Bounded memory banks: a reservoir that caps what fitting keeps, and a greedy k-center coreset fast on a CPU.

Memory-bank models must not grow without bound with the training set. ``ReservoirSampler`` keeps a uniform
sample of at most ``capacity`` items however many batches arrive, so fitting memory is constant once full and
time is linear in the number of images. ``greedy_coreset_indices`` then picks the bank with the k-center greedy
rule (as PatchCore does, Sener & Savarese 2018). anomalib's ``KCenterGreedy`` runs one Python step per selected
point over the whole set with sparse-projection features; here the set is projected once to a few dense
dimensions, distances are updated with one matrix-vector product per step, and large sets are split into groups
that are solved together in one batched step, which cuts the number of steps by the number of groups.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        msg = f"coreset size must be a positive integer, got {size!r}"
        raise ValueError(msg)


def random_projection(embeddings: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """Gaussian Johnson-Lindenstrauss projection of the last axis to ``dim`` (unchanged when already smaller)."""
    features = embeddings.shape[-1]
    if features <= dim:
        return embeddings.float()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    matrix = torch.randn(features, dim, generator=generator) / math.sqrt(dim)
    return embeddings.float() @ matrix.to(embeddings.device)


@torch.no_grad()
def grouped_greedy_coreset_indices(
    embeddings: torch.Tensor, size: int, projection_dim: int | None = 64, seed: int = 0
) -> torch.Tensor:
    """k-center greedy within each group of a ``(groups, n, dim)`` tensor; returns ``(groups, min(size, n))``.

    Every group starts from its point nearest to the group mean (deterministic) and then repeatedly adds the
    point farthest from the points chosen so far.
    """
    _check_size(size)
    if embeddings.ndim != 3:
        msg = f"embeddings must be (groups, n, dim), got shape {tuple(embeddings.shape)}"
        raise ValueError(msg)
    groups, count, _ = embeddings.shape
    if size >= count:
        return torch.arange(count, device=embeddings.device).expand(groups, count).clone()
    features = embeddings.float() if projection_dim is None else random_projection(embeddings, projection_dim, seed)
    squared_norms = (features * features).sum(-1)
    group_index = torch.arange(groups, device=features.device)

    mean_distance = ((features - features.mean(1, keepdim=True)) ** 2).sum(-1)
    chosen = mean_distance.argmin(1)
    selected = [chosen]
    min_distance = torch.full((groups, count), float("inf"), device=features.device)
    for _ in range(size - 1):
        centre = features[group_index, chosen]  # (groups, dim)
        distance = (
            squared_norms
            - 2 * torch.einsum("gnd,gd->gn", features, centre)
            + squared_norms[group_index, chosen][:, None]
        )
        torch.minimum(min_distance, distance, out=min_distance)
        min_distance[group_index, chosen] = -1.0  # never pick a centre twice
        chosen = min_distance.argmax(1)
        selected.append(chosen)
    return torch.stack(selected, 1)


def greedy_coreset_indices(
    embeddings: torch.Tensor,
    size: int,
    projection_dim: int | None = 64,
    group_size: int = 4096,
    seed: int = 0,
) -> torch.Tensor:
    """Indices of a k-center greedy coreset of ``size`` rows of a ``(n, dim)`` tensor.

    Sets larger than ``group_size`` are shuffled into equal groups, each gets its share of the coreset, and the
    groups are solved in one batched greedy run: the steps drop from ``size`` to ``size / groups``.
    """
    _check_size(size)
    if embeddings.ndim != 2:
        msg = f"embeddings must be (n, dim), got shape {tuple(embeddings.shape)}"
        raise ValueError(msg)
    count = embeddings.shape[0]
    if size >= count:
        return torch.arange(count, device=embeddings.device)
    groups = max(1, min(size, math.ceil(count / group_size)))
    if groups == 1:
        return grouped_greedy_coreset_indices(embeddings[None], size, projection_dim, seed)[0]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    order = torch.randperm(count, generator=generator).to(embeddings.device)
    per_group = count // groups
    grouped_order = order[: per_group * groups].view(groups, per_group)
    share = math.ceil(size / groups)
    local = grouped_greedy_coreset_indices(embeddings[grouped_order], min(share, per_group), projection_dim, seed)
    picked = torch.gather(grouped_order, 1, local).T.reshape(-1)  # interleave groups so a cut keeps all groups
    return picked[:size]


class ReservoirSampler:
    """Uniform sample of at most ``capacity`` items (first axis) from a stream of batches, whatever its order.

    Every item gets a key, a seeded hash of its bytes, and the ``capacity`` items with the smallest keys are kept
    (bottom-k sampling). A hash ranks items uniformly at random, like Vitter's reservoir, but the sample depends
    only on which items were seen, not on the order a shuffled dataloader gave them: the same data and seed give
    the same fitted model. Identical items share a key, so copies are kept or dropped together. Items offered with
    an id (their image path) are keyed by the id instead of their bytes: the sample then does not move with the
    last bits of a float embedding either (batch size, number of DDP ranks, CPU or GPU), and an image repeated by a
    ``DistributedSampler``'s padding keeps its key. The store is preallocated and replaced in place, so memory stays
    at ``capacity`` items.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if not isinstance(capacity, int) or capacity <= 0:
            msg = f"reservoir capacity must be a positive integer, got {capacity!r}"
            raise ValueError(msg)
        self.capacity = capacity
        self.seed = seed
        self.seen = 0
        self._salt = seed.to_bytes(8, "little", signed=True)
        self._store: torch.Tensor | None = None
        self._keys = torch.empty(0, dtype=torch.long)
        self._filled = 0
        # each kept item's id (an image path), when ``add`` was given ids: merging across DDP ranks keeps one
        # item per id, so the repeats a DistributedSampler pads its shards with count once
        self._ids: list[str | None] = []

    def _key(self, item: torch.Tensor, name: str | None = None) -> int:
        """Seeded hash of the item's id when it has one, else of its bytes."""
        data = name.encode() if name is not None else item.cpu().contiguous().numpy().tobytes()
        digest = hashlib.blake2b(data, digest_size=8, salt=self._salt).digest()
        return int.from_bytes(digest, "little") >> 1  # fits a signed 64-bit tensor

    def add(self, batch: torch.Tensor, ids: Sequence[str] | None = None) -> None:
        """Offer every item of ``batch`` (with its id, e.g. image path); memory never exceeds ``capacity`` items."""
        batch = batch.detach()
        if ids is not None and len(ids) != len(batch):
            msg = f"{len(ids)} ids for a batch of {len(batch)} items"
            raise ValueError(msg)
        names: list[str | None] = list(ids) if ids is not None else [None] * len(batch)
        if self._store is None:
            self._store = batch.new_empty((self.capacity, *batch.shape[1:]))
            self._keys = torch.empty(self.capacity, dtype=torch.long)
            self._ids = [None] * self.capacity
        elif batch.shape[1:] != self._store.shape[1:]:
            msg = f"items of shape {tuple(batch.shape[1:])} differ from earlier ones {tuple(self._store.shape[1:])}"
            raise ValueError(msg)
        self.seen += batch.shape[0]
        keys = torch.tensor([self._key(item, name) for item, name in zip(batch, names, strict=True)], dtype=torch.long)
        free = min(self.capacity - self._filled, batch.shape[0])
        if free > 0:
            self._store[self._filled : self._filled + free] = batch[:free]
            self._keys[self._filled : self._filled + free] = keys[:free]
            self._ids[self._filled : self._filled + free] = names[:free]
            self._filled += free
        rest, rest_keys = batch[free:], keys[free:]
        if rest_keys.numel() == 0:
            return
        # full: keep the capacity smallest keys of store + rest; entering items take the evicted slots
        kept = torch.zeros(self.capacity + rest_keys.numel(), dtype=torch.bool)
        kept[torch.cat([self._keys, rest_keys]).argsort(stable=True)[: self.capacity]] = True
        evicted = (~kept[: self.capacity]).nonzero().flatten()
        entering = kept[self.capacity :].nonzero().flatten()
        self._store[evicted.to(self._store.device)] = rest[entering.to(rest.device)].to(self._store.device)
        self._keys[evicted] = rest_keys[entering]
        for slot, item in zip(evicted.tolist(), entering.tolist(), strict=True):
            self._ids[slot] = names[free + item]

    def samples(self) -> torch.Tensor:
        """The kept items in key order, ``(min(seen, capacity), ...)``."""
        return self.entries()[0]

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
        """The kept items, their keys and ids (``None`` when any item came without one), in key order."""
        if self._store is None:
            msg = "the reservoir is empty: no training batch was seen"
            raise RuntimeError(msg)
        order = self._keys[: self._filled].argsort(stable=True)
        ids = [self._ids[index] for index in order.tolist()]
        items = self._store[: self._filled][order.to(self._store.device)]
        return items, self._keys[: self._filled][order], None if None in ids else ids  # type: ignore[return-value]

    def load(self, items: torch.Tensor, keys: torch.Tensor, ids: Sequence[str] | None, seen: int) -> None:
        """Replace the content by ``items`` with their ``keys`` (a merge of reservoirs: ``gather_reservoir``)."""
        if len(items) > self.capacity or len(keys) != len(items) or (ids is not None and len(ids) != len(items)):
            msg = f"cannot load {len(items)} items / {len(keys)} keys into a reservoir of capacity {self.capacity}"
            raise ValueError(msg)
        self._store = items.new_empty((self.capacity, *items.shape[1:]))
        self._store[: len(items)] = items
        self._keys = torch.empty(self.capacity, dtype=torch.long)
        self._keys[: len(items)] = keys.to(torch.long).cpu()
        self._ids = [*(ids if ids is not None else [None] * len(items)), *[None] * (self.capacity - len(items))]
        self._filled = len(items)
        self.seen = seen

    def clear(self) -> None:
        self._store, self._keys, self._filled, self.seen = None, torch.empty(0, dtype=torch.long), 0, 0
        self._ids = []
