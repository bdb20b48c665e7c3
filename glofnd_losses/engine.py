"""The chunked engine: every loss of the package runs its score rows through it.

A :class:`Bank` is one set of anchor rows (``(V, b, d)``: ``V`` rows per anchor) against one set
of columns (``(C, d)``, the gathered batch). The engine takes the anchors in chunks; for a chunk
it computes the float32 scores, lets the detector flag (and learn), builds the keep-mask, and
asks the loss's formula for each row's value and its gradient with respect to the row's scores.
Then, while the chunk is still at hand, it adds the chunk's share of the feature gradients
(``dS @ columns`` to the anchors, ``dS^T @ anchors`` to the columns) and of the scale's gradient,
and drops every ``c x C`` intermediate. Every quantity of the method belongs to one anchor's rows
(its counts, spread, batch quantile, log-sum-exp or ``u`` terms), so chunking is exact.

The backward only scales those gradients by the incoming one: no recomputation, and the same
three matrix products per bank as autograd through a dense loss.
Peak memory is ``O(chunk x C + (b + C) x d)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from glofnd_losses import functional
from glofnd_losses.detectors import Detection, Detector, ScoreChunk, Step
from glofnd_losses.functional import RowTerms

SCORE_CHUNK_BYTES = 16 * 2**20
"""Default size of one chunk's float32 scores (``V x c x C x 4`` bytes); the chunk's other
intermediates (masks, exponentials, their gradient) take about three times as much again."""

SECOND_ORDER_ERROR = (
    "The GloFND losses (GloFNDSogCLRLoss, GloFNDNTXent, GloFNDClipLoss, GloFNDSigLipLoss) do not support "
    "second-order gradients "
    "(backward or torch.autograd.grad with create_graph=True, e.g. a gradient penalty): the chunked engine "
    "computes the loss's gradient in the forward pass, so it has no graph to differentiate again. Compute "
    "the penalty's gradient on a separate forward of the model without the GloFND loss, or use "
    "create_graph=False."
)
"""The error a backward with ``create_graph=True`` through a loss's engine raises."""

Formula = Callable[["RowInputs"], RowTerms]
"""A loss's formula: per-row values and score gradients of a chunk (see :class:`RowInputs`)."""


@dataclass
class Bank:
    """One set of anchor rows against one set of columns.

    Attributes:
        prefix: Name prefix of the bank's threshold fields (``""``, ``"image_"``, ``"text_"``).
        anchors: ``(V, b, d)`` float32 anchor embeddings (with gradient where the loss needs one).
        columns: ``(C, d)`` float32 column embeddings.
        excluded: ``(b, E)`` columns of each anchor that are not negatives.
        positive_index: ``(V, b)`` positive column of each row.
        row_weight: Weight of every row's value in the loss (e.g. ``1 / rows`` for a mean).
        anchor_labels: ``(b,)`` labels of the anchors, or None.
        column_labels: ``(C,)`` labels of the columns, or None.
    """

    prefix: str
    anchors: torch.Tensor
    columns: torch.Tensor
    excluded: torch.Tensor
    positive_index: torch.Tensor
    row_weight: float
    anchor_labels: torch.Tensor | None = None
    column_labels: torch.Tensor | None = None


@dataclass
class RowInputs:
    """What a formula sees of a chunk.

    Attributes:
        scores: ``(V, c, C)`` float32 scores (detached).
        positive_index: ``(V, c)`` positive column of each row.
        keep: ``(V, c, C)`` bool negatives kept in the loss (at least one per row).
        kept_count: ``(V, c)`` float32 kept negatives per row.
        state_rows: The chunk anchors' stored per-sample rows (``(c,)`` each).
        scale: 0-d inverse temperature.
        num_negatives: Negatives per row before filtering.
        bias: 0-d logit bias (SigLIP), or None for losses without one.
        flagged: ``(V, c, C)`` bool negatives flagged and taken out of ``keep``, for a loss that
            attracts them as positives; None when it eliminates them (or nothing is filtered).
    """

    scores: torch.Tensor
    positive_index: torch.Tensor
    keep: torch.Tensor
    kept_count: torch.Tensor
    state_rows: dict[str, torch.Tensor]
    scale: torch.Tensor
    num_negatives: int
    bias: torch.Tensor | None = None
    flagged: torch.Tensor | None = None


