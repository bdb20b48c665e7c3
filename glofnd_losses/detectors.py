"""False-negative detectors shared by every loss.

A detector looks at one chunk of detached score rows and says which negatives are false
negatives (``flagged``). Detectors are plain objects: any state they need is declared as
per-sample fields (:meth:`Detector.fields`) that the owning loss stores in its
:class:`~glofnd_losses.state.PerSampleState` and syncs with its other state in one gather.

* :class:`GloFNDDetector` (``"glofnd"``): a learned per-sample global threshold (the paper).
* :class:`FNCDetector` (``"fnc"``): each row's mini-batch ``(1 - alpha)``-quantile (Huynh et al.
  2022, as compared in the paper). Stateless.
* :class:`OracleDetector` (``"oracle"``): same-label negatives, for upper-bound experiments.
* :class:`NoDetector` (``None``): flags nothing; the losses reduce to their base form.

Every quantity a detector computes belongs to one anchor's rows, so a chunk of anchors is
detected exactly as the whole batch would be. Treatment (elimination) is applied by the engine,
not the detectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from glofnd_losses import functional, thresholds
from glofnd_losses.state import Field
from glofnd_losses.thresholds import ThresholdOptimizer, ThresholdRows


@dataclass
class ScoreChunk:
    """Detached score rows of a chunk of anchors, as a detector sees them.

    Attributes:
        scores: ``(V, c, C)`` float32 cosine scores.
        excluded: ``(c, E)`` columns of each anchor that are not negatives (its positive, itself).
        anchor_labels: ``(c,)`` labels of the anchors, or None.
        column_labels: ``(C,)`` labels of the columns, or None.
        anchors: ``(V, c, d)`` the anchors whose rows the scores are, or None.
        column_covariance: ``(d, d)`` covariance of the columns (:func:`~glofnd_losses.functional.row_std`),
            where the detector asks for it (:attr:`Detector.needs_score_spread`), else None.
    """

    scores: torch.Tensor
    excluded: torch.Tensor
    anchor_labels: torch.Tensor | None = None
    column_labels: torch.Tensor | None = None
    anchors: torch.Tensor | None = None
    column_covariance: torch.Tensor | None = None

    def score_spread(self) -> torch.Tensor:
        """``(c,)`` each anchor's score standard deviation, averaged over its rows."""
        if self.anchors is None or self.column_covariance is None:
            raise ValueError("the score spread needs the chunk's anchors and the columns' covariance")
        return functional.row_std(self.anchors, self.column_covariance).mean(dim=0)

    @property
    def num_negatives(self) -> int:
        """Negatives per row."""
        return self.scores.shape[-1] - self.excluded.shape[-1]

    def same_label(self) -> torch.Tensor | None:
        """``(c, C)`` bool negatives sharing the anchor's label (the true false negatives), or None."""
        if self.anchor_labels is None or self.column_labels is None:
            return None
        same = self.anchor_labels[:, None] == self.column_labels[None, :]
        return functional.negative_mask(self.excluded, self.scores.shape[-1]) & same


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
    """What a detector returns for one chunk.

    Negatives scoring strictly above ``thresholds`` are false negatives; without thresholds,
    ``flagged`` lists them (the oracle), and with neither nothing is flagged.

    Attributes:
        thresholds: ``(c,)`` or ``(V, c)`` float32 thresholds, or None.
        flagged: ``(V, c, C)`` bool false negatives (only negatives) when there are no thresholds.
        new_rows: Updated per-sample fields of the chunk's anchors (empty when nothing is learned).
    """

    thresholds: torch.Tensor | None = None
    flagged: torch.Tensor | None = None
    new_rows: dict[str, torch.Tensor] = field(default_factory=dict)

    def unflagged(self, chunk: ScoreChunk) -> torch.Tensor | None:
        """``(V, c, C)`` bool negatives not flagged, or None when nothing is flagged."""
        if self.thresholds is not None:
            return functional.keep_at_or_below(chunk.scores, chunk.excluded, self.thresholds)
        if self.flagged is not None:
            return functional.exclude_(~self.flagged, chunk.excluded)
        return None


class Detector:
    """Interface of a false-negative detector."""

    name: str = ""

    @property
    def needs_score_spread(self) -> bool:
        """Whether a learning step reads :meth:`ScoreChunk.score_spread`."""
        return False

    def fields(self, prefix: str) -> dict[str, Field]:
        """Per-sample fields this detector needs, named with ``prefix``."""
        return {}

    def detect(self, chunk: ScoreChunk, state_rows: dict[str, torch.Tensor], prefix: str, step: Step) -> Detection:
        """Flag the false negatives of ``chunk``; learn from it if ``step.learn``."""
        raise NotImplementedError


