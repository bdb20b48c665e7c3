"""Unimodal SogCLR (global contrastive loss) with GloFND false-negative filtering."""

from __future__ import annotations

import math

import torch

from glofnd_losses import functional
from glofnd_losses.base import GloFNDLossBase, autocast_disabled
from glofnd_losses.engine import RowInputs
from glofnd_losses.functional import RowTerms
from glofnd_losses.thresholds import ThresholdOptimizer

MIN_TEMPERATURE = 1 / 80
"""Smallest temperature of :class:`GloFNDSogCLRLoss`: ``exp(1 / 0.0125) ~ 5.5e34`` is finite in float32."""


class GloFNDSogCLRLoss(GloFNDLossBase):
    """SogCLR's global contrastive loss whose negatives skip GloFND's false negatives.

    SogCLR keeps, for every data set item, a moving average ``u`` of the mean exponential
    similarity of the item to its negatives, which lets it optimise the global (whole data set)
    contrastive loss with small batches. GloFND learns, for every item, the similarity threshold
    above which a negative is a false negative, and those negatives leave both the loss and ``u``.

    Inputs are two views of the same ``b`` items plus their data set indices. Embeddings are
    L2-normalised here and the loss is computed in float32 (also under autocast). When a
    ``torch.distributed`` process group is active, the views are gathered (with gradient) and
    every local anchor is contrasted with the global batch; the per-sample state is identical on
    every rank after every step.

    The returned scalar has SogCLR's surrogate gradient (an estimate of ``temperature`` times the
    gradient of the global contrastive loss) and, as its value, the matching estimate of
    ``temperature`` times the global contrastive loss, ``mean_i sum_v [-s_pos + tau * log u_i^v]``,
    so that logged values are meaningful. Per-step diagnostics (tensors, no host sync) are in
    :attr:`last_stats`.

    Args:
        num_samples: Number of data set items; ``indices`` must lie in ``[0, num_samples)``.
        temperature: SogCLR's temperature ``tau`` (at least 1/80, see :data:`MIN_TEMPERATURE`).
        gamma: Weight of the new estimate in ``u``'s moving average (``u`` is set directly at an
            item's first visit).
        alpha: Target fraction of each item's negatives flagged as false negatives.
        start_epoch: First 0-based epoch in which thresholds learn and filter (paper: 70 of 200).
        detector: ``"glofnd"``, ``"fnc"`` (mini-batch quantile), ``"oracle"`` (needs labels) or None.
        threshold_optimizer: GloFND's update rule (default :meth:`ThresholdOptimizer.default`).
        start_step: First training step in which thresholds learn (for data without epochs).
        filter_start_epoch: First epoch in which flagged negatives are removed (default
            ``start_epoch``).
        chunk_size: Anchors per chunk of the score rows; None (default) keeps each chunk's scores
            within a fixed memory budget, so peak memory stays flat as the batch grows.
        treatment: ``"eliminate"`` only (flagged negatives leave the loss): SogCLR tracks its
            denominator with ``u``, which has no attracted form.
        state_sharding: ``"replicated"`` (every rank stores every sample's row) or ``"sharded"``
            (each rank stores a contiguous block of rows and a step fetches its anchors' rows from
            their owners: per-rank memory divided by the world size; see docs/sharded_state.md).

    Examples:
        >>> import torch
        >>> from glofnd_losses import GloFNDSogCLRLoss
        >>> loss_fn = GloFNDSogCLRLoss(num_samples=1000, alpha=0.01)
        >>> z1, z2 = torch.randn(8, 32, requires_grad=True), torch.randn(8, 32, requires_grad=True)
        >>> indices = torch.arange(8)
        >>> loss = loss_fn(z1, z2, indices)
        >>> loss.backward()
        >>> loss_fn.thresholds.shape
        torch.Size([1000])
    """

    def __init__(
        self,
        num_samples: int,
        temperature: float = 0.1,
        gamma: float = 0.9,
        alpha: float = 0.01,
        start_epoch: int = 0,
        detector: str | None = "glofnd",
        threshold_optimizer: ThresholdOptimizer | None = None,
        *,
        start_step: int = 0,
        filter_start_epoch: int | None = None,
        chunk_size: int | None = None,
        treatment: str = "eliminate",
        state_sharding: str = "replicated",
    ) -> None:
        if not MIN_TEMPERATURE <= temperature < math.inf:
            raise ValueError(
                f"temperature must be >= {MIN_TEMPERATURE} (1/80): SogCLR's u averages exp(s / temperature) over "
                f"cosines s up to 1, which overflows float32 below that, and finite, got {temperature}"
            )
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        if treatment == "attract":
            raise ValueError(
                "treatment='attract' is not available for GloFNDSogCLRLoss: SogCLR tracks its denominator with u, "
                "which has no attracted form; use GloFNDNTXent(treatment='attract') or treatment='eliminate'"
            )
        super().__init__(
            num_samples, alpha, detector, threshold_optimizer, start_epoch, start_step, filter_start_epoch, chunk_size,
            treatment=treatment, state_sharding=state_sharding,
        )  # fmt: skip
        self.add_state("u", torch.float32, 0.0, minimum=0.0)
        # A 0/1 byte, not bool: weight-averaging callbacks (Lightning's WeightAveraging) subtract buffers.
        self.add_state("u_initialized", torch.uint8, 0.0, minimum=0.0, maximum=1.0)
        self.temperature = float(temperature)
        self.gamma = float(gamma)

    def _loss_settings(self) -> str:
        return f"temperature={self.temperature}, gamma={self.gamma}"

    @property
    def thresholds(self) -> torch.Tensor:
        """Per-sample GloFND thresholds, ``(num_samples,)``: a copy, so writing to it leaves the state as it is."""
        return self._threshold_buffer("").detach().clone()

    @property
    def u(self) -> torch.Tensor:
        """Per-sample moving averages of the negatives' mean exponential: a copy, as :attr:`thresholds`."""
        return self.state.buffer("u").detach().clone()

    def forward(
        self, z1: torch.Tensor, z2: torch.Tensor, indices: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Loss of a batch of two views.

        Args:
            z1: Embeddings of the first view, ``(b, d)``.
            z2: Embeddings of the second view, ``(b, d)``.
            indices: Data set indices of the ``b`` items, ``(b,)`` integers.
            labels: Optional ``(b,)`` class labels, for the oracle detector and for the
                ``fn_precision`` / ``fn_recall`` diagnostics.

        Returns:
            A scalar (see the class docstring for what its value is).
        """
        settings = self._begin_step()
        with autocast_disabled(z1.device.type):
            inputs = self._two_view_inputs(z1, z2, indices, labels, ("z1", "z2"), True, 1.0 / z1.shape[0])
            if inputs.global_size == 1:
                return self._loss_without_negatives([z1, z2], inputs.checked)
            state_rows = self.state.read(inputs.checked.indices)
            scale = inputs.bank.anchors.new_full((), 1.0 / self.temperature)  # not learned here: no gradient
            result = self._run_bank(inputs.bank, self._rows, state_rows, settings, scale)
            new_rows = {**result.new_rows, "u": result.outputs["u"]}
            new_rows["u_initialized"] = torch.ones_like(state_rows["u_initialized"])
        self._end_step(inputs.checked, new_rows, result.stats, z1.shape[0])
        return result.loss

    def _rows(self, rows: RowInputs) -> RowTerms:
        """SogCLR's row formula (:func:`~glofnd_losses.functional.sogclr_rows`); ``u`` is the mean over the views."""
        terms, u_new = functional.sogclr_rows(
            rows.scores,
            rows.positive_index,
            rows.keep,
            rows.kept_count,
            rows.state_rows["u"],
            rows.state_rows["u_initialized"].bool(),
            self.gamma,
            self.temperature,
        )
        terms.outputs["u"] = u_new.mean(dim=0)
        return terms
