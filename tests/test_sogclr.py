"""GloFNDSogCLRLoss against a straightforward per-anchor implementation of the SogCLR loss with GloFND.

The formulas: each sample's moving average ``u`` of its kept negatives' mean ``exp(score / tau)`` (weight
``gamma``), and its threshold moved by ``lr * (fraction of its negatives above it - alpha)`` (GloFND,
ICML 2025), the negatives above it left out of the loss.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from glofnd_losses import GloFNDSogCLRLoss, ThresholdOptimizer


class ReferenceSogCLR:
    """Loops over anchors and views; projected-SGD thresholds; written from the formulas only."""

    def __init__(self, num_samples: int, tau: float, gamma: float, alpha: float, lr: float) -> None:
        self.tau, self.gamma, self.alpha, self.lr = tau, gamma, alpha, lr
        self.threshold = [1.0] * num_samples
        self.u = [0.0] * num_samples
        self.seen = [False] * num_samples

    def loss(self, z1: torch.Tensor, z2: torch.Tensor, indices: list[int], filtering: bool) -> torch.Tensor:
        a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        size = a.shape[0]
        total = torch.zeros(())
        new_threshold, new_u = {}, {}
        for i in range(size):
            item = indices[i]
            rows = []
            for anchor, same, other in ((a[i], a, b), (b[i], b, a)):
                negatives = [anchor @ other[j] for j in range(size) if j != i]
                negatives += [anchor @ same[j] for j in range(size) if j != i]
                rows.append((anchor @ other[i], torch.stack(negatives)))
            above = sum(int((scores.detach() > self.threshold[item]).sum()) for _, scores in rows)
            subgradient = self.alpha - above / (2 * 2 * (size - 1))
            lam = min(1.0, max(-1.0, self.threshold[item] - self.lr * subgradient))
            new_threshold[item] = lam
            updated = []
            for positive, scores in rows:
                kept = scores[scores.detach() <= lam] if filtering else scores
                if kept.numel() == 0:
                    kept = scores
                estimate = float(torch.exp(kept.detach() / self.tau).mean())
                u_row = (1 - self.gamma) * self.u[item] + self.gamma * estimate if self.seen[item] else estimate
                weights = torch.exp(kept.detach() / self.tau) / u_row
                surrogate = -positive + (weights * kept).mean()
                value = -positive.detach() + self.tau * math.log(u_row)
                total = total + surrogate - surrogate.detach() + value
                updated.append(u_row)
            new_u[item] = sum(updated) / 2
        for item in new_threshold:
            self.threshold[item], self.u[item], self.seen[item] = new_threshold[item], new_u[item], True
        return total / size


@pytest.mark.parametrize("filter_start_epoch", [0, 2])
def test_matches_reference_over_several_steps(filter_start_epoch: int) -> None:
    num_samples, size = 30, 8
    loss_fn = GloFNDSogCLRLoss(
        num_samples,
        temperature=0.2,
        gamma=0.7,
        alpha=0.1,
        threshold_optimizer=ThresholdOptimizer(rule="sgd", lr=0.8),
        filter_start_epoch=filter_start_epoch,
    )
    reference = ReferenceSogCLR(num_samples, tau=0.2, gamma=0.7, alpha=0.1, lr=0.8)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(4):
        loss_fn.set_epoch(epoch)
        indices = torch.randperm(num_samples, generator=generator)[:size]
        base = torch.randn(size, 6, generator=generator)
        z1 = (base + 0.5 * torch.randn(size, 6, generator=generator)).requires_grad_(True)
        z2 = (base + 0.5 * torch.randn(size, 6, generator=generator)).requires_grad_(True)
        r1, r2 = z1.detach().clone().requires_grad_(True), z2.detach().clone().requires_grad_(True)
        loss = loss_fn(z1, z2, indices)
        expected = reference.loss(r1, r2, indices.tolist(), filtering=epoch >= filter_start_epoch)
        loss.backward()
        expected.backward()
        torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(z1.grad, r1.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(z2.grad, r2.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(loss_fn.thresholds, torch.tensor(reference.threshold), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss_fn.u, torch.tensor(reference.u), rtol=1e-5, atol=1e-6)
    assert (loss_fn.thresholds < 1).sum() > 10
    assert loss_fn.last_stats["filtered_fraction"] > 0


def test_no_detector_and_before_start_leave_the_loss_unfiltered() -> None:
    generator = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(8, 5, generator=generator), torch.randn(8, 5, generator=generator)
    plain = GloFNDSogCLRLoss(10, detector=None)
    late = GloFNDSogCLRLoss(10, alpha=0.2, start_epoch=5)
    assert torch.equal(plain(z1, z2, torch.arange(8)), late(z1, z2, torch.arange(8)))
    assert torch.all(late.thresholds == 1.0)
    assert torch.equal(plain.u, late.u)


def test_start_step_counts_the_loss_s_training_steps() -> None:
    # Data without epochs: thresholds learn from the loss's third training step (step 2), not before.
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 5, generator=generator), torch.randn(8, 5, generator=generator)) for _ in range(3)]
    plain = GloFNDSogCLRLoss(10, detector=None)
    late = GloFNDSogCLRLoss(10, alpha=0.2, start_step=2)
    late.eval()
    late(*batches[0], torch.arange(8))  # an eval step is not a training step
    late.train()
    for step, (z1, z2) in enumerate(batches):
        value, plain_value = late(z1, z2, torch.arange(8)), plain(z1, z2, torch.arange(8))
        if step < 2:
            assert torch.equal(value, plain_value) and torch.all(late.thresholds == 1.0), step
    assert late.step == 3 and (late.thresholds[:8] < 1).all()
    assert float(late.last_stats["flagged_fraction"]) > 0


def test_alpha_zero_never_filters() -> None:
    loss_fn = GloFNDSogCLRLoss(10, alpha=0.0, threshold_optimizer=ThresholdOptimizer(rule="sgd", lr=1.0))
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):
        loss_fn(torch.randn(8, 5, generator=generator), torch.randn(8, 5, generator=generator), torch.arange(8))
        assert loss_fn.last_stats["filtered_fraction"] == 0
    assert torch.all(loss_fn.thresholds == 1.0)


def test_eval_mode_changes_no_state() -> None:
    loss_fn = GloFNDSogCLRLoss(10, alpha=0.2).eval()
    loss_fn(torch.randn(8, 5), torch.randn(8, 5), torch.arange(8))
    assert torch.all(loss_fn.thresholds == 1.0) and torch.all(loss_fn.u == 0) and loss_fn.step == 0
