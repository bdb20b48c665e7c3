"""Per-sample state with an index-scatter sync rule.

Every loss in the package keeps a few numbers per data set item (threshold, visit count, Adam's
moments under an Adam rule, SogCLR's ``u`` and its init flag). They live here as registered,
persistent buffers (so they are in ``state_dict()`` and follow ``.to(device)``), one 1-D buffer per
field.

Sync rule (compare torchmetrics' declared states with a reduction; ours is scatter-by-index):
each rank computes new rows for its local anchors, :meth:`PerSampleState.commit` packs
``(index, error_bits, field_1, ..., field_F)`` of those rows into one ``float64`` tensor, runs **one**
all-gather, and every rank writes every row. The state is therefore bit-identical on every rank
after every step and any rank can checkpoint at any step.

Duplicate indices in a global batch are resolved deterministically: the last occurrence in global
batch order (rank order, then position) wins on every rank. The rows of the earlier occurrences
are replaced by the winner's before the scatter, so the scatter never races.

If any rank flags its batch as invalid (non-zero error bits of its input checks), the whole step
writes nothing (the old rows are written back), so a rejected batch never corrupts or
half-updates the state; :meth:`PerSampleState.commit` returns every rank's error bits, so that
every rank can raise the same error in the same step.

With one process there is nothing to gather: the rows are written as they are, with the same
last-occurrence rule and no float64 pack (some single-device backends, e.g. Apple's MPS, have no
float64).

Sharded (``sharding="sharded"``, :mod:`glofnd_losses.sharding`): each rank stores only the block of
rows it owns. :meth:`read` all-gathers the batch's indices and fetches every anchor's rows from its
owner in one all-to-all; :meth:`commit` runs the same all-gather as above and every rank writes the
rows it owns. Both are collectives in every step (also in evaluation). Per-rank memory is
``num_samples * bytes per row / world_size``; per-step traffic is ``O(global batch)``, as in the
replicated state. ``state_dict()`` holds the blocks as DTensors sharded on dim 0, so
``torch.distributed.checkpoint`` saves them at one world size and loads them at another. The
blocks are laid out when the table is first used under a process group, so a loss built before
``init_process_group`` (a LightningModule's ``__init__``) never allocates every row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from glofnd_losses import distributed, sharded_rows
from glofnd_losses.sharding import Layout, check_state_sharding, current_layout


@dataclass(frozen=True)
class Field:
    """Declaration of one per-sample field.

    Attributes:
        dtype: Storage dtype (``float32``, ``int32``, ``uint8`` or ``bool``; all pack exactly into
            float64). Flags kept as ``uint8``, not ``bool``, survive weight averaging, which
            subtracts buffers.
        init: Initial value of every row.
        minimum: Smallest value a loaded state may hold (None: no bound). Values are always finite.
        maximum: Largest value a loaded state may hold (None: no bound).
        saturates: Whole-number fields only: a count that stops at ``maximum``; a loaded value
            above it (a checkpoint stored with a wider type) is read as ``maximum``.
    """

    dtype: torch.dtype
    init: float
    minimum: float | None = None
    maximum: float | None = None
    saturates: bool = False

    def range_text(self) -> str:
        """The values this field accepts, for error messages: ``"finite values in [-1.0, 1.0]"``."""
        low = "-inf" if self.minimum is None else repr(float(self.minimum))
        high = "inf" if self.maximum is None else repr(float(self.maximum))
        kind = "whole numbers" if not self.dtype.is_floating_point else "finite values"
        return f"{kind} in [{low}, {high}]" if self.minimum is not None or self.maximum is not None else kind


def check_global_shape(key: str, value: Any, num_samples: int) -> None:
    """A ValueError naming ``key`` unless ``value`` (a DTensor: its global shape) has shape ``(num_samples,)``."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{key} must be a tensor of shape ({num_samples},), got {type(value).__name__}")
    if tuple(value.shape) != (num_samples,):
        raise ValueError(
            f"{key} must have shape (num_samples={num_samples},), got {tuple(value.shape)}: "
            "was the state saved by a loss with another num_samples?"
        )


