"""treatment="attract": flagged negatives become extra positives, against hand-written references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glofnd_losses import GloFNDClipLoss, GloFNDNTXent, GloFNDSigLipLoss, GloFNDSogCLRLoss, functional
from tests import dist_cases
from tests.multiprocess import run_ranks
from tests.test_clip import make_pairs
from tests.test_siglip import hand_written_filtered_loss


def supervised_row_loss(logits: torch.Tensor, positive: int, negatives: list[int], flagged: list[int]) -> torch.Tensor:
    """``-(1/|P|) sum_{q in P} log softmax_q`` over ``{positive} + negatives``, ``P = {positive} + flagged``."""
    columns = [positive, *negatives]
    log_softmax = logits[columns] - torch.logsumexp(logits[columns], dim=0)
    chosen = [0] + [1 + negatives.index(column) for column in flagged]
    return -log_softmax[chosen].mean()


def test_the_row_formula_is_the_supervised_contrastive_loss() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 3, 7, generator=generator, dtype=torch.float64) * 2 - 1
    positive_index = torch.tensor([[1, 4, 0], [2, 2, 6]])
    excluded = torch.tensor([[1, 5], [4, 5], [0, 3]])  # the positive's column may or may not be listed
    negatives = functional.negative_mask(excluded, 7).expand(2, -1, -1).clone()
    negatives.scatter_(-1, positive_index[..., None], False)
    flagged = negatives & (torch.rand(2, 3, 7, generator=generator) < 0.4)
    keep = negatives & ~flagged
    scale = torch.tensor(3.0, dtype=torch.float64)
    terms = functional.supervised_cross_entropy_rows(scores, scale, positive_index, keep, flagged)
    for view in range(2):
        for row in range(3):
            row_scores = scores[view, row].clone().requires_grad_(True)
            columns = negatives[view, row].nonzero().flatten().tolist()
            marked = flagged[view, row].nonzero().flatten().tolist()
            expected = supervised_row_loss(scale * row_scores, int(positive_index[view, row]), columns, marked)
            expected.backward()
            torch.testing.assert_close(terms.value[view, row], expected.detach())
            assert row_scores.grad is not None
            torch.testing.assert_close(terms.grad_scores[view, row], row_scores.grad)
    # Nothing flagged: the usual cross-entropy (rows whose positive is excluded: 5 negatives each).
    listed = excluded[:, 0].expand(2, -1)
    every = functional.negative_mask(excluded, 7).expand(2, -1, -1)
    plain = functional.cross_entropy_rows(scores, scale, listed, every, every.sum(-1).double(), 5)
    nothing = functional.supervised_cross_entropy_rows(scores, scale, listed, every, every & False)
    torch.testing.assert_close(nothing.value, plain.value)
    torch.testing.assert_close(nothing.grad_scores, plain.grad_scores)


def clip_reference(images: torch.Tensor, texts: torch.Tensor, scale: float, image_thresholds: torch.Tensor,
                   text_thresholds: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """CLIP's two directions, each row attracting the negatives above its threshold; mean over the 2b rows."""
    size = images.shape[0]
    total = images.new_zeros(())
    for anchors, columns, thresholds in ((images, texts, image_thresholds), (texts, images, text_thresholds)):
        scores = anchors @ columns.T
        for row in range(size):
            negatives = [column for column in range(size) if column != row]
            flagged = [column for column in negatives if scores[row, column] > thresholds[row]]
            total = total + supervised_row_loss(scale * scores[row], row, negatives, flagged)
    return total / (2 * size)


