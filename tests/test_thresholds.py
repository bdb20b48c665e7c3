"""Threshold update rules against hand computations."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from glofnd_losses import functional, thresholds
from glofnd_losses.detectors import GloFNDDetector, ScoreChunk, Step
from glofnd_losses.thresholds import ThresholdOptimizer, ThresholdRows, step, threshold_fields


def fresh(size: int = 3) -> ThresholdRows:
    """Unvisited rows with Adam's moments."""
    return ThresholdRows(torch.ones(size), torch.zeros(size, dtype=torch.int32), torch.zeros(size), torch.zeros(size))


@pytest.mark.parametrize(("epoch", "multiplier"), [(15, 0.456), (20, 0.467), (70, 0.618), (199, 0.701)])
def test_paper_rule_first_step_uses_epoch_bias_correction(epoch: int, multiplier: float) -> None:
    # The reference code's first step of a sample is lr * c * sign(G), with c depending on the epoch.
    grad = torch.tensor([0.01, -0.5, 0.3])
    new = thresholds.step(fresh(), grad, None, epoch, ThresholdOptimizer.paper())
    step = (1.0 - new.threshold) / 0.05
    expected = torch.sign(grad) * multiplier
    expected[1] = (1.0 - 1.0) / 0.05  # clamped at 1: a negative gradient pushes above the upper bound
    torch.testing.assert_close(step, expected, atol=2e-3, rtol=0)
    assert thresholds.paper_first_step_multiplier(epoch) == pytest.approx(multiplier, abs=1e-3)


def test_per_sample_adam_matches_hand_computation_over_two_visits() -> None:
    optimizer = ThresholdOptimizer(rule="adam", lr=0.1, betas=(0.9, 0.98), eps=1e-8)
    rows = ThresholdRows(torch.tensor([0.5]), torch.zeros(1, dtype=torch.int32), torch.zeros(1), torch.zeros(1))
    lam, m, v = 0.5, 0.0, 0.0
    for visit, grad in enumerate([0.2, -0.1], start=1):
        rows = thresholds.step(rows, torch.tensor([grad]), None, epoch=99, optimizer=optimizer)
        m = 0.9 * m + 0.1 * grad
        v = 0.98 * v + 0.02 * grad * grad
        lam = lam - 0.1 * (m / (1 - 0.9**visit)) / (math.sqrt(v / (1 - 0.98**visit)) + 1e-8)
        assert rows.threshold.item() == pytest.approx(lam, rel=1e-5)
        assert rows.visits.item() == visit


def test_sgd_with_inverse_sqrt_decay_and_floor() -> None:
    optimizer = ThresholdOptimizer(rule="sgd", lr=2.0, lr_decay="inverse_sqrt", min_lr=1.0)
    rows = ThresholdRows(torch.tensor([0.0]), torch.tensor([3], dtype=torch.int32))
    new = thresholds.step(rows, torch.tensor([0.1]), None, 0, optimizer)
    assert new.threshold.item() == pytest.approx(-2.0 / math.sqrt(4) * 0.1)
    rows.visits.fill_(99)  # lr / sqrt(100) = 0.2 is below the floor of 1.0
    assert thresholds.step(rows, torch.tensor([0.1]), None, 0, optimizer).threshold.item() == pytest.approx(-0.1)


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_minibatch_quantile_seeds_the_first_visit_only(rule: str) -> None:
    optimizer = dataclasses.replace(ThresholdOptimizer.default(), rule=rule)
    moments = (torch.zeros(2), torch.zeros(2)) if rule == "adam" else (None, None)
    rows = ThresholdRows(torch.tensor([1.0, 0.3]), torch.tensor([0, 4], dtype=torch.int32), *moments)
    score_std = torch.tensor([0.2, 0.2])
    new = thresholds.step(rows, torch.tensor([0.01, 0.01]), torch.tensor([0.42, 0.1]), 0, optimizer, score_std)
    assert new.threshold[0].item() == pytest.approx(0.42)  # seeded, no step
    assert new.threshold[1].item() < 0.3  # a positive gradient moves an already seeded threshold down
    assert new.visits.tolist() == [1, 5]
    if rule == "adam":  # the seeded row's moments stay at zero; the stepped row's move
        assert new.exp_avg is not None and new.exp_avg.tolist()[0] == 0.0 and new.exp_avg.tolist()[1] > 0.0
    else:
        assert new.exp_avg is None and new.exp_avg_sq is None


def test_default_rule_steps_0_2_std_over_the_root_of_the_visits_floored_at_0_1() -> None:
    # README: steps of 0.2 / sqrt(visits) score standard deviations, floored at 0.1, per unit of G / alpha.
    rows = ThresholdRows(torch.full((3,), 0.5), torch.tensor([1, 4, 16], dtype=torch.int32), None, None)
    score_std = torch.tensor([0.1, 0.1, 0.3])
    far_below = torch.full((3,), -1.0)  # the stop at the batch quantile does not bind
    new = thresholds.step(rows, torch.ones(3), far_below, 0, ThresholdOptimizer.default(), score_std)
    expected = torch.tensor([0.5 - 0.2 * 0.1, 0.5 - 0.2 / 2 * 0.1, 0.5 - 0.1 * 0.3])  # 0.2 / 4 < 0.1: the floor
    torch.testing.assert_close(new.threshold, expected)
    assert new.visits.tolist() == [2, 5, 17]


