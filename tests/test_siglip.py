"""GloFNDSigLipLoss against open_clip's SigLipLoss and a hand-written filtered sigmoid loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from glofnd_losses import GloFNDSigLipLoss
from tests import dist_cases
from tests.multiprocess import run_ranks
from tests.test_clip import make_pairs

WORLD = 2


def open_clip_and_ours(
    images: torch.Tensor, texts: torch.Tensor, bias: float | None, **options: object
) -> list[tuple[torch.Tensor | None, ...]]:
    """Value and gradients (images, texts, logit_scale, logit_bias) of SigLipLoss and of ours without a detector."""
    results = []
    for label in ("open_clip", "glofnd"):
        image_part, text_part = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
        logit_scale = torch.tensor(10.0, requires_grad=True)
        logit_bias = None if bias is None else torch.tensor(bias, requires_grad=True)
        if label == "open_clip":
            loss = SigLipLoss()(image_part, text_part, logit_scale, logit_bias)
        else:
            loss_fn = GloFNDSigLipLoss(images.shape[0], detector=None, **options)  # type: ignore[arg-type]
            loss = loss_fn(image_part, text_part, logit_scale, logit_bias, indices=torch.arange(images.shape[0]))
        loss.backward()
        bias_grad = None if logit_bias is None else logit_bias.grad
        results.append((loss.detach(), image_part.grad, text_part.grad, logit_scale.grad, bias_grad))
    return results


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
@pytest.mark.parametrize("bias", [-10.0, 0.5, None])
def test_equals_open_clip_on_one_rank(bias: float | None, chunk_size: int | None) -> None:
    images, texts, _, _ = make_pairs(1, 10, 10)[0]
    expected, actual = open_clip_and_ours(images, texts, bias, chunk_size=chunk_size)
    for got, want in zip(actual, expected):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def hand_written_filtered_loss(
    images: torch.Tensor,
    texts: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    image_thresholds: torch.Tensor,
    text_thresholds: torch.Tensor,
    attract: bool = False,
) -> torch.Tensor:
    """``-(1/b) sum_ij log sigmoid(z_ij x_ij)`` per pair, each negative's term in two halves, one per side.

    A side that keeps the pair (score at or below its threshold) gives its half with ``z = -1``; a
    side that flags it gives nothing, or with ``attract`` its half with ``z = +1``.
    """
    size = images.shape[0]
    total = images.new_zeros(())
    for i in range(size):
        for j in range(size):
            score = images[i] @ texts[j]
            logit = scale * score + bias
            if i == j:
                total = total - F.logsigmoid(logit)
                continue
            for threshold in (image_thresholds[i], text_thresholds[j]):
                if score <= threshold:
                    total = total - 0.5 * F.logsigmoid(-logit)
                elif attract:
                    total = total - 0.5 * F.logsigmoid(logit)
    return total / size


def test_flagged_halves_leave_the_sum_as_a_hand_written_loss() -> None:
    steps = make_pairs(3, 12, 30, seed=3)
    loss_fn = GloFNDSigLipLoss(30, alpha=0.15, chunk_size=5)
    flagged = 0.0
    for images, texts, indices, _ in steps:
        image_part, text_part = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
        scale, bias = torch.tensor(8.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
        loss = loss_fn(image_part, text_part, scale, bias, indices=indices)
        loss.backward()
        # The step's masks use the thresholds it learned: those stored after it.
        inputs = [tensor.detach().double().requires_grad_(True) for tensor in (images, texts, scale, bias)]
        thresholds = (loss_fn.image_thresholds[indices].double(), loss_fn.text_thresholds[indices].double())
        expected = hand_written_filtered_loss(*inputs, *thresholds)
        expected.backward()
        torch.testing.assert_close(loss.detach().double(), expected.detach(), rtol=1e-5, atol=1e-6)
        for got, want in zip((image_part.grad, text_part.grad, scale.grad, bias.grad), inputs):
            assert got is not None and want.grad is not None
            torch.testing.assert_close(got.double(), want.grad, rtol=1e-4, atol=1e-6)
        flagged += float(loss_fn.last_stats["image_flagged_fraction"] + loss_fn.last_stats["text_flagged_fraction"])
    assert flagged > 0  # the case exercises filtering


def test_equals_open_clip_on_two_ranks_for_every_dist_impl() -> None:
    images, texts, _, _ = make_pairs(1, 12, 12, seed=5)[0]
    dist_impls = ["bidir", "shift", "reduce", "gather"]
    for per_impl in run_ranks(dist_cases.siglip_parity_cases, WORLD, images, texts, dist_impls):
        for result in per_impl.values():  # value and gradients of the features, logit_scale and logit_bias
            for got, expected in zip(result["glofnd"], result["open_clip"]):
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_two_ranks_equal_one_rank_with_glofnd() -> None:
    kwargs = {"num_samples": 40, "alpha": 0.1, "chunk_size": 4}
    batches = make_pairs(3, 12, 40, seed=2)
    single = dist_cases.siglip_equivalence_case(0, 1, kwargs, batches)
    per_rank = run_ranks(dist_cases.siglip_equivalence_case, WORLD, kwargs, batches)
    for name, expected in single["state"].items():
        for result in per_rank:
            torch.testing.assert_close(result["state"][name], expected, rtol=1e-5, atol=1e-6, msg=name)
    # As open_clip's, a rank's loss is normalised by its local batch: the mean over ranks (and
    # DDP's averaged gradient) is the single process's, and each rank's feature gradients are
    # WORLD times the single process's (DDP divides them by WORLD).
    for step, expected in enumerate(single["values"]):
        mean_value = sum(result["values"][step] for result in per_rank) / WORLD
        torch.testing.assert_close(mean_value, expected, rtol=1e-5, atol=1e-6)
        mean_scale_grad = sum(result["grads"][step][2] for result in per_rank) / WORLD
        torch.testing.assert_close(mean_scale_grad, single["grads"][step][2], rtol=1e-5, atol=1e-6)
        for rank, result in enumerate(per_rank):
            part = slice(rank * 6, (rank + 1) * 6)
            for got, want in zip(result["grads"][step][:2], single["grads"][step][:2]):
                torch.testing.assert_close(got / WORLD, want[part], rtol=1e-5, atol=1e-6)
    assert (single["state"]["state.image_threshold_visits"] > 0).sum() > 10


def test_a_lone_pair_gives_its_positive_term_and_learns_nothing() -> None:
    images, texts, _, _ = make_pairs(1, 1, 5)[0]
    expected = SigLipLoss()(images, texts, torch.tensor(10.0), torch.tensor(-2.0))
    loss_fn = GloFNDSigLipLoss(5)
    before = {name: value.clone() for name, value in loss_fn.state_dict().items()}
    with pytest.warns(UserWarning, match="its positive term"):
        loss = loss_fn(images, texts, torch.tensor(10.0), torch.tensor(-2.0), indices=torch.tensor([3]))
    torch.testing.assert_close(loss, expected)
    for name, value in loss_fn.state_dict().items():
        if name.startswith("state."):  # the per-sample state; the step counter counts the step
            assert torch.equal(value, before[name]), name


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dist_impl": "ring"}, "dist_impl must be one of"),
        ({"world_size": 0}, "world_size must be a positive int"),
        ({"rank": -1}, "rank must be an int >= 0"),
        ({"alpha": 1.0}, "alpha must be in"),
        ({"detector": "oracel"}, "detector"),
    ],
)
def test_bad_constructor_arguments_are_refused_by_name(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GloFNDSigLipLoss(10, **options)  # type: ignore[arg-type]


def test_a_world_size_that_disagrees_with_torch_distributed_is_refused() -> None:
    images, texts, indices, _ = make_pairs(1, 4, 10)[0]
    loss_fn = GloFNDSigLipLoss(10, world_size=2)
    before = loss_fn.step
    with pytest.raises(ValueError, match=r"world_size=2 was given .* reports world_size=1"):
        loss_fn(images, texts, 10.0, -5.0, indices=indices)
    assert loss_fn.step == before


@pytest.mark.parametrize("name", ["logit_scale", "logit_bias"])
def test_scalars_of_more_than_one_element_are_refused_by_name(name: str) -> None:
    images, texts, indices, _ = make_pairs(1, 4, 10)[0]
    scalars = {"logit_scale": torch.tensor(10.0), "logit_bias": torch.tensor(-5.0)}
    scalars[name] = torch.ones(2)
    with pytest.raises(ValueError, match=f"{name} must be a scalar"):
        GloFNDSigLipLoss(10)(images, texts, scalars["logit_scale"], scalars["logit_bias"], indices=indices)


def test_bf16_autocast_computes_in_float32() -> None:
    images, texts, indices, _ = make_pairs(1, 8, 10)[0]
    expected = GloFNDSigLipLoss(10, detector=None)(images, texts, 10.0, -5.0, indices=indices)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = GloFNDSigLipLoss(10, detector=None)(images, texts, 10.0, -5.0, indices=indices)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize(
    ("scale", "bias", "message"),
    [
        (float("nan"), -5.0, r"logit_scale must be finite and > 0 .*got nan"),
        (0.0, -5.0, "logit_scale must be finite and > 0"),
        (-3.0, -5.0, "logit_scale must be finite and > 0"),
        (float("inf"), -5.0, "logit_scale must be finite and > 0"),
        (10.0, float("nan"), "logit_bias must be finite, got nan"),
    ],
)
def test_bad_scalar_values_are_refused_by_name_and_learn_nothing(scale: float, bias: float, message: str) -> None:
    images, texts, indices, _ = make_pairs(1, 4, 10)[0]
    loss_fn = GloFNDSigLipLoss(10, alpha=0.2)
    before = {name: value.clone() for name, value in loss_fn.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        loss_fn(images, texts, torch.tensor(scale), torch.tensor(bias), indices=indices)
    for name, value in loss_fn.state_dict().items():
        assert torch.equal(value, before[name]), name