@dataclass
class BankResult:
    """What the engine returns for a bank.

    Attributes:
        loss: 0-d ``sum(row_weight * value)`` with the gradients of the formula.
        new_rows: Per-sample fields the detector learned, ``(b,)`` each.
        outputs: Per-anchor results of the formula, ``(b,)`` each.
        stats: Per-step diagnostics (detached 0-d tensors, named with the bank's prefix).
        thresholds: A detection-only pass's ``(b,)`` thresholds each anchor flagged above (``inf``
            where every negative was flagged, as the loss then keeps them all), when filtering
            with a detector that has thresholds; else None.
    """

    loss: torch.Tensor
    new_rows: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    thresholds: torch.Tensor | None = None


@dataclass
class Pass:
    """Everything a bank's pass needs besides the tensors that receive gradients.

    Attributes:
        bank: The bank.
        formula: The loss's per-row formula, or None for a pass that only detects (and learns):
            no loss, no gradients, and the thresholds each anchor flagged with are returned.
        detector: The loss's detector.
        state_rows: Stored rows of the bank's anchors, ``(b,)`` each.
        step: What the detector knows about the step.
        filtering: Whether flagged negatives leave the loss.
        chunk_size: Anchors per chunk, or None for :data:`SCORE_CHUNK_BYTES`.
        attract: Whether the formula receives the flagged negatives (as extra positives).
    """

    bank: Bank
    formula: Formula | None
    detector: Detector
    state_rows: dict[str, torch.Tensor]
    step: Step
    filtering: bool
    chunk_size: int | None
    attract: bool = False


def chunk_anchors(chunk_size: int | None, views: int, columns: int, anchors: int) -> int:
    """Anchors per chunk: ``chunk_size``, or as many as keep the chunk's scores under the budget."""
    if chunk_size is None:
        chunk_size = SCORE_CHUNK_BYTES // (4 * views * max(columns, 1))
    return max(1, min(int(chunk_size), anchors))


def run(work: Pass, scale: torch.Tensor, bias: torch.Tensor | None = None) -> BankResult:
    """The bank's loss term, learned state rows, formula outputs and diagnostics.

    The chunks run without autograd; the loss term then carries the gradients they computed
    (:class:`_WithGradients`), so a backward costs one multiplication per input.

    Args:
        work: The pass.
        scale: 0-d float32 inverse temperature; its gradient is the loss's where it requires one.
        bias: 0-d float32 logit bias (the logits are ``scale * scores + bias``), or None.
    """
    bank = work.bank
    inputs = (bank.anchors, bank.columns, scale, bias)
    wanted = [
        tensor is not None and work.formula is not None and torch.is_grad_enabled() and tensor.requires_grad
        for tensor in inputs
    ]
    with torch.no_grad():
        anchors, columns, scale_value = (tensor.detach() for tensor in inputs[:3])
        logits = _Logits(scale_value, None if bias is None else bias.detach())
        gradients = _Gradients.zeros(inputs, wanted)
        covariance = None
        if work.step.learn and work.detector.needs_score_spread:
            covariance = functional.column_covariance(columns)
        totals = _Totals()
        size = chunk_anchors(work.chunk_size, anchors.shape[0], columns.shape[0], anchors.shape[1])
        for start in range(0, anchors.shape[1], size):
            stop = min(start + size, anchors.shape[1])
            _chunk(work, anchors, columns, covariance, logits, slice(start, stop), gradients, totals)
        value = torch.as_tensor(totals.loss) * bank.row_weight
    num_negatives = columns.shape[0] - bank.excluded.shape[1]
    loss: torch.Tensor = _WithGradients.apply(value, *inputs, *gradients.as_tuple())
    return BankResult(
        loss,
        totals.per_anchor(totals.new_rows),
        totals.per_anchor(totals.outputs),
        totals.stats(bank.prefix, anchors.shape[0] * anchors.shape[1], num_negatives),
        torch.cat(totals.flag_thresholds) if totals.flag_thresholds else None,
    )