def test_without_a_batch_quantile_a_seeded_rule_steps_every_row() -> None:
    # None tells the rule that no row is on its first visit (the loss knows every sample was seen).
    optimizer = ThresholdOptimizer(rule="sgd", lr=0.5, init="minibatch_quantile")
    rows = ThresholdRows(torch.tensor([0.4]), torch.tensor([2], dtype=torch.int32))
    new = thresholds.step(rows, torch.tensor([0.1]), None, 0, optimizer)
    assert new.threshold.item() == pytest.approx(0.4 - 0.5 * 0.1)
    assert new.visits.tolist() == [3]


def test_grad_clip_bounds_the_step_both_ways() -> None:
    optimizer = ThresholdOptimizer(rule="sgd", lr=0.1, grad_clip=3.0)
    rows = ThresholdRows(torch.tensor([0.0, 0.0, 0.0]), torch.zeros(3, dtype=torch.int32))
    new = thresholds.step(rows, torch.tensor([-50.0, 0.5, 7.0]), None, 0, optimizer)
    torch.testing.assert_close(new.threshold, torch.tensor([0.3, -0.05, -0.3]))


def test_score_std_unit_scales_each_step_by_the_anchor_spread() -> None:
    optimizer = ThresholdOptimizer(rule="sgd", lr=0.2, step_unit="score_std")
    rows = ThresholdRows(torch.tensor([0.5, 0.5]), torch.zeros(2, dtype=torch.int32))
    new = thresholds.step(rows, torch.tensor([1.0, 1.0]), None, 0, optimizer, score_std=torch.tensor([0.1, 0.5]))
    torch.testing.assert_close(new.threshold, torch.tensor([0.5 - 0.02, 0.5 - 0.1]))
    with pytest.raises(ValueError, match="score standard deviations"):
        thresholds.step(rows, torch.tensor([1.0, 1.0]), None, 0, optimizer)


def test_thresholds_stay_in_minus_one_one() -> None:
    optimizer = ThresholdOptimizer(rule="sgd", lr=100.0)
    rows = ThresholdRows(torch.tensor([0.9, -0.9]), torch.zeros(2, dtype=torch.int32))
    new = thresholds.step(rows, torch.tensor([-1.0, 1.0]), None, 0, optimizer)
    assert new.threshold.tolist() == [1.0, -1.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rule": "rmsprop"}, "rule"),
        ({"lr": 0.0}, "lr"),
        ({"bias_correction": "step"}, "bias_correction"),
        ({"grad_clip": 0.0}, "grad_clip"),
        ({"step_unit": "cosine"}, "step_unit"),
    ],
)
def test_bad_optimizer_settings_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ThresholdOptimizer(**kwargs)


def test_normalize_grad_divides_the_subgradient_by_alpha() -> None:
    from glofnd_losses.detectors import GloFNDDetector, ScoreChunk, Step

    scores = torch.tensor([[[0.9, 0.5, 0.2, 0.7]]])
    excluded = torch.tensor([[0]])
    rows = ScoreChunk(scores, excluded)
    state = {"threshold": torch.tensor([0.6]), "threshold_visits": torch.tensor([1], dtype=torch.int32)}
    optimizer = ThresholdOptimizer(rule="sgd", lr=0.01, normalize_grad=True)
    detection = GloFNDDetector(alpha=0.25, optimizer=optimizer).detect(rows, state, "", Step(learn=True, epoch=0))
    # One of three negatives (0.7) is above 0.6: G = 0.25 - 1/3, normalised by alpha = 0.25.
    assert detection.thresholds is not None
    assert detection.thresholds.item() == pytest.approx(0.6 - 0.01 * (0.25 - 1 / 3) / 0.25)


def test_stop_at_batch_quantile_keeps_a_step_from_overshooting() -> None:
    optimizer = ThresholdOptimizer(rule="sgd", lr=1.0, stop_at_batch_quantile=True)
    rows = ThresholdRows(torch.tensor([0.1, 0.8, 0.5]), torch.ones(3, dtype=torch.int32))
    # Anchor 0: a huge upward step stops at its batch quantile 0.4; anchor 1: a downward step stops at 0.7;
    # anchor 2: a small step that does not reach its quantile is taken unchanged.
    grad = torch.tensor([-2.0, 2.0, -0.05])
    new = thresholds.step(rows, grad, torch.tensor([0.4, 0.7, 0.9]), 0, optimizer)
    torch.testing.assert_close(new.threshold, torch.tensor([0.4, 0.7, 0.55]))


