"""GloFNDClipLoss against open_clip's ClipLoss and a per-anchor implementation of its three estimators.

The estimators: CLIP's mini-batch cross-entropy, FastCLIP-v1 (SogCLR's moving average ``u`` per sample
and modality, fixed temperature) and FastCLIP-v3 (learned temperature), each with GloFND's per-sample
thresholds removing the negatives above them.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from glofnd_losses import GloFNDClipLoss, ThresholdOptimizer
from glofnd_losses.schedules import cosine_gamma
from tests import dist_cases
from tests.multiprocess import run_ranks

WORLD = 2


def make_pairs(steps: int, size: int, num_samples: int, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        base = torch.randn(size, 8, generator=generator)
        images = F.normalize(base + 0.4 * torch.randn(size, 8, generator=generator), dim=1)
        texts = F.normalize(base + 0.4 * torch.randn(size, 8, generator=generator), dim=1)
        indices = torch.randperm(num_samples, generator=generator)[:size]
        labels = torch.randint(0, 3, (size,), generator=generator)
        batches.append((images, texts, indices, labels))
    return batches


class ReferenceClip:
    """Per-anchor loops over CLIP's cross-entropy and FastCLIP-v1/v3 with GloFND thresholds learned by projected SGD.

    ``"minibatch"``: each anchor's cross-entropy against its batch, the kept negatives' sum
    rescaled to the full negative count, averaged over the anchors of both modalities.
    """

    def __init__(self, num_samples: int, estimator: str, alpha: float, lr: float, rho: float, tau: float) -> None:
        self.estimator, self.alpha, self.lr, self.rho, self.tau = estimator, alpha, lr, rho, tau
        self.threshold = {"image": [1.0] * num_samples, "text": [1.0] * num_samples}
        self.u = {"image": [0.0] * num_samples, "text": [0.0] * num_samples}

    def loss(
        self, images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor, indices: list[int], epoch: int
    ):
        size = images.shape[0]
        gamma = cosine_gamma(epoch)
        inverse_tau = logit_scale if self.estimator == "fastclip" else torch.tensor(1 / self.tau)
        ratios, logs, cross_entropy = torch.zeros(()), torch.zeros(()), torch.zeros(())
        updates: dict[str, dict[int, tuple[float, float]]] = {"image": {}, "text": {}}
        for modality, anchors, candidates in (("image", images, texts), ("text", texts, images)):
            for i in range(size):
                item = indices[i]
                scores = torch.stack([anchors[i] @ candidates[j] for j in range(size)])
                plain = scores.detach().tolist()
                negatives = [j for j in range(size) if j != i]
                above = sum(plain[j] > self.threshold[modality][item] for j in negatives)
                lam = self.threshold[modality][item] - self.lr * (self.alpha - above / (size - 1))
                lam = min(1.0, max(-1.0, lam))
                kept = [j for j in negatives if plain[j] <= lam] or negatives
                if self.estimator == "minibatch":
                    logits = scores * logit_scale
                    kept_sum = torch.stack([torch.exp(logits[j]) for j in kept]).sum() * (size - 1) / len(kept)
                    cross_entropy = cross_entropy + torch.log(torch.exp(logits[i]) + kept_sum) - logits[i]
                    updates[modality][item] = (lam, 0.0)
                    continue
                estimate = torch.stack([torch.exp((scores[j] - scores[i]) * inverse_tau) for j in kept]).mean()
                old = self.u[modality][item]
                fresh = float(estimate.detach())
                u_new = fresh if old < 1e-35 else (1 - gamma) * old + gamma * fresh
                ratios = ratios + estimate / (u_new + 1e-14)
                logs = logs + math.log(u_new + 1e-14)
                updates[modality][item] = (lam, u_new)
        for modality, rows in updates.items():
            for item, (lam, u_new) in rows.items():
                self.threshold[modality][item], self.u[modality][item] = lam, u_new
        if self.estimator == "minibatch":
            return cross_entropy / (2 * size)
        total = ratios / size
        if self.estimator == "sogclr":
            return total
        tau = 1 / logit_scale
        return tau.detach() * total + self.rho * tau + tau * 0.5 * logs / size


@pytest.mark.parametrize("estimator", ["minibatch", "sogclr", "fastclip"])
def test_estimators_match_reference_over_several_steps(estimator: str) -> None:
    num_samples, size = 24, 8
    loss_fn = GloFNDClipLoss(
        num_samples, estimator=estimator, alpha=0.15, temperature=0.1,
        threshold_optimizer=ThresholdOptimizer(rule="sgd", lr=0.8),
    )  # fmt: skip
    reference = ReferenceClip(num_samples, estimator, alpha=0.15, lr=0.8, rho=6.5, tau=0.1)
    for epoch, (images, texts, indices, _) in enumerate(make_pairs(4, size, num_samples)):
        loss_fn.set_epoch(epoch)
        ours = [
            images.clone().requires_grad_(True),
            texts.clone().requires_grad_(True),
            torch.tensor(5.0, requires_grad=True),
        ]
        theirs = [tensor.detach().clone().requires_grad_(True) for tensor in ours]
        loss = loss_fn(*ours, indices=indices)
        expected = reference.loss(*theirs, indices.tolist(), epoch)
        loss.backward()
        expected.backward()
        torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
        for mine, ref in zip(ours, theirs):
            expected_grad = torch.zeros_like(ref) if ref.grad is None else ref.grad  # sogclr: scale unused
            torch.testing.assert_close(mine.grad, expected_grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(loss_fn.image_thresholds, torch.tensor(reference.threshold["image"]))
        torch.testing.assert_close(loss_fn.text_thresholds, torch.tensor(reference.threshold["text"]))
        if estimator == "minibatch":
            continue
        torch.testing.assert_close(
            loss_fn.state.buffer("u_image"), torch.tensor(reference.u["image"]), rtol=1e-5, atol=0
        )
        torch.testing.assert_close(loss_fn.state.buffer("u_text"), torch.tensor(reference.u["text"]), rtol=1e-5, atol=0)
    assert loss_fn.last_stats["image_filtered_fraction"] > 0
    assert (loss_fn.text_thresholds < 1).sum() > 10


def test_minibatch_equals_open_clip_on_one_rank() -> None:
    images, texts, _, _ = make_pairs(1, 10, 10)[0]
    results = []
    for label in ("open_clip", "glofnd"):
        image_part, text_part = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
        logit_scale = torch.tensor(12.0, requires_grad=True)
        if label == "open_clip":
            loss = ClipLoss()(image_part, text_part, logit_scale, output_dict=True)["contrastive_loss"]
        else:
            loss_fn = GloFNDClipLoss(10, estimator="minibatch", detector=None)
            loss = loss_fn(image_part, text_part, logit_scale, output_dict=True, indices=torch.arange(10))[
                "contrastive_loss"
            ]
        loss.backward()
        results.append((loss.detach(), image_part.grad, text_part.grad, logit_scale.grad))
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_logit_scale_gradient_stays_accurate_at_a_large_batch() -> None:
    # The scale's gradient sums batch^2 products whose rows nearly cancel; one float32 dot over
    # all of them (MKL's) came out 1e-3 off at batch 4096, where float32 autograd is 2e-7 off.
    batch = 4096
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(batch, 64, generator=generator)
    images = F.normalize(shared + 0.5 * torch.randn(batch, 64, generator=generator), dim=1)
    texts = F.normalize(shared + 0.5 * torch.randn(batch, 64, generator=generator), dim=1)
    reference_scale = torch.tensor(1 / 0.07, dtype=torch.float64, requires_grad=True)
    ClipLoss()(images.double(), texts.double(), reference_scale).backward()
    logit_scale = torch.tensor(1 / 0.07, requires_grad=True)
    loss_fn = GloFNDClipLoss(batch, estimator="minibatch", detector=None)  # fastclip's gradient takes the same sum
    loss_fn(images, texts, logit_scale, indices=torch.arange(batch)).backward()
    assert logit_scale.grad is not None
    torch.testing.assert_close(logit_scale.grad.double(), reference_scale.grad, rtol=1e-5, atol=0)


@pytest.mark.parametrize(("local_loss", "gather_with_grad"), [(True, True), (False, False), (False, True)])
def test_minibatch_matches_open_clip_on_two_ranks(local_loss: bool, gather_with_grad: bool) -> None:
    images, texts, _, _ = make_pairs(1, 12, 12, seed=5)[0]
    results = run_ranks(dist_cases.open_clip_parity_case, WORLD, images, texts, local_loss, gather_with_grad)
    mean_value = sum(result["glofnd"][0] for result in results) / WORLD
    mean_scale_grad = sum(result["glofnd"][3] for result in results) / WORLD  # what DDP's averaging gives
    for result in results:
        (value, image_grad, text_grad, scale_grad), mine = result["open_clip"], result["glofnd"]
        if local_loss:  # the same local-anchors x global-candidates loss
            for expected, actual in zip(result["open_clip"], mine):
                torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
            continue
        # open_clip computes the global loss on every rank; ours is the local anchors' share, with
        # gradients summed over ranks by the gather. Without gather_with_grad open_clip's gradient
        # reaches the local features only (1 / world of ours), with it every rank's.
        torch.testing.assert_close(mean_value, value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mean_scale_grad, scale_grad, rtol=1e-5, atol=1e-6)
        share = 1.0 if gather_with_grad else 1.0 / WORLD
        torch.testing.assert_close(mine[1] * share, image_grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine[2] * share, text_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("world", "accelerator_path"),
    [(WORLD, False), (WORLD, True), (3, False)],
    ids=["cpu_path", "accelerator_path", "three_ranks"],
)
@pytest.mark.parametrize("estimator", ["minibatch", "sogclr", "fastclip"])
def test_ranks_equal_one_rank(
    estimator: str, world: int, accelerator_path: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # accelerator_path: the branch-free path of accelerators (no host reads), on CPU tensors.
    # three_ranks: an odd world size (rank offsets, the gathers' order).
    kwargs = {"num_samples": 40, "estimator": estimator, "alpha": 0.1}
    batches = make_pairs(3, 12, 40, seed=2)
    if accelerator_path:
        dist_cases.take_accelerator_path(monkeypatch)
    single = dist_cases.run_clip_steps(GloFNDClipLoss(**kwargs), batches, rank=0, world_size=1)
    ranks = run_ranks(dist_cases.clip_equivalence_case, world, kwargs, batches, accelerator_path)
    assert len(ranks) == world
    local = 12 // world
    for step, (image_grad, text_grad, scale_grad) in enumerate(single["grads"]):
        for rank, result in enumerate(ranks):
            part = slice(rank * local, (rank + 1) * local)
            torch.testing.assert_close(result["grads"][step][0] / world, image_grad[part], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(result["grads"][step][1] / world, text_grad[part], rtol=1e-5, atol=1e-6)
        mean_scale_grad = sum(result["grads"][step][2] for result in ranks) / world
        torch.testing.assert_close(mean_scale_grad, scale_grad, rtol=1e-5, atol=1e-6)
        mean_value = sum(result["values"][step] for result in ranks) / world
        torch.testing.assert_close(mean_value, single["values"][step], rtol=1e-5, atol=1e-6)
    for name, value in single["state"].items():
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-5, atol=1e-6)
        for rank, result in enumerate(ranks[1:], start=1):
            assert torch.equal(result["state"][name], ranks[0]["state"][name]), f"{name} differs on rank {rank}"
    assert (single["state"]["state.image_threshold"] < 1).any()


def test_sogclr_keeps_logit_scale_in_the_graph_and_rejects_siglip() -> None:
    images, texts, indices, _ = make_pairs(1, 6, 6)[0]
    logit_scale = torch.tensor(10.0, requires_grad=True)
    loss_fn = GloFNDClipLoss(6, estimator="sogclr")
    loss_fn(images, texts, logit_scale, indices=indices).backward()
    assert logit_scale.grad is not None and logit_scale.grad == 0
    with pytest.raises(ValueError, match="logit_bias"):
        loss_fn(images, texts, logit_scale, torch.tensor(-10.0), indices=indices)
    with pytest.raises(ValueError, match="estimator"):
        GloFNDClipLoss(6, estimator="siglip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"indices must lie in \[0, num_samples=6\)"):
        loss_fn(images, texts, logit_scale, indices=indices + 6)


@pytest.mark.parametrize("estimator", ["minibatch", "sogclr", "fastclip"])
def test_one_element_logit_scale_gives_a_scalar_loss(estimator: str) -> None:
    images, texts, indices, _ = make_pairs(1, 6, 6)[0]
    results = []
    for shape in ((), (1,)):
        logit_scale = torch.full(shape, 10.0, requires_grad=True)
        loss = GloFNDClipLoss(6, estimator=estimator)(images, texts, logit_scale, indices=indices)
        loss.backward()
        assert loss.shape == () and logit_scale.grad is not None and logit_scale.grad.shape == shape
        results.append((loss.detach(), logit_scale.grad.reshape(())))
    torch.testing.assert_close(results[0], results[1])
    with pytest.raises(ValueError, match=r"logit_scale must be a scalar .* got shape \(2,\)"):
        GloFNDClipLoss(6, estimator=estimator)(images, texts, torch.tensor([10.0, 10.0]), indices=indices)


@pytest.mark.parametrize("accelerator_path", [False, True], ids=["cpu_path", "accelerator_path"])
def test_features_that_are_not_l2_normalised_are_refused(
    accelerator_path: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Thresholds live in [-1, 1]: raw features (scores above 1) would be flagged wholesale.
    images, texts, indices, _ = make_pairs(1, 6, 6)[0]
    if accelerator_path:
        dist_cases.take_accelerator_path(monkeypatch)
    loss_fn = GloFNDClipLoss(6, estimator="fastclip", alpha=0.1)
    loss_fn.set_epoch(0)
    before = {name: value.clone() for name, value in loss_fn.state_dict().items() if torch.is_tensor(value)}
    message = r"text_features must be L2-normalised \(rows of norm 1"
    if accelerator_path:
        loss_fn(images, texts * 5, torch.tensor(10.0), indices=indices)  # found on the device, raised later
        with pytest.raises(ValueError, match=message):
            loss_fn.check_errors()
    else:
        with pytest.raises(ValueError, match=message + r".* got a row of norm 5"):
            loss_fn(images, texts * 5, torch.tensor(10.0), indices=indices)
    for name, value in before.items():
        if name == "_extra_state" and accelerator_path:  # the step counter counts a step raised later (README)
            assert loss_fn.step == 1
            continue
        assert torch.equal(loss_fn.state_dict()[name], value), name
    # Normalised in half precision (open_clip under autocast): accepted.
    loss_fn(images.bfloat16(), F.normalize(texts.bfloat16(), dim=1), torch.tensor(10.0), indices=indices)
    loss_fn.check_errors()