class _WithGradients(torch.autograd.Function):
    """``value`` as a function of the inputs whose gradients the engine has already computed.

    Called as ``apply(value, *inputs, *gradients)``: the gradient of each input (None where it
    needs none) follows the inputs in the same order.
    """

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, *inputs_then_gradients: torch.Tensor | None) -> torch.Tensor:
        gradients = inputs_then_gradients[len(inputs_then_gradients) // 2 :]
        ctx.present = [gradient is not None for gradient in gradients]
        ctx.save_for_backward(*(gradient for gradient in gradients if gradient is not None))
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # Grad mode is on in a backward only under create_graph=True. The saved gradients are
        # constants, so a graph built through them would miss the loss's second derivative and a
        # gradient penalty would be silently wrong: refuse it (once_differentiable did not, as
        # the incoming gradient needs no grad and the inputs' graphs, e.g. a normalisation,
        # still carried one).
        if torch.is_grad_enabled():
            raise RuntimeError(SECOND_ORDER_ERROR)
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_loss if present else None for present in ctx.present]
        return (None, *grads, *(None for _ in grads))


@dataclass
class _Logits:
    """A chunk's logits are ``scale * scores + bias`` (no bias: None)."""

    scale: torch.Tensor
    bias: torch.Tensor | None


@dataclass
class _Gradients:
    """Gradients of the bank's weighted loss, filled chunk by chunk (None where not wanted)."""

    anchors: torch.Tensor | None
    columns: torch.Tensor | None
    scale: torch.Tensor | None
    bias: torch.Tensor | None

    @classmethod
    def zeros(cls, inputs: tuple[torch.Tensor | None, ...], wanted: list[bool]) -> _Gradients:
        return cls(*(torch.zeros_like(tensor) if need and tensor is not None else None
                     for tensor, need in zip(inputs, wanted)))  # fmt: skip

    def as_tuple(self) -> tuple[torch.Tensor | None, ...]:
        return self.anchors, self.columns, self.scale, self.bias

    def add(self, grad_scores: torch.Tensor, anchors: torch.Tensor, columns: torch.Tensor, scale: torch.Tensor,
            rows: slice) -> None:  # fmt: skip
        """Add a chunk's share: ``grad_scores`` ``(V, c, C)`` is ``d loss / d scores`` of its rows."""
        if self.anchors is not None or self.scale is not None:
            grad_anchors = grad_scores @ columns
            if self.anchors is not None:
                self.anchors[:, rows] = grad_anchors
            if self.scale is not None:
                # The loss depends on the scale only through the logits scale * s + bias, so d / d scale
                # is sum(dS * S) / scale, and sum_c dS_rc S_rc = a_r . (dS_r @ columns): no c x C pass.
                self.scale += (grad_anchors * anchors).sum() / scale
        if self.bias is not None:
            self.bias += grad_scores.sum() / scale  # d logits / d bias = 1 = (d logits / d scores) / scale
        if self.columns is not None:
            self.columns.addmm_(grad_scores.flatten(0, 1).mT, anchors.flatten(0, 1))


