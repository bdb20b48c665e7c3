"""Input checks that never add a host-device sync to the training step.

Shape, dtype and length checks read host metadata only and raise at once. Value checks (indices
in range, finite embeddings) need the data:

* on CPU tensors they run eagerly and raise ``ValueError`` before anything is written;
* on an accelerator they are computed on the device as a bit mask. The step then writes no state
  (:meth:`glofnd_losses.state.PerSampleState.commit` carries the mask of every rank in its
  all-gather), the mask is copied to pinned host memory without blocking, and the ``ValueError``
  is raised by a later call of the loss (or :meth:`DeferredErrors.raise_if_any`).

With several ranks every rank raises, in the same call (docs/reliability.md):

* CPU: one all-gather of each rank's batch size and check result (:func:`raise_together`) before
  the step's first other collective, so a rank with a bad batch never leaves the others waiting;
* accelerators: the masks of all ranks ride with the state rows; each rank reduces them to one
  number (:func:`combine_rank_bits`) and raises :data:`COLLECTIVE_ERROR_DELAY` calls later, the
  same call on every rank whatever the timing of its copy.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from glofnd_losses import distributed
from glofnd_losses.host import PendingHostValue

_INDEX_BIT = 1
_RANK_BITS = 8
"""Width of one rank's check result in :func:`combine_rank_bits` (room for three embeddings' bits)."""
_FIRST_BAD_SHIFT, _COUNT_SHIFT = 16, 40
COLLECTIVE_ERROR_DELAY = 2
"""Calls after a bad accelerator step at which every rank raises (several ranks).

The host waits for the check result of that step if it has not landed. Two calls, not one: by
the start of the second next forward the device has finished the bad step's forward unless the
host runs more than a whole step ahead, so the wait returns at once; waiting at the next forward
would hold the host back to the device's progress in every step.
"""
UNIT_NORM_TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 2e-2}
"""Largest ``| ||x|| - 1 |`` of an embedding that must be L2-normalised, by dtype (default 1e-3)."""


def _norm_offsets(tensor: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Each row's ``| ||x|| - 1 |``, and the tolerance of the tensor's dtype."""
    offsets = (torch.linalg.vector_norm(tensor.detach().float(), dim=1) - 1).abs()
    return offsets, UNIT_NORM_TOLERANCE.get(tensor.dtype, 1e-3)


def check_embeddings(named: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Embeddings must be 2-D floating tensors of one shape and device."""
    first_name, first = named[0]
    for name, tensor in named:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2:
            raise ValueError(f"{name} must have shape (batch_size, dim), got {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {tensor.dtype}")
        if tensor.shape != first.shape:
            raise ValueError(
                f"{name} must have the same shape as {first_name} {tuple(first.shape)}, got {tuple(tensor.shape)}"
            )
        if tensor.device != first.device:
            raise ValueError(f"{name} is on {tensor.device} but {first_name} is on {first.device}")
    if first.shape[0] < 1:
        raise ValueError(f"{first_name} must hold at least one sample, got batch size 0")


def check_index_shape(indices: torch.Tensor, batch_size: int, name: str = "indices") -> None:
    """Indices must be a 1-D integer tensor with one entry per sample."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D integer torch.Tensor, got {type(indices).__name__}")
    if indices.dim() != 1 or indices.shape[0] != batch_size:
        raise ValueError(
            f"{name} must have shape ({batch_size},) (one data set index per sample), got {tuple(indices.shape)}"
        )
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer data set indices, got dtype {indices.dtype}")


def _not_unit_norm(name: str) -> str:
    return (
        f"{name} must be L2-normalised (rows of norm 1, as open_clip's models return them): its scores are "
        "compared with thresholds in [-1, 1]"
    )


def _message(bits: int, num_samples: int, names: Sequence[str]) -> str:
    problems = []
    if bits & _INDEX_BIT:
        problems.append(f"indices must lie in [0, num_samples={num_samples})")
    for position, name in enumerate(names):
        if bits & (2 << position):
            problems.append(f"{name} contains NaN or infinite values")
        if bits & (2 << (len(names) + position)):
            problems.append(_not_unit_norm(name))
    return "; ".join(problems) + " (the state was left unchanged)"


def combine_rank_bits(per_rank: torch.Tensor, rank: int) -> torch.Tensor:
    """Every rank's check results as one 0-d int64, computed on the device (no host read).

    Args:
        per_rank: ``(world_size,)`` int64 check results of the ranks, in rank order.
        rank: This rank.

    Returns:
        This rank's bits, the first bad rank's bits, that rank and the number of bad ranks, packed
        so that :func:`collective_message` can name them.
    """
    bad = per_rank != 0
    first_bad = torch.argmax(bad.to(torch.int64))  # the first True; 0 where none is (then unused)
    return (
        per_rank[rank]
        | (per_rank[first_bad] << _RANK_BITS)
        | (first_bad << _FIRST_BAD_SHIFT)
        | (bad.sum() << _COUNT_SHIFT)
    )


