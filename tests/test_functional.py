"""The functional core against hand-written references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from glofnd_losses import functional, host


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


@settings(max_examples=40, deadline=None)
@POOLED_CASES
def test_straddled_quantile_equals_the_topk_quantile(alpha: float, negatives: int, views: int, seed: int) -> None:
    # Scores on a grid of 1/8 (ties); a bound between the two order statistics of the quantile.
    scores, excluded, mask = random_rows(views, 5, 50, negatives, seed)
    scores = (scores * 8).round() / 8
    scores[0, 0, excluded[0, :1]] = 5.0  # an excluded column must be ignored
    pooled = torch.stack([scores[:, i][:, mask[i]].reshape(-1).sort(descending=True).values for i in range(5)])
    position = (views * negatives - 1) * (1 - alpha)
    top_count = views * negatives - math.floor(position)
    bound = pooled[:, top_count - 1]  # the lower order statistic: exactly top_count - 1 above it when distinct
    above = (pooled > bound[:, None]).sum(dim=1)
    straddles = functional.straddles_quantile(above, alpha, views * negatives)
    assert torch.equal(straddles, above == top_count - 1)
    rows = straddles.nonzero().squeeze(1)
    assume(len(rows) > 0)
    expected = functional.pooled_quantile(scores, excluded, alpha, negatives)[rows]
    found = functional.straddled_quantile(scores[:, rows], excluded[rows], bound[rows], alpha, negatives)
    assert torch.equal(found, expected)


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


def test_filtered_cross_entropy_without_filtering_is_cross_entropy() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 9, generator=generator)
    positive = torch.tensor([0, 3, 1, 8, 4])
    keep = torch.ones(2, 5, 9, dtype=torch.bool)
    keep[:, torch.arange(5), positive] = False
    got = functional.filtered_cross_entropy(logits, 1.0, positive, keep, keep.sum(-1).float(), num_negatives=8)
    expected = F.cross_entropy(logits.reshape(10, 9), positive.repeat(2), reduction="none").reshape(2, 5)
    torch.testing.assert_close(got, expected)


def test_filtered_cross_entropy_rescales_kept_negatives_to_the_full_count() -> None:
    logits = torch.tensor([[[2.0, 1.0, 0.5, -1.0, 0.0]]])
    positive = torch.tensor([0])
    keep = torch.tensor([[[False, False, True, True, False]]])  # keep 2 of the 4 negatives
    expected = -2.0 + math.log(math.exp(2.0) + (4 / 2) * (math.exp(0.5) + math.exp(-1.0)))
    got = functional.filtered_cross_entropy(logits, 1.0, positive, keep, torch.tensor([[2.0]]), num_negatives=4)
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.fixture
def count_bytes_always(monkeypatch: pytest.MonkeyPatch) -> None:
    """count_true's byte sums for every mask (by default small masks take the plain sum)."""
    monkeypatch.setattr(functional, "_COUNT_BYTES_FROM", 0)


@pytest.mark.usefixtures("count_bytes_always")
@pytest.mark.parametrize("columns", [1, 127, 128, 300, 2048])
def test_count_true_equals_a_plain_sum(columns: int) -> None:
    mask = torch.rand(2, 3, columns, generator=torch.Generator().manual_seed(columns)) < 0.9
    assert torch.equal(functional.count_true(mask), mask.sum(dim=-1, dtype=torch.int32))
    assert torch.equal(functional.count_true(mask[:, 1]), mask[:, 1].sum(dim=-1, dtype=torch.int32))


@pytest.mark.usefixtures("count_bytes_always")
@pytest.mark.parametrize("rows", [1, 127, 128, 300])
def test_count_true_of_a_transposed_view_equals_a_plain_sum(rows: int) -> None:
    # GloFNDClipLoss's text rows in one process are a transposed view of the image rows: their
    # counts run down the memory rows.
    memory = torch.rand(2, rows, 7, generator=torch.Generator().manual_seed(rows)) < 0.6
    for mask in (memory.mT, memory.mT[:, 2:5], memory[:, ::2].mT):
        assert torch.equal(functional.count_true(mask), mask.sum(dim=-1, dtype=torch.int32))