def checked_values(key: str, value: torch.Tensor, field: Field) -> torch.Tensor:
    """``value`` converted to ``field.dtype`` (saturating counts clamped), or a ValueError naming ``key``."""
    if value.is_complex():
        raise ValueError(f"{key} must hold real numbers (stored as {field.dtype}), got dtype {value.dtype}")
    value = value.detach()
    if field.saturates and field.maximum is not None and not value.is_meta:
        value = torch.where(value > field.maximum, torch.full_like(value, field.maximum), value)
    converted = value.to(field.dtype)
    if value.is_meta:  # no values to check
        return converted
    bad = _bad_rows(value, converted, field)
    if bool(bad.any()):
        row = int(bad.to(torch.uint8).argmax())
        raise ValueError(
            f"{key} must hold {field.range_text()} (as {field.dtype}), got {float(value[row])!r} at row {row}"
        )
    return converted


def _bad_rows(value: torch.Tensor, converted: torch.Tensor, field: Field) -> torch.Tensor:
    """Bool mask of the rows ``converted`` (``value`` in ``field.dtype``) does not hold, or out of range.

    Compared in the value's own dtype, so that checking a large state makes no float64 copy of it.
    """
    if field.dtype.is_floating_point:  # rounding to float32 is fine; not finite, or overflowing it, is not
        bad = ~torch.isfinite(converted)
        if value.is_floating_point():
            bad |= ~torch.isfinite(value)
    else:  # a fraction, NaN or a value beyond the dtype's range does not come back unchanged
        bad = converted.to(value.dtype) != value
    if field.minimum is not None:
        bad |= value < field.minimum
    if field.maximum is not None:
        bad |= value > field.maximum
    return bad


def _count_load(module: nn.Module, incompatible_keys: object) -> None:
    """``load_state_dict`` post-hook of :class:`PerSampleState`."""
    assert isinstance(module, PerSampleState)
    module.loads += 1


def _last_occurrence(indices: torch.Tensor) -> torch.Tensor:
    """Position of the last occurrence of each element's value in ``indices`` (1-D, int64)."""
    sorted_values, order = torch.sort(indices, stable=True)
    last_sorted = torch.searchsorted(sorted_values, indices, right=True) - 1
    return order[last_sorted]


BLOCK_OWNER = "block_owner"
"""Non-persistent buffer of a sharded table: the rank whose block it holds (see ``_mark_owner``)."""


