"""How per-sample rows move between the ranks' blocks of a sharded table (:mod:`glofnd_losses.sharding`).

Pure functions over one rank's buffers and its :class:`~glofnd_losses.sharding.Layout`, without a
host read: fetching a batch's rows from their owners, the scatter that writes only the rows this
rank owns, and the DTensor form of a block for ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from glofnd_losses import distributed
from glofnd_losses.sharding import Layout


def local_positions(global_indices: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Each index's row in this rank's block (clamped into it) and whether this rank owns it."""
    owned = (global_indices >= layout.start) & (global_indices < layout.stop)
    local = (global_indices - layout.start).clamp(0, max(layout.rows - 1, 0))
    return local, owned


def fetch(stores: list[torch.Tensor], indices: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The rows ``indices`` (this rank's anchors) of every store, as ``(b, len(stores))`` float64.

    A collective: an all-gather of the indices, then one all-to-all in which block ``q`` carries
    rank ``q``'s anchors' rows where this rank owns them (zeros elsewhere); each anchor then takes
    the block of its owner. float64 holds every stored value exactly.
    """
    global_indices = distributed.gather_rows(indices)
    local, owned = local_positions(global_indices, layout)
    packed = indices.new_zeros((global_indices.shape[0], len(stores)), dtype=torch.float64)
    if layout.rows > 0:
        columns = [store.index_select(0, local).to(torch.float64) for store in stores]
        packed = torch.where(owned.unsqueeze(1), torch.stack(columns, dim=1), packed)
    received = distributed.exchange_blocks(packed).view(layout.world_size, indices.shape[0], len(stores))
    owners = torch.div(indices, layout.block, rounding_mode="floor").clamp_max(layout.world_size - 1)
    return received[owners, torch.arange(indices.shape[0], device=indices.device)]


@dataclass
class OwnedScatter:
    """Where each position of a global batch writes in this rank's block.

    Attributes:
        targets: ``(B,)`` rows of the block, one per position.
        source: ``(B,)`` the position whose value each position writes.
        source_owned: ``(B,)`` whether that value is new (False: the target's old value is rewritten).
    """

    targets: torch.Tensor
    source: torch.Tensor
    source_owned: torch.Tensor


def owned_scatter(global_indices: torch.Tensor, layout: Layout) -> OwnedScatter:
    """A scatter of the global batch that changes only the rows this rank owns, without a host read.

    A scatter needs a target for every position: each position another rank owns is sent to the
    target of one owned position, carrying that position's value (so every write to a target
    carries the same value and none races); when no position is owned, every position rewrites
    one row with its old value. ``layout`` must own at least one row.
    """
    local, owned = local_positions(global_indices, layout)
    representative = owned.to(torch.uint8).argmax()  # an owned position, if any
    positions = torch.arange(global_indices.shape[0], device=global_indices.device)
    source = torch.where(owned, positions, representative)
    return OwnedScatter(local.index_select(0, source), source, owned.index_select(0, source))


def as_dtensor(block: torch.Tensor, layout: Layout, meshes: dict[str, Any]) -> torch.Tensor:
    """This rank's ``block`` as a DTensor of ``layout.num_samples`` rows sharded on dim 0.

    Its mesh is the default process group itself (``DeviceMesh.from_group``: no new group, no
    collective), kept in ``meshes`` by device type.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    device_type = block.device.type
    if device_type not in meshes:
        meshes[device_type] = DeviceMesh.from_group(dist.distributed_c10d._get_default_group(), device_type)
    mesh = meshes[device_type]
    return DTensor.from_local(
        block, mesh, [Shard(0)], run_check=False, shape=torch.Size([layout.num_samples]), stride=(1,)
    )


def block_of(key: str, value: torch.Tensor, layout: Layout, store: torch.Tensor) -> torch.Tensor:
    """The rows of ``layout``'s block in a loaded field: a full tensor, or this table's own DTensor entry.

    A DTensor is accepted only where it wraps this rank's buffer (this table's ``state_dict()``
    entry, filled in place by ``torch.distributed.checkpoint``). Any other DTensor cannot be told
    apart from one that one rank saved with ``torch.save`` and every rank loaded, whose local
    block is that rank's rows, not this one's.
    """
    from torch.distributed.tensor import DTensor

    if not isinstance(value, DTensor):
        # A copy where it is a part: a load with assign=True would otherwise keep every row alive.
        return value[layout.start : layout.stop].clone() if layout.is_sharded else value
    local = value.to_local()
    if local.untyped_storage().data_ptr() == store.untyped_storage().data_ptr() and local.shape == store.shape:
        return local
    raise ValueError(
        f"{key} is a DTensor that is not this loss's own state_dict() entry: load sharded state with "
        "torch.distributed.checkpoint into loss.state_dict() (or pass full (num_samples,) tensors). A "
        "state_dict saved with torch.save by one rank holds that rank's rows only"
    )
