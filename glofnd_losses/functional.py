"""Pure tensor functions: similarity rows, negative and keep masks, threshold statistics, losses.

Nothing here holds state or communicates. Shapes use ``V`` rows per anchor (2 for two-view
unimodal losses, 1 per modality for CLIP), ``b`` local anchors and ``C`` candidate columns.
Scores are raw cosine similarities (not divided by the temperature), in float32.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from glofnd_losses import host


def two_view_scores(
    view_a: torch.Tensor, view_b: torch.Tensor, all_a: torch.Tensor, all_b: torch.Tensor
) -> torch.Tensor:
    """Unimodal similarity rows of the local anchors against the global batch, in one GEMM.

    Both rows of anchor ``i`` (``a_i`` and ``b_i``) run over the columns ``[A | B]`` of the global
    batch. With ``p`` the anchor's position in the global batch, row ``a`` has its positive
    (``b_p``) at column ``B + p`` and itself at ``p``; row ``b`` has its positive at ``p`` and
    itself at ``B + p`` (see :func:`two_view_positives`). Both rows exclude the same two columns.

    Args:
        view_a: Local normalised embeddings of view a, ``(b, d)``.
        view_b: Local normalised embeddings of view b, ``(b, d)``.
        all_a: Global batch of view a, ``(B, d)``.
        all_b: Global batch of view b, ``(B, d)``.

    Returns:
        Scores of shape ``(2, b, 2B)``.
    """
    anchors, columns = two_view_features(view_a, view_b, all_a, all_b)
    return anchors @ columns.T


def two_view_features(
    view_a: torch.Tensor, view_b: torch.Tensor, all_a: torch.Tensor, all_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of :func:`two_view_scores`: anchors ``(2, b, d)`` and columns ``(2B, d)`` (``[A; B]``)."""
    return torch.stack([view_a, view_b]), torch.cat([all_a, all_b])


def two_view_positives(local_size: int, global_size: int, offset: int, device: torch.device) -> torch.Tensor:
    """Positive column ``(2, b)`` of each row of :func:`two_view_scores`."""
    positions = torch.arange(local_size, device=device) + offset
    return torch.stack([positions + global_size, positions])


def two_view_excluded(local_size: int, global_size: int, offset: int, device: torch.device) -> torch.Tensor:
    """Columns ``(b, 2)`` of :func:`two_view_scores` that are not negatives: the anchor's own item."""
    positions = torch.arange(local_size, device=device) + offset
    return torch.stack([positions, positions + global_size], dim=1)


def cross_modal_excluded(local_size: int, offset: int, device: torch.device) -> torch.Tensor:
    """Column ``(b, 1)`` of image-vs-text rows that is not a negative: the paired item."""
    return (torch.arange(local_size, device=device) + offset)[:, None]


def negative_mask(excluded: torch.Tensor, num_columns: int) -> torch.Tensor:
    """Bool mask ``(b, C)``: True on every column except the ``excluded`` ones."""
    mask = torch.ones(excluded.shape[0], num_columns, dtype=torch.bool, device=excluded.device)
    return fill_excluded_(mask, excluded, False)


def fill_excluded_(rows: torch.Tensor, excluded: torch.Tensor, value: float | bool) -> torch.Tensor:
    """In place: ``value`` in the ``excluded`` columns of every row of ``rows``; returns ``rows``.

    Args:
        rows: ``(..., b, C)`` tensor.
        excluded: ``(b, E)`` columns of each of the ``b`` rows.
        value: The value written there.
    """
    if host.compiling():
        # Inside a torch.compile graph a scatter, fused with its neighbours, makes inductor's CPU
        # code generator emit C++ that does not compile (torch 2.15); a comparison with the column
        # numbers fuses cleanly, and costs nothing once fused.
        columns = torch.arange(rows.shape[-1], device=rows.device)
        return rows.masked_fill_((columns == excluded[..., None]).any(dim=-2), value)
    return rows.scatter_(-1, excluded.expand(*rows.shape[:-2], -1, -1), value)


def last_dim_contiguous(tensor: torch.Tensor) -> bool:
    """Whether the last dimension is laid out contiguously (false for a transposed view's rows)."""
    return tensor.shape[-1] <= 1 or tensor.stride(-1) == 1