def test_select_anchors_equals_index_select_in_either_layout() -> None:
    memory = torch.rand(2, 9, 6, generator=torch.Generator().manual_seed(0))
    anchors = torch.tensor([4, 0, 5])
    for scores in (memory, memory.mT):
        selected = functional.select_anchors(scores, anchors)
        assert torch.equal(selected, scores[:, anchors])
    assert functional.select_anchors(memory.mT, anchors).mT.is_contiguous()  # kept the transposed layout


def test_dot_pairs_elements_whatever_the_two_layouts() -> None:
    generator = torch.Generator().manual_seed(0)
    first, second = torch.rand(1, 5, 4, generator=generator), torch.rand(1, 5, 4, generator=generator)
    for left, right in ((first.mT, second.mT), (first.mT, second.mT.contiguous()), (first, second)):
        torch.testing.assert_close(functional._dot(left, right), (left * right).sum())


def test_row_std_of_a_transposed_view_equals_torch_std() -> None:
    memory = 0.25 * torch.rand(1, 300, 5, generator=torch.Generator().manual_seed(0)) + 0.7
    torch.testing.assert_close(functional.row_std(memory.mT), memory.mT.std(dim=-1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["transposed", "mixed"])
def test_fused_losses_on_a_transposed_view_equal_the_contiguous_rows(layout: str) -> None:
    """Values and gradients (scores and scale) do not depend on how the rows lie in memory."""
    generator = torch.Generator().manual_seed(1)
    memory = torch.rand(7, 7, generator=generator, dtype=torch.float64) * 2 - 1  # rows are the columns
    positive = torch.arange(7)
    keep_rows = (torch.rand(7, 7, generator=generator) < 0.7) & ~torch.eye(7, dtype=torch.bool)
    keep_rows[torch.arange(7), (positive + 1) % 7] = True  # every row keeps a negative
    kept_count = keep_rows.sum(-1).double()
    weights = torch.rand(7, generator=generator, dtype=torch.float64)
    results = []
    for arrangement in ("contiguous", layout):
        leaf = memory.clone().requires_grad_()
        scores = leaf.t() if arrangement != "contiguous" else leaf.t().contiguous()
        keep = keep_rows.t().contiguous().t() if arrangement == "transposed" else keep_rows
        scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
        entropy = functional.filtered_cross_entropy(scores[None], scale, positive, keep[None], kept_count[None], 6)
        mean = functional.kept_mean_exp(scores, scale, positive, keep, kept_count)
        ((entropy[0] + mean) * weights).sum().backward()
        results.append((entropy.detach(), mean.detach(), leaf.grad, scale.grad))
    for transposed, contiguous in zip(*results):
        torch.testing.assert_close(transposed, contiguous)


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
def test_filtered_cross_entropy_gradients_match_autograd(rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    scores = torch.rand(rows, 6, 11, generator=generator, dtype=torch.float64) * 2 - 1
    positive = torch.tensor([0, 3, 1, 10, 4, 7])
    keep = torch.rand(rows, 6, 11, generator=generator) < 0.7
    keep[..., 2] = True  # every row keeps a negative
    keep[:, torch.arange(6), positive] = False
    weights = torch.rand(rows, 6, generator=generator, dtype=torch.float64)  # a non-uniform upstream gradient
    results = []
    for implementation in ("fused", "autograd"):
        leaf_scores = scores.clone().requires_grad_()
        scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
        if implementation == "fused":
            loss = functional.filtered_cross_entropy(leaf_scores, scale, positive, keep, keep.sum(-1).double(), 10)
        else:
            loss = autograd_filtered_cross_entropy(leaf_scores, scale, positive, keep, 10)
        (loss * weights).sum().backward()
        results.append((loss.detach(), leaf_scores.grad, scale.grad))
    for fused, reference in zip(*results):
        torch.testing.assert_close(fused, reference)


def test_kept_mean_exp_matches_autograd_including_the_cap() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 11, generator=generator, dtype=torch.float64) * 2 - 1
    positive = torch.tensor([0, 3, 1, 10, 4, 7])
    scores[0, 0], scores[0, 5] = -0.9, 0.95  # (0.95 + 0.9) * 50 > 80: a capped term
    keep = torch.rand(6, 11, generator=generator) < 0.7
    keep[:, 5] = True  # every row keeps a negative, row 0 the capped one
    keep[torch.arange(6), positive] = False
    kept_count = keep.sum(-1).double()
    weights = torch.rand(6, generator=generator, dtype=torch.float64)  # a non-uniform upstream gradient
    results = []
    for implementation in ("fused", "autograd"):
        leaf_scores = scores.clone().requires_grad_()
        scale = torch.tensor(50.0, dtype=torch.float64, requires_grad=True)
        if implementation == "fused":
            mean = functional.kept_mean_exp(leaf_scores, scale, positive, keep, kept_count)
        else:
            exponent = (leaf_scores - leaf_scores.gather(-1, positive[:, None])) * scale
            terms = torch.where(keep, exponent.clamp_max(functional.exponent_cap(11)).exp(), 0.0)
            mean = terms.sum(-1) / kept_count
        (mean * weights).sum().backward()
        results.append((mean.detach(), leaf_scores.grad, scale.grad))
    assert results[0][0][0] > math.exp(functional.exponent_cap(11)) / kept_count[0]  # the cap was reached
    assert results[0][1][0, 5] == 0  # and passes no gradient
    for fused, reference in zip(*results):
        torch.testing.assert_close(fused, reference)


def test_row_std_equals_torch_std() -> None:
    scores = 0.25 * torch.rand(2, 5, 300, generator=torch.Generator().manual_seed(0)) + 0.7  # compressed cosines
    torch.testing.assert_close(functional.row_std(scores), scores.std(dim=-1), atol=1e-5, rtol=1e-4)


def collapsed_embeddings(count: int, dim: int, spread: float, seed: int) -> torch.Tensor:
    """Unit vectors around one shared direction (an untrained encoder): cosines in a narrow band."""
    shared = torch.randn(dim, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))
    return F.normalize(shared + spread * noise * shared.norm() / math.sqrt(dim), dim=-1)