def hand_default_detection(
    scores: torch.Tensor, excluded: torch.Tensor, state: dict[str, torch.Tensor], alpha: float
) -> ThresholdRows:
    """The default rule written out: subgradient / alpha, spread, pooled quantile, one step."""
    current = ThresholdRows.from_state(state, "")
    negatives = scores.shape[-1] - excluded.shape[-1]
    subgradient = functional.threshold_subgradient(scores, excluded, current.threshold, alpha, negatives)
    score_std = scores.std(dim=-1).mean(dim=0)  # torch's two-pass std over the score rows
    quantile = functional.pooled_quantile(scores, excluded, alpha, negatives)
    return thresholds.step(current, subgradient / alpha, quantile, 0, ThresholdOptimizer.default(), score_std)


@pytest.mark.parametrize("views", [1, 2])
def test_detector_takes_the_default_rule_step_and_flags_above_the_new_threshold(views: int) -> None:
    # Embeddings that drift, so that some steps pass the batch quantile, over 30 steps from the first visit.
    alpha, anchors, columns, dim = 0.05, 24, 80, 8
    detector = GloFNDDetector(alpha, ThresholdOptimizer.default())
    generator = torch.Generator().manual_seed(views)
    excluded = torch.stack([torch.arange(anchors), torch.arange(anchors) + anchors], dim=1)
    negatives = functional.negative_mask(excluded, columns)
    state = {"threshold": torch.ones(anchors), "threshold_visits": torch.zeros(anchors, dtype=torch.int32)}
    for step_number in range(30):
        drift = torch.zeros(dim)
        drift[0] = 2 * math.sin(step_number / 4)
        anchor_features = F.normalize(torch.randn(views, anchors, dim, generator=generator) + drift, dim=-1)
        column_features = F.normalize(torch.randn(columns, dim, generator=generator) + drift, dim=-1)
        scores = anchor_features @ column_features.T
        expected = hand_default_detection(scores, excluded, state, alpha)
        covariance = functional.column_covariance(column_features)
        chunk = ScoreChunk(scores, excluded, anchors=anchor_features, column_covariance=covariance)
        detection = detector.detect(chunk, state, "", Step(learn=True, epoch=0))
        assert detection.thresholds is not None
        torch.testing.assert_close(detection.thresholds, expected.threshold, rtol=0, atol=1e-6, msg=str(step_number))
        bound = detection.thresholds[None, :, None]
        assert torch.equal(detection.unflagged(chunk), (scores <= bound) & negatives)
        assert torch.equal(detection.new_rows["threshold_visits"], expected.visits)
        state = detection.new_rows


@pytest.mark.parametrize(
    ("optimizer", "dtype", "limit"),
    [
        (ThresholdOptimizer.default(), torch.uint8, 5),  # lr 0.2, floor 0.1: the decay ends at 4 steps
        (ThresholdOptimizer.paper(), torch.uint8, 1),  # epoch bias correction: only the first visit counts
        (ThresholdOptimizer.clipped(), torch.uint8, 5),
        (ThresholdOptimizer(rule="adam"), torch.int32, None),  # per-sample bias correction reads every count
        (ThresholdOptimizer(rule="sgd", lr_decay="inverse_sqrt"), torch.int32, None),  # no floor: decays forever
    ],
)
def test_visit_counts_are_stored_in_a_byte_where_the_rule_stops_reading_them(
    optimizer: ThresholdOptimizer, dtype: torch.dtype, limit: int | None
) -> None:
    assert optimizer.visit_count_limit() == limit
    assert threshold_fields("", optimizer)["threshold_visits"].dtype == dtype


def test_a_saturating_count_gives_the_thresholds_of_an_unbounded_one() -> None:
    # 300 visits of the same rows: past the uint8 count's 255, bit for bit the int32 count's thresholds.
    generator = torch.Generator().manual_seed(0)
    optimizer = ThresholdOptimizer.default()
    rows = {
        dtype: ThresholdRows(torch.full((4,), 0.5), torch.zeros(4, dtype=dtype)) for dtype in (torch.uint8, torch.int32)
    }
    for _ in range(300):
        subgradient = torch.randn(4, generator=generator)
        quantile, spread = torch.rand(4, generator=generator), torch.rand(4, generator=generator)
        rows = {dtype: step(row, subgradient, quantile, 0, optimizer, spread) for dtype, row in rows.items()}
    assert rows[torch.uint8].visits.tolist() == [255] * 4 and rows[torch.int32].visits.tolist() == [300] * 4
    assert torch.equal(rows[torch.uint8].threshold, rows[torch.int32].threshold)


def test_a_checkpoint_with_wider_counts_loads_them_saturated() -> None:
    from glofnd_losses import GloFNDNTXent

    loss_fn = GloFNDNTXent(num_samples=4)
    checkpoint = loss_fn.state_dict()
    checkpoint["state.threshold_visits"] = torch.tensor([0, 3, 255, 70000], dtype=torch.int32)  # an int32 state
    loss_fn.load_state_dict(checkpoint)
    assert loss_fn.threshold_visits.tolist() == [0, 3, 255, 255]