def refused_by_others(bad_rank: int, bits: int, bad_ranks: int, num_samples: int, names: Sequence[str]) -> str:
    """The message of a rank whose own batch was fine: which rank's batch was refused and why."""
    more = f" (and {bad_ranks - 1} other rank(s)' batches)" if bad_ranks > 1 else ""
    return (
        f"rank {bad_rank}'s batch was refused{more}: {_message(bits, num_samples, names)}; every rank raises "
        "this error in the same step, so that no rank waits for the others or pairs its next step with theirs"
    )


def collective_message(combined: int, rank: int, num_samples: int, names: Sequence[str]) -> str:
    """The message of :func:`combine_rank_bits`'s value on ``rank`` ("" when every batch was fine)."""
    mask = (1 << _RANK_BITS) - 1
    own, first_bits = combined & mask, (combined >> _RANK_BITS) & mask
    first_bad = (combined >> _FIRST_BAD_SHIFT) & ((1 << (_COUNT_SHIFT - _FIRST_BAD_SHIFT)) - 1)
    bad_ranks = combined >> _COUNT_SHIFT
    if own:
        return f"rank {rank}: {_message(own, num_samples, names)}; every rank raises in the same step"
    if bad_ranks:
        return refused_by_others(first_bad, first_bits, bad_ranks, num_samples, names)
    return ""


def value_error_bits(
    indices: torch.Tensor,
    num_samples: int,
    embeddings: Sequence[tuple[str, torch.Tensor]],
    unit_norm: bool = False,
) -> torch.Tensor:
    """0-d int tensor whose bits flag out-of-range indices, non-finite and (``unit_norm``) unnormalised embeddings."""
    bits = ((indices < 0) | (indices >= num_samples)).any().to(torch.int64) * _INDEX_BIT
    for position, (_, tensor) in enumerate(embeddings):
        bits = bits + (~torch.isfinite(tensor).all()).to(torch.int64) * (2 << position)
        if unit_norm:
            offsets, tolerance = _norm_offsets(tensor)
            bits = bits + (offsets > tolerance).any().to(torch.int64) * (2 << (len(embeddings) + position))
    return bits


def check_values_eagerly(
    indices: torch.Tensor,
    num_samples: int,
    embeddings: Sequence[tuple[str, torch.Tensor]],
    unit_norm: bool = False,
) -> None:
    """Raise ``ValueError`` for bad index or embedding values (CPU tensors: no device sync)."""
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_samples):
        bad = indices[(indices < 0) | (indices >= num_samples)][0]
        raise ValueError(f"indices must lie in [0, num_samples={num_samples}), got {int(bad)}")
    for name, tensor in embeddings:
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} contains NaN or infinite values (the state was left unchanged)")
        if not unit_norm:
            continue
        offsets, tolerance = _norm_offsets(tensor)
        worst = int(offsets.argmax())
        if float(offsets[worst]) > tolerance:
            norm = float(torch.linalg.vector_norm(tensor[worst].detach().float()))
            raise ValueError(f"{_not_unit_norm(name)}, got a row of norm {norm:.4g} (the state was left unchanged)")


def raise_together(
    indices: torch.Tensor,
    num_samples: int,
    embeddings: Sequence[tuple[str, torch.Tensor]],
    unit_norm: bool = False,
) -> None:
    """Several ranks, CPU tensors: raise the same step's ``ValueError`` on every rank if any batch is bad.

    One all-gather of each rank's batch size and check result, made before the step's other
    collectives: a rank whose batch is refused never leaves the others waiting in a gather, and
    none goes on to pair its next step with another's current one. Unequal batch sizes are
    refused first (the gathers need equal ones). The bad rank's message is the eager check's;
    the others name the bad rank and its problem.
    """
    bits = int(value_error_bits(indices, num_samples, embeddings, unit_norm))
    per_rank = distributed.gather_host_ints([indices.shape[0], bits], indices.device)
    distributed.raise_if_unequal_sizes([size for size, _ in per_rank])
    bad_ranks = [rank for rank, (_, rank_bits) in enumerate(per_rank) if rank_bits]
    if not bad_ranks:
        return
    if bits:
        try:
            check_values_eagerly(indices, num_samples, embeddings, unit_norm)
            problem = _message(bits, num_samples, [name for name, _ in embeddings])
        except ValueError as error:
            problem = str(error)
        raise ValueError(f"rank {distributed.rank()}: {problem}; every rank raises in the same step")
    first = bad_ranks[0]
    names = [name for name, _ in embeddings]
    raise ValueError(refused_by_others(first, per_rank[first][1], len(bad_ranks), num_samples, names))


