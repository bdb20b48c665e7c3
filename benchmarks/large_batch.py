"""Peak memory and time of GloFND training steps at large batches, against the peers, as ratios.

Three comparisons, each at two batch sizes (the larger 4x the smaller):

* CLIP, dim 512, batches 4096 and 16384: ``GloFNDClipLoss(num_samples, "minibatch")`` vs open_clip's
  ``ClipLoss()`` (``speed.py``'s ``clip_minibatch`` and ``open_clip`` cases);
* SigLIP, dim 512, batches 4096 and 16384: ``GloFNDSigLipLoss(num_samples)`` vs open_clip's
  ``SigLipLoss()``, logit bias -10 (``siglip_glofnd`` and ``open_clip_siglip``);
* NT-Xent, dim 128, batches 2048 and 8192: ``GloFNDNTXent(num_samples, temperature=0.5)`` vs
  lightly's ``NTXentLoss(temperature=0.5)`` (``glofnd_ntxent`` and ``lightly_ntxent``).

Our losses run with GloFND learning and filtering: ``detector="glofnd"``, ``start_epoch=0``, in
training mode, from a fresh loss (no warm-up epochs, unlike ``speed.py``'s steady state: the
steps here include the first visits that seed the thresholds). Each case runs in its own fresh
process (``speed.py``'s ``Workload`` on its data: a pool of four batches of fixed random
embeddings, reshuffled into a new batch at every step): ``--warmup-steps`` untimed steps (by
default one on CUDA, whose first step initialises its libraries, none elsewhere), then ``--steps``
timed forward+backward steps (two by default); the time is the median of the timed
steps, the peak memory covers every step (``speed.PeakMemory``: ``torch.cuda.max_memory_allocated``
on CUDA, the growth of the peak RSS on CPU, over what the process held before its first step: the
inputs' pool is not counted, each step's drawn batch is). Before that, one step of the same case at
batch 64 loads the kernels' code (on CPU tens of MiB that do not depend on the batch size). Ratios
compare cases of the same run.

Targets printed next to the figures: peak memory at the larger batch at most
0.15x the peer's; our growth (peak at the larger batch / peak at the smaller) at most 5x for a 4x
batch (1.25x the batch factor for other pairs of batches); step time at most 1.0x the peer's, with
1.10x as the bar. Separate processes catch different phases of a shared machine, so the time
ratios of a CPU run move by 0.1 or more between runs (``speed.py``'s paired ratios are steadier);
raise ``--steps`` or ``--rounds`` for steadier medians.

``--chunk-size N`` passes ``chunk_size=N`` to our losses where their constructor accepts it
(``inspect.signature``); without it the losses choose (their default). The JSON records whether
the constructor took it.

Run: ``python benchmarks/large_batch.py --device cuda --out large_batch.json``; on a small machine
``--quick`` (CLIP and SigLIP 512 and 2048, NT-Xent 256 and 1024) or ``--batch-sizes 512 2048``
(every comparison).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
from typing import Any

import speed  # benchmarks/speed.py, beside this script
import torch

PAGE_IN_BATCH = 64
"""Batch of the step that loads the kernels' code before the peak is measured (:func:`page_in_code`)."""

COMPARISONS: dict[str, dict[str, Any]] = {
    "clip": {
        "title": "GloFNDClipLoss minibatch / open_clip ClipLoss",
        "ours": "clip_minibatch",
        "peer": "open_clip",
        "dim": 512,
        "batches": (4096, 16384),
        "quick": (512, 2048),
    },
    "siglip": {
        "title": "GloFNDSigLipLoss / open_clip SigLipLoss",
        "ours": "siglip_glofnd",
        "peer": "open_clip_siglip",
        "dim": 512,
        "batches": (4096, 16384),
        "quick": (512, 2048),
    },
    "ntxent": {
        "title": "GloFNDNTXent / lightly NTXentLoss",
        "ours": "glofnd_ntxent",
        "peer": "lightly_ntxent",
        "dim": 128,
        "batches": (2048, 8192),
        "quick": (256, 1024),
    },
}
MEMORY_TARGET = 0.15
"""Our peak memory at the larger batch over the peer's, at most."""
GROWTH_TARGET_PER_BATCH_FACTOR = 5 / 4
"""Our peak memory growth from the smaller to the larger batch, at most, per unit of batch factor (5x for 4x)."""
TIME_TARGET, TIME_BAR = 1.0, 1.10
"""Our step time over the peer's: the target, and the bar it must not pass."""