@pytest.mark.parametrize("spread", [10.0, 0.3, 0.02])
def test_row_std_from_features_equals_the_std_of_the_product(spread: float) -> None:
    """Float64 brute force, from spread cosines down to a narrow band near 1 (a collapsed encoder)."""
    anchors = collapsed_embeddings(2 * 6, 16, spread, seed=0).view(2, 6, 16)
    columns = collapsed_embeddings(40, 16, spread, seed=1)
    expected = (anchors.double() @ columns.double().T).std(dim=-1)
    torch.testing.assert_close(functional.row_std_from_features(anchors, columns).double(), expected, rtol=1e-3, atol=0)


def test_row_std_of_collapsed_rows_stays_accurate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where E[s^2] - E[s]^2 cancels in float32 (std ~1e-4 at mean ~0.9996), on the CPU and accelerator paths."""
    anchors = collapsed_embeddings(2 * 3, 16, 0.02, seed=2).view(2, 3, 16)
    columns = collapsed_embeddings(64, 16, 0.02, seed=1)
    scores = anchors @ columns.T
    expected = (anchors.double() @ columns.double().T).std(dim=-1)
    for rows in (scores, scores.mT.contiguous().mT):  # contiguous rows, rows down the columns
        on_cpu = functional.row_std(rows)
        torch.testing.assert_close(on_cpu.double(), expected, rtol=1e-3, atol=0)
        with monkeypatch.context() as patch:
            patch.setattr(host, "reads_without_sync", lambda device: False)
            assert torch.equal(functional.row_std(rows), on_cpu)
    torch.testing.assert_close(functional.row_std_from_features(anchors, columns).double(), expected, rtol=1e-3, atol=0)


@pytest.mark.parametrize("transposed", [False, True])
def test_row_std_takes_the_features_by_its_cost_rule(transposed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The features are used where the rule says (seen with features that do not factor the scores)."""
    scores = 0.25 * torch.rand(1, 300, 300, generator=torch.Generator().manual_seed(0)) + 0.7
    scores = scores.mT if transposed else scores
    generator = torch.Generator().manual_seed(1)
    small_dim = torch.rand(1, 300, 4, generator=generator), torch.rand(300, 4, generator=generator)
    large_dim = torch.rand(1, 300, 64, generator=generator), torch.rand(300, 64, generator=generator)
    assert functional.std_from_features_is_cheaper(scores, 4)  # 300 * 300 >= 16 * 600 / 8
    torch.testing.assert_close(functional.row_std(scores, small_dim), functional.row_std_from_features(*small_dim))
    assert not functional.std_from_features_is_cheaper(scores, 64)  # 300 * 300 < 4096 * 600 / 16
    torch.testing.assert_close(functional.row_std(scores, large_dim), scores.std(dim=-1), atol=1e-5, rtol=1e-4)
    monkeypatch.setattr(functional, "_STD_FROM_FEATURES_AT", 0)
    torch.testing.assert_close(functional.row_std(scores, small_dim), scores.std(dim=-1), atol=1e-5, rtol=1e-4)


