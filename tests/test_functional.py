"""The functional core against hand-written references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from glofnd_losses import functional


def value_and_gradients(
    terms: functional.RowTerms, scores: torch.Tensor, scale: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A formula's rows, the gradient of ``sum(weights * rows)`` for the scores and, through the
    logits ``scale * scores``, for the scale (the engine's identity ``sum(dS * s) / scale``)."""
    grad_scores = terms.grad_scores * weights[..., None]
    return terms.value, grad_scores, (grad_scores * scores).sum() / scale


def random_rows(
    views: int, anchors: int, columns: int, negatives: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores, the excluded columns (b, E) and the matching negative mask."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(views, anchors, columns, generator=generator) * 2 - 1
    excluded = torch.stack(
        [torch.randperm(columns, generator=generator)[: columns - negatives] for _ in range(anchors)]
    )
    mask = torch.ones(anchors, columns, dtype=torch.bool)
    for row in range(anchors):
        mask[row, excluded[row]] = False
    scores[0, 0, excluded[0, :1]] = 5.0  # an excluded column above every negative must not count
    return scores, excluded, mask


@settings(max_examples=40, deadline=None)
@given(
    alpha=st.floats(0.0, 0.9),
    negatives=st.integers(1, 40),
    seed=st.integers(0, 10_000),
)
def test_minibatch_quantile_equals_torch_quantile(alpha: float, negatives: int, seed: int) -> None:
    scores, excluded, mask = random_rows(2, 3, 50, negatives, seed)
    expected = torch.stack(
        [torch.stack([torch.quantile(scores[v, i][mask[i]], 1 - alpha) for i in range(3)]) for v in range(2)]
    )
    torch.testing.assert_close(functional.minibatch_quantile(scores, excluded, alpha, negatives), expected)


POOLED_CASES = given(
    alpha=st.floats(0.0, 0.9),
    negatives=st.integers(1, 40),
    views=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
"""Hypothesis cases of the pooled-quantile tests."""


@settings(max_examples=40, deadline=None)
@POOLED_CASES
def test_pooled_quantile_equals_torch_quantile_of_the_concatenated_rows(
    alpha: float, negatives: int, views: int, seed: int
) -> None:
    scores, excluded, mask = random_rows(views, 3, 50, negatives, seed)
    expected = torch.stack([torch.quantile(scores[:, i][:, mask[i]].reshape(-1), 1 - alpha) for i in range(3)])
    torch.testing.assert_close(functional.pooled_quantile(scores, excluded, alpha, negatives), expected)


@settings(max_examples=30, deadline=None)
@given(negatives=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_counts_and_keep_mask_skip_excluded_columns(negatives: int, seed: int) -> None:
    scores, excluded, mask = random_rows(2, 4, 45, negatives, seed)
    thresholds = torch.rand(4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    expected_count = ((scores > thresholds[None, :, None]) & mask).sum(dim=(0, 2)).float()
    torch.testing.assert_close(functional.count_above(scores, excluded, thresholds), expected_count)
    expected_keep = (scores <= thresholds[None, :, None]) & mask
    assert torch.equal(functional.keep_at_or_below(scores, excluded, thresholds), expected_keep)
    assert torch.equal(functional.negative_mask(excluded, 45), mask)


def test_threshold_subgradient_by_hand() -> None:
    # One anchor, two rows of 4 columns; column 0 is the positive (not a negative).
    scores = torch.tensor([[[0.9, 0.5, 0.2, 0.7]], [[0.9, 0.1, 0.6, 0.4]]])
    excluded = torch.tensor([[0]])
    threshold = torch.tensor([0.45])
    # Negatives above 0.45: row 0 -> 0.5, 0.7; row 1 -> 0.6. Three of six.
    got = functional.threshold_subgradient(scores, excluded, threshold, alpha=0.1, num_negatives=3)
    torch.testing.assert_close(got, torch.tensor([0.1 - 3 / 6]))
    # Ties are kept (strict >): a threshold equal to a score does not count it.
    tie = functional.threshold_subgradient(scores, excluded, torch.tensor([0.6]), alpha=0.0, num_negatives=3)
    torch.testing.assert_close(tie, torch.tensor([-1 / 6]))


def test_cross_entropy_rows_without_filtering_is_cross_entropy() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 9, generator=generator)
    positive = torch.tensor([0, 3, 1, 8, 4])
    keep = torch.ones(2, 5, 9, dtype=torch.bool)
    keep[:, torch.arange(5), positive] = False
    scale = torch.tensor(1.0)
    got = functional.cross_entropy_rows(logits, scale, positive.expand(2, -1), keep, keep.sum(-1).float(), 8).value
    expected = F.cross_entropy(logits.reshape(10, 9), positive.repeat(2), reduction="none").reshape(2, 5)
    torch.testing.assert_close(got, expected)


def test_cross_entropy_rows_rescales_kept_negatives_to_the_full_count() -> None:
    logits = torch.tensor([[[2.0, 1.0, 0.5, -1.0, 0.0]]])
    positive = torch.tensor([0])
    keep = torch.tensor([[[False, False, True, True, False]]])  # keep 2 of the 4 negatives
    expected = -2.0 + math.log(math.exp(2.0) + (4 / 2) * (math.exp(0.5) + math.exp(-1.0)))
    got = functional.cross_entropy_rows(logits, torch.tensor(1.0), positive[None], keep, torch.tensor([[2.0]]), 4)
    assert got.value.item() == pytest.approx(expected, rel=1e-6)


def autograd_filtered_cross_entropy(
    scores: torch.Tensor, scale: torch.Tensor, positive: torch.Tensor, keep: torch.Tensor, num_negatives: int
) -> torch.Tensor:
    """The same loss written with plain autograd ops (where, logsumexp), as an independent reference."""
    logits = scores * scale
    kept_count = keep.sum(-1).to(scores.dtype)
    negative = torch.logsumexp(torch.where(keep, logits, float("-inf")), dim=-1) + torch.log(num_negatives / kept_count)
    positive_logit = logits.gather(-1, positive.expand(scores.shape[0], -1)[..., None]).squeeze(-1)
    return torch.logaddexp(positive_logit, negative) - positive_logit


@pytest.mark.parametrize("rows", [1, 2])
def test_cross_entropy_rows_gradients_match_autograd(rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    scores = torch.rand(rows, 6, 11, generator=generator, dtype=torch.float64) * 2 - 1
    positive = torch.tensor([0, 3, 1, 10, 4, 7])
    keep = torch.rand(rows, 6, 11, generator=generator) < 0.7
    keep[..., 2] = True  # every row keeps a negative
    keep[:, torch.arange(6), positive] = False
    weights = torch.rand(rows, 6, generator=generator, dtype=torch.float64)  # a non-uniform upstream gradient
    scale = torch.tensor(7.0, dtype=torch.float64)
    terms = functional.cross_entropy_rows(scores, scale, positive.expand(rows, -1), keep, keep.sum(-1).double(), 10)
    fused = value_and_gradients(terms, scores, scale, weights)
    leaf_scores, leaf_scale = scores.clone().requires_grad_(), scale.clone().requires_grad_()
    loss = autograd_filtered_cross_entropy(leaf_scores, leaf_scale, positive, keep, 10)
    (loss * weights).sum().backward()
    for got, reference in zip(fused, (loss.detach(), leaf_scores.grad, leaf_scale.grad)):
        torch.testing.assert_close(got, reference)


def test_kept_mean_exp_rows_match_autograd_including_the_cap() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 11, generator=generator, dtype=torch.float64) * 2 - 1
    positive = torch.tensor([0, 3, 1, 10, 4, 7])
    scores[0, 0], scores[0, 5] = -0.9, 0.95  # (0.95 + 0.9) * 50 > 80: a capped term
    keep = torch.rand(6, 11, generator=generator) < 0.7
    keep[:, 5] = True  # every row keeps a negative, row 0 the capped one
    keep[torch.arange(6), positive] = False
    kept_count = keep.sum(-1).double()
    weights = torch.rand(6, generator=generator, dtype=torch.float64)  # a non-uniform upstream gradient
    scale = torch.tensor(50.0, dtype=torch.float64)
    terms = functional.kept_mean_exp_rows(scores[None], scale, positive[None], keep[None], kept_count[None])
    fused = value_and_gradients(terms, scores[None], scale, weights[None])
    leaf_scores, leaf_scale = scores.clone().requires_grad_(), scale.clone().requires_grad_()
    exponent = (leaf_scores - leaf_scores.gather(-1, positive[:, None])) * leaf_scale
    mean = torch.where(keep, exponent.clamp_max(functional.exponent_cap(11)).exp(), 0.0).sum(-1) / kept_count
    (mean * weights).sum().backward()
    assert fused[0][0, 0] > math.exp(functional.exponent_cap(11)) / kept_count[0]  # the cap was reached
    assert fused[1][0, 0, 5] == 0  # and passes no gradient
    for got, reference in zip(fused, (mean.detach()[None], leaf_scores.grad[None], leaf_scale.grad)):
        torch.testing.assert_close(got, reference)


def collapsed_embeddings(count: int, dim: int, spread: float, seed: int) -> torch.Tensor:
    """Unit vectors around one shared direction (an untrained encoder): cosines in a narrow band."""
    shared = torch.randn(dim, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))
    return F.normalize(shared + spread * noise * shared.norm() / math.sqrt(dim), dim=-1)


def test_row_std_of_collapsed_rows_stays_accurate() -> None:
    """A spread of ~1e-4 at a mean cosine of ~0.9996 (a collapsed encoder), against float64."""
    anchors = collapsed_embeddings(2 * 3, 16, 0.02, seed=2).view(2, 3, 16)
    columns = collapsed_embeddings(64, 16, 0.02, seed=1)
    expected = (anchors.double() @ columns.double().T).std(dim=-1)
    got = functional.row_std(anchors, functional.column_covariance(columns))
    torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=0)


@pytest.mark.parametrize("spread", [10.0, 0.3])
def test_row_std_equals_the_std_of_the_product(spread: float) -> None:
    anchors = collapsed_embeddings(2 * 6, 16, spread, seed=0).view(2, 6, 16)
    columns = collapsed_embeddings(40, 16, spread, seed=1)
    got = functional.row_std(anchors, functional.column_covariance(columns))
    torch.testing.assert_close(got, (anchors @ columns.T).std(dim=-1), rtol=1e-4, atol=1e-6)


def test_keep_nonempty_falls_back_to_all_negatives() -> None:
    excluded = torch.tensor([[0], [1]])  # row 0's negatives are columns 1, 2; row 1's are 0, 2
    keep = torch.tensor([[[False, False, False], [True, False, False]]])
    keep, count = functional.keep_nonempty(keep, keep.sum(-1, dtype=torch.int32), excluded)
    assert torch.equal(keep, torch.tensor([[[False, True, True], [True, False, False]]]))
    assert count.tolist() == [[2.0, 1.0]]


def test_two_view_rows_put_positive_and_self_where_the_mask_says() -> None:
    generator = torch.Generator().manual_seed(1)
    view_a = F.normalize(torch.randn(6, 4, generator=generator), dim=1)
    view_b = F.normalize(torch.randn(6, 4, generator=generator), dim=1)
    local = slice(2, 4)  # rank 1 of 3 with 2 samples each
    anchors, columns = functional.two_view_features(view_a[local], view_b[local], view_a, view_b)
    scores = anchors @ columns.T
    negatives = functional.negative_mask(functional.two_view_excluded(2, 6, offset=2, device=torch.device("cpu")), 12)
    positives = functional.two_view_positives(2, 6, offset=2, device=torch.device("cpu"))
    for row, anchor in enumerate(range(2, 4)):
        pair = float(view_a[anchor] @ view_b[anchor])
        assert scores[0, row, positives[0, row]] == pytest.approx(pair)
        assert scores[1, row, positives[1, row]] == pytest.approx(pair)
        assert scores[0, row, anchor] == pytest.approx(1.0)  # a_i against itself
        assert scores[1, row, 6 + anchor] == pytest.approx(1.0)  # b_i against itself
        assert not negatives[row, anchor] and not negatives[row, 6 + anchor]
        others = [j for j in range(6) if j != anchor]
        torch.testing.assert_close(scores[0, row, [6 + j for j in others]], view_b[others] @ view_a[anchor])
    assert negatives.sum(dim=1).tolist() == [10, 10]


def test_kept_mean_exp_of_many_capped_terms_stays_finite() -> None:
    # 7,000 negatives far above the positive: 7,000 * exp(80) overflows float32, so the cap is lower.
    scores = torch.ones(2, 7001)
    scores[:, 0] = -1.0
    keep = torch.ones(2, 7001, dtype=torch.bool)
    keep[:, 0] = False
    positive = torch.zeros(1, 2, dtype=torch.int64)
    kept_count = keep.sum(-1)[None].float()
    mean = functional.kept_mean_exp_rows(scores[None], torch.tensor(100.0), positive, keep[None], kept_count).value[0]
    assert functional.exponent_cap(7001) < functional.MAX_EXPONENT
    torch.testing.assert_close(mean, torch.full((2,), math.exp(functional.exponent_cap(7001))), rtol=1e-5, atol=0)


@pytest.mark.parametrize("columns", [200, 7000])  # 7,000 terms of exp(1 / tau) ~ 5.5e34 overflow a float32 sum
def test_sogclr_rows_of_a_collapsed_encoder_at_the_smallest_temperature_stay_exact(columns: int) -> None:
    # Every cosine near 1 at tau = 1/80: u, the value and the gradient against float64 (which cannot overflow).
    generator = torch.Generator().manual_seed(5)
    scores = (1 - 1e-3 * torch.rand(2, 4, columns, generator=generator, dtype=torch.float64)).requires_grad_(True)
    positive = torch.tensor([0, 1, 2, 3])
    keep = torch.ones(2, 4, columns, dtype=torch.bool)
    keep[:, torch.arange(4), positive] = False
    keep[:, 0, columns // 2 :] = False  # a row with half its negatives flagged
    tau = 1 / 80
    as_float32 = scores.detach().float()
    terms, u_new = functional.sogclr_rows(
        as_float32, positive.expand(2, -1), keep, keep.sum(-1).float(), torch.zeros(4),
        torch.zeros(4, dtype=torch.bool), 0.9, tau,
    )  # fmt: skip
    per_row, grad = terms.value, terms.grad_scores
    exponentials = torch.where(keep, torch.exp(scores / tau), 0.0)
    expected_u = exponentials.sum(-1) / keep.sum(-1)
    expected = -scores.gather(-1, positive.expand(2, -1)[..., None]).squeeze(-1) + tau * torch.log(expected_u)
    expected.sum().backward()  # with u' = g (first visit) the surrogate's gradient is this objective's
    assert torch.isfinite(u_new).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(u_new.double(), expected_u.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(per_row.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), scores.grad, rtol=1e-4, atol=1e-9)


def test_sogclr_rows_gradient_matches_the_global_objective_at_first_visit() -> None:
    # With u' = g (first visit) the surrogate gradient equals the gradient of
    # -s_pos + tau * log(mean_kept exp(s / tau)).
    generator = torch.Generator().manual_seed(2)
    scores = torch.rand(1, 3, 6, generator=generator) * 2 - 1
    positive = torch.tensor([0, 1, 2])
    keep = torch.ones(1, 3, 6, dtype=torch.bool)
    keep[0, torch.arange(3), positive] = False
    keep[0, 0, 4] = False
    tau = 0.2
    terms, _ = functional.sogclr_rows(
        scores, positive[None], keep, keep.sum(-1).float(), torch.zeros(3), torch.zeros(3, dtype=torch.bool), 0.9, tau
    )
    reference_scores = scores.clone().requires_grad_(True)
    total = torch.zeros(())
    for i in range(3):
        kept = reference_scores[0, i][keep[0, i]]
        total = total - reference_scores[0, i, positive[i]] + tau * torch.log(torch.exp(kept / tau).mean())
    total.backward()
    torch.testing.assert_close(terms.grad_scores, reference_scores.grad)
    torch.testing.assert_close(terms.value.sum(), total.detach())

