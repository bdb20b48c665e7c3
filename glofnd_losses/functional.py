"""Pure tensor functions: score rows, negative masks, threshold statistics, per-row loss formulas.

Nothing here holds state or communicates. Shapes use ``V`` rows per anchor (2 for two-view
unimodal losses, 1 per modality for CLIP), ``b`` anchors (or one chunk of them) and ``C``
candidate columns. Scores are raw cosine similarities (not divided by the temperature), in
float32.

The loss formulas work on whole rows and return, beside each row's value, its gradient with
respect to the row's scores: :mod:`glofnd_losses.engine` turns those into feature gradients chunk
by chunk, so no ``b x C`` tensor outlives a chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class RowTerms:
    """What a loss formula returns for a chunk of rows.

    Attributes:
        value: ``(V, c)`` each row's loss value.
        grad_scores: ``(V, c, C)`` the gradient of each row's value with respect to its scores
            (for SogCLR, of its surrogate: the value and the gradient may belong to different
            functions).
        outputs: Per-anchor ``(c,)`` detached results the loss keeps (e.g. the updated ``u``).
    """

    value: torch.Tensor
    grad_scores: torch.Tensor
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


def two_view_features(
    view_a: torch.Tensor, view_b: torch.Tensor, all_a: torch.Tensor, all_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors ``(2, b, d)`` and columns ``(2B, d)`` (``[A; B]``) of a two-view loss.

    Both rows of anchor ``i`` (``a_i`` and ``b_i``) run over the columns ``[A | B]`` of the global
    batch. With ``p`` the anchor's position in the global batch, row ``a`` has its positive
    (``b_p``) at column ``B + p`` and itself at ``p``; row ``b`` has its positive at ``p`` and
    itself at ``B + p`` (see :func:`two_view_positives`). Both rows exclude the same two columns.
    """
    return torch.stack([view_a, view_b]), torch.cat([all_a, all_b])


def two_view_positives(local_size: int, global_size: int, offset: int, device: torch.device) -> torch.Tensor:
    """Positive column ``(2, b)`` of each row of a two-view loss."""
    positions = torch.arange(local_size, device=device) + offset
    return torch.stack([positions + global_size, positions])


def two_view_excluded(local_size: int, global_size: int, offset: int, device: torch.device) -> torch.Tensor:
    """Columns ``(b, 2)`` of a two-view loss's rows that are not negatives: the anchor's own item."""
    positions = torch.arange(local_size, device=device) + offset
    return torch.stack([positions, positions + global_size], dim=1)


def cross_modal_excluded(local_size: int, offset: int, device: torch.device) -> torch.Tensor:
    """Column ``(b, 1)`` of image-vs-text rows that is not a negative: the paired item."""
    return (torch.arange(local_size, device=device) + offset)[:, None]