def chunk_kwargs(cls: Any, chunk_size: int | None) -> dict[str, int]:
    """``{"chunk_size": chunk_size}`` where ``cls`` accepts it and one is asked for, else nothing."""
    if chunk_size is None or not accepts_chunk_size(cls):
        return {}
    return {"chunk_size": chunk_size}


def accepts_chunk_size(cls: Any) -> bool:
    return "chunk_size" in inspect.signature(cls).parameters


def build_ours(case: str, num_samples: int, chunk_size: int | None) -> Any:
    """Our loss of ``case``, learning and filtering from the first step, with ``chunk_size`` where accepted."""
    from glofnd_losses import GloFNDClipLoss, GloFNDNTXent, GloFNDSigLipLoss

    if case == "siglip_glofnd":
        return GloFNDSigLipLoss(num_samples, detector="glofnd", start_epoch=0, chunk_size=chunk_size)
    if case == "clip_minibatch":
        return GloFNDClipLoss(
            num_samples, "minibatch", detector="glofnd", start_epoch=0, **chunk_kwargs(GloFNDClipLoss, chunk_size)
        )
    if case == "glofnd_ntxent":
        return GloFNDNTXent(
            num_samples, temperature=0.5, detector="glofnd", start_epoch=0, **chunk_kwargs(GloFNDNTXent, chunk_size)
        )
    raise ValueError(f"not one of our cases: {case}")


def page_in_code(case: str, ours: bool, args: argparse.Namespace) -> None:
    """One step of the case at a small batch before the peak is measured.

    A process's first call of each kernel pages in its library code and sets up thread pools:
    tens of MiB of resident memory on CPU that have nothing to do with the batch size (the losses
    call different kernels, so it would differ between them).
    """
    loss_fn = build_ours(case, args.num_samples, args.chunk_size) if ours else speed.build(case, args.num_samples)
    workload = speed.Workload(case, PAGE_IN_BATCH, args.dim, args.num_samples, args.device, False, loss_fn=loss_fn)
    workload.step(workload.draw())


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: one case's peak memory (MiB) and step times (seconds)."""
    case, batch = args.child, args.batch_sizes[0]
    ours = case in {comparison["ours"] for comparison in COMPARISONS.values()}
    page_in_code(case, ours, args)
    loss_fn = build_ours(case, args.num_samples, args.chunk_size) if ours else speed.build(case, args.num_samples)
    workload = speed.Workload(case, batch, args.dim, args.num_samples, args.device, False, loss_fn=loss_fn)
    peak = speed.PeakMemory(args.device)
    for _ in range(args.warmup_steps):
        workload.step(workload.draw())
    step_seconds = [workload.timed_steps(1) for _ in range(args.steps)]
    result: dict[str, Any] = {
        "peak_mib": peak.mib(),
        "seconds": statistics.median(step_seconds),
        "step_seconds": step_seconds,
    }
    if ours:
        result["training"], result["learning"] = loss_fn.training, bool(loss_fn.learning)
        result["filtering"] = bool(loss_fn.filtering)
        result["accepts_chunk_size"] = accepts_chunk_size(type(loss_fn))
        result["chunk_size_asked"] = args.chunk_size if result["accepts_chunk_size"] else None
    return result