def ntxent_reference(view_a: torch.Tensor, view_b: torch.Tensor, temperature: float,
                     thresholds: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """NT-Xent's 2b rows over ``[A; B]`` but the anchor, attracting what scores above its item's threshold."""
    size = view_a.shape[0]
    columns = torch.cat([view_a, view_b])
    total = view_a.new_zeros(())
    for view, anchors in enumerate((view_a, view_b)):
        scores = F.normalize(anchors, dim=1) @ F.normalize(columns, dim=1).T
        for row in range(size):
            own, positive = (row, size + row) if view == 0 else (size + row, row)
            negatives = [column for column in range(2 * size) if column not in (own, positive)]
            flagged = [column for column in negatives if scores[row, column] > thresholds[row]]
            total = total + supervised_row_loss(scores[row] / temperature, positive, negatives, flagged)
    return total / (2 * size)


@pytest.mark.parametrize("name", ["clip", "ntxent"])
def test_softmax_losses_attract_as_the_hand_written_loss(name: str) -> None:
    # alpha 0.15: the batch quantiles fall between two scores, so no threshold ties a score.
    if name == "clip":
        loss_fn: GloFNDClipLoss | GloFNDNTXent = GloFNDClipLoss(30, "minibatch", alpha=0.15, treatment="attract",
                                                                chunk_size=5)  # fmt: skip
    else:
        loss_fn = GloFNDNTXent(30, temperature=0.2, alpha=0.15, treatment="attract", chunk_size=5)
    attracted = 0.0
    for first, second, indices, _ in make_pairs(3, 12, 30, seed=3):
        leaves = [first.clone().requires_grad_(True), second.clone().requires_grad_(True)]
        if isinstance(loss_fn, GloFNDClipLoss):
            loss = loss_fn(*leaves, 8.0, indices=indices)
        else:
            loss = loss_fn(*leaves, indices)
        loss.backward()
        inputs = [tensor.detach().double().requires_grad_(True) for tensor in (first, second)]
        if isinstance(loss_fn, GloFNDClipLoss):
            thresholds = (loss_fn.image_thresholds[indices].double(), loss_fn.text_thresholds[indices].double())
            expected = clip_reference(*inputs, 8.0, *thresholds)
            attracted += float(loss_fn.last_stats["image_filtered_fraction"])
        else:
            expected = ntxent_reference(*inputs, 0.2, loss_fn.thresholds[indices].double())
            attracted += float(loss_fn.last_stats["filtered_fraction"])
        expected.backward()
        torch.testing.assert_close(loss.detach().double(), expected.detach(), rtol=1e-5, atol=1e-6)
        for leaf, reference in zip(leaves, inputs):
            assert leaf.grad is not None and reference.grad is not None
            torch.testing.assert_close(leaf.grad.double(), reference.grad, rtol=1e-4, atol=1e-6)
    assert attracted > 0  # the case exercises attraction


def test_siglip_attracts_as_the_hand_written_loss() -> None:
    loss_fn = GloFNDSigLipLoss(30, alpha=0.15, treatment="attract", chunk_size=5)
    for images, texts, indices, _ in make_pairs(3, 12, 30, seed=3):
        leaves = [tensor.clone().requires_grad_(True) for tensor in (images, texts)]
        scale, bias = torch.tensor(8.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
        loss = loss_fn(*leaves, scale, bias, indices=indices)
        loss.backward()
        inputs = [tensor.detach().double().requires_grad_(True) for tensor in (images, texts, scale, bias)]
        thresholds = (loss_fn.image_thresholds[indices].double(), loss_fn.text_thresholds[indices].double())
        expected = hand_written_filtered_loss(*inputs, *thresholds, attract=True)
        expected.backward()
        torch.testing.assert_close(loss.detach().double(), expected.detach(), rtol=1e-5, atol=1e-6)
        for got, reference in zip((*(leaf.grad for leaf in leaves), scale.grad, bias.grad), inputs):
            assert got is not None and reference.grad is not None
            torch.testing.assert_close(got.double(), reference.grad, rtol=1e-4, atol=1e-6)
    assert float(loss_fn.last_stats["image_filtered_fraction"]) > 0


def test_attraction_on_two_ranks_equals_one_rank() -> None:
    kwargs = {"num_samples": 40, "estimator": "minibatch", "alpha": 0.15, "treatment": "attract"}
    batches = make_pairs(3, 12, 40, seed=2)
    single = dist_cases.clip_equivalence_case(0, 1, kwargs, batches)
    per_rank = run_ranks(dist_cases.clip_equivalence_case, 2, kwargs, batches)
    for name, expected in single["state"].items():
        for result in per_rank:
            torch.testing.assert_close(result["state"][name], expected, rtol=1e-5, atol=1e-6, msg=name)
    for step, expected in enumerate(single["grads"]):
        for rank, result in enumerate(per_rank):  # each rank: the mean over its rows, gradients summed by the gather
            part = slice(rank * 6, (rank + 1) * 6)
            for got, want in zip(result["grads"][step][:2], expected[:2]):
                torch.testing.assert_close(got / 2, want[part], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: GloFNDSogCLRLoss(10, treatment="attract"), "not available for GloFNDSogCLRLoss"),
        (lambda: GloFNDClipLoss(10, "fastclip", treatment="attract"), "needs estimator='minibatch'"),
        (lambda: GloFNDClipLoss(10, "sogclr", treatment="attract"), "needs estimator='minibatch'"),
        (lambda: GloFNDNTXent(10, treatment="pull"), r"treatment must be one of \('eliminate', 'attract'\)"),
        (lambda: GloFNDSigLipLoss(10, treatment=None), "treatment must be one of"),
    ],
    ids=["sogclr", "clip-fastclip", "clip-sogclr", "ntxent-typo", "siglip-none"],
)
def test_treatments_without_an_attracted_form_are_refused_by_name(build: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()  # type: ignore[operator]
