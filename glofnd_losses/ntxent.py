"""NT-Xent (SimCLR) with GloFND false-negative filtering: a drop-in for lightly's NTXentLoss."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from glofnd_losses import functional
from glofnd_losses.base import GloFNDLossBase, autocast_disabled, check_finite_positive
from glofnd_losses.engine import RowInputs
from glofnd_losses.functional import RowTerms
from glofnd_losses.thresholds import ThresholdOptimizer


class GloFNDNTXent(GloFNDLossBase):
    """lightly's ``NTXentLoss`` whose negatives skip GloFND's false negatives.

    With filtering off (``detector=None``, before ``start_epoch``, or while no threshold has moved)
    the value and gradients equal ``lightly.loss.NTXentLoss(temperature, gather_distributed=...)``:
    the mean over the ``2b`` local rows of the cross-entropy of each view against the other view
    and the other samples of both views. With filtering, each row's kept negatives are rescaled
    to the full negative count (``-l_pos + log(exp(l_pos) + (N / n_kept) * sum_kept exp(l))``), so
    the positive/negative balance is unchanged. Memory banks are not supported: banked
    negatives have no data set index to carry a threshold.

    Args:
        num_samples: Number of data set items; ``indices`` must lie in ``[0, num_samples)``.
        temperature: Softmax temperature, as in lightly (> 0).
        memory_bank_size: lightly's second argument, kept in its place so that lightly's
            positional calls carry over; must be a bank of 0 items (``0``, ``(0,)`` or ``(0, dim)``).
        gather_distributed: Contrast against the global batch of all ranks (as in lightly). The
            per-sample state is synced across ranks either way, so every rank must pass the same
            batch size.
        alpha: Target fraction of each item's negatives flagged as false negatives.
        start_epoch: First 0-based epoch in which thresholds learn and filter.
        detector: ``"glofnd"``, ``"fnc"``, ``"oracle"`` (needs labels) or None.
        threshold_optimizer: GloFND's update rule (default :meth:`ThresholdOptimizer.default`).
        start_step: First training step in which thresholds learn (for data without epochs).
        filter_start_epoch: First epoch in which flagged negatives are removed.
        chunk_size: Anchors per chunk of the score rows; None (default) keeps each chunk's scores
            within a fixed memory budget, so peak memory stays flat as the batch grows.
        treatment: ``"eliminate"`` (flagged negatives leave the loss) or ``"attract"`` (they become
            extra positives: ``-(1/|P|) sum_{q in P} log softmax_q`` over the positive and every negative).
        state_sharding: ``"replicated"`` (every rank stores every sample's row) or ``"sharded"``
            (each rank stores a contiguous block of rows and a step fetches its anchors' rows from
            their owners: per-rank memory divided by the world size; see docs/sharded_state.md).

    Examples:
        >>> import torch
        >>> from glofnd_losses import GloFNDNTXent
        >>> criterion = GloFNDNTXent(num_samples=1000, temperature=0.5)
        >>> out0, out1 = torch.randn(8, 32), torch.randn(8, 32)
        >>> loss = criterion(out0, out1, indices=torch.arange(8))
        >>> float(loss) > 0
        True
    """

    def __init__(
        self,
        num_samples: int,
        temperature: float = 0.5,
        memory_bank_size: int | Sequence[int] = 0,
        gather_distributed: bool = False,
        *,
        alpha: float = 0.01,
        start_epoch: int = 0,
        detector: str | None = "glofnd",
        threshold_optimizer: ThresholdOptimizer | None = None,
        start_step: int = 0,
        filter_start_epoch: int | None = None,
        chunk_size: int | None = None,
        treatment: str = "eliminate",
        state_sharding: str = "replicated",
    ) -> None:
        bank_size = (memory_bank_size,) if isinstance(memory_bank_size, int) else tuple(memory_bank_size or (0,))
        if bank_size[0] != 0:  # lightly's rule: a bank of 0 items, (0,) or (0, dim), is no bank
            raise ValueError(
                f"memory_bank_size must be 0: GloFNDNTXent does not support memory banks (banked negatives "
                f"carry no data set index, so no threshold applies to them), got {memory_bank_size}"
            )
        if not isinstance(gather_distributed, bool):
            raise ValueError(f"gather_distributed must be a bool, got {gather_distributed!r}")
        # lightly refuses only |temperature| < 1e-8; a negative one inverts the softmax.
        check_finite_positive("temperature", temperature)
        super().__init__(
            num_samples, alpha, detector, threshold_optimizer, start_epoch, start_step, filter_start_epoch, chunk_size,
            treatment=treatment, state_sharding=state_sharding,
        )  # fmt: skip
        self.temperature = float(temperature)
        self.gather_distributed = bool(gather_distributed)

    def _loss_settings(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"

    @property
    def thresholds(self) -> torch.Tensor:
        """Per-sample GloFND thresholds, ``(num_samples,)``: a copy, so writing to it leaves the state as it is."""
        return self._threshold_buffer("").detach().clone()

    def forward(
        self, out0: torch.Tensor, out1: torch.Tensor, indices: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Loss of a batch of two views.

        Args:
            out0: Projections of the first view, ``(b, d)``.
            out1: Projections of the second view, ``(b, d)``.
            indices: Data set indices of the ``b`` items, ``(b,)`` integers.
            labels: Optional ``(b,)`` class labels, for the oracle detector and the
                ``fn_precision`` / ``fn_recall`` diagnostics.

        Returns:
            Scalar loss: the mean over the ``2b`` local rows.
        """
        settings = self._begin_step()
        with autocast_disabled(out0.device.type):
            names = ("out0", "out1")
            rows = 2 * out0.shape[0]
            inputs = self._two_view_inputs(out0, out1, indices, labels, names, self.gather_distributed, 1.0 / rows)
            if inputs.global_size == 1:
                return self._loss_without_negatives([out0, out1], inputs.checked)
            state_rows = self.state.read(inputs.checked.indices)
            inverse_temperature = inputs.bank.anchors.new_full((), 1.0 / self.temperature)
            result = self._run_bank(inputs.bank, cross_entropy, state_rows, settings, inverse_temperature)
        self._end_step(inputs.checked, result.new_rows, result.stats, out0.shape[0])
        return result.loss


def cross_entropy(rows: RowInputs) -> RowTerms:
    """The softmax losses' row formula (NT-Xent, CLIP's minibatch estimator) on a chunk.

    :func:`~glofnd_losses.functional.cross_entropy_rows` without the flagged negatives, or
    :func:`~glofnd_losses.functional.supervised_cross_entropy_rows` with them as extra positives.
    """
    if rows.flagged is not None:
        return functional.supervised_cross_entropy_rows(
            rows.scores, rows.scale, rows.positive_index, rows.keep, rows.flagged
        )
    return functional.cross_entropy_rows(
        rows.scores, rows.scale, rows.positive_index, rows.keep, rows.kept_count, rows.num_negatives
    )