def exclude_(mask: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """In place: the ``excluded`` columns (``(c, E)``) of every row of ``mask`` ``(V, c, C)`` set to False."""
    return mask.scatter_(-1, excluded.expand(mask.shape[0], -1, -1), False)


def negative_mask(excluded: torch.Tensor, num_columns: int) -> torch.Tensor:
    """Bool mask ``(c, C)``: True on every column except the ``excluded`` ones (``(c, E)``)."""
    everything = torch.ones(1, excluded.shape[0], num_columns, dtype=torch.bool, device=excluded.device)
    return exclude_(everything, excluded)[0]


def count_above(scores: torch.Tensor, excluded: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Number of negatives scoring strictly above each anchor's threshold, pooled over its rows.

    Args:
        scores: ``(V, b, C)`` float32 scores.
        excluded: ``(b, E)`` columns of each anchor that are not negatives (positive, self).
        thresholds: ``(b,)`` float32 thresholds, one per anchor.

    Returns:
        ``(b,)`` counts as float32.
    """
    bound = thresholds[None, :, None]
    everything = torch.sum(scores > bound, dim=(0, 2), dtype=torch.int32)
    excluded_scores = scores.gather(-1, excluded.expand(scores.shape[0], -1, -1))
    not_negatives = torch.sum(excluded_scores > bound, dim=(0, 2), dtype=torch.int32)
    return (everything - not_negatives).to(torch.float32)


def threshold_subgradient(
    scores: torch.Tensor, excluded: torch.Tensor, thresholds: torch.Tensor, alpha: float, num_negatives: int
) -> torch.Tensor:
    """Stochastic subgradient of the quantile objective ``alpha*lam + mean((s - lam)_+)``.

    ``G_i = alpha - (# negatives of i with s > lam_i) / (V * num_negatives)``, pooling the ``V``
    rows of the anchor (paper Eq. 4; strict ``>``, so ties count as kept).

    Args:
        scores: ``(V, b, C)`` float32 scores.
        excluded: ``(b, E)`` non-negative columns.
        thresholds: ``(b,)`` thresholds before the update.
        alpha: Target fraction of negatives above the threshold.
        num_negatives: Negatives per row (``C - E``).

    Returns:
        ``(b,)`` subgradients in ``[alpha - 1, alpha]``.
    """
    fraction_above = count_above(scores, excluded, thresholds) / (scores.shape[0] * num_negatives)
    return alpha - fraction_above


def _quantile_rank(alpha: float, num_negatives: int) -> tuple[int, float]:
    """Where the ``(1 - alpha)``-quantile of ``num_negatives`` values lies in the descending order.

    Returns ``(top_count, fraction)``: the quantile interpolates, by ``fraction``, from the
    ``top_count``-th largest value towards the ``(top_count - 1)``-th largest.
    """
    position = (num_negatives - 1) * (1.0 - alpha)
    lower_rank = math.floor(position)  # ascending rank r is descending rank num_negatives - 1 - r
    return num_negatives - lower_rank, position - lower_rank


def _top_negatives(scores: torch.Tensor, excluded: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` largest negatives of every row, unsorted; ``-inf`` fills where a row has fewer.

    The top ``count + E`` values of the raw row are taken (no masked copy of it) and the excluded
    columns among them are set to ``-inf``.
    """
    values, columns = scores.topk(min(count + excluded.shape[1], scores.shape[-1]), dim=-1)
    is_excluded = (columns[..., None] == excluded[None, :, None, :]).any(dim=-1)
    return values.masked_fill(is_excluded, float("-inf"))


def _interpolate_top(top: torch.Tensor, top_count: int, fraction: float) -> torch.Tensor:
    """The quantile from candidates ``(..., m)`` holding the ``top_count`` largest values.

    ``lower + fraction * (upper - lower)``, never above ``upper`` (float32 rounding included).
    """
    top = top.sort(dim=-1, descending=True).values
    lower = top[..., top_count - 1]
    if top_count < 2 or fraction == 0.0:
        return lower
    upper = top[..., top_count - 2]
    return torch.minimum(lower + fraction * (upper - lower), upper)


def minibatch_quantile(scores: torch.Tensor, excluded: torch.Tensor, alpha: float, num_negatives: int) -> torch.Tensor:
    """Per-row ``(1 - alpha)``-quantile of the negatives (FNC's threshold), via ``topk``.

    Equal to ``torch.quantile(row[negatives], 1 - alpha)`` (linear interpolation) without sorting
    the whole row, without a host sync and without ``torch.quantile``'s 16M-element limit.

    Args:
        scores: ``(V, b, C)`` float32 scores.
        excluded: ``(b, E)`` non-negative columns (distinct within a row).
        alpha: Upper tail fraction.
        num_negatives: Negatives per row (``C - E``).

    Returns:
        ``(V, b)`` float32 quantiles.
    """
    top_count, fraction = _quantile_rank(alpha, num_negatives)
    return _interpolate_top(_top_negatives(scores, excluded, top_count), top_count, fraction)


def pooled_quantile(scores: torch.Tensor, excluded: torch.Tensor, alpha: float, num_negatives: int) -> torch.Tensor:
    """``(1 - alpha)``-quantile of each anchor's negatives pooled over its ``V`` rows, via ``topk``.

    Equal to ``torch.quantile(torch.cat([row[negatives] for row in anchor_rows]), 1 - alpha)``: the
    point where the anchor's threshold subgradient (:func:`threshold_subgradient`, which pools the
    rows the same way) changes sign.

    Args:
        scores: ``(V, b, C)`` float32 scores.
        excluded: ``(b, E)`` non-negative columns (distinct within a row).
        alpha: Upper tail fraction.
        num_negatives: Negatives per row (``C - E``).

    Returns:
        ``(b,)`` float32 quantiles.
    """
    views, anchors, columns = scores.shape
    top_count, fraction = _quantile_rank(alpha, views * num_negatives)
    pooled = scores.transpose(0, 1).reshape(1, anchors, views * columns)
    offsets = torch.arange(views, device=excluded.device) * columns
    pooled_excluded = (excluded[:, None, :] + offsets[None, :, None]).reshape(anchors, -1)
    return _interpolate_top(_top_negatives(pooled, pooled_excluded, top_count), top_count, fraction)[0]


def column_covariance(columns: torch.Tensor) -> torch.Tensor:
    """``(d, d)`` covariance of the columns ``(C, d)``, centred first (see :func:`row_std`)."""
    centred = columns - columns.mean(dim=0, keepdim=True)
    return centred.mT @ centred / max(columns.shape[0] - 1, 1)


def row_std(anchors: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """Standard deviation of each row of ``anchors @ columns.mT`` over its columns, without forming it.

    Row ``i``'s deviations from its mean are ``a_i . (c_j - c_mean)``, so its (Bessel-corrected)
    variance is ``a_i^T Cov a_i`` with ``Cov`` the columns' :func:`column_covariance`: a ``d x d``
    product per row instead of two passes over its ``C`` scores. Centring first keeps it accurate
    relative to the spread itself, also where every score lies in a narrow band (collapsed
    embeddings).

    Args:
        anchors: ``(..., R, d)`` anchor embeddings.
        covariance: ``(d, d)`` :func:`column_covariance` of the columns.

    Returns:
        ``(..., R)`` standard deviations.
    """
    variance = ((anchors @ covariance) * anchors).sum(dim=-1)
    return variance.clamp_min(0.0).sqrt()


def keep_at_or_below(scores: torch.Tensor, excluded: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Keep-mask: negatives with ``score <= threshold``; thresholds ``(b,)`` or ``(V, b)``."""
    if thresholds.dim() == 1:
        thresholds = thresholds.expand(scores.shape[0], -1)
    return exclude_(scores <= thresholds[..., None], excluded)


def keep_nonempty(
    keep: torch.Tensor, kept_count: torch.Tensor, excluded: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A row of ``keep`` whose negatives are all flagged keeps them all (branch-free).

    Args:
        keep: ``(V, c, C)`` bool negatives not flagged (False in the excluded columns).
        kept_count: ``(V, c)`` int32 their per-row counts.
        excluded: ``(c, E)`` columns of each anchor that are not negatives.

    Returns:
        The mask after the fallback and its ``(V, c)`` float32 per-row counts (never 0).
    """
    empty = kept_count == 0
    keep = exclude_(keep | empty[..., None], excluded)
    num_negatives = keep.shape[-1] - excluded.shape[-1]
    return keep, torch.where(empty, num_negatives, kept_count).to(torch.float32)


def row_positive(scores: torch.Tensor, positive_index: torch.Tensor) -> torch.Tensor:
    """``(V, c)`` score of each row's positive column (``positive_index``: ``(V, c)``)."""
    return scores.gather(-1, positive_index[..., None]).squeeze(-1)


def cross_entropy_rows(
    scores: torch.Tensor,
    scale: torch.Tensor,
    positive_index: torch.Tensor,
    keep: torch.Tensor,
    kept_count: torch.Tensor,
    num_negatives: int,
) -> RowTerms:
    """NT-Xent / InfoNCE per row over the positive and the kept negatives, on logits ``scale * scores``.

    The kept negatives' sum of exponentials is rescaled to the full negative count, so the
    positive/negative balance is unchanged by filtering:
    ``-l_pos + log(exp(l_pos) + (num_negatives / n_kept) * sum_kept exp(l))``. With every
    negative kept this is the usual cross-entropy. Its gradient: ``scale * p_c`` for a kept
    negative (``p_c`` its share of the softmax) and ``-scale * (1 - p_pos)`` for the positive.

    Args:
        scores: ``(V, c, C)`` float32 cosine scores.
        scale: 0-d positive inverse temperature.
        positive_index: ``(V, c)`` column of each row's positive.
        keep: ``(V, c, C)`` bool kept negatives (at least one per row; the positive is not kept).
        kept_count: ``(V, c)`` float32 number of kept negatives per row.
        num_negatives: Negatives per row before filtering.

    Returns:
        Per-row losses and their gradients.
    """
    exponentials = torch.where(keep, scores, float("-inf"))
    row_max = exponentials.amax(dim=-1, keepdim=True)  # finite: every row keeps a negative
    exponentials.sub_(row_max).mul_(scale).exp_()
    total = exponentials.sum(dim=-1)
    positive = row_positive(scores, positive_index) * scale
    negative_lse = scale * row_max.squeeze(-1) + total.log() + math.log(num_negatives) - kept_count.log()
    # Share of the rescaled negatives in the row's softmax over {positive, negatives}.
    negative_share = torch.sigmoid(negative_lse - positive)
    row_grad = scale * negative_share
    grad_scores = exponentials.mul_((row_grad / total)[..., None])
    grad_scores.scatter_add_(-1, positive_index[..., None], -row_grad[..., None])
    return RowTerms(torch.logaddexp(positive, negative_lse) - positive, grad_scores)


def supervised_cross_entropy_rows(
    scores: torch.Tensor,
    scale: torch.Tensor,
    positive_index: torch.Tensor,
    keep: torch.Tensor,
    flagged: torch.Tensor,
) -> RowTerms:
    """Cross-entropy per row whose flagged negatives are extra positives (supervised-contrastive form).

    With ``P`` the row's positive and its flagged negatives, and the softmax over the positive and
    every negative (kept or flagged, none rescaled): ``-(1/|P|) sum_{q in P} log softmax(l)_q``,
    ``l = scale * s``. Its gradient: ``scale * (p_c - [c in P] / |P|)``. With nothing flagged it
    is the usual cross-entropy.

    Args:
        scores: ``(V, c, C)`` float32 cosine scores.
        scale: 0-d positive inverse temperature.
        positive_index: ``(V, c)`` column of each row's positive.
        keep: ``(V, c, C)`` bool kept negatives.
        flagged: ``(V, c, C)`` bool flagged negatives (disjoint from ``keep``).

    Returns:
        Per-row losses and their gradients.
    """
    positives = flagged.float().scatter_(-1, positive_index[..., None], 1.0)
    positive_count = positives.sum(dim=-1)
    logits = torch.where(keep | flagged, scores, float("-inf")).scatter_(
        -1, positive_index[..., None], row_positive(scores, positive_index)[..., None]
    )
    row_max = logits.amax(dim=-1, keepdim=True)  # finite: the positive is in every row
    exponentials = logits.sub_(row_max).mul_(scale).exp_()
    total = exponentials.sum(dim=-1)
    log_normaliser = scale * row_max.squeeze(-1) + total.log()
    mean_positive_logit = scale * (scores * positives).sum(dim=-1) / positive_count
    grad_scores = exponentials.div_(total[..., None]).sub_(positives.div_(positive_count[..., None])).mul_(scale)
    return RowTerms(log_normaliser - mean_positive_logit, grad_scores)


MAX_EXPONENT = 80.0
"""Cap of :func:`kept_mean_exp_rows`'s exponents at up to 2,900 columns (``exp(80) ~ 5.5e34``)."""

LOG_SUMMABLE = 88.0
"""``exp(LOG_SUMMABLE) ~ 1.7e38``: a sum of float32 terms whose total stays below it is finite."""


def row_sum_may_overflow(columns: int, largest_exponent: float) -> bool:
    """Whether a row of ``columns`` float32 terms up to ``exp(largest_exponent)`` can sum past float32's range."""
    return bool(columns > math.exp(LOG_SUMMABLE - largest_exponent))


def exponent_cap(columns: int) -> float:
    """Largest exponent of :func:`kept_mean_exp_rows`'s terms: ``columns`` of them sum finitely in float32."""
    if not row_sum_may_overflow(columns, MAX_EXPONENT):
        return MAX_EXPONENT
    return LOG_SUMMABLE - math.log(int(columns))


def kept_mean_exp_rows(
    scores: torch.Tensor,
    scale: torch.Tensor,
    positive_index: torch.Tensor,
    keep: torch.Tensor,
    kept_count: torch.Tensor,
) -> RowTerms:
    """FastCLIP's per-row ``g = mean_kept exp((s_ij - s_ii) * scale)`` and its gradient.

    Exponents are capped at :func:`exponent_cap` (80, less beyond 2,900 columns), so that
    negatives scoring far above the positive at a small temperature (``s_ij - s_ii > 0.8`` at
    ``tau = 0.01``) cannot overflow the row's sum; a capped term passes no gradient. The gradient
    is ``scale * exp_c / n`` for a kept negative and minus the row's sum of those for the positive.

    Args:
        scores: ``(V, c, C)`` float32 scores.
        scale: 0-d positive inverse temperature.
        positive_index: ``(V, c)`` column of each row's positive.
        keep: ``(V, c, C)`` bool kept negatives (at least one per row; the positive is not kept).
        kept_count: ``(V, c)`` float32 number of kept negatives per row.

    Returns:
        Per-row means and their gradients.
    """
    positive = row_positive(scores, positive_index)
    exponents = torch.sub(scores, positive[..., None]).mul_(scale)
    cap = exponent_cap(scores.shape[-1])
    capped = exponents > cap
    exponentials = exponents.clamp_max_(cap).exp_().mul_(keep)
    mean = exponentials.sum(dim=-1) / kept_count
    grad_scores = exponentials.masked_fill_(capped, 0.0).mul_((scale / kept_count)[..., None])
    grad_scores.scatter_add_(-1, positive_index[..., None], -grad_scores.sum(dim=-1, keepdim=True))
    return RowTerms(mean, grad_scores)


def moving_average(
    previous: torch.Tensor, estimate: torch.Tensor, gamma: float, initialized: torch.Tensor
) -> torch.Tensor:
    """``(1 - gamma) * previous + gamma * estimate``, or ``estimate`` where not yet initialised."""
    return torch.where(initialized, (1.0 - gamma) * previous + gamma * estimate, estimate)


def sogclr_rows(
    scores: torch.Tensor,
    positive_index: torch.Tensor,
    keep: torch.Tensor,
    kept_count: torch.Tensor,
    u_previous: torch.Tensor,
    u_initialized: torch.Tensor,
    gamma: float,
    temperature: float,
) -> tuple[RowTerms, torch.Tensor]:
    """SogCLR's per-row loss with its moving average of the negatives' mean exponential.

    For each row: ``g = mean_kept exp(s / tau)``, ``u' = (1 - gamma) u + gamma g`` (``u' = g`` at
    a sample's first visit), weights ``w = sg[exp(s / tau) / u']``, and

    * gradient of the row: ``-grad s_pos + mean_kept w * grad s`` (SogCLR's surrogate, an estimate
      of ``tau`` times the gradient of the global contrastive loss);
    * value of the row: ``-s_pos + tau * log u'``, the matching estimate of ``tau`` times the
      global contrastive loss of the anchor (so logs show a meaningful number).

    Args:
        scores: ``(V, c, C)`` float32 cosine scores.
        positive_index: ``(V, c)`` positive column of each row.
        keep: ``(V, c, C)`` bool kept negatives (at least one per row).
        kept_count: ``(V, c)`` float32 number of kept negatives per row.
        u_previous: ``(c,)`` stored ``u`` of each anchor's item.
        u_initialized: ``(c,)`` bool, whether ``u_previous`` has been set before.
        gamma: Weight of the new estimate.
        temperature: ``tau``.

    Returns:
        The rows' terms and the ``(V, c)`` updated ``u'``.
    """
    # Each term is at most exp(1 / tau), but a row of C of them can sum past float32's range (a
    # collapsed encoder at tau = 1/80 from C = 6,200): there every term is divided by C first.
    columns = scores.shape[-1]
    log_divisor = math.log(columns) if row_sum_may_overflow(columns, 1.0 / temperature) else 0.0
    exponentials = torch.mul(scores, 1.0 / temperature).sub_(log_divisor).exp_().mul_(keep)
    estimate = exponentials.sum(dim=-1) / kept_count * math.exp(log_divisor)  # a mean of terms <= exp(1 / tau)
    u_new = moving_average(u_previous.expand_as(estimate), estimate, gamma, u_initialized.expand_as(estimate))
    u_safe = u_new.clamp_min(torch.finfo(u_new.dtype).tiny)
    positive = row_positive(scores, positive_index)
    # w_c / n = (exponential * divisor) / (u' n): the divisor divides n first (u' n can pass float32's range).
    grad_scores = exponentials.mul_((1.0 / (u_safe * (kept_count / math.exp(log_divisor))))[..., None])
    grad_scores.scatter_add_(-1, positive_index[..., None], torch.full_like(positive[..., None], -1.0))
    value = -positive + temperature * torch.log(u_safe)
    return RowTerms(value, grad_scores), u_new


def sigmoid_rows(
    scores: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    positive_index: torch.Tensor,
    negative_weight: torch.Tensor,
    attracted_weight: torch.Tensor | None = None,
) -> RowTerms:
    """SigLIP's per-row sum of pairwise sigmoid losses over the positive and the weighted negatives.

    With logits ``x = scale * s + bias``, a row's value is ``softplus(-x_pos) + sum_n w_n
    softplus(x_n)`` (``-log sigmoid(z x)`` with label ``z = +1`` for the positive, ``-1`` for a
    negative). A flagged negative's weight drops (to 0, or 1/2 when one of its two sides flags
    it); nothing is rescaled, as each pair is its own binary problem. The gradient:
    ``w_n * scale * sigmoid(x_n)`` for a negative and ``-scale * sigmoid(-x_pos)`` for the positive.

    Args:
        scores: ``(V, c, C)`` float32 cosine scores.
        scale: 0-d positive inverse temperature.
        bias: 0-d logit bias.
        positive_index: ``(V, c)`` column of each row's positive.
        negative_weight: ``(V, c, C)`` weight of each column's negative term (bool or float; 0 on
            the positive).
        attracted_weight: ``(V, c, C)`` weight of each column's term as an extra positive
            (label ``+1``: ``softplus(-x)``, gradient ``-scale * sigmoid(-x)``), or None.

    Returns:
        Per-row sums and their gradients.
    """
    logits = torch.mul(scores, scale).add_(bias)
    negative_sum = torch.nn.functional.softplus(logits).mul_(negative_weight).sum(dim=-1)
    positive = logits.gather(-1, positive_index[..., None]).squeeze(-1)
    if attracted_weight is not None:
        negative_sum += torch.nn.functional.softplus(-logits).mul_(attracted_weight).sum(dim=-1)
        attracted_grad = torch.sigmoid(-logits).mul_(attracted_weight).mul_(-scale)
    grad_scores = logits.sigmoid_().mul_(negative_weight).mul_(scale)
    if attracted_weight is not None:
        grad_scores += attracted_grad
    grad_scores.scatter_add_(-1, positive_index[..., None], (-scale * torch.sigmoid(-positive))[..., None])
    return RowTerms(torch.nn.functional.softplus(-positive) + negative_sum, grad_scores)
