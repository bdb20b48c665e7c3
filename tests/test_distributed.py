"""Real 2-process runs (gloo on CPU) against 1-process runs over the same global batches."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests import dist_cases
from tests.multiprocess import run_ranks

WORLD = 2


def make_batches(steps: int, global_batch: int, dim: int, num_samples: int, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        base = torch.randn(global_batch, dim, generator=generator)
        view_a = base + 0.3 * torch.randn(global_batch, dim, generator=generator)
        view_b = base + 0.3 * torch.randn(global_batch, dim, generator=generator)
        indices = torch.randperm(num_samples, generator=generator)[:global_batch]
        indices[-1] = indices[0]  # a duplicate across the two ranks: the last occurrence must win
        labels = torch.randint(0, 3, (global_batch,), generator=generator)
        batches.append((view_a, view_b, indices, labels))
    return batches


CASES = {
    "sogclr-glofnd": ("sogclr", {"num_samples": 40, "alpha": 0.1, "optimizer": {"rule": "adam", "lr": 0.2}}),
    "sogclr-default": ("sogclr", {"num_samples": 40, "alpha": 0.1}),
    "sogclr-fnc": ("sogclr", {"num_samples": 40, "alpha": 0.1, "detector": "fnc"}),
    "ntxent-glofnd": ("ntxent", {"num_samples": 40, "alpha": 0.1, "gather_distributed": True}),
    "ntxent-oracle": ("ntxent", {"num_samples": 40, "gather_distributed": True, "detector": "oracle"}),
}


def assert_equivalent(single: dict[str, Any], ranks: list[dict[str, Any]], rtol: float = 1e-5) -> None:
    world = len(ranks)
    local = single["grads"][0][0].shape[0] // world
    atol = rtol / 10
    for step, (grad_a, grad_b) in enumerate(single["grads"]):
        for rank, result in enumerate(ranks):
            part = slice(rank * local, (rank + 1) * local)
            # DDP averages gradients over ranks: rank gradient / world == 1-process gradient.
            torch.testing.assert_close(result["grads"][step][0] / world, grad_a[part], rtol=rtol, atol=atol)
            torch.testing.assert_close(result["grads"][step][1] / world, grad_b[part], rtol=rtol, atol=atol)
        mean_value = sum(result["values"][step] for result in ranks) / world
        torch.testing.assert_close(mean_value, single["values"][step], rtol=rtol, atol=atol)
    for name, value in single["state"].items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(ranks[0]["state"][name], value, rtol=rtol, atol=atol)
            for rank, result in enumerate(ranks[1:], start=1):
                assert torch.equal(result["state"][name], ranks[0]["state"][name]), f"{name} differs on rank {rank}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_equal_one_rank_with_twice_the_batch(case: str) -> None:
    name, kwargs = CASES[case]
    batches = make_batches(steps=4, global_batch=12, dim=8, num_samples=40)
    single = dist_cases.run_steps(dist_cases.make_loss(name, kwargs), batches, rank=0, world_size=1)
    ranks = run_ranks(dist_cases.equivalence_case, WORLD, name, kwargs, batches, False)
    assert_equivalent(single, ranks)
    if "state.threshold" in single["state"]:
        assert (single["state"]["state.threshold"] < 1).any(), "thresholds never moved: the test would be vacuous"


@pytest.mark.parametrize("case", ["sogclr-default", "ntxent-glofnd"])
def test_three_ranks_equal_one_rank_with_three_times_the_batch(case: str) -> None:
    # An odd world size: rank offsets, the gathers' order and the duplicate (first and last item
    # of each global batch: ranks 0 and 2) resolved as with two ranks.
    name, kwargs = CASES[case]
    batches = make_batches(steps=4, global_batch=12, dim=8, num_samples=40, seed=5)
    single = dist_cases.run_steps(dist_cases.make_loss(name, kwargs), batches, rank=0, world_size=1)
    ranks = run_ranks(dist_cases.equivalence_case, 3, name, kwargs, batches, False)
    assert len(ranks) == 3
    assert_equivalent(single, ranks)
    assert (single["state"]["state.threshold"] < 1).any(), "thresholds never moved: the test would be vacuous"


def test_accelerator_path_two_ranks_equal_one_rank() -> None:
    # The branch-free path of accelerators (deferred checks, every anchor's quantile), on CPU tensors.
    name, kwargs = CASES["sogclr-default"]
    batches = make_batches(steps=4, global_batch=12, dim=8, num_samples=40, seed=2)
    single = run_ranks(dist_cases.equivalence_case, 1, name, kwargs, batches, False, True)[0]
    ranks = run_ranks(dist_cases.equivalence_case, WORLD, name, kwargs, batches, False, True)
    assert_equivalent(single, ranks)
    assert (single["state"]["state.threshold"] < 1).any(), "thresholds never moved: the test would be vacuous"


def test_compiled_two_ranks_equal_one_eager_rank() -> None:
    # torch.compile (inductor) on every rank: the gathers and the state's all-gather run between
    # the compiled graphs. Fused kernels sum in another order, hence the looser tolerance.
    name, kwargs = CASES["ntxent-glofnd"]
    batches = make_batches(steps=4, global_batch=12, dim=8, num_samples=40, seed=3)
    single = dist_cases.run_steps(dist_cases.make_loss(name, kwargs), batches, rank=0, world_size=1)
    ranks = run_ranks(dist_cases.equivalence_case, WORLD, name, kwargs, batches, False, False, True)
    assert all(result["compiled_graphs"] > 0 for result in ranks)
    assert_equivalent(single, ranks, rtol=1e-4)
    assert (single["state"]["state.threshold"] < 1).any(), "thresholds never moved: the test would be vacuous"


def test_ntxent_without_gather_contrasts_locally_and_keeps_one_state_on_every_rank() -> None:
    # gather_distributed=False: each rank's loss is the single-process loss of its own batch, and
    # the state holds both ranks' rows (rank 0's samples are 0..19, rank 1's 20..39).
    kwargs = {"num_samples": 40, "alpha": 0.1, "gather_distributed": False}
    generator = torch.Generator().manual_seed(6)
    batches = []
    for view_a, view_b, _, labels in make_batches(steps=3, global_batch=12, dim=8, num_samples=40, seed=6):
        own_samples = [torch.randperm(20, generator=generator)[:6] + 20 * rank for rank in range(WORLD)]
        batches.append((view_a, view_b, torch.cat(own_samples), labels))
    ranks = run_ranks(dist_cases.equivalence_case, WORLD, "ntxent", kwargs, batches, False)
    singles = [
        dist_cases.run_steps(dist_cases.make_loss("ntxent", kwargs), [
            (view_a[part], view_b[part], indices[part], labels[part]) for view_a, view_b, indices, labels in batches
        ], rank=0, world_size=1)
        for part in (slice(0, 6), slice(6, 12))
    ]  # fmt: skip
    for result, single in zip(ranks, singles):
        torch.testing.assert_close(torch.stack(result["values"]), torch.stack(single["values"]), rtol=1e-6, atol=0)
    rank_of_sample = torch.arange(40) // 20
    for name, value in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][name], value), name
        if name.startswith("state."):
            expected = torch.where(rank_of_sample == 0, singles[0]["state"][name], singles[1]["state"][name])
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=0)
    assert (ranks[0]["state"]["state.threshold"][20:] < 1).any(), "rank 1's rows never moved: the test is vacuous"


def test_bad_input_on_one_rank_writes_nothing_on_any_rank() -> None:
    # On an accelerator an index out of range is found on the device and raised later (no host
    # sync in the step); the step's state update is dropped on every rank, not only the bad one.
    batches = make_batches(steps=3, global_batch=12, dim=8, num_samples=40, seed=4)
    ranks = run_ranks(dist_cases.deferred_error_case, WORLD, batches, 1)
    for result in ranks:
        assert result["before"].keys() == result["after"].keys()
        for name, value in result["before"].items():
            assert torch.equal(result["after"][name], value), name
    assert (ranks[0]["before"]["threshold"] < 1).any(), "the earlier steps learned: the check is not vacuous"
    # The check results ride with the state rows: every rank raises, naming the bad rank.
    assert ranks[0]["error"] is not None and ranks[0]["error"].startswith("rank 1's batch was refused: indices")
    assert ranks[1]["error"] is not None and ranks[1]["error"].startswith("rank 1: indices")
    assert "num_samples=40" in ranks[1]["error"]


def test_accelerate_gather_is_used_and_agrees() -> None:
    name, kwargs = CASES["sogclr-glofnd"]
    batches = make_batches(steps=3, global_batch=12, dim=8, num_samples=40, seed=1)
    single = dist_cases.run_steps(dist_cases.make_loss(name, kwargs), batches, rank=0, world_size=1)
    ranks = run_ranks(dist_cases.equivalence_case, WORLD, name, kwargs, batches, True)
    assert all(result["used_accelerate"] for result in ranks)
    assert [result["accelerate_gathers"] for result in ranks] == [6, 6], "the labels and the state rows, per step"
    assert_equivalent(single, ranks)


def test_accelerate_that_sees_one_process_is_not_trusted() -> None:
    # accelerate's default state on a CPU host without the launcher's variables reports one process
    # (its gather would return the local rows): the state must still be synced through torch.
    name, kwargs = CASES["sogclr-default"]
    batches = make_batches(steps=3, global_batch=12, dim=8, num_samples=40, seed=3)
    single = dist_cases.run_steps(dist_cases.make_loss(name, kwargs), batches, rank=0, world_size=1)
    ranks = run_ranks(dist_cases.accelerate_disagrees_case, WORLD, name, kwargs, batches)
    assert [result["accelerate_processes"] for result in ranks] == [1, 1]
    assert not any(result["used_accelerate"] for result in ranks)
    assert_equivalent(single, ranks)


def test_ntxent_matches_lightly_on_two_ranks() -> None:
    generator = torch.Generator().manual_seed(3)
    out0, out1 = torch.randn(16, 8, generator=generator), torch.randn(16, 8, generator=generator)
    for result in run_ranks(dist_cases.lightly_parity_case, WORLD, out0, out1):
        for expected, actual in zip(result["lightly"], result["glofnd"]):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_helper", [False, True])
def test_ddp_buffer_broadcast_is_disabled_by_the_helper(use_helper: bool) -> None:
    rank1_threshold = run_ranks(dist_cases.ddp_broadcast_case, WORLD, use_helper)[1]
    expected = 0.5 if use_helper else 1.0  # without the helper DDP copies rank 0's buffer over rank 1's
    assert torch.all(rank1_threshold == expected)


@pytest.mark.parametrize(
    ("name", "kwargs", "sizes"),
    [
        ("ntxent", {"num_samples": 40, "gather_distributed": False}, [6, 5]),  # only the state rows are gathered
        ("ntxent", {"num_samples": 40, "gather_distributed": False}, [1, 2]),  # rank 0 has no negatives
        ("sogclr", {"num_samples": 40}, [6, 5]),
    ],
    ids=["ntxent-local", "ntxent-local-one-item", "sogclr"],
)
def test_unequal_batch_sizes_across_ranks_raise_a_clear_error(name: str, kwargs: dict[str, Any], sizes: list) -> None:
    # gloo aborts the processes on a size mismatch (or waits for ever where one rank has no state
    # rows to send); every rank must raise instead, naming the sizes.
    for result in run_ranks(dist_cases.uneven_batch_case, WORLD, name, kwargs, sizes):
        assert result["error"] is not None and "same batch size" in result["error"] and str(sizes) in result["error"]
        assert result["state_unchanged"]
