"""Where a loss step's time goes: inclusive time per step of the package's main functions.

Runs one ``benchmarks/speed.py`` case in its steady state (the same data, warm-up and settled
state as there) and wraps the functions below with a clock, so that each line is the time spent
inside that function per step, wherever in the step it is called, its callees included: lines
overlap (``detect`` contains the functional calls the detector makes, ``threshold_subgradient``
contains a ``count_above``; ``forward + backward`` is the whole step). The wrappers add a few
microseconds per call, so read the figures at batch 1024 and up, and compare the lines of one case
only: the cases run one after the other and this machine's speed drifts between them. This is a
diagnostic for where to look, not a benchmark (``speed.py``'s paired ratios compare cases).

Run: ``python benchmarks/step_breakdown.py --case sogclr_plain sogclr_glofnd --batch 1024``
(the cases run one after the other in this process). For the allocator settings of ``speed.py
--keep-freed-memory``, set them in the environment: ``MALLOC_MMAP_THRESHOLD_=4294967296
MALLOC_TRIM_THRESHOLD_=68719476736 python benchmarks/step_breakdown.py ...``.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import torch

FUNCTIONAL = (
    "negative_mask", "threshold_subgradient", "row_std", "pooled_quantile", "minibatch_quantile", "keep_nonempty",
    "cross_entropy_rows", "sogclr_rows", "kept_mean_exp_rows",
)  # fmt: skip
"""Functions of :mod:`glofnd_losses.functional` that are timed."""


class Clock:
    """Accumulated seconds and calls per wrapped function."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()

    def wrap(self, owner: Any, name: str, label: str | None = None) -> None:
        """Replace ``owner.name`` by a timed version of itself.

        Args:
            owner: A module or class.
            name: The function's attribute name on ``owner``.
            label: Its line in the report (default ``name``).
        """
        function: Callable[..., Any] = getattr(owner, name)
        label = label or name

        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1

        setattr(owner, name, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def main() -> None:
    """Parse the arguments, wrap the functions, then time each case and print its lines."""
    import speed  # benchmarks/speed.py, beside this script

    from glofnd_losses import detectors, functional

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="+", choices=sorted(speed.ALL_CASES), default=["sogclr_glofnd"])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        print("note: CUDA runs asynchronously; without a synchronisation in each wrapper the lines are launch times")
    clock = Clock()
    for name in FUNCTIONAL:
        clock.wrap(functional, name)
    clock.wrap(detectors.GloFNDDetector, "detect", "detect (GloFND)")
    keeps_freed = all(os.environ.get(key) == value for key, value in speed.KEEP_FREED_MEMORY.items())
    print(f"device {args.device}, {torch.get_num_threads()} threads, glibc keeps freed memory: {keeps_freed}")
    for case in args.case:
        workload = speed.Workload(case, args.batch, 128, 100_000, args.device, compiled=False).warm_up()
        workload.timed_steps(3)
        clock.reset()
        step_seconds = workload.timed_steps(args.steps)
        print(f"\n{speed.ALL_CASES[case]}, batch {args.batch}: forward + backward {1e3 * step_seconds:.2f} ms per step")
        for label, seconds in clock.seconds.most_common():
            calls = clock.calls[label] / args.steps
            print(f"  {label:<24} {1e3 * seconds / args.steps:8.3f} ms per step  ({calls:.1f} calls)")


if __name__ == "__main__":
    main()