class PerSampleState(nn.Module):
    """A table of ``num_samples`` rows with named scalar fields, synced across ranks by index.

    Args:
        num_samples: Number of data set items (rows). Indices must lie in ``[0, num_samples)``.
        fields: Field name to declaration. Buffer names are the field names.
        sharding: ``"replicated"`` (every rank stores every row) or ``"sharded"`` (each rank its
            block, :mod:`glofnd_losses.sharding`).

    Examples:
        >>> import torch
        >>> state = PerSampleState(10, {"threshold": Field(torch.float32, 1.0)})
        >>> idx = torch.tensor([3, 7])
        >>> state.commit(idx, {"threshold": torch.tensor([0.5, 0.25])})  # every rank's check bits
        tensor([0])
        >>> state.read(idx)["threshold"]
        tensor([0.5000, 0.2500])
        >>> state.commit(idx, {"threshold": torch.tensor([0.0, 0.0])}, error_bits=torch.tensor(1))
        tensor([1])
        >>> state.read(idx)["threshold"]
        tensor([0.5000, 0.2500])
    """

    def __init__(self, num_samples: int, fields: dict[str, Field], sharding: str = "replicated") -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
        self.num_samples = int(num_samples)
        self.sharding = check_state_sharding(sharding)
        # The rows this rank stores; None until a sharded table is first used (see _ensure_layout).
        self.layout: Layout | None = None
        if sharding == "replicated" or distributed.is_distributed():
            self.layout = current_layout(self.num_samples, sharding)
        # Whether nothing was written or loaded yet: only such a table may be laid out anew.
        self._pristine = True
        # One DeviceMesh per device type for the DTensor entries of state_dict(), built once per layout.
        self._meshes: dict[str, Any] = {}
        self.fields: dict[str, Field] = {}
        for name, field in fields.items():
            self.add(name, field)
        self.loads = 0
        """How many times a state was loaded into this table (through any parent module or directly)."""
        self.register_load_state_dict_post_hook(_count_load)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> PerSampleState:
        """Follow device moves but never dtype casts: ``.half()`` must not round thresholds.

        A table on the meta device (a model built under ``torch.device("meta")``) has no values
        to move: moved off it (``to_empty``) it starts from the fields' initial values.
        """
        owner = self._buffers.get(BLOCK_OWNER)
        if owner is not None:
            moved_to = fn(owner[:1]).device
            if owner.is_meta and moved_to.type != "meta" and self.layout is not None:
                self._buffers[BLOCK_OWNER] = _owner_mark(self.layout, moved_to)
            else:
                self._buffers[BLOCK_OWNER] = owner.to(device=moved_to)
        for name, field in self.fields.items():
            store = self._buffers[name]
            assert store is not None
            moved_to = fn(store[:1]).device
            if store.is_meta and moved_to.type != "meta":
                with torch.inference_mode(False):
                    self._buffers[name] = torch.full_like(store, field.init, device=moved_to)
            else:
                self._buffers[name] = store.to(device=moved_to)
        return self

    def _ensure_layout(self) -> Layout:
        """Lay the table out for the current process group, the first time it is used under it.

        Raises:
            RuntimeError: A sharded table that holds rows (written or loaded) under another
                process group: its rows cannot be split anew in place.
        """
        wanted = current_layout(self.num_samples, self.sharding)
        if wanted == self.layout:
            return wanted
        if self.layout is not None and not self._pristine:
            raise RuntimeError(
                f"the sharded per-sample state holds the rows of rank {self.layout.rank} of {self.layout.world_size}, "
                f"but this process is rank {wanted.rank} of {wanted.world_size}: save it with "
                "torch.distributed.checkpoint and load it at the new world size"
            )
        device: torch.device | None = None
        for name, field in self.fields.items():
            device = self._buffers[name].device  # type: ignore[union-attr]
            self._buffers[name] = _allocate(name, field, wanted.rows, device, self.num_samples)
        self._mark_owner(wanted, device)
        self.layout = wanted
        self._meshes = {}
        return wanted

    def _mark_owner(self, layout: Layout, device: torch.device | None) -> None:
        """Hold this rank's number in a buffer that DDP's buffer broadcast would overwrite (sharded only).

        A loss inside a module wrapped by ``DistributedDataParallel`` has its buffers overwritten
        by rank 0's at every forward unless they are ignored (:func:`glofnd_losses.ddp.ignore_loss_buffers_in_ddp`):
        harmless for a replicated table, every other rank's rows lost for a sharded one. The
        ranks compare :meth:`blocks_untouched` at their first call and refuse to go on.
        """
        if layout.is_sharded and self.fields:
            self.register_buffer(BLOCK_OWNER, _owner_mark(layout, device), persistent=False)
        else:
            self._buffers.pop(BLOCK_OWNER, None)

    def layout_held(self) -> str:
        """What this table holds, the same text on every rank of a consistent run (for comparing ranks)."""
        if self.layout is None:
            return "not laid out yet"
        held = "rows" if not self._pristine else "initial rows"
        return f"{held} laid out for {self.layout.world_size} rank(s)"

    def blocks_untouched(self) -> bool:
        """Whether this rank's block still carries its own rank (reads the device: once per run)."""
        owner = self._buffers.get(BLOCK_OWNER)
        return owner is None or self.layout is None or int(owner[0]) == self.layout.rank

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Check every incoming field, then load them in their declared dtypes (all or nothing).

        Every field present is checked (:meth:`checked_fields`) before any is written, so a state
        of another size or with a NaN leaves this table as it was. The fields are loaded in their
        declared dtypes, also with ``load_state_dict(..., assign=True)``: a plain load copies into
        the fp32 buffers; ``assign=True`` would keep a checkpoint's tensors as they are, so a
        checkpoint stored in bf16 would round every later update. ``state_dict`` is the caller's
        shallow copy: replacing its entries changes nothing of theirs.
        """
        state_dict.update(self.checked_fields(state_dict, prefix))
        self._pristine = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        """The rows as tensors of shape ``(num_samples,)``: sharded ones as DTensors over every rank.

        As ``nn.Module``'s, the entries share the buffers' storage (weight averaging such as
        timm's EMA writes through them). A sharded table's entry wraps this rank's block in a
        DTensor sharded on dim 0, the form ``torch.distributed.checkpoint`` saves and reshards
        (and loads in place); ``torch.save`` of one rank's ``state_dict`` would hold that rank's
        block only.
        """
        layout = self._ensure_layout()
        for name in self.fields:
            store = self.buffer(name)
            value = store if keep_vars else store.detach()
            destination[prefix + name] = (
                sharded_rows.as_dtensor(value, layout, self._meshes) if layout.is_sharded else value
            )

    def checked_fields(self, state_dict: Mapping[str, Any], prefix: str) -> dict[str, torch.Tensor]:
        """The fields of ``state_dict`` under ``prefix``: this rank's rows, checked and in their dtypes.

        Absent fields are left out. A full ``(num_samples,)`` tensor gives this rank's block; this
        table's own DTensor entries (filled by ``torch.distributed.checkpoint``) their local block.

        Raises:
            ValueError: A field of another size, dtype or range, naming its key.
        """
        layout = self._ensure_layout()
        checked = {}
        for name, field in self.fields.items():
            key = prefix + name
            if key in state_dict:
                check_global_shape(key, state_dict[key], self.num_samples)
                rows = sharded_rows.block_of(key, state_dict[key], layout, self.buffer(name))
                checked[key] = checked_values(key, rows, field)
        return checked

    def add(self, name: str, field: Field) -> None:
        """Declare one more field: a persistent buffer of this rank's rows at ``field.init``."""
        if name in self.fields:
            raise ValueError(f"per-sample field {name!r} is declared twice")
        rows = 0 if self.layout is None else self.layout.rows
        self.fields[name] = field
        # No device: a table built under ``with torch.device("meta")`` allocates nothing.
        self.register_buffer(name, _allocate(name, field, rows, None, self.num_samples), persistent=True)
        if self.layout is not None and BLOCK_OWNER not in self._buffers:
            self._mark_owner(self.layout, None)

    def extra_repr(self) -> str:
        sharded = ", sharding='sharded'" if self.sharding == "sharded" else ""
        return f"num_samples={self.num_samples}, fields=({', '.join(self.fields)}){sharded}"

    @property
    def owned_rows(self) -> range:
        """The data set indices whose rows this rank stores (every index when replicated)."""
        layout = self._ensure_layout()
        return range(layout.start, layout.stop)

    def buffer(self, name: str) -> torch.Tensor:
        """The 1-D buffer of field ``name`` (not a copy): this rank's rows, :attr:`owned_rows`."""
        self._ensure_layout()
        value = getattr(self, name)
        assert isinstance(value, torch.Tensor)
        return value

    def all_true(self, condition: Callable[[torch.Tensor], torch.Tensor], names: list[str]) -> torch.Tensor:
        """0-d bool: whether ``condition`` (elementwise) holds for every row of fields ``names``, on every rank.

        A collective when the table is sharded (every rank must call it in the same step).
        """
        layout = self._ensure_layout()
        device = self.buffer(names[0]).device if names else torch.device("cpu")
        local = torch.stack([condition(self.buffer(name)).all() for name in names]).all() if names else None
        local = torch.ones((), dtype=torch.bool, device=device) if local is None else local
        return distributed.all_ranks_true(local) if layout.is_sharded else local

    def read(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``indices`` of every field (copies; indices must be valid).

        A collective when the table is sharded: every rank must call it in the same step with
        the same number of indices.
        """
        layout = self._ensure_layout()
        if not layout.is_sharded or not self.fields:  # no fields (a detector without state): nothing to fetch
            return {name: self.buffer(name).index_select(0, indices) for name in self.fields}
        names = list(self.fields)
        rows = sharded_rows.fetch([self.buffer(name) for name in names], indices, layout)
        return {name: rows[:, column].to(self.fields[name].dtype) for column, name in enumerate(names)}

    def commit(
        self,
        indices: torch.Tensor,
        rows: dict[str, torch.Tensor],
        error_bits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Write new rows for the local ``indices`` on every rank (one all-gather).

        Must be called by every rank in the same step (it is a collective when a process group
        is active). Every rank writes the rows it stores: all of them, or its block.

        Args:
            indices: Local data set indices, 1-D int64 of length ``b`` (equal on every rank).
            rows: New values per field, each of shape ``(b,)``; fields not given keep their value.
            error_bits: Optional 0-d integer tensor of this rank's input check results (0: valid,
                below 2**53); if it is non-zero on any rank, nothing is written on any rank.

        Returns:
            ``(world_size,)`` int64 error bits of every rank in rank order, on ``indices``' device
            (zeros where none were given); the caller raises from them without a host read.
        """
        layout = self._ensure_layout()
        self._pristine = False
        device = indices.device
        local_bits = torch.zeros((), dtype=torch.int64, device=device) if error_bits is None else error_bits
        if not distributed.is_distributed():
            # One process: the local rows are all the rows, written as they are (no float64 pack,
            # which some backends, e.g. Apple's MPS, do not have).
            winners = _last_occurrence(indices)
            new_rows = {name: rows[name].detach().index_select(0, winners) for name in rows}
            self._write(indices, new_rows, None if error_bits is None else error_bits == 0)
            return local_bits.to(torch.int64).reshape(1)
        names = list(rows)
        # The check result rides with the rows: every rank learns every rank's verdict from the
        # all-gather the step makes anyway (float64 holds integers exactly below 2**53).
        columns = [indices.to(torch.float64), local_bits.to(torch.float64).expand(indices.shape[0])]
        columns += [rows[name].detach().to(torch.float64) for name in names]
        packed = distributed.gather_rows(torch.stack(columns, dim=1))

        global_indices = packed[:, 0].to(torch.int64)
        # Every occurrence of an index carries its last occurrence's row: the scatter never races.
        winning_rows = packed.index_select(0, _last_occurrence(global_indices))
        per_rank_bits = packed[:: indices.shape[0], 1].to(torch.int64)  # each rank's first row
        new_rows = {name: winning_rows[:, column] for column, name in enumerate(names, 2)}
        valid = (per_rank_bits == 0).all()
        if layout.is_sharded:
            self._write_owned(global_indices, new_rows, valid, layout)
        else:
            self._write(global_indices, new_rows, valid)
        return per_rank_bits

    def _write(self, indices: torch.Tensor, rows: dict[str, torch.Tensor], valid: torch.Tensor | None) -> None:
        """Write ``rows`` (one value per index; duplicates carry equal values) unless ``valid`` is False."""
        for name, values in rows.items():
            store = self.buffer(name)
            new_values = values.to(store.dtype)
            if valid is not None:
                new_values = torch.where(valid, new_values, store.index_select(0, indices))
            store.index_copy_(0, indices, new_values)

    def _write_owned(
        self, global_indices: torch.Tensor, rows: dict[str, torch.Tensor], valid: torch.Tensor, layout: Layout
    ) -> None:
        """Write the rows of the indices this rank owns (one value per index), without a host read."""
        if layout.rows == 0:
            return
        scatter = sharded_rows.owned_scatter(global_indices, layout)
        new_rows = {name: values.index_select(0, scatter.source) for name, values in rows.items()}
        self._write(scatter.targets, new_rows, scatter.source_owned & valid)


def _allocate(name: str, field: Field, rows: int, device: torch.device | None, num_samples: int) -> torch.Tensor:
    """``rows`` values of ``field`` at its initial value, or an error naming the field and its size."""
    try:
        # A table first laid out in an inference_mode() forward (a validation loop) must stay writable.
        with torch.inference_mode(False):
            return torch.full((rows,), field.init, dtype=field.dtype, device=device)
    except RuntimeError as error:  # the allocator's message names neither the argument nor the field
        size = rows * torch.empty((), dtype=field.dtype).element_size()
        raise RuntimeError(
            f"num_samples={num_samples}: cannot allocate {rows} rows of the per-sample field {name!r} "
            f"({size / 2**30:.1f} GiB); is num_samples the data set's size? (state_sharding='sharded' "
            "splits the rows over the ranks)"
        ) from error


def _owner_mark(layout: Layout, device: torch.device | None) -> torch.Tensor:
    """The value of the ``block_owner`` buffer: this rank's number."""
    with torch.inference_mode(False):
        return torch.tensor([layout.rank], device=device)