@dataclass
class _Totals:
    """Sums and per-anchor pieces gathered over the chunks."""

    loss: torch.Tensor | float = 0.0
    new_rows: list[dict[str, torch.Tensor]] = field(default_factory=list)
    outputs: list[dict[str, torch.Tensor]] = field(default_factory=list)
    flagged: torch.Tensor | float = 0.0
    kept: torch.Tensor | float = 0.0
    thresholds: list[torch.Tensor] = field(default_factory=list)
    flag_thresholds: list[torch.Tensor] = field(default_factory=list)
    precision: list[torch.Tensor] = field(default_factory=list)
    recall: list[torch.Tensor] = field(default_factory=list)

    @staticmethod
    def per_anchor(pieces: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not pieces or not pieces[0]:
            return {}
        return {name: torch.cat([piece[name] for piece in pieces]) for name in pieces[0]}

    def stats(self, prefix: str, rows: int, num_negatives: int) -> dict[str, torch.Tensor]:
        """Diagnostics of the bank over ``rows`` rows of ``num_negatives`` negatives each."""
        total = float(rows * num_negatives)
        stats: dict[str, Any] = {
            "flagged_fraction": self.flagged / total,
            "filtered_fraction": 1.0 - self.kept / total,
            "kept_negatives": self.kept / rows,
        }
        if self.thresholds:
            stats["mean_threshold"] = torch.cat([part.flatten() for part in self.thresholds]).mean()
        if self.precision:
            stats["fn_precision"] = torch.cat(self.precision).mean()
            stats["fn_recall"] = torch.cat(self.recall).mean()
        return {f"{prefix}{name}": torch.as_tensor(value).detach() for name, value in stats.items()}

    def add(self, terms: RowTerms) -> None:
        """Add a chunk's loss terms and outputs."""
        self.loss = self.loss + terms.value.sum()
        self.outputs.append(terms.outputs)

    def add_detection(self, detection: Detection, kept_count: torch.Tensor) -> None:
        """Add a chunk's learned rows, thresholds and kept negatives."""
        self.new_rows.append(detection.new_rows)
        self.kept = self.kept + kept_count.sum()
        if detection.thresholds is not None:
            self.thresholds.append(detection.thresholds)

    def add_flags(self, chunk: ScoreChunk, unflagged: torch.Tensor, unflagged_count: torch.Tensor) -> None:
        """Count the chunk's flagged negatives and, with labels, their per-anchor precision and recall."""
        negatives = chunk.num_negatives * unflagged_count.numel()
        self.flagged = self.flagged + (negatives - unflagged_count.sum(dtype=torch.int64))
        same = chunk.same_label()
        if same is None:
            return
        from glofnd_losses.metrics import per_anchor_precision_recall

        flagged = functional.exclude_(~unflagged, chunk.excluded)
        precision, recall = per_anchor_precision_recall(flagged, same)
        self.precision.append(precision)
        self.recall.append(recall)


def _chunk(work: Pass, anchors: torch.Tensor, columns: torch.Tensor, covariance: torch.Tensor | None,
           logits: _Logits, rows: slice, gradients: _Gradients, totals: _Totals) -> None:  # fmt: skip
    """One chunk of anchors: scores, detection, keep-mask, formula, gradients; nothing ``c x C`` is kept."""
    bank = work.bank
    chunk_anchors_ = anchors[:, rows]
    scores = chunk_anchors_ @ columns.mT
    labels = None if bank.anchor_labels is None else bank.anchor_labels[rows]
    chunk = ScoreChunk(scores, bank.excluded[rows], labels, bank.column_labels, chunk_anchors_, covariance)
    state_rows = {name: values[rows] for name, values in work.state_rows.items()}
    detection = work.detector.detect(chunk, state_rows, bank.prefix, work.step)
    unflagged = detection.unflagged(chunk)
    unflagged_count = None if unflagged is None else unflagged.sum(dim=-1, dtype=torch.int32)
    if unflagged is None or unflagged_count is None or not work.filtering:
        keep = functional.negative_mask(chunk.excluded, scores.shape[-1]).expand_as(scores)
        kept_count = torch.full(scores.shape[:2], float(chunk.num_negatives), device=scores.device)
    else:
        keep, kept_count = functional.keep_nonempty(unflagged, unflagged_count, chunk.excluded)
    totals.add_detection(detection, kept_count)
    if unflagged is not None and unflagged_count is not None:
        totals.add_flags(chunk, unflagged, unflagged_count)
    if work.formula is None:
        if work.filtering and detection.thresholds is not None and unflagged_count is not None:
            totals.flag_thresholds.append(_flag_thresholds(detection.thresholds, unflagged_count))
        return
    flagged = None
    if work.attract and work.filtering and unflagged is not None:
        flagged = functional.negative_mask(chunk.excluded, scores.shape[-1]) & ~keep
    terms = work.formula(
        RowInputs(scores, bank.positive_index[:, rows], keep, kept_count, state_rows, logits.scale,
                  chunk.num_negatives, logits.bias, flagged)
    )  # fmt: skip
    totals.add(terms)
    gradients.add(terms.grad_scores.mul_(bank.row_weight), chunk_anchors_, columns, logits.scale, rows)


def _flag_thresholds(thresholds: torch.Tensor, unflagged_count: torch.Tensor) -> torch.Tensor:
    """``(c,)`` thresholds of one-row anchors, ``inf`` where every negative was flagged (all are kept then)."""
    if unflagged_count.shape[0] != 1:
        raise ValueError("a detection-only pass returns thresholds of one-row anchors only")
    per_anchor = thresholds.reshape(-1)
    return torch.where(unflagged_count[0] == 0, torch.inf, per_anchor)