class NoDetector(Detector):
    """Flags nothing."""

    name = "none"

    def detect(self, chunk: ScoreChunk, state_rows: dict[str, torch.Tensor], prefix: str, step: Step) -> Detection:
        return Detection()


class FNCDetector(Detector):
    """Per-row mini-batch ``(1 - alpha)``-quantile threshold (no state).

    Args:
        alpha: Fraction of each row's negatives flagged.
    """

    name = "fnc"

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def detect(self, chunk: ScoreChunk, state_rows: dict[str, torch.Tensor], prefix: str, step: Step) -> Detection:
        return Detection(functional.minibatch_quantile(chunk.scores, chunk.excluded, self.alpha, chunk.num_negatives))


class OracleDetector(Detector):
    """Same-label negatives are the false negatives (needs labels)."""

    name = "oracle"

    def detect(self, chunk: ScoreChunk, state_rows: dict[str, torch.Tensor], prefix: str, step: Step) -> Detection:
        same = chunk.same_label()
        if same is None:
            raise ValueError("detector='oracle' needs labels: pass labels=... to the loss's forward")
        return Detection(flagged=same.expand_as(chunk.scores))


class GloFNDDetector(Detector):
    """GloFND: one learned threshold per data set item, the global ``(1 - alpha)``-quantile.

    Per step: the subgradient is computed with the stored thresholds, the thresholds take one
    step of the rule (:func:`glofnd_losses.thresholds.step`), and the negatives scoring strictly
    above the *updated* threshold are flagged (paper order).

    ``alpha=0`` flags nothing and learns nothing: the target, the largest score over the whole
    data set, is above every batch's scores, but a rule would learn it from below (a seeded
    start begins at the batch maximum, and the subgradient, ``-fraction above``, cannot be
    normalised by ``alpha``), flagging negatives on the way.

    Args:
        alpha: Target fraction of each item's negatives (over the whole data set) to flag.
        optimizer: Update rule of the thresholds.
    """

    name = "glofnd"

    def __init__(self, alpha: float, optimizer: ThresholdOptimizer) -> None:
        self.alpha = alpha
        self.optimizer = optimizer

    @property
    def needs_score_spread(self) -> bool:
        return self.optimizer.step_unit == "score_std"

    def fields(self, prefix: str) -> dict[str, Field]:
        return thresholds.threshold_fields(prefix, self.optimizer)

    def detect(self, chunk: ScoreChunk, state_rows: dict[str, torch.Tensor], prefix: str, step: Step) -> Detection:
        if self.alpha == 0:
            return Detection()
        current = ThresholdRows.from_state(state_rows, prefix)
        if not step.learn:
            return Detection(current.threshold)
        scores, excluded, negatives = chunk.scores, chunk.excluded, chunk.num_negatives
        subgradient = functional.threshold_subgradient(scores, excluded, current.threshold, self.alpha, negatives)
        if self.optimizer.normalize_grad and self.alpha > 0:
            subgradient = subgradient / self.alpha
        score_std = chunk.score_spread() if self.needs_score_spread else None
        quantile = None
        if self.optimizer.needs_batch_quantile(step.all_seeded):
            quantile = functional.pooled_quantile(scores, excluded, self.alpha, negatives)
        updated = thresholds.step(current, subgradient, quantile, step.epoch, self.optimizer, score_std)
        return Detection(updated.threshold, new_rows=updated.to_state(prefix))


DETECTOR_NAMES = ("glofnd", "fnc", "oracle", None)


def make_detector(name: str | None, alpha: float, optimizer: ThresholdOptimizer | None) -> Detector:
    """Build a detector from its name (``"glofnd"``, ``"fnc"``, ``"oracle"`` or None)."""
    if optimizer is not None and not isinstance(optimizer, ThresholdOptimizer):
        raise ValueError(
            "threshold_optimizer must be a ThresholdOptimizer or None (e.g. ThresholdOptimizer.paper() for the "
            f"paper's Adam rule), got {optimizer!r}"
        )
    if name == "glofnd":
        return GloFNDDetector(alpha, optimizer or ThresholdOptimizer.default())
    if name == "fnc":
        return FNCDetector(alpha)
    if name == "oracle":
        return OracleDetector()
    if name is None or name == "none":
        return NoDetector()
    raise ValueError(f"detector must be one of 'glofnd', 'fnc', 'oracle' or None, got {name!r}")
