"""Every rank fails together: real 2-process gloo runs where one rank's batch, settings or process goes wrong.

Each run is one spawn (the cases of a run share it: spawning dominates the time), kept in a
module-scoped fixture; the tests read it. ``benchmarks/fault_times.py`` runs the same cases and
records the time to error; the times are printed here (``-s``) but are not asserted.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tests import fault_cases
from tests.multiprocess import run_ranks, run_ranks_with_lost_peers

WORLD = 2
PROBLEM_WORDS = {"nan": "contains NaN", "index": "indices must lie in [0, num_samples=40)"}


@pytest.fixture(scope="module")
def cpu_runs() -> list[dict[str, dict[str, Any]]]:
    batches = fault_cases.make_batches(fault_cases.CPU_STEPS, 4 * WORLD, seed=1)
    return run_ranks(fault_cases.faulty_runs, WORLD, batches, fault_cases.CPU_FAULTS, False)


@pytest.fixture(scope="module")
def accelerator_runs() -> list[dict[str, dict[str, Any]]]:
    batches = fault_cases.make_batches(fault_cases.ACCELERATOR_STEPS, 4 * WORLD, seed=2)
    return run_ranks(fault_cases.faulty_runs, WORLD, batches, fault_cases.ACCELERATOR_FAULTS, True)


def assert_error_names_the_bad_rank(errors: list[str | None], bad_rank: int, problem: str) -> None:
    """Every rank raised; the bad rank its own problem, the others naming the bad rank and the problem."""
    for rank, error in enumerate(errors):
        assert error is not None, f"rank {rank} did not raise"
        if problem == "size":
            assert "same batch size" in error and "[4, 3]" in error
        elif rank == bad_rank:
            assert error.startswith(f"rank {bad_rank}: ") and PROBLEM_WORDS[problem] in error
        else:
            assert error.startswith(f"rank {bad_rank}'s batch was refused: ") and PROBLEM_WORDS[problem] in error


def assert_lockstep_equals_reference(ranks: list[dict[str, Any]]) -> None:
    """The steps that returned a loss gave what a run without the bad steps gives; one state on every rank."""
    for result in ranks:
        assert result["clean_steps"], "no step returned a loss: the comparison is vacuous"
        for step, (value, grad) in zip(result["clean_steps"], result["reference_steps"]):
            assert torch.equal(result["steps"][step]["value"], value), f"step {step}'s loss"
            assert torch.equal(result["steps"][step]["grad"], grad), f"step {step}'s gradient"
        for name, value in result["reference_state"].items():
            assert torch.equal(result["state"][name], value), name
    for name, value in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][name], value), f"{name} differs between the ranks"
    assert any(not step["state_unchanged"] for step in ranks[0]["steps"]), "no step learned: the check is vacuous"


@pytest.mark.parametrize("loss_name", sorted(fault_cases.LOSSES))
def test_cpu_bad_batch_raises_on_every_rank_in_its_step(cpu_runs: list, loss_name: str) -> None:
    ranks = [result[loss_name] for result in cpu_runs]
    for step, (bad_rank, problem) in fault_cases.CPU_FAULTS.items():
        records = [result["steps"][step] for result in ranks]
        assert_error_names_the_bad_rank([record["error"] for record in records], bad_rank, problem)
        assert all(record["state_unchanged"] for record in records), f"step {step} wrote state"
        print(f"{loss_name} cpu {problem} on rank {bad_rank}: " + ", ".join(f"{r['seconds']:.4f} s" for r in records))
    assert [step for step, record in enumerate(ranks[0]["steps"]) if record["error"]] == sorted(fault_cases.CPU_FAULTS)
    assert_lockstep_equals_reference(ranks)


@pytest.mark.parametrize("loss_name", sorted(fault_cases.LOSSES))
def test_accelerator_bad_batch_raises_on_every_rank_two_calls_later(accelerator_runs: list, loss_name: str) -> None:
    ranks = [result[loss_name] for result in accelerator_runs]
    delay = 2  # validation.COLLECTIVE_ERROR_DELAY, spelled out: the call at which users see the error
    for step, (bad_rank, problem) in fault_cases.ACCELERATOR_FAULTS.items():
        bad = [result["steps"][step] for result in ranks]
        assert all(record["error"] is None and record["state_unchanged"] for record in bad), "no host read, no write"
        raised = [result["steps"][step + delay] for result in ranks]
        assert_error_names_the_bad_rank([record["error"] for record in raised], bad_rank, problem)
        assert all(record["state_unchanged"] for record in raised)
    raising_steps = sorted(step + delay for step in fault_cases.ACCELERATOR_FAULTS)
    for result in ranks:
        assert [step for step, record in enumerate(result["steps"]) if record["error"]] == raising_steps
    assert_lockstep_equals_reference(ranks)


@pytest.fixture(scope="module")
def mismatch_runs() -> list[list[dict[str, Any]]]:
    return run_ranks(fault_cases.mismatch_run, WORLD, fault_cases.MISMATCHES)


@pytest.mark.parametrize("case", range(len(fault_cases.MISMATCHES)), ids=[c[0] for c in fault_cases.MISMATCHES])
def test_ranks_built_differently_raise_naming_the_setting(mismatch_runs: list, case: int) -> None:
    setting = fault_cases.MISMATCHES[case][0]
    for rank, results in enumerate(mismatch_runs):
        result = results[case]
        assert result["error"] is not None, f"rank {rank} did not raise"
        assert result["error"].startswith("every rank must build the loss with the same settings")
        assert f"{setting}: rank 0 = " in result["error"] and ", rank 1 = " in result["error"]
        assert math.isfinite(float(result["after"])), "the next step after the error runs in step on both ranks"
        print(f"mismatch {setting} rank {rank}: {result['seconds']:.4f} s")
    assert mismatch_runs[0][case]["error"] == mismatch_runs[1][case]["error"]


def test_named_values_are_each_ranks(mismatch_runs: list) -> None:
    error = mismatch_runs[0][0]["error"]
    assert error is not None and "num_samples: rank 0 = 40, rank 1 = 41" in error
    labels = [case[0] for case in fault_cases.MISMATCHES]
    state_error = mismatch_runs[0][labels.index("state.threshold (sum, sum of squares)")]["error"]
    # Rank 0 loaded its thresholds times 0.5: 40 thresholds of 0.5 against 40 of 1.
    assert state_error is not None and "rank 0 = (20, 10), rank 1 = (40, 40)" in state_error


@pytest.mark.parametrize("how", ["exit", "stall"])
def test_a_lost_rank_releases_the_other_with_an_error(how: str) -> None:
    # Rank 1 leaves (os._exit) or hangs just before the state's all-gather; rank 0 waits there. gloo
    # notices a closed connection at once and a silent peer at the process group's timeout: an
    # error either way, never a wait for ever (the runner kills the processes after 300 s).
    timeout = fault_cases.PROCESS_GROUP_TIMEOUT_S
    ranks = run_ranks_with_lost_peers(fault_cases.lost_rank_run, WORLD, timeout, "sogclr", how)
    assert ranks[1] is None, "rank 1 was lost before reporting"
    result = ranks[0]
    assert result is not None and result["error_type"] is not None, f"rank 0 got no error: {result}"
    print(f"lost rank ({how}): rank 0 raised {result['error_type']} after {result['seconds']:.2f} s: {result['error']}")
