"""Batch composition for CIRR training: which pairs share a batch, at a fixed batch size.

In CIRR each pair's reference and target belong to a subset of six similar images (`img_set.members`). With an
in-batch contrastive loss, two pairs of one subset in a batch are hard negatives of each other, and sometimes
false ones (one pair's target can be the other's reference). The samplers choose:

- `random`: a seeded shuffle cut into batches (CoVR's plain shuffled loader);
- `contrastive`: no two pairs of one subset in one (global) batch;
- `similar`: batches are filled subset by subset, so a pair's subset-mates sit in its batch as hard negatives.

A subset is a set of img_set.members: pairs with the same member set belong to it. The epoch is planned on the
*global* batch (batch size x processes, the batch the all-gathered loss sees), identically on every rank from
(seed, epoch); each rank takes its slice of every global batch. Every pair is used at most once per epoch, and
every batch has exactly `batch_size` pairs; the pairs that cannot fill a last batch (or, for `contrastive`, a batch
of distinct subsets) are left out of that epoch, a different few each epoch (`num_dropped`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from torch.utils.data import Sampler

from configs.schema import CONFIG_CHOICES
from data.retrieval import DataError

SAMPLERS = CONFIG_CHOICES["cir_sampler"]


def subset_groups(members: list[list[str]]) -> list[int]:
    """Group id per pair: pairs with the same img_set.members (as a set) are one subset."""
    ids: dict[frozenset[str], int] = {}
    return [ids.setdefault(frozenset(m), len(ids)) for m in members]


def plan_epoch(groups: list[int], batch_size: int, mode: str, seed: int) -> list[list[int]]:
    """The epoch's batches (lists of pair indices, each exactly `batch_size` long) for one seed."""
    if mode not in SAMPLERS:
        raise ValueError(f"unknown sampler {mode!r}; valid: {', '.join(SAMPLERS)}")
    rng = random.Random(seed)
    by_group: dict[int, list[int]] = {}
    for pair, group in enumerate(groups):
        by_group.setdefault(group, []).append(pair)
    group_ids = list(by_group)
    rng.shuffle(group_ids)
    for g in group_ids:
        rng.shuffle(by_group[g])
    if mode == "random":
        order = list(range(len(groups)))
        rng.shuffle(order)
        return [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    if mode == "similar":
        # Groups one after another: a batch holds whole groups, and a group straddles at most two batches.
        order = [pair for g in group_ids for pair in by_group[g]]
        return [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    # contrastive: each batch takes one pair from each of `batch_size` distinct groups, the groups with the most
    # pairs left first (ties in the shuffled order), which empties the groups evenly and leaves the fewest behind.
    position = {g: n for n, g in enumerate(group_ids)}
    remaining = {g: by_group[g] for g in group_ids}
    batches = []
    while len(remaining) >= batch_size:
        chosen = sorted(remaining, key=lambda g: (-len(remaining[g]), position[g]))[:batch_size]
        batches.append([remaining[g].pop() for g in chosen])
        for g in chosen:
            if not remaining[g]:
                del remaining[g]
        rng.shuffle(group_ids)  # re-break ties each batch, so the same groups do not always meet
        position = {g: n for n, g in enumerate(group_ids)}
    rng.shuffle(batches)
    return batches


class CirrBatchSampler(Sampler[list[int]]):
    """Yields this rank's share (`batch_size` pair indices) of every global batch of the epoch; call set_epoch."""

    def __init__(
        self, members: list[list[str]], batch_size: int, mode: str, seed: int, rank: int = 0, world_size: int = 1
    ):
        if mode not in SAMPLERS:
            raise ValueError(f"unknown sampler {mode!r}; valid: {', '.join(SAMPLERS)}")
        self.groups = subset_groups(members)
        self.batch_size, self.mode, self.seed = batch_size, mode, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.epoch = 0
        num_groups = len(set(self.groups))
        if len(members) < self.global_batch:
            raise DataError(
                f"the CIRR training split has {len(members)} pairs, fewer than one global batch "
                f"({batch_size} x {world_size} processes); lower batch_size_train"
            )
        if mode == "contrastive" and num_groups < self.global_batch:
            raise DataError(
                f"cir_sampler contrastive needs at least one subset per pair of a global batch, but the training "
                f"split has {num_groups} subsets (distinct img_set.members) for a global batch of "
                f"{self.global_batch}; lower batch_size_train or use cir_sampler random"
            )
        self._batches = self._plan()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._batches = self._plan()

    def _plan(self) -> list[list[int]]:
        return plan_epoch(self.groups, self.global_batch, self.mode, self.seed * 100003 + self.epoch)

    @property
    def num_dropped(self) -> int:
        """Pairs not used this epoch (too few to fill a last batch)."""
        return len(self.groups) - len(self._batches) * self.global_batch

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[list[int]]:
        start = self.rank * self.batch_size
        for batch in self._batches:
            yield batch[start : start + self.batch_size]
