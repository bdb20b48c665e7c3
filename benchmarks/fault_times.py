"""Time to error of the two-rank fault cases of tests/test_faults_distributed.py.

Runs the same cases (real gloo processes on CPU) and writes, per case and rank, the seconds from
the start of the failing call to the error, to ``benchmarks/results/fault_times.json``. The
figures depend on the machine's load; they show the order of magnitude (milliseconds for a
refused batch or a mismatched configuration, the process group's timeout for a silent peer).

Run from the repository root: ``python benchmarks/fault_times.py``.
"""

from __future__ import annotations

import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import fault_cases  # noqa: E402 - after the path: tests/ is not installed
from tests.multiprocess import run_ranks, run_ranks_with_lost_peers  # noqa: E402

WORLD = 2
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fault_times.json")


def bad_batch_times(accelerator: bool) -> dict[str, list[float]]:
    """Seconds of the call that raised, per loss, fault and rank."""
    faults, steps = (
        (fault_cases.ACCELERATOR_FAULTS, fault_cases.ACCELERATOR_STEPS)
        if accelerator
        else (fault_cases.CPU_FAULTS, fault_cases.CPU_STEPS)
    )
    delay = 2 if accelerator else 0  # validation.COLLECTIVE_ERROR_DELAY on the accelerator path
    batches = fault_cases.make_batches(steps, 4 * WORLD, seed=1)
    ranks = run_ranks(fault_cases.faulty_runs, WORLD, batches, faults, accelerator)
    path = "accelerator path" if accelerator else "cpu"
    times = {}
    for loss_name in fault_cases.LOSSES:
        for step, (bad_rank, problem) in faults.items():
            records = [result[loss_name]["steps"][step + delay] for result in ranks]
            assert all(record["error"] for record in records), f"{loss_name} step {step}: not every rank raised"
            times[f"{loss_name} {path}: {problem} on rank {bad_rank}"] = [record["seconds"] for record in records]
    return times


def mismatch_times() -> dict[str, list[float]]:
    ranks = run_ranks(fault_cases.mismatch_run, WORLD, fault_cases.MISMATCHES)
    times = {}
    for case, (setting, _, _) in enumerate(fault_cases.MISMATCHES):
        assert all(result[case]["error"] for result in ranks), f"{setting}: not every rank raised"
        times[f"mismatched {setting}"] = [result[case]["seconds"] for result in ranks]
    return times


def lost_rank_times() -> dict[str, list[float | None]]:
    times: dict[str, list[float | None]] = {}
    timeout = fault_cases.PROCESS_GROUP_TIMEOUT_S
    for how in ("exit", "stall"):
        result = run_ranks_with_lost_peers(fault_cases.lost_rank_run, WORLD, timeout, "sogclr", how)[0]
        assert result is not None and result["error_type"], f"rank 0 got no error when rank 1 was lost ({how})"
        times[f"rank 1 lost ({how}), process group timeout {timeout:.0f} s"] = [result["seconds"], None]
    return times


def main() -> None:
    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "seconds_per_rank": {
            **bad_batch_times(accelerator=False),
            **bad_batch_times(accelerator=True),
            **mismatch_times(),
            **lost_rank_times(),
        },
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as handle:
        json.dump(results, handle, indent=2)
        handle.write("\n")
    for case, seconds in results["seconds_per_rank"].items():
        print(f"{case}: " + ", ".join("-" if value is None else f"{value:.4f} s" for value in seconds))


if __name__ == "__main__":
    main()
