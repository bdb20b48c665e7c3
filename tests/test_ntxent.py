"""GloFNDNTXent against lightly's NTXentLoss and a hand-written filtered NT-Xent."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss

from glofnd_losses import GloFNDNTXent, ThresholdOptimizer


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_equals_lightly_without_filtering(temperature: float) -> None:
    generator = torch.Generator().manual_seed(0)
    out0, out1 = torch.randn(12, 16, generator=generator), torch.randn(12, 16, generator=generator)
    results = []
    for criterion in (NTXentLoss(temperature=temperature), GloFNDNTXent(100, temperature=temperature, detector=None)):
        a, b = out0.clone().requires_grad_(True), out1.clone().requires_grad_(True)
        loss = criterion(a, b) if isinstance(criterion, NTXentLoss) else criterion(a, b, torch.arange(12) + 50)
        loss.backward()
        results.append((loss.detach(), a.grad, b.grad))
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_equals_lightly_while_thresholds_warm_up() -> None:
    # Thresholds learn from epoch 0 but filter only from epoch 3: the loss stays lightly's.
    criterion = GloFNDNTXent(100, alpha=0.2, filter_start_epoch=3)
    lightly_loss = NTXentLoss()
    generator = torch.Generator().manual_seed(1)
    for epoch in range(3):
        criterion.set_epoch(epoch)
        out0, out1 = torch.randn(10, 8, generator=generator), torch.randn(10, 8, generator=generator)
        torch.testing.assert_close(criterion(out0, out1, torch.arange(10)), lightly_loss(out0, out1))
        if epoch > 0:  # flagged by the learning thresholds, but nothing filtered yet
            assert criterion.last_stats["flagged_fraction"] > 0 and criterion.last_stats["filtered_fraction"] == 0
    assert (criterion.thresholds[:10] < 1).all()


def test_filtered_loss_matches_hand_written_formula() -> None:
    criterion = GloFNDNTXent(20, temperature=0.5, alpha=0.3, threshold_optimizer=ThresholdOptimizer(rule="sgd", lr=2.0))
    generator = torch.Generator().manual_seed(2)
    out0, out1 = torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator)
    loss = criterion(out0, out1, torch.arange(6))
    a, b = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    total = 0.0
    for i in range(6):
        lam = float(criterion.thresholds[i])
        for anchor, same, other in ((a[i], a, b), (b[i], b, a)):
            negatives = [float(anchor @ other[j]) for j in range(6) if j != i]
            negatives += [float(anchor @ same[j]) for j in range(6) if j != i]
            kept = [s for s in negatives if s <= lam] or negatives
            positive = float(anchor @ other[i]) / 0.5
            negative_sum = len(negatives) / len(kept) * sum(math.exp(s / 0.5) for s in kept)
            total += -positive + math.log(math.exp(positive) + negative_sum)
    assert criterion.last_stats["filtered_fraction"] > 0
    assert loss.item() == pytest.approx(total / 12, rel=1e-5)


def test_oracle_drops_exactly_the_same_label_negatives() -> None:
    criterion = GloFNDNTXent(20, temperature=0.5, detector="oracle")
    generator = torch.Generator().manual_seed(3)
    out0, out1 = torch.randn(8, 4, generator=generator), torch.randn(8, 4, generator=generator)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2])
    loss = criterion(out0, out1, torch.arange(8), labels=labels)
    a, b = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    total = 0.0
    for i in range(8):
        others = [j for j in range(8) if j != i]
        for anchor, same, other in ((a[i], a, b), (b[i], b, a)):
            negatives = [(float(anchor @ view[j]), int(labels[j])) for view in (other, same) for j in others]
            kept = [score for score, label in negatives if label != labels[i]] or [score for score, _ in negatives]
            positive = float(anchor @ other[i]) / 0.5
            negative_sum = len(negatives) / len(kept) * sum(math.exp(score / 0.5) for score in kept)
            total += -positive + math.log(math.exp(positive) + negative_sum)
    assert loss.item() == pytest.approx(total / 16, rel=1e-5)
    stats = criterion.last_stats
    assert float(stats["fn_precision"]) == 1.0 and float(stats["fn_recall"]) == 1.0
    same_label_share = 4 * sum(int((labels == labels[i]).sum()) - 1 for i in range(8)) / (16 * 14)  # 2 rows x 2 views
    assert float(stats["flagged_fraction"]) == pytest.approx(same_label_share)


@pytest.mark.parametrize("bank", [128, (512, 128), [512, 128]])
def test_memory_bank_is_rejected(bank: int | tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="memory_bank_size must be 0"):
        GloFNDNTXent(100, memory_bank_size=bank)
    with pytest.raises(ValueError, match="memory_bank_size must be 0"):  # lightly's positional order
        GloFNDNTXent(100, 0.1, bank)


@pytest.mark.parametrize("no_bank", [0, (0,), (0, 128), [0, 128]])
def test_lightly_spellings_of_no_memory_bank_are_accepted(no_bank: int | tuple[int, ...]) -> None:
    NTXentLoss(0.1, no_bank)  # lightly takes each of them
    assert GloFNDNTXent(100, 0.1, no_bank).temperature == 0.1


def test_lightly_positional_arguments_land_in_the_same_parameters() -> None:
    lightly_loss, ours = NTXentLoss(0.2, 0, True), GloFNDNTXent(100, 0.2, 0, True)
    assert (ours.temperature, ours.gather_distributed) == (lightly_loss.temperature, lightly_loss.gather_distributed)
    with pytest.raises(ValueError, match="gather_distributed must be a bool, got 'yes'"):
        GloFNDNTXent(100, 0.2, 0, "yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("temperature", [0.0, -0.5, float("inf"), float("nan")])
def test_a_temperature_that_is_not_positive_and_finite_is_refused(temperature: float) -> None:
    with pytest.raises(ValueError, match=f"temperature must be finite and > 0, got {temperature}"):
        GloFNDNTXent(100, temperature)
