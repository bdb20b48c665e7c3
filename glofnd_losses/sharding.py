"""Which rank stores which rows of the per-sample state.

``state_sharding="replicated"`` (the default) keeps every row on every rank. ``"sharded"`` splits
the rows into contiguous blocks, one per rank in rank order: with ``N`` rows and ``W`` ranks,
rank ``r`` owns rows ``[r * ceil(N / W), min((r + 1) * ceil(N / W), N))``. That is
``torch.chunk``'s split and the placement of a DTensor sharded on dimension 0 (``Shard(0)``) over
a one-dimensional mesh of every rank, so ``torch.distributed.checkpoint`` saves the blocks at one
world size and loads them at another.
"""

from __future__ import annotations

from dataclasses import dataclass

from glofnd_losses import distributed

STATE_SHARDINGS = ("replicated", "sharded")
"""Where the per-sample rows live: every row on every rank, or each rank its own block."""


def check_state_sharding(value: object) -> str:
    """``value`` if it is one of :data:`STATE_SHARDINGS`, else a ValueError naming the argument."""
    if value not in STATE_SHARDINGS:
        raise ValueError(f"state_sharding must be one of {STATE_SHARDINGS}, got {value!r}")
    assert isinstance(value, str)
    return value


@dataclass(frozen=True)
class Layout:
    """The rows one rank stores.

    Attributes:
        num_samples: Rows of the whole table.
        world_size: Ranks the rows are split over (1: this rank stores every row).
        rank: This rank.

    Examples:
        >>> [Layout(10, 4, rank).stop - Layout(10, 4, rank).start for rank in range(4)]
        [3, 3, 3, 1]
        >>> Layout(2, 3, 2).rows  # fewer rows than ranks: the last ranks own none
        0
    """

    num_samples: int
    world_size: int = 1
    rank: int = 0

    @property
    def block(self) -> int:
        """Rows per rank (the last ranks may own fewer)."""
        return -(-self.num_samples // self.world_size)

    @property
    def start(self) -> int:
        """First row this rank owns."""
        return min(self.rank * self.block, self.num_samples)

    @property
    def stop(self) -> int:
        """One past the last row this rank owns."""
        return min(self.start + self.block, self.num_samples)

    @property
    def rows(self) -> int:
        """Rows this rank owns."""
        return self.stop - self.start

    @property
    def is_sharded(self) -> bool:
        """Whether other ranks own some of the rows."""
        return self.world_size > 1

    def describe(self) -> str:
        """The ownership rule, for comparing ranks: ``"contiguous blocks of 5 rows over 2 ranks"``."""
        if not self.is_sharded:
            return "every row on this rank"
        return f"contiguous blocks of {self.block} rows over {self.world_size} ranks"


def current_layout(num_samples: int, state_sharding: str) -> Layout:
    """The rows this rank stores under ``state_sharding`` in the current process group."""
    if state_sharding == "sharded" and distributed.is_distributed():
        return Layout(num_samples, distributed.world_size(), distributed.rank())
    return Layout(num_samples)
