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

from glofnd_losses import functional, host, thresholds
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
        features: Detached ``(anchors, columns)`` embeddings whose product ``anchors @
            columns.mT`` are the scores (anchors ``(V, b, d)``, columns ``(C, d)``), or None. Lets
            :func:`~glofnd_losses.functional.row_std` take the cheaper way at large batches.
    """

    scores: torch.Tensor
    excluded: torch.Tensor
    negatives: torch.Tensor
    anchor_labels: torch.Tensor | None = None
    column_labels: torch.Tensor | None = None
    features: tuple[torch.Tensor, torch.Tensor] | None = None

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
        unflagged: ``(V, b, C)`` bool :meth:`kept` mask when the detector built it on the way,
            else None.
        unflagged_count: ``(V, b)`` int32 per-row counts of ``unflagged``, or None.
    """

    thresholds: torch.Tensor | None = None
    flagged: torch.Tensor | None = None
    new_rows: dict[str, torch.Tensor] = field(default_factory=dict)
    unflagged: torch.Tensor | None = None
    unflagged_count: torch.Tensor | None = None

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
        return thresholds.threshold_fields(prefix, self.optimizer)

    def detect(self, rows: BatchRows, state_rows: dict[str, torch.Tensor], prefix: str, step: Step) -> Detection:
        current = ThresholdRows.from_state(state_rows, prefix)
        if not step.learn:
            return Detection(current.threshold)
        subgradient = functional.threshold_subgradient(
            rows.scores, rows.excluded, current.threshold, self.alpha, rows.num_negatives
        )
        if self.optimizer.normalize_grad and self.alpha > 0:
            subgradient = subgradient / self.alpha
        score_std = None
        if self.optimizer.step_unit == "score_std":
            score_std = functional.row_std(rows.scores, rows.features).mean(dim=0)
        proposed = thresholds.propose(current, subgradient, step.epoch, self.optimizer, score_std)
        seeding = self.optimizer.init == "minibatch_quantile" and not step.all_seeded
        if not (seeding or self.optimizer.stop_at_batch_quantile):
            return Detection(proposed.threshold, new_rows=proposed.to_state(prefix))
        if not host.reads_without_sync(rows.scores.device):
            # Accelerators: the quantile of every row (selecting rows would need a host sync).
            quantile = functional.pooled_quantile(rows.scores, rows.excluded, self.alpha, rows.num_negatives)
            updated = thresholds.finish(current, proposed, quantile, self.optimizer)
            return Detection(updated.threshold, new_rows=updated.to_state(prefix))
        return self._detect_selecting_rows(rows, current, proposed, prefix, seeding)

    def _detect_selecting_rows(
        self, rows: BatchRows, current: ThresholdRows, proposed: ThresholdRows, prefix: str, seeding: bool
    ) -> Detection:
        """On CPU: the batch quantile only for the anchors that need it, by the cheapest means.

        Those are the first visits (seeding; a ``topk``) and, for the stop, the anchors whose
        proposed step may pass their batch quantile, found from the keep-mask of the proposed
        thresholds (:func:`~glofnd_losses.functional.may_pass_quantile`). Most of these only
        straddle it (:func:`~glofnd_losses.functional.straddled_quantile`, two masked reductions);
        the others (a ``topk``) are rare once thresholds have converged. Where the quantile lies
        among a row's few largest values (:func:`~glofnd_losses.functional.straddling_takes_topk`),
        the straddling anchors take the short ``topk`` too. The keep-mask is the
        loss's mask except for the anchors whose threshold the stop or the seed changed, whose
        rows are rebuilt. Bit-identical to computing every anchor's quantile.
        """
        first_visit = current.visits == 0 if seeding else None  # seeded by the quantile: no stop
        unflagged = unflagged_count = None
        topk_needed = first_visit
        straddling = None
        if self.optimizer.stop_at_batch_quantile:
            unflagged = functional.keep_at_or_below(rows.scores, rows.excluded, proposed.threshold)
            unflagged_count = functional.count_true(unflagged)
            negatives = rows.scores.shape[0] * rows.num_negatives
            above = negatives - unflagged_count.sum(dim=0)
            upward = proposed.threshold > current.threshold
            may_pass = (proposed.threshold != current.threshold) & functional.may_pass_quantile(
                above, upward, self.alpha, negatives
            )
            if first_visit is not None:
                may_pass &= ~first_visit
            pooled_excluded = rows.scores.shape[0] * rows.excluded.shape[1]
            if functional.straddling_takes_topk(self.alpha, negatives, pooled_excluded):
                topk_candidates = may_pass  # those next to their quantile too: the topk is short
            else:
                straddles = functional.straddles_quantile(above, self.alpha, negatives)
                straddling = may_pass & straddles
                topk_candidates = may_pass & ~straddles  # those that cross their quantile
            topk_needed = topk_candidates if first_visit is None else topk_candidates | first_visit
        assert topk_needed is not None  # without the stop, only seeding gets here
        # The anchors below are positions in a pool of rows: every anchor where rows are cheap to
        # index, else (a transposed view, whose rows are strided) the candidates, gathered once.
        pool = None
        if not functional.last_dim_contiguous(rows.scores):
            needed = topk_needed if straddling is None else topk_needed | straddling
            pool = needed.nonzero().squeeze(1)  # CPU tensors: no device sync
            if len(pool) == len(needed):  # every anchor (first visits): no copy of the rows
                pool = None

        def among_pool(anchors: torch.Tensor) -> torch.Tensor:
            return (anchors if pool is None else anchors[pool]).nonzero().squeeze(1)

        pool_scores = rows.scores if pool is None else functional.select_anchors(rows.scores, pool)
        pool_excluded = rows.excluded if pool is None else rows.excluded[pool]
        # Where the stop cannot bind, the proposed threshold stands in for the quantile (thresholds.finish).
        pool_quantile = proposed.threshold.clone() if pool is None else proposed.threshold[pool]
        if straddling is not None:
            among = among_pool(straddling)
            if len(among):
                pool_quantile[among] = functional.straddled_quantile(
                    functional.select_anchors(pool_scores, among),
                    pool_excluded[among],
                    pool_quantile[among],
                    self.alpha,
                    rows.num_negatives,
                )
        among = among_pool(topk_needed)
        if len(among) and len(among) == len(pool_quantile):  # every row of the pool: no copy of the rows
            pool_quantile = functional.pooled_quantile(pool_scores, pool_excluded, self.alpha, rows.num_negatives)
        elif len(among):
            pool_quantile[among] = functional.pooled_quantile(
                functional.select_anchors(pool_scores, among), pool_excluded[among], self.alpha, rows.num_negatives
            )
        quantile = pool_quantile if pool is None else proposed.threshold.index_copy(0, pool, pool_quantile)
        updated = thresholds.finish(current, proposed, quantile, self.optimizer)
        if unflagged is not None and unflagged_count is not None:
            # The mask was built at the proposed thresholds: rebuild the rows the stop or the seed
            # moved (all in the pool).
            among = among_pool(updated.threshold != proposed.threshold)
            if len(among):
                moved_again = among if pool is None else pool[among]
                mask = functional.keep_at_or_below(
                    functional.select_anchors(pool_scores, among), pool_excluded[among], updated.threshold[moved_again]
                )
                unflagged[:, moved_again] = mask
                unflagged_count[:, moved_again] = functional.count_true(mask)
        return Detection(
            updated.threshold, new_rows=updated.to_state(prefix), unflagged=unflagged, unflagged_count=unflagged_count
        )


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
