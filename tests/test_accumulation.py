"""Gradient accumulation: the calls of one optimiser step learn once and sum to one call on the whole batch."""

from __future__ import annotations

import pytest
import torch

from glofnd_losses import GloFNDSogCLRLoss
from tests import dist_cases
from tests.multiprocess import run_ranks
from tests.test_clip import make_pairs

NAMES = ["clip_minibatch", "clip_sogclr", "clip_fastclip", "siglip", "sogclr", "ntxent"]
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def assert_accumulated_equals_whole(accumulated: dict, whole: dict, num_calls: int) -> None:
    """State and feature gradients equal; each call's value is the whole batch's; scalars' gradients add up per call."""
    assert accumulated["step"] == whole["step"] == 2
    for key, expected in whole["state"].items():
        torch.testing.assert_close(accumulated["state"][key], expected, **TOLERANCE, msg=key)
    for step, expected in enumerate(whole["values"]):
        for call in range(num_calls):
            torch.testing.assert_close(accumulated["values"][step * num_calls + call], expected, **TOLERANCE)
    for got, expected in zip(accumulated["grads"], whole["grads"]):
        for position in (0, 1):  # the features: each call's share reaches its micro-batch only
            torch.testing.assert_close(got[position], expected[position], **TOLERANCE)
        for position in (2, 3):  # logit_scale and logit_bias enter every call with gradients (as in open_clip)
            if expected[position] is None:
                assert got[position] is None
            else:
                torch.testing.assert_close(got[position], num_calls * expected[position], **TOLERANCE)


@pytest.mark.parametrize("name", NAMES)
def test_accumulated_calls_equal_one_call_on_the_whole_batch(name: str) -> None:
    batches = make_pairs(2, 12, 40, seed=4)
    whole = dist_cases.accumulation_case(0, 1, name, batches, 1)
    accumulated = dist_cases.accumulation_case(0, 1, name, batches, 3)
    assert_accumulated_equals_whole(accumulated, whole, 3)
    assert (whole["state"][next(iter(whole["state"]))] != 1).any()  # something was learned


def test_accumulated_calls_on_two_ranks_equal_one_call_on_the_whole_batch() -> None:
    batches = make_pairs(2, 12, 40, seed=4)
    whole = run_ranks(dist_cases.accumulation_cases, 2, NAMES, batches, 1)
    accumulated = run_ranks(dist_cases.accumulation_cases, 2, NAMES, batches, 2)
    for name in NAMES:
        for rank in range(2):
            assert_accumulated_equals_whole(accumulated[rank][name], whole[rank][name], 2)


def test_the_calls_of_an_accumulated_step_must_share_their_indices() -> None:
    loss_fn = GloFNDSogCLRLoss(40, alpha=0.1)
    first, second, indices, _ = make_pairs(1, 8, 40)[0]
    with pytest.raises(ValueError, match="indices: call 2 of an accumulation of 2 got other indices"):
        with loss_fn.accumulation(2):
            loss_fn(first, second, indices)
            loss_fn(first, second, indices.flip(0))


def test_an_accumulation_left_early_is_an_error_and_the_next_step_learns() -> None:
    loss_fn = GloFNDSogCLRLoss(40, alpha=0.1)
    first, second, indices, _ = make_pairs(1, 8, 40)[0]
    with pytest.raises(RuntimeError, match="an accumulation of 3 loss calls ended after 1"):
        with loss_fn.accumulation(3):
            loss_fn(first, second, indices)
    visits = loss_fn.threshold_visits[indices].clone()
    loss_fn(first, second, indices)
    assert torch.equal(loss_fn.threshold_visits[indices], visits + 1)


@pytest.mark.parametrize("num_calls", [0, 2.0, "2"])
def test_a_bad_number_of_calls_is_refused_by_name(num_calls: object) -> None:
    with pytest.raises(ValueError, match="num_calls must be a positive int"):
        GloFNDSogCLRLoss(40).begin_accumulation(num_calls)  # type: ignore[arg-type]