def raise_if_settings_differ(settings: dict[str, str], device: torch.device) -> None:
    """Several ranks: raise the same ``ValueError`` on every rank unless every rank has these ``settings``.

    Two small all-gathers and a host read: for the first call of a run (and after a load), not
    for every step. Ranks built differently would otherwise abort gloo (different row counts) or
    diverge silently (a different ``alpha`` learns different thresholds into a state that should
    be one).

    Args:
        settings: Setting name to its value's text, e.g. ``{"num_samples": "40"}``; the message
            reads ``num_samples: rank 0 = 40, rank 1 = 41``.
        device: Where the process group's collectives take tensors.
    """
    per_rank = [json.loads(text) for text in distributed.gather_texts(json.dumps(settings), device)]
    differing = []
    for key in dict.fromkeys(key for rank_settings in per_rank for key in rank_settings):
        values = [rank_settings.get(key, "(none)") for rank_settings in per_rank]
        if len(set(values)) > 1:
            differing.append(f"{key}: " + ", ".join(f"rank {rank} = {value}" for rank, value in enumerate(values)))
    if differing:
        raise ValueError(
            "every rank must build the loss with the same settings and load the same state (the per-sample "
            "state is one table, replicated on every rank), but they differ: " + "; ".join(differing)
        )


class _Pending(NamedTuple):
    """One step's check result on its way to the host."""

    value: PendingHostValue
    names: str
    num_samples: int
    due: int | None
    """Several ranks: the call at which every rank raises it (value from :func:`combine_rank_bits`)."""
    rank: int


class DeferredErrors:
    """Carries device-side check results to the host without blocking the step."""

    def __init__(self) -> None:
        self._pending: list[_Pending] = []

    def record(
        self, bits: torch.Tensor, num_samples: int, names: Sequence[str], due: int | None = None, rank: int = 0
    ) -> None:
        """Start a non-blocking copy of ``bits`` to the host.

        Args:
            bits: 0-d int64: one process's :func:`value_error_bits`, or (``due`` given) every
                rank's, from :func:`combine_rank_bits`.
            num_samples: The loss's ``num_samples``, for the message.
            names: The checked embeddings' names, for the message.
            due: Several ranks: the call number at which every rank raises (waiting for the copy
                then if need be) and not before, so that all raise in the same call. None: raise
                at the first call after the copy has landed.
            rank: This rank (several ranks).
        """
        self._pending.append(_Pending(PendingHostValue(bits), ",".join(names), num_samples, due, rank))

    def raise_if_any(self, wait: bool = False, call: int | None = None) -> None:
        """Raise ``ValueError`` for any recorded bad batch whose result is available (or due).

        Args:
            wait: Block until every pending result is available (for the end of training).
            call: The current call number, compared with the results' ``due``.
        """
        still_pending: list[_Pending] = []
        for pending in self._pending:
            due_now = pending.due is not None and call is not None and call >= pending.due
            if pending.due is not None and not (wait or due_now):
                still_pending.append(pending)
                continue
            bits = pending.value.get(wait=wait or due_now)
            if bits is None:
                still_pending.append(pending)
            elif bits:
                self._pending = []
                raise ValueError(_pending_message(pending, bits))
        self._pending = still_pending


def _pending_message(pending: _Pending, bits: int) -> str:
    names = pending.names.split(",")
    if pending.due is None:
        return _message(bits, pending.num_samples, names)
    return collective_message(bits, pending.rank, pending.num_samples, names)


OPEN_CLIP_MODEL_OUTPUTS = frozenset({"image_features", "text_features", "logit_scale", "logit_bias", "image_embs",
                                     "text_embs", "logits", "labels"})  # fmt: skip
"""Names of the outputs open_clip's models return (``CLIP``, ``CustomTextCLIP``, ``CoCa``, open_clip 3.x).

open_clip's training loop calls ``loss(**model_out, output_dict=True)``; with distillation it adds
each of the teacher's outputs as ``dist_<name>``.
"""


def check_model_outputs(extra: Mapping[str, object], loss_name: str) -> None:
    """Refuse keyword arguments that are not open_clip model outputs (a misspelled argument).

    A loss that takes ``**kwargs`` to swallow the model outputs it does not use would also swallow
    ``outputdict=True`` and return a tensor where a dict was asked for.

    Args:
        extra: The keyword arguments the loss did not name.
        loss_name: The loss's class name, for the message.

    Raises:
        TypeError: As Python's for an unknown keyword: ``unexpected keyword argument 'outputdict'``.
    """
    unknown = [name for name in extra if name.removeprefix("dist_") not in OPEN_CLIP_MODEL_OUTPUTS]
    if unknown:
        known = ", ".join(sorted(OPEN_CLIP_MODEL_OUTPUTS))
        raise TypeError(
            f"{loss_name}.forward() got an unexpected keyword argument {unknown[0]!r} (besides its own arguments it "
            f"takes only the outputs of open_clip's models, ignored: {known}, and their 'dist_' forms)"
        )


def check_int_at_least(name: str, value: Any, minimum: int, meaning: str = "") -> int:
    """``value`` as an int (any integer type, e.g. ``numpy.int64``) >= ``minimum``, or a ValueError naming ``name``."""
    try:
        as_int = operator.index(value)
    except TypeError:
        as_int = minimum - 1
    if isinstance(value, bool) or as_int < minimum:
        requirement = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        meaning = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name} must be {requirement}{meaning}, got {value!r}")
    return as_int
