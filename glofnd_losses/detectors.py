"""False-negative detectors shared by every loss.

A detector looks at the detached similarity rows of a batch and says which negatives are false
negatives (``flagged``) and which are kept in the loss. Detectors are plain objects: any state
they need is declared as per-sample fields (:meth:`Detector.fields`) that the owning loss stores
in its :class:`~glofnd_losses.state.PerSampleState` and syncs with its other state in one gather.

* :class:`GloFNDDetector` (``"glofnd"``): a learned per-sample global threshold (the paper).
* :class:`FNCDetector` (``"fnc"``): each row's mini-batch ``(1 - alpha)``-quantile (Huynh et al.
  2022, as compared in the paper). Stateless.
* :class:`OracleDetector` (``"oracle"``): same-label negatives, for upper-bound experiments.
* :class:`NoDetector` (``None``): flags nothing; the losses reduce to their base form.

Treatment is elimination (flagged negatives leave the loss) and is applied by the losses, not the
detectors, so an attraction treatment can be added without touching them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from glofnd_losses import functional, thresholds
from glofnd_losses.state import Field
from glofnd_losses.thresholds import ThresholdOptimizer, ThresholdRows


@dataclass
class BatchRows:
    """Detached similarity rows of a batch, as a detector sees them.

    Attributes:
        scores: ``(V, b, C)`` float32 cosine scores.
        excluded: ``(b, E)`` columns of each anchor that are not negatives (its positive, itself).
        negatives: ``(b, C)`` bool negative mask, the same for all ``V`` rows.
        anchor_labels: ``(b,)`` labels of the anchors, or None.
        column_labels: ``(C,)`` labels of the columns, or None.
    """

    scores: torch.Tensor
    excluded: torch.Tensor
    negatives: torch.Tensor
    anchor_labels: torch.Tensor | None = None
    column_labels: torch.Tensor | None = None

    @property
    def num_negatives(self) -> int:
        """Negatives per row."""
        return self.scores.shape[-1] - self.excluded.shape[-1]


@dataclass(frozen=True)
class Step:
    """What a detector knows about the training step.

    Attributes:
        learn: Whether thresholds learn from this batch (training mode, past the start).
        epoch: Current 0-based epoch.
        all_seeded: Every sample of the data set has been visited before, so no first-visit
            work is needed. False is always safe.
    """

    learn: bool
    epoch: int
    all_seeded: bool = False


@dataclass
class Detection:
    """What a detector returns for one bank of rows.

    Negatives scoring strictly above ``thresholds`` are false negatives; without thresholds,
    ``flagged`` lists them (the oracle), and with neither nothing is flagged.

    Attributes:
        thresholds: ``(b,)`` or ``(V, b)`` float32 thresholds, or None.
        flagged: ``(b, C)`` or ``(V, b, C)`` bool false negatives when there are no thresholds.
        new_rows: Updated per-sample fields of the anchors (empty when nothing is learned).
    """

    thresholds: torch.Tensor | None = None
    flagged: torch.Tensor | None = None
    new_rows: dict[str, torch.Tensor] = field(default_factory=dict)

    def kept(self, rows: BatchRows) -> torch.Tensor:
        """``(V, b, C)`` bool negatives that are not flagged."""
        negatives = rows.negatives.expand_as(rows.scores)
        if self.thresholds is not None:
            return functional.keep_at_or_below(rows.scores, rows.excluded, self.thresholds)
        if self.flagged is not None:
            return negatives & ~self.flagged
        return negatives


class Detector:
    """Interface of a false-negative detector."""

    name: str = ""

    def fields(self, prefix: str) -> dict[str, Field]:
        """Per-sample fields this detector needs, named with ``prefix``."""
        return {}

    def detect(self, rows: BatchRows, state_rows: dict[str, torch.Tensor], prefix: str, step: Step) -> Detection:
        """Flag the false negatives of ``rows``; learn from them if ``step.learn``."""
        raise NotImplementedError


class NoDetector(Detector):
    """Flags nothing."""

    name = "none"

    def detect(self, rows: BatchRows, state_rows: dict[str, torch.Tensor], prefix: str, step: Step) -> Detection:
        return Detection()


class FNCDetector(Detector):
    """Per-row mini-batch ``(1 - alpha)``-quantile threshold (no state).

    Args:
        alpha: Fraction of each row's negatives flagged.
    """

    name = "fnc"

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def detect(self, rows: BatchRows, state_rows: dict[str, torch.Tensor], prefix: str, step: Step) -> Detection:
        return Detection(functional.minibatch_quantile(rows.scores, rows.excluded, self.alpha, rows.num_negatives))


class OracleDetector(Detector):
    """Same-label negatives are the false negatives (needs labels)."""

    name = "oracle"

    def detect(self, rows: BatchRows, state_rows: dict[str, torch.Tensor], prefix: str, step: Step) -> Detection:
        if rows.anchor_labels is None or rows.column_labels is None:
            raise ValueError("detector='oracle' needs labels: pass labels=... to the loss's forward")
        same = rows.anchor_labels[:, None] == rows.column_labels[None, :]
        return Detection(flagged=rows.negatives & same)


class GloFNDDetector(Detector):
    """GloFND: one learned threshold per data set item, the global ``(1 - alpha)``-quantile.

    Per step: the subgradient is computed with the stored thresholds, the thresholds are updated,
    and the negatives scoring strictly above the *updated* threshold are flagged (paper order).

    Args:
        alpha: Target fraction of each item's negatives (over the whole data set) to flag.
        optimizer: Update rule of the thresholds.
    """

    name = "glofnd"

    def __init__(self, alpha: float, optimizer: ThresholdOptimizer) -> None:
        self.alpha = alpha
        self.optimizer = optimizer

    def fields(self, prefix: str) -> dict[str, Field]:
        return thresholds.threshold_fields(prefix)

    def detect(self, rows: BatchRows, state_rows: dict[str, torch.Tensor], prefix: str, step: Step) -> Detection:
        current = ThresholdRows.from_state(state_rows, prefix)
        new_rows: dict[str, torch.Tensor] = {}
        threshold = current.threshold
        if step.learn:
            subgradient = functional.threshold_subgradient(
                rows.scores, rows.excluded, current.threshold, self.alpha, rows.num_negatives
            )
            if self.optimizer.normalize_grad and self.alpha > 0:
                subgradient = subgradient / self.alpha
            seed = None
            seeding = self.optimizer.init == "minibatch_quantile" and not step.all_seeded
            if seeding or self.optimizer.stop_at_batch_quantile:
                per_row = functional.minibatch_quantile(rows.scores, rows.excluded, self.alpha, rows.num_negatives)
                seed = per_row.mean(dim=0)
            score_std = None
            if self.optimizer.step_unit == "score_std":
                score_std = functional.row_std(rows.scores).mean(dim=0)
            updated = thresholds.step(current, subgradient, seed, step.epoch, self.optimizer, score_std)
            threshold = updated.threshold
            new_rows = updated.to_state(prefix)
        return Detection(threshold, new_rows=new_rows)


DETECTOR_NAMES = ("glofnd", "fnc", "oracle", None)


def make_detector(name: str | None, alpha: float, optimizer: ThresholdOptimizer | None) -> Detector:
    """Build a detector from its name (``"glofnd"``, ``"fnc"``, ``"oracle"`` or None)."""
    if name == "glofnd":
        return GloFNDDetector(alpha, optimizer or ThresholdOptimizer.default())
    if name == "fnc":
        return FNCDetector(alpha)
    if name == "oracle":
        return OracleDetector()
    if name is None or name == "none":
        return NoDetector()
    raise ValueError(f"detector must be one of 'glofnd', 'fnc', 'oracle' or None, got {name!r}")
