"""What each part of a GloFND step costs: paired time ratios against the same loss without a detector.

For each loss (``GloFNDSogCLRLoss``, ``GloFNDClipLoss`` "minibatch" and "fastclip", at the alphas
of ``speed.py``) three rungs, each timed paired against the loss without a detector in one
process (``speed.py``'s ``measure_paired``: A B B A groups, median and quartiles of the groups'
ratios), on ``speed.py``'s steady state (thresholds learned, every sample visited):

* ``filter only``: the loss in ``eval()`` mode: the learned thresholds mask the negatives and the
  loss counts the kept ones, nothing is learned or written back. The cost of filtering alone.
* ``paper's rule``: learning with ``ThresholdOptimizer.paper()`` (the reference code's Adam): one
  more comparison pass for the subgradient's count, the moments read and written. The least a
  learned per-sample threshold costs in this package.
* ``default rule``: ``ThresholdOptimizer.default()``: the paper's passes plus the score spread (the
  step unit) and the stop at the batch quantile (a ``topk`` of every anchor's tail), the parts
  that BENCHMARKS.md section 1 shows keep thresholds on a moving encoder.

For CLIP "minibatch" the paper's rule is also paired against open_clip's ``ClipLoss``, the peer
of ``speed.py``'s "Clip minibatch / open_clip".

Run: ``python benchmarks/cost_ladder.py --batch-sizes 256 1024 4096 --threads 2 --keep-freed-memory``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import speed  # benchmarks/speed.py, beside this script
import torch

LOSSES = (
    ("SogCLR", "sogclr_plain", ("sogclr_frozen", "sogclr_paper", "sogclr_glofnd")),
    ("CLIP minibatch", "clip_minibatch_plain", ("clip_minibatch_frozen", "clip_minibatch_paper", "clip_minibatch")),
    ("FastCLIP", "fastclip_plain", ("fastclip_frozen", "fastclip_paper", "fastclip_glofnd")),
)
"""(title, the loss without a detector, its rungs: filter only, paper's rule, default rule)."""
RUNGS = ("filter only", "paper's rule", "default rule")
EXTRA_PAIRS = (("CLIP minibatch, paper's rule / open_clip", "clip_minibatch_paper", "open_clip"),)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    speed.add_machine_arguments(parser)
    parser.add_argument("--paired-blocks", type=int, default=16, help="timed blocks per side, even")
    parser.add_argument("--steps-per-block", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the ratios as JSON")
    args = parser.parse_args()
    if args.paired_blocks < 2 or args.paired_blocks % 2 or args.steps_per_block < 1:
        parser.error("--paired-blocks must be even and >= 2, --steps-per-block >= 1")
    args.compile = False  # read by speed.run_paired
    if args.threads:
        torch.set_num_threads(args.threads)
    child_env: dict[str, str] | None = {**os.environ, **speed.KEEP_FREED_MEMORY} if args.keep_freed_memory else None
    device_name = speed.device_label(args.device)
    print(
        f"device: {device_name}, torch {torch.__version__}, dim {args.dim}; time ratios against the same loss "
        f"without a detector, paired ({args.paired_blocks // 2} groups of A B B A blocks of {args.steps_per_block} "
        "steps): median (quartiles)\n"
    )
    results: dict[str, Any] = {"device": device_name, "batches": {}}
    header = f"{'batch':>6} | {'loss':<15} | " + " | ".join(f"{rung:>19}" for rung in RUNGS)
    print(header + "\n" + "-" * len(header))
    for batch in args.batch_sizes:
        batch_results: dict[str, Any] = {}
        for title, plain, rungs in LOSSES:
            rows = {rung: speed.run_paired(case, plain, batch, args, child_env) for rung, case in zip(RUNGS, rungs)}
            batch_results[title] = rows
            print(f"{batch:>6} | {title:<15} | " + " | ".join(f"{speed.paired_cell(row):>19}" for row in rows.values()))
        for title, mine, peer in EXTRA_PAIRS:
            row = speed.run_paired(mine, peer, batch, args, child_env)
            batch_results[title] = row
            print(f"{batch:>6} | {title}: {speed.paired_cell(row)}")
        results["batches"][batch] = batch_results
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