def _transposed_layout(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is laid out as a transposed view: strided rows, ``tensor.mT`` contiguous."""
    return not last_dim_contiguous(tensor) and tensor.mT.is_contiguous()


def select_anchors(scores: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """The rows ``(V, k, C)`` of the ``anchors`` (``(k,)`` positions) among ``scores`` ``(V, b, C)``.

    Rows laid out down the columns (a transposed view) are gathered from every memory row with
    ``gather`` and keep that layout; on CPU indexing them as rows, or ``index_select`` across the
    memory rows, is several times slower.
    """
    if _transposed_layout(scores):
        memory_rows = scores.mT  # (V, C, b), contiguous
        columns = anchors.expand(*memory_rows.shape[:-1], -1)
        return memory_rows.gather(-1, columns).mT
    return scores.index_select(1, anchors)


_COUNT_CHUNK = 128  # columns summed in uint8 (at most 255 without overflow)
_COUNT_BYTES_FROM = 2**20  # smaller masks: one int32 sum (its copy is small) beats three operators


def count_true(mask: torch.Tensor) -> torch.Tensor:
    """Number of True entries along the last dimension, as int32, without an integer copy of ``mask``.

    ``mask.sum(dim=-1, dtype=torch.int32)`` first converts the whole mask to int32 (4x its size);
    on CPU that temporary costs more than the count. Here the mask is read as bytes and summed in
    ``uint8`` over chunks of 128 entries, then the per-chunk sums are added in int32. A mask laid
    out down its columns (a transposed view's rows) is summed down the memory rows the same way.
    Masks of fewer than 2**20 entries take the plain sum, which is faster there
    (``benchmarks/compare_ops.py``).

    Args:
        mask: Bool tensor ``(..., C)``.

    Returns:
        ``(...)`` int32 counts.
    """
    # A compiled graph fuses the count (no temporary), and inductor's CPU code for the uint8
    # chunk sums below is wrong (counts off by the row length, torch 2.15).
    if host.compiling() or mask.numel() < _COUNT_BYTES_FROM:
        return mask.sum(dim=-1, dtype=torch.int32)
    if last_dim_contiguous(mask):
        return _count_bytes(mask.view(torch.uint8), dim=-1)
    if _transposed_layout(mask):  # its rows run down the memory rows
        return _count_bytes(mask.mT.view(torch.uint8), dim=-2)
    return mask.sum(dim=-1, dtype=torch.int32)


def _count_bytes(as_bytes: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of the 0/1 bytes along ``dim`` (-1 or -2) as int32, in uint8 over chunks of 128."""
    length = as_bytes.shape[dim]
    whole = length - length % _COUNT_CHUNK
    if not whole:
        return as_bytes.sum(dim=dim, dtype=torch.int32)
    chunks = as_bytes.narrow(dim, 0, whole).unflatten(dim, (whole // _COUNT_CHUNK, _COUNT_CHUNK))
    counts = chunks.sum(dim=dim, dtype=torch.uint8).sum(dim=dim, dtype=torch.int32)
    if whole < length:
        counts += as_bytes.narrow(dim, whole, length - whole).sum(dim=dim, dtype=torch.int32)
    return counts


def _excluded_scores(scores: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    return scores.gather(-1, excluded.expand(scores.shape[0], -1, -1))


def count_above(scores: torch.Tensor, excluded: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Number of negatives scoring strictly above each anchor's threshold, pooled over rows.

    Counts over whole rows, then subtracts the excluded columns (one pass over the scores, no
    negative mask).

    Args:
        scores: ``(V, b, C)`` float32 scores.
        excluded: ``(b, E)`` columns of each anchor that are not negatives (positive, self).
        thresholds: ``(b,)`` float32 thresholds, one per anchor.

    Returns:
        ``(b,)`` counts as float32.
    """
    bound = thresholds[None, :, None]
    everything = count_true(scores > bound).sum(dim=0)
    not_negatives = torch.sum(_excluded_scores(scores, excluded) > bound, dim=(0, 2), dtype=torch.int32)
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
    if not last_dim_contiguous(scores):  # a transposed view: topk would read each row with a stride
        scores = scores.contiguous()
    values, columns = scores.topk(min(count + excluded.shape[1], scores.shape[-1]), dim=-1)
    is_excluded = (columns[..., None] == excluded[None, :, None, :]).any(dim=-1)
    return values.masked_fill(is_excluded, float("-inf"))


def _interpolate(lower: torch.Tensor, upper: torch.Tensor | None, fraction: float) -> torch.Tensor:
    """``lower + fraction * (upper - lower)``, never above ``upper`` (float32 rounding included).

    :func:`may_pass_quantile` relies on the quantile staying within its two order statistics.
    """
    if upper is None or fraction == 0.0:
        return lower
    return torch.minimum(lower + fraction * (upper - lower), upper)


def _interpolate_top(top: torch.Tensor, top_count: int, fraction: float) -> torch.Tensor:
    """The quantile from candidates ``(..., m)`` holding the ``top_count`` largest values."""
    top = top.sort(dim=-1, descending=True).values
    upper = top[..., top_count - 2] if top_count >= 2 else None
    return _interpolate(top[..., top_count - 1], upper, fraction)


def minibatch_quantile(scores: torch.Tensor, excluded: torch.Tensor, alpha: float, num_negatives: int) -> torch.Tensor:
    """Per-row ``(1 - alpha)``-quantile of the negatives (FNC's threshold), via ``topk``.

    Equal to ``torch.quantile(row[negatives], 1 - alpha)`` (linear interpolation) without sorting
    the whole row, without masking a copy of it, and without ``torch.quantile``'s 16M-element
    limit.

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
    # One row of V * C columns per anchor: one topk over it is several times faster on CPU than V
    # topks of twice the count over the rows (a copy for V > 1, a view for V = 1).
    pooled = scores.transpose(0, 1).reshape(1, anchors, views * columns)
    offsets = torch.arange(views, device=excluded.device) * columns
    pooled_excluded = (excluded[:, None, :] + offsets[None, :, None]).reshape(anchors, -1)
    return _interpolate_top(_top_negatives(pooled, pooled_excluded, top_count), top_count, fraction)[0]


def may_pass_quantile(above_count: torch.Tensor, upward: torch.Tensor, alpha: float, negatives: int) -> torch.Tensor:
    """Anchors whose new threshold may lie past their :func:`pooled_quantile`, from a count.

    With ``above_count`` the anchor's negatives (pooled over its rows) strictly above its new
    threshold, an upward step can have passed the quantile only if fewer than ``top_count``
    negatives remain above it, and a downward step only if at least ``top_count - 1`` do
    (``top_count`` from :func:`_quantile_rank`). Every anchor whose step passes its quantile is in
    the result (with the anchors whose threshold lies between the two order statistics the
    quantile interpolates, see :func:`straddled_quantile`), so the quantile needs to be computed
    for these anchors only.

    Args:
        above_count: ``(b,)`` negatives strictly above each anchor's new threshold.
        upward: ``(b,)`` bool, whether the anchor's threshold moved up.
        alpha: Upper tail fraction of the quantile.
        negatives: Negatives per anchor, pooled over its rows (``V * num_negatives``).

    Returns:
        ``(b,)`` bool.
    """
    top_count, _ = _quantile_rank(alpha, negatives)
    return torch.where(upward, above_count <= top_count - 1, above_count >= top_count - 1)


SHORT_TOPK = 12
"""Longest ``topk`` (values per row) that :func:`straddling_takes_topk` prefers to :func:`straddled_quantile`.

A ``topk`` of a few values per row costs less than the two masked reductions on CPU, a long one
more. ``benchmarks/speed.py`` times the two ways against each other (its ``Clip topk /
reductions`` pair; BENCHMARKS.md section 2).
"""


def straddling_takes_topk(alpha: float, negatives: int, excluded: int) -> bool:
    """Whether the anchors next to their quantile should take the ``topk`` rather than two reductions.

    True when :func:`pooled_quantile`'s ``topk`` takes only a few of the largest values (small
    ``alpha * negatives``, as at CLIP's alpha of 1e-3): such a short ``topk`` costs less per score
    than :func:`straddled_quantile`, and one selection of rows then serves every anchor that needs
    its quantile. Both ways give the same quantile, bit for bit.

    Args:
        alpha: Upper tail fraction of the quantile.
        negatives: Negatives per anchor, pooled over its rows (``V * num_negatives``).
        excluded: Columns per anchor, pooled over its rows, that are not negatives (``V * E``);
            the ``topk`` takes them too.

    Returns:
        Whether :func:`pooled_quantile`'s ``topk`` takes at most :data:`SHORT_TOPK` values.
    """
    top_count, _ = _quantile_rank(alpha, negatives)
    return top_count + excluded <= SHORT_TOPK


def straddles_quantile(above_count: torch.Tensor, alpha: float, negatives: int) -> torch.Tensor:
    """``(b,)`` bool: thresholds with exactly ``top_count - 1`` negatives above them.

    Such a threshold lies between the two order statistics that :func:`pooled_quantile`
    interpolates, and :func:`straddled_quantile` finds the quantile without a ``topk``.
    Arguments as in :func:`may_pass_quantile`.
    """
    top_count, _ = _quantile_rank(alpha, negatives)
    return above_count == top_count - 1


def straddled_quantile(
    scores: torch.Tensor, excluded: torch.Tensor, bound: torch.Tensor, alpha: float, num_negatives: int
) -> torch.Tensor:
    """:func:`pooled_quantile` of anchors whose ``bound`` straddles it (:func:`straddles_quantile`).

    The two order statistics are then the largest negative at or below ``bound`` and the
    smallest above it: two masked reductions instead of a ``topk``, with the same result.

    Args:
        scores: ``(V, b, C)`` float32 scores.
        excluded: ``(b, E)`` non-negative columns.
        bound: ``(b,)`` thresholds with exactly ``top_count - 1`` negatives strictly above.
        alpha: Upper tail fraction.
        num_negatives: Negatives per row.

    Returns:
        ``(b,)`` float32 quantiles.
    """
    top_count, fraction = _quantile_rank(alpha, scores.shape[0] * num_negatives)
    at_or_below = at_or_below_bound(scores, bound[None, :, None])
    lower_candidates = fill_excluded_(torch.where(at_or_below, scores, float("-inf")), excluded, float("-inf"))
    lower = lower_candidates.amax(dim=(0, 2))
    if top_count < 2 or fraction == 0.0:
        return lower
    upper_candidates = fill_excluded_(torch.where(at_or_below, float("inf"), scores), excluded, float("inf"))
    return _interpolate(lower, upper_candidates.amin(dim=(0, 2)), fraction)


_STD_FROM_FEATURES_AT = 8  # from R C >= d^2 (R + C) / 8 for contiguous rows (R rows, C columns), / 16 for strided
_STD_CANCELS_BELOW = 1e-3  # variance / E[s^2] under which E[s^2] - E[s]^2 loses float32 digits of the spread


def row_std(scores: torch.Tensor, features: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Standard deviation of each row over all its columns, ``(..., C) -> (...)``.

    From the row sum and the row norm (two reductions that write nothing), several times faster
    on CPU than ``Tensor.std``. ``E[s^2] - E[s]^2`` cancels in float32 where the spread is small
    against the scores themselves (a collapsed encoder: every cosine of a row within ~1e-2 of
    its mean); such rows take the squared deviations from the mean (one more pass; on CPU only
    when a row needs it).

    Where ``features`` are given and that is cheaper, the spreads come from them
    (:func:`row_std_from_features`): two reductions over ``R x C`` scores against two GEMMs of
    ``d^2 (R + C)`` multiply-adds, which win once the rows no longer fit in the CPU's caches
    (from ``R C >= d^2 (R + C) / 8``, half that for rows laid out down the columns, whose
    reductions are slower; ``benchmarks/compare_ops.py``). The ways agree to float32 rounding.

    Args:
        scores: ``(..., R, C)`` rows.
        features: ``(anchors, columns)`` with ``scores == anchors @ columns.mT`` (anchors
            ``(..., R, d)``, columns ``(C, d)``), or None.
    """
    if features is not None and std_from_features_is_cheaper(scores, features[1].shape[-1]):
        return row_std_from_features(*features)
    count = scores.shape[-1]
    mean = scores.sum(dim=-1) / count
    mean_square = _row_sum_of_squares(scores) / count
    variance = mean_square - mean.square()
    cancels = variance < _STD_CANCELS_BELOW * mean_square
    if not host.reads_without_sync(scores.device) or bool(cancels.any()):
        variance = torch.where(cancels, _row_sum_of_squares(scores - mean[..., None]) / count, variance)
    return (variance.clamp_min(0.0) * (count / max(count - 1, 1))).sqrt()


def std_from_features_is_cheaper(scores: torch.Tensor, feature_dim: int) -> bool:
    """:func:`row_std`'s cost rule: whether ``(..., R, C)`` rows factored through ``feature_dim`` take the features."""
    count = scores.shape[-1]
    rows = scores.numel() // max(count, 1)
    ratio = _STD_FROM_FEATURES_AT if last_dim_contiguous(scores) else 2 * _STD_FROM_FEATURES_AT
    return ratio * rows * count >= feature_dim * feature_dim * (rows + count)


def _row_sum_of_squares(scores: torch.Tensor) -> torch.Tensor:
    if last_dim_contiguous(scores):
        return torch.linalg.vector_norm(scores, dim=-1).square()
    return scores.square().sum(dim=-1)  # CPU's vector_norm across rows (a transposed view) is over ten times slower


def row_std_from_features(anchors: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """:func:`row_std` of ``anchors @ columns.mT`` without forming it, ``(..., R, d), (C, d) -> (..., R)``.

    Row ``i``'s deviations from its mean are ``a_i . (c_j - c_mean)``, so its variance is
    ``a_i^T S a_i / (C - 1)`` with ``S`` the scatter matrix of the centred columns. Centring first
    keeps the result accurate relative to the spread itself, also where every score lies in a
    narrow band (collapsed embeddings) and under reduced-precision matmuls (TF32).
    """
    count = columns.shape[-2]
    centred = columns - columns.mean(dim=-2, keepdim=True)
    scatter = centred.mT @ centred
    variance = ((anchors @ scatter) * anchors).sum(dim=-1) / max(count - 1, 1)
    return variance.clamp_min(0.0).sqrt()


def at_or_below_bound(scores: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Bool ``scores <= bound`` (``bound`` broadcasts), computed as ``bound >= scores``.

    The same values (NaN compares False both ways), but torch 2.15's CPU ``le`` kernel is slower
    than its ``ge``: this takes 0.61-0.81 of the time of ``scores <= bound``
    (``benchmarks/compare_ops.py``).
    """
    return torch.ge(bound, scores)


def keep_at_or_below(scores: torch.Tensor, excluded: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Keep-mask: negatives with ``score <= threshold``; thresholds ``(b,)`` or ``(V, b)``."""
    if thresholds.dim() == 1:
        thresholds = thresholds.expand(scores.shape[0], -1)
    return fill_excluded_(at_or_below_bound(scores, thresholds[..., None]), excluded, False)


def keep_nonempty_(
    keep: torch.Tensor, kept_count: torch.Tensor, excluded: torch.Tensor, num_negatives: int
) -> torch.Tensor:
    """In place: a row of ``keep`` whose negatives are all flagged keeps them all.

    One in-place pass over the mask (no second mask is built); on CPU only when such a row exists.

    Args:
        keep: ``(V, b, C)`` bool negatives not flagged; modified in place.
        kept_count: ``(V, b)`` their per-row counts.
        excluded: ``(b, E)`` non-negative columns (stay False).
        num_negatives: Negatives per row.

    Returns:
        ``(V, b)`` float32 kept counts after the fallback (never 0).
    """
    empty = kept_count == 0
    # Such rows are rare: a CPU tensor can be checked first (reading it is no device sync).
    if not host.reads_without_sync(keep.device) or bool(empty.any()):
        fill_excluded_(keep.logical_or_(empty[..., None]), excluded, False)
    return torch.where(empty, num_negatives, kept_count).to(torch.float32)


_DOT_CHUNK = 1 << 18
"""Elements per partial product of :func:`_dot` on CPU."""


def _dot(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Sum of the elementwise product of two tensors of one shape.

    Two tensors with the same transposed layout (the rows of a transposed view) are read in
    memory order, without a copy; ``reshape(-1)`` would copy each into row order first. Other
    layouts are flattened in row order.

    On CPU the product is summed in parts of ``_DOT_CHUNK`` elements: MKL's float32 ``dot`` keeps
    a few float32 accumulators, whose error grows with the length (on a 4096 x 4096 CLIP buffer
    the logit scale's gradient came out about 1e-3 off: ``tests/test_clip.py``).
    """
    if first.stride() == second.stride() and _transposed_layout(first):
        first, second = first.mT, second.mT
    first, second = first.reshape(-1), second.reshape(-1)
    if first.device.type != "cpu" or first.numel() <= _DOT_CHUNK:
        return torch.dot(first, second)
    parts = [torch.dot(a, b) for a, b in zip(first.split(_DOT_CHUNK), second.split(_DOT_CHUNK))]
    return torch.stack(parts).sum()


def _scores_and_scale_gradients(
    ctx: Any, grad_scores: torch.Tensor, scores: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    """Backward outputs ``(scores, scale, None, None, None)`` of a loss of ``scale * scores``.

    ``grad_scores`` is the gradient with respect to the scores, which already carries the factor
    ``scale``; the scale's gradient is then ``sum(grad_scores * scores) / scale`` (one dot
    product, no second pass; ``scale`` is positive: ``logit_scale = exp(.)`` or ``1 / tau``).
    """
    grad_scale = None
    if ctx.needs_input_grad[1]:
        grad_scale = (_dot(grad_scores, scores) / scale).to(scale.dtype)
    return grad_scores if ctx.needs_input_grad[0] else None, grad_scale, None, None, None


class _FilteredCrossEntropy(torch.autograd.Function):
    """Forward and hand-written backward of :func:`filtered_cross_entropy` on one full-size buffer.

    The forward turns one ``(V, b, C)`` temporary into the kept negatives' exponentials in place
    (shifted by each row's largest kept logit, left unnormalised: the backward folds the row's
    softmax denominator into its per-row factor); the backward turns the same buffer into the
    gradient in place. Autograd through ``where``, ``logsumexp`` and the logit scaling would
    allocate five or six such tensors and pass over them twice as often.
    """

    @staticmethod
    def forward(
        ctx: Any,
        scores: torch.Tensor,
        scale: torch.Tensor,
        positive_index: torch.Tensor,
        keep: torch.Tensor,
        log_rescale: torch.Tensor,
    ) -> torch.Tensor:
        scores, scale = scores.detach(), scale.detach()
        exponentials = torch.where(keep, scores, float("-inf"))
        row_max = exponentials.amax(dim=-1, keepdim=True)  # finite: every row keeps a negative
        # exp(scale * (s - max)): the scale is positive, so this shifts by the largest kept logit.
        # (Two in-place passes: on CPU one addcmul with a tensor scale is several times slower.)
        exponentials.sub_(row_max).mul_(scale).exp_()
        total = exponentials.sum(dim=-1)
        positive = scores.gather(-1, positive_index[..., None]).squeeze(-1) * scale
        negative_lse = scale * row_max.squeeze(-1) + total.log() + log_rescale
        # Share of the rescaled negatives in the row's softmax over {positive, negatives}.
        negative_share = torch.sigmoid(negative_lse - positive)
        ctx.save_for_backward(scores, scale, positive_index, exponentials, negative_share, total)
        return torch.logaddexp(positive, negative_lse) - positive

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        scores, scale, positive_index, exponentials, negative_share, total = ctx.saved_tensors
        row_grad = scale * grad_loss * negative_share
        # d loss / d score: row_grad * softmax for a kept negative, -row_grad for the positive;
        # one pass over the buffer.
        grad_scores = exponentials.mul_((row_grad / total)[..., None])
        grad_scores.scatter_add_(-1, positive_index[..., None], -row_grad[..., None])
        return _scores_and_scale_gradients(ctx, grad_scores, scores, scale)


def filtered_cross_entropy(
    scores: torch.Tensor,
    scale: torch.Tensor | float,
    positive_index: torch.Tensor,
    keep: torch.Tensor,
    kept_count: torch.Tensor,
    num_negatives: int,
) -> torch.Tensor:
    """NT-Xent / InfoNCE per row over the positive and the kept negatives, on logits ``scale * scores``.

    The kept negatives' sum of exponentials is rescaled to the full negative count, so the
    positive/negative balance is unchanged by filtering:
    ``-l_pos + log(exp(l_pos) + (num_negatives / n_kept) * sum_kept exp(l))``.
    With every negative kept this is the usual cross-entropy. Gradients flow to ``scores`` and,
    when it is a tensor that requires them, to ``scale`` (CLIP's ``logit_scale``); the backward is
    written by hand (see :class:`_FilteredCrossEntropy`) and supports one backward pass.

    Args:
        scores: ``(V, b, C)`` float32 cosine scores.
        scale: Inverse temperature, a float or a 0-d float32 tensor.
        positive_index: ``(b,)`` or ``(V, b)`` column of each row's positive.
        keep: ``(V, b, C)`` bool kept negatives (at least one per row; the positive is not kept).
        kept_count: ``(V, b)`` float32 number of kept negatives per row.
        num_negatives: Negatives per row before filtering.

    Returns:
        ``(V, b)`` per-row losses.
    """
    if not isinstance(scale, torch.Tensor):  # a fill on the device, not a copy from the host
        scale = scores.new_full((), float(scale))
    positive_index = positive_index.expand(scores.shape[0], -1).contiguous()
    keep = keep.expand_as(scores)
    log_rescale = math.log(num_negatives) - torch.log(kept_count)
    loss: torch.Tensor = _FilteredCrossEntropy.apply(scores, scale, positive_index, keep, log_rescale)
    return loss


MAX_EXPONENT = 80.0
"""Cap of :func:`kept_mean_exp`'s exponents at up to 2,900 columns (``exp(80) ~ 5.5e34``)."""

LOG_SUMMABLE = 88.0
"""``exp(LOG_SUMMABLE) ~ 1.7e38``: a sum of float32 terms whose total stays below it is finite."""


def row_sum_may_overflow(columns: int, largest_exponent: float) -> bool:
    """Whether a row of ``columns`` float32 terms up to ``exp(largest_exponent)`` can sum past float32's range.

    A comparison of the size, not its logarithm: under ``torch.compile`` with a symbolic batch
    size it is a guard, and the size is specialised only where the answer is yes (rare).
    """
    return bool(columns > math.exp(LOG_SUMMABLE - largest_exponent))


def exponent_cap(columns: int) -> float:
    """Largest exponent of :func:`kept_mean_exp`'s terms: ``columns`` of them sum finitely in float32."""
    if not row_sum_may_overflow(columns, MAX_EXPONENT):
        return MAX_EXPONENT
    return LOG_SUMMABLE - math.log(int(columns))


class _KeptMeanExp(torch.autograd.Function):
    """Forward and hand-written backward of :func:`kept_mean_exp` on one full-size buffer.

    Autograd through the subtraction, scaling, cap, exponential and mask allocates a ``(b, C)``
    tensor per step and passes over each again backwards; here one buffer holds the
    exponentials and then, in place, the gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        scores: torch.Tensor,
        scale: torch.Tensor,
        positive_index: torch.Tensor,
        keep: torch.Tensor,
        kept_count: torch.Tensor,
    ) -> torch.Tensor:
        scores, scale = scores.detach(), scale.detach()
        positive = scores.gather(-1, positive_index[:, None])
        exponentials = torch.addcmul(-scale * positive, scores, scale)  # (s - s_pos) * scale in one pass
        # No gradient through the cap (as autograd's clamp). Capped exponents are rare: on CPU their
        # presence is read first (no device sync) and their mask built only then.
        cap = exponent_cap(scores.shape[-1])
        capped = None
        if not host.reads_without_sync(exponentials.device) or bool(exponentials.amax() > cap):
            capped = exponentials > cap
        exponentials.clamp_max_(cap).exp_().mul_(keep)
        ctx.save_for_backward(scores, scale, positive_index, exponentials, capped, kept_count)
        return exponentials.sum(dim=-1) / kept_count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_mean: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        scores, scale, positive_index, exponentials, capped, kept_count = ctx.saved_tensors
        # d mean_i / d s_ij = scale * exp_ij / n_i for a kept, uncapped negative j; the positive's
        # is minus their row sum.
        grad_scores = exponentials.mul_((scale * grad_mean / kept_count)[:, None])
        if capped is not None:
            grad_scores.masked_fill_(capped, 0.0)
        grad_scores.scatter_add_(-1, positive_index[:, None], -grad_scores.sum(dim=-1, keepdim=True))
        return _scores_and_scale_gradients(ctx, grad_scores, scores, scale)


def kept_mean_exp(
    scores: torch.Tensor,
    scale: torch.Tensor,
    positive_index: torch.Tensor,
    keep: torch.Tensor,
    kept_count: torch.Tensor,
) -> torch.Tensor:
    """FastCLIP's per-anchor ``g_i = mean_kept exp((s_ij - s_ii) * scale)``, differentiable in both.

    Exponents are capped at :func:`exponent_cap` (80, less beyond 2,900 columns), so that
    negatives scoring far above the positive at a small temperature (``s_ij - s_ii > 0.8`` at
    ``tau = 0.01``) cannot overflow the row's sum; a capped term passes no gradient. The backward
    is written by hand (one backward pass).

    Args:
        scores: ``(b, C)`` float32 scores, with gradient.
        scale: 0-d positive inverse temperature (gradient where it requires one).
        positive_index: ``(b,)`` column of each row's positive.
        keep: ``(b, C)`` bool kept negatives (at least one per row; the positive is not kept).
        kept_count: ``(b,)`` float32 number of kept negatives per row.

    Returns:
        ``(b,)`` means.
    """
    mean: torch.Tensor = _KeptMeanExp.apply(scores, scale, positive_index, keep, kept_count)
    return mean


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """SogCLR's per-row loss with its moving average of the negatives' mean exponential.

    For each row: ``g = mean_kept exp(s / tau)``, ``u' = (1 - gamma) u + gamma g`` (``u' = g`` at
    a sample's first visit), weights ``w = sg[exp(s / tau) / u']``, and

    * gradient of the row: ``-grad s_pos + mean_kept w * grad s`` (SogCLR's surrogate, an estimate
      of ``tau`` times the gradient of the global contrastive loss);
    * value of the row: ``-s_pos + tau * log u'``, the matching estimate of ``tau`` times the
      global contrastive loss of the anchor (so logs show a meaningful number).

    Args:
        scores: ``(V, b, C)`` float32 cosine scores, with gradient.
        positive_index: ``(b,)`` or ``(V, b)`` positive column of each row.
        keep: ``(V, b, C)`` bool kept negatives (at least one per row).
        kept_count: ``(V, b)`` float32 number of kept negatives per row.
        u_previous: ``(b,)`` stored ``u`` of each anchor's item.
        u_initialized: ``(b,)`` bool, whether ``u_previous`` has been set before.
        gamma: Weight of the new estimate.
        temperature: ``tau``.

    Returns:
        ``(V, b)`` per-row losses and ``(V, b)`` updated ``u'`` (detached).
    """
    # In place on one temporary: every full-size (V, b, C) allocation costs more than its arithmetic on CPU.
    exp_scores = torch.mul(scores.detach(), 1.0 / temperature)
    # Each term is at most exp(1 / tau), but a row of C of them can sum past float32's range (a
    # collapsed encoder at tau = 1/80 from C = 6,200): there every term is divided by C first.
    columns = scores.shape[-1]
    divisor = float(int(columns)) if row_sum_may_overflow(columns, 1.0 / temperature) else 1.0
    if divisor > 1.0:
        exp_scores.sub_(math.log(divisor))
    exp_scores.exp_().mul_(keep)
    estimate = exp_scores.sum(dim=-1) / kept_count
    kept_share = kept_count
    if divisor > 1.0:
        estimate = estimate * divisor  # a mean of terms <= exp(1 / tau): finite
        kept_share = kept_count / divisor
    u_new = moving_average(u_previous.expand_as(estimate), estimate, gamma, u_initialized.expand_as(estimate))
    u_safe = u_new.clamp_min(torch.finfo(u_new.dtype).tiny)
    positive = scores.gather(-1, positive_index.expand(scores.shape[0], -1)[..., None]).squeeze(-1)
    # sum_c w_c s_c / n with w_c = exp(s_c / tau) / u': one weighted reduction, no weight tensor.
    surrogate = -positive + (exp_scores * scores).sum(dim=-1) / (u_safe * kept_share)
    value = -positive.detach() + temperature * torch.log(u_safe)
    return surrogate + (value - surrogate.detach()), u_new