def run_case(case: str, batch: int, dim: int, args: argparse.Namespace, env: dict[str, str] | None) -> dict[str, Any]:
    child_args = [
        "--child", case, "--batch-sizes", str(batch), "--dim", str(dim), "--num-samples", str(args.num_samples),
        "--device", args.device, "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
    ] + ([] if args.chunk_size is None else ["--chunk-size", str(args.chunk_size)])  # fmt: skip
    runs = [speed.run_child(child_args, env, script=__file__) for _ in range(args.rounds)]
    result = dict(runs[0])
    result["peak_mib"] = max(run["peak_mib"] for run in runs)
    result["seconds"] = statistics.median(run["seconds"] for run in runs)
    result["step_seconds"] = [seconds for run in runs for seconds in run["step_seconds"]]
    return result


def time_verdict(ratio: float) -> str:
    return "met" if ratio <= TIME_TARGET else ("within bar" if ratio <= TIME_BAR else "MISSED")


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def summarize(comparison: dict[str, Any], rows: dict[int, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Ratios, growth factors and targets of one comparison from its measured cases."""
    batches = sorted(rows)
    small, large = batches[0], batches[-1]
    per_batch = {
        batch: {
            "memory_ratio": rows[batch]["ours"]["peak_mib"] / max(rows[batch]["peer"]["peak_mib"], 1e-9),
            "time_ratio": rows[batch]["ours"]["seconds"] / rows[batch]["peer"]["seconds"],
        }
        for batch in batches
    }
    growth = {
        side: rows[large][side]["peak_mib"] / max(rows[small][side]["peak_mib"], 1e-9) for side in ("ours", "peer")
    }
    batch_factor = large / small
    growth_target = GROWTH_TARGET_PER_BATCH_FACTOR * batch_factor
    targets = {
        "memory_ratio_at_largest": {
            "value": per_batch[large]["memory_ratio"], "target": MEMORY_TARGET,
            "verdict": verdict(per_batch[large]["memory_ratio"] <= MEMORY_TARGET),
        },
        "our_growth": {
            "value": growth["ours"], "target": growth_target, "verdict": verdict(growth["ours"] <= growth_target)
        },
        "time_ratio": {
            str(batch): {
                "value": per_batch[batch]["time_ratio"], "target": TIME_TARGET, "bar": TIME_BAR,
                "verdict": time_verdict(per_batch[batch]["time_ratio"]),
            }
            for batch in batches
        },
    }  # fmt: skip
    return {
        "ratios": per_batch,
        "growth": {**growth, "from_batch": small, "to_batch": large, "batch_factor": batch_factor},
        "targets": targets,
    }


def print_summary(comparison: dict[str, Any], summary: dict[str, Any]) -> None:
    growth, targets = summary["growth"], summary["targets"]
    print(f"\n{comparison['title']} (dim {comparison['dim']}): ours / peer, same run")
    for batch, ratio in summary["ratios"].items():
        print(
            f"  batch {batch:>6}: memory {ratio['memory_ratio']:6.3f}x, time {ratio['time_ratio']:5.2f}x "
            f"(target <= {TIME_TARGET:.2f}x, bar {TIME_BAR:.2f}x: {targets['time_ratio'][str(batch)]['verdict']})"
        )
    memory = targets["memory_ratio_at_largest"]
    print(
        f"  memory at batch {growth['to_batch']}: {memory['value']:.3f}x the peer "
        f"(target <= {MEMORY_TARGET:.2f}x: {memory['verdict']})"
    )
    print(
        f"  growth, peak at {growth['to_batch']} / peak at {growth['from_batch']} ({growth['batch_factor']:g}x batch): "
        f"ours {growth['ours']:.2f}x, peer {growth['peer']:.2f}x "
        f"(target ours <= {targets['our_growth']['target']:.2f}x: {targets['our_growth']['verdict']})"
    )


def parse_arguments() -> argparse.Namespace:
    """This script's flags, checked, with ``--warmup-steps``'s default for the device filled in."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    speed.add_machine_arguments(parser)
    parser.set_defaults(batch_sizes=None, dim=None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small batches: CLIP 512 and 2048, NT-Xent 256 and 1024 (see --batch-sizes)",
    )
    parser.add_argument(
        "--comparisons", nargs="+", choices=sorted(COMPARISONS), default=list(COMPARISONS), help="what to measure"
    )
    parser.add_argument("--steps", type=int, default=2, help="timed forward+backward steps per process (median)")
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="untimed steps before them, in the peak (default: 1 on CUDA, whose first step initialises its "
        "libraries; 0 elsewhere)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="processes per case (median time, largest peak)")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="rows per chunk, to our losses that accept it (default: theirs)"
    )
    parser.add_argument("--out", default=None, help="write the measurements and ratios as JSON")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup_steps is None:
        args.warmup_steps = 1 if args.device.startswith("cuda") else 0
    if args.steps < 1 or args.warmup_steps < 0 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1, --warmup-steps >= 0")
    if args.batch_sizes is not None and len(args.batch_sizes) < 2 and not args.child:
        parser.error("--batch-sizes needs two sizes or more (growth: the largest over the smallest)")
    return args


def announce_run(args: argparse.Namespace) -> dict[str, Any]:
    """Print the run's settings; the results' skeleton, with the same settings and the targets."""
    device_name = speed.device_label(args.device)
    allocator = "glibc keeps freed memory" if args.keep_freed_memory else "default allocator settings"
    chunking = "chunk_size: the losses' default" if args.chunk_size is None else f"chunk_size={args.chunk_size}"
    print(
        f"device: {device_name}, torch {torch.__version__}, a fresh process per case, {args.warmup_steps} untimed + "
        f"{args.steps} timed steps (median) x {args.rounds} rounds, {allocator}, {chunking}\n"
    )
    return {
        "device": device_name, "torch": torch.__version__, "allocator": allocator,
        "settings": {
            "steps": args.steps, "warmup_steps": args.warmup_steps, "rounds": args.rounds,
            "num_samples": args.num_samples, "chunk_size": args.chunk_size,
        },
        "targets": {
            "memory_ratio_at_largest": MEMORY_TARGET, "growth_per_batch_factor": GROWTH_TARGET_PER_BATCH_FACTOR,
            "time_ratio": TIME_TARGET, "time_bar": TIME_BAR,
        },
        "comparisons": {},
    }  # fmt: skip


def measure_comparison(key: str, args: argparse.Namespace, env: dict[str, str] | None) -> dict[str, Any]:
    """Both sides of comparison ``key`` at each of its batch sizes, a table row each; with its summary."""
    comparison = COMPARISONS[key]
    dim = args.dim or comparison["dim"]
    batches = args.batch_sizes or (comparison["quick"] if args.quick else comparison["batches"])
    rows: dict[int, dict[str, dict[str, Any]]] = {}
    for batch in sorted(batches):
        rows[batch] = {}
        for side in ("ours", "peer"):
            case = comparison[side]
            rows[batch][side] = row = run_case(case, batch, dim, args, env)
            print(
                f"{batch:>6} | {dim:>4} | {speed.ALL_CASES[case]:<42} | {row['peak_mib']:>10.1f} "
                f"| {1e3 * row['seconds']:>9.1f}",
                flush=True,
            )
    summary = summarize(comparison, rows)
    return {
        "title": comparison["title"], "ours": comparison["ours"], "peer": comparison["peer"], "dim": dim,
        "cases": {str(batch): row for batch, row in rows.items()}, **summary,
    }  # fmt: skip


def main() -> None:
    args = parse_arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args)))
        return

    env = {**os.environ, **speed.KEEP_FREED_MEMORY} if args.keep_freed_memory else None
    results = announce_run(args)
    header = f"{'batch':>6} | {'dim':>4} | {'case':<42} | {'peak MiB':>10} | {'step ms':>9}"
    print(header + "\n" + "-" * len(header))
    for key in args.comparisons:
        results["comparisons"][key] = measure_comparison(key, args, env)
    for key in args.comparisons:
        print_summary(results["comparisons"][key], results["comparisons"][key])
    if args.out:
        speed.write_json(args.out, results)
        print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
