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

The storage is a plain buffer per field. Moving it to the host or sharding it across ranks (for
data sets of hundreds of millions of items) only changes :meth:`read` and :meth:`commit`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from glofnd_losses import distributed


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
    """

    dtype: torch.dtype
    init: float
    minimum: float | None = None
    maximum: float | None = None

    def range_text(self) -> str:
        """The values this field accepts, for error messages: ``"finite values in [-1.0, 1.0]"``."""
        low = "-inf" if self.minimum is None else repr(float(self.minimum))
        high = "inf" if self.maximum is None else repr(float(self.maximum))
        kind = "whole numbers" if not self.dtype.is_floating_point else "finite values"
        return f"{kind} in [{low}, {high}]" if self.minimum is not None or self.maximum is not None else kind


def checked_rows(key: str, value: Any, field: Field, num_samples: int) -> torch.Tensor:
    """A loaded field's rows converted to ``field.dtype``, or a ValueError naming ``key``.

    The rows must be a ``(num_samples,)`` tensor of real numbers that ``field.dtype`` holds exactly
    (whole numbers for integer fields) and lie in the field's range. Reads every value: meant for
    load time, not the training step.
    """
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{key} must be a tensor of shape ({num_samples},), got {type(value).__name__}")
    if tuple(value.shape) != (num_samples,):
        raise ValueError(
            f"{key} must have shape (num_samples={num_samples},), got {tuple(value.shape)}: "
            "was the state saved by a loss with another num_samples?"
        )
    if value.is_complex():
        raise ValueError(f"{key} must hold real numbers (stored as {field.dtype}), got dtype {value.dtype}")
    value = value.detach()
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


class PerSampleState(nn.Module):
    """A table of ``num_samples`` rows with named scalar fields, synced across ranks by index.

    Args:
        num_samples: Number of data set items (rows). Indices must lie in ``[0, num_samples)``.
        fields: Field name to declaration. Buffer names are the field names.

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

    def __init__(self, num_samples: int, fields: dict[str, Field]) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
        self.num_samples = int(num_samples)
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
        for name, field in self.fields.items():
            store = self.buffer(name)
            moved_to = fn(store[:1]).device
            if store.is_meta and moved_to.type != "meta":
                self._buffers[name] = torch.full_like(store, field.init, device=moved_to)
            else:
                self._buffers[name] = store.to(device=moved_to)
        return self

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Check every incoming field, then load them in their declared dtypes (all or nothing).

        Every field present is checked (:func:`checked_rows`) before any is written, so a state
        of another size or with a NaN leaves this table as it was. The fields are loaded in their
        declared dtypes, also with ``load_state_dict(..., assign=True)``: a plain load copies into
        the fp32 buffers; ``assign=True`` would keep a checkpoint's tensors as they are, so a
        checkpoint stored in bf16 would round every later update. ``state_dict`` is the caller's
        shallow copy: replacing its entries changes nothing of theirs.
        """
        state_dict.update(self.checked_fields(state_dict, prefix))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def checked_fields(self, state_dict: Mapping[str, Any], prefix: str) -> dict[str, torch.Tensor]:
        """The fields of ``state_dict`` under ``prefix``, checked and in their dtypes (absent ones left out).

        Raises:
            ValueError: A field of another size, dtype or range, naming its key.
        """
        return {
            prefix + name: checked_rows(prefix + name, state_dict[prefix + name], field, self.num_samples)
            for name, field in self.fields.items()
            if prefix + name in state_dict
        }

    def add(self, name: str, field: Field) -> None:
        """Declare one more field: a persistent buffer of ``num_samples`` rows at ``field.init``."""
        if name in self.fields:
            raise ValueError(f"per-sample field {name!r} is declared twice")
        try:
            values = torch.full((self.num_samples,), field.init, dtype=field.dtype)
        except RuntimeError as error:  # the allocator's message names neither the argument nor the field
            size = self.num_samples * torch.empty((), dtype=field.dtype).element_size()
            raise RuntimeError(
                f"num_samples={self.num_samples}: cannot allocate the per-sample field {name!r} "
                f"({size / 2**30:.1f} GiB); is num_samples the data set's size?"
            ) from error
        self.fields[name] = field
        self.register_buffer(name, values, persistent=True)

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, fields=({', '.join(self.fields)})"

    def buffer(self, name: str) -> torch.Tensor:
        """The full 1-D buffer of field ``name`` (not a copy)."""
        value = getattr(self, name)
        assert isinstance(value, torch.Tensor)
        return value

    def read(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``indices`` of every field (copies; indices must be valid)."""
        return {name: self.buffer(name).index_select(0, indices) for name in self.fields}

    def commit(
        self,
        indices: torch.Tensor,
        rows: dict[str, torch.Tensor],
        error_bits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Write new rows for the local ``indices`` on every rank (one all-gather).

        Must be called by every rank in the same step (it is a collective when a process group
        is active).

        Args:
            indices: Local data set indices, 1-D int64 of length ``b`` (equal on every rank).
            rows: New values per field, each of shape ``(b,)``; fields not given keep their value.
            error_bits: Optional 0-d integer tensor of this rank's input check results (0: valid,
                below 2**53); if it is non-zero on any rank, nothing is written on any rank.

        Returns:
            ``(world_size,)`` int64 error bits of every rank in rank order, on ``indices``' device
            (zeros where none were given); the caller raises from them without a host read.
        """
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
        self._write(global_indices, new_rows, (per_rank_bits == 0).all())
        return per_rank_bits

    def _write(self, indices: torch.Tensor, rows: dict[str, torch.Tensor], valid: torch.Tensor | None) -> None:
        """Write ``rows`` (one value per index; duplicates carry equal values) unless ``valid`` is False."""
        for name, values in rows.items():
            store = self.buffer(name)
            new_values = values.to(store.dtype)
            if valid is not None:
                new_values = torch.where(valid, new_values, store.index_select(0, indices))
            store.index_copy_(0, indices, new_values)