def test_keep_nonempty_falls_back_to_all_negatives_in_place() -> None:
    excluded = torch.tensor([[0], [1]])  # row 0's negatives are columns 1, 2; row 1's are 0, 2
    keep = torch.tensor([[[False, False, False], [True, False, False]]])
    count = functional.keep_nonempty_(keep, keep.sum(-1), excluded, num_negatives=2)
    assert torch.equal(keep, torch.tensor([[[False, True, True], [True, False, False]]]))
    assert count.tolist() == [[2.0, 1.0]]


def test_two_view_rows_put_positive_and_self_where_the_mask_says() -> None:
    generator = torch.Generator().manual_seed(1)
    view_a = F.normalize(torch.randn(6, 4, generator=generator), dim=1)
    view_b = F.normalize(torch.randn(6, 4, generator=generator), dim=1)
    local = slice(2, 4)  # rank 1 of 3 with 2 samples each
    scores = functional.two_view_scores(view_a[local], view_b[local], view_a, view_b)
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
    mean = functional.kept_mean_exp(scores, torch.tensor(100.0), torch.tensor([0, 0]), keep, keep.sum(-1).float())
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
    as_float32 = scores.detach().float().requires_grad_(True)
    per_row, u_new = functional.sogclr_rows(
        as_float32, positive, keep, keep.sum(-1).float(), torch.zeros(4), torch.zeros(4, dtype=torch.bool), 0.9, tau
    )
    per_row.sum().backward()
    exponentials = torch.where(keep, torch.exp(scores / tau), 0.0)
    expected_u = exponentials.sum(-1) / keep.sum(-1)
    expected = -scores.gather(-1, positive.expand(2, -1)[..., None]).squeeze(-1) + tau * torch.log(expected_u)
    expected.sum().backward()  # with u' = g (first visit) the surrogate's gradient is this objective's
    assert torch.isfinite(u_new).all() and torch.isfinite(as_float32.grad).all()
    torch.testing.assert_close(u_new.double(), expected_u.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(per_row.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(as_float32.grad.double(), scores.grad, rtol=1e-4, atol=1e-9)


def test_sogclr_rows_gradient_matches_the_global_objective_at_first_visit() -> None:
    # With u' = g (first visit) the surrogate gradient equals the gradient of
    # -s_pos + tau * log(mean_kept exp(s / tau)).
    generator = torch.Generator().manual_seed(2)
    scores = (torch.rand(1, 3, 6, generator=generator) * 2 - 1).requires_grad_(True)
    positive = torch.tensor([0, 1, 2])
    keep = torch.ones(1, 3, 6, dtype=torch.bool)
    keep[0, torch.arange(3), positive] = False
    keep[0, 0, 4] = False
    tau = 0.2
    per_row, _ = functional.sogclr_rows(
        scores, positive, keep, keep.sum(-1).float(), torch.zeros(3), torch.zeros(3, dtype=torch.bool), 0.9, tau
    )
    per_row.sum().backward()
    reference_scores = scores.detach().clone().requires_grad_(True)
    total = torch.zeros(())
    for i in range(3):
        kept = reference_scores[0, i][keep[0, i]]
        total = total - reference_scores[0, i, positive[i]] + tau * torch.log(torch.exp(kept / tau).mean())
    total.backward()
    torch.testing.assert_close(scores.grad, reference_scores.grad)
    torch.testing.assert_close(per_row.detach().sum(), total.detach())

