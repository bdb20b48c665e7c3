"""Forward+backward time and peak memory of the GloFND losses against their peers, as ratios.

Every configuration first runs in its own subprocess (clean memory high-water mark) on the same
inputs; ratios are taken between configurations measured in the same invocation, because absolute
times on shared machines are noise. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and
the growth of the process's peak RSS over its pre-loss baseline on CPU.

Time ratios are also measured paired (``--paired-blocks``, on by default; ``--rounds`` does not
apply): for each comparison one more process holds both losses and runs blocks of steps of each
in the order A B B A, A B B A, ... (``measure_paired``); each such group gives one ratio, A's two
blocks over B's two, and the median over the groups is printed with its quartiles. On a shared
machine whose speed drifts by tens of percent over seconds to minutes, separate processes can
each catch a different phase, so that their ratios for identical code move by 0.1 or more between
runs; a slow phase slows both halves of a group alike.

Comparisons (dim 128):

* ``GloFNDNTXent`` (GloFND, filtering active) vs lightly's ``NTXentLoss``;
* ``GloFNDSogCLRLoss`` with GloFND vs without a detector (SogCLR alone);
* ``GloFNDClipLoss("minibatch")`` (GloFND, filtering active) vs open_clip's ``ClipLoss``, and
  with vs without GloFND;
* ``GloFNDClipLoss("fastclip")`` with GloFND vs without a detector;
* ``GloFNDSogCLRLoss`` per-step time with ``num_samples`` 10^3 vs 10^7 (cost independent of N).

GloFND cases are timed in the steady state, after the first epoch: the data set is a few batches'
worth of fixed random embeddings, reshuffled into new batches at every step; after some warm-up
epochs (thresholds learned) every sample is marked visited and ``set_epoch`` lets the loss find
out, so no first-visit work is done. The ``(first epoch)`` case times steps on never-seen samples.
The ``rule w/o stop`` case is ``ThresholdOptimizer.clipped()``. ``topk rows`` counts the anchors
per anchor and step whose batch quantile took a ``topk`` (the default rule's stop: every anchor at
every learning step). ``ops`` is the number of
ATen operators a step dispatches (forward and backward, views included): a host-side cost
independent of the batch size (on a GPU, most of them launch a kernel).

On CPU, every new large temporary tensor is fresh memory from the operating system (glibc maps
blocks of this size anew for every allocation) and its first touch costs page faults; on some
virtual machines that costs more than the arithmetic on it, and it varies from run to run.
``--keep-freed-memory`` tells glibc's allocator (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``) in every measured process to keep freed memory for reuse, as the CUDA
caching allocator does on a GPU, so that the ratios measure the computation. Both settings apply
to every case alike.

``--compile`` compiles every loss, ours and the peers alike, with ``torch.compile`` (inductor,
``nn.Module.compile``); compilation happens in the untimed warm-up steps, and ``ops`` is not
counted, nor are ``topk rows`` (the counters would themselves change what is compiled). ``--cases`` measures a subset.

Run: ``python benchmarks/speed.py --batch-sizes 256 1024 4096`` (add ``--device cuda`` on a GPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

CASES = {
    "lightly_ntxent": "lightly NTXentLoss",
    "glofnd_ntxent": "GloFNDNTXent (GloFND filtering)",
    "sogclr_plain": "GloFNDSogCLRLoss (no detector)",
    "sogclr_glofnd": "GloFNDSogCLRLoss (GloFND filtering)",
    "sogclr_glofnd_first_epoch": "GloFNDSogCLRLoss (GloFND, first epoch)",
    "sogclr_glofnd_no_stop": "GloFNDSogCLRLoss (GloFND, rule w/o stop)",
    "open_clip": "open_clip ClipLoss",
    "clip_minibatch_plain": "GloFNDClipLoss minibatch (no detector)",
    "clip_minibatch": "GloFNDClipLoss minibatch (GloFND)",
    "fastclip_plain": "GloFNDClipLoss fastclip (no detector)",
    "fastclip_glofnd": "GloFNDClipLoss fastclip (GloFND)",
    "open_clip_siglip": "open_clip SigLipLoss",
    "siglip_plain": "GloFNDSigLipLoss (no detector)",
    "siglip_glofnd": "GloFNDSigLipLoss (GloFND)",
}
LADDER_CASES = {
    "sogclr_frozen": "GloFNDSogCLRLoss (GloFND, filter only)",
    "sogclr_paper": "GloFNDSogCLRLoss (GloFND, paper's rule)",
    "clip_minibatch_frozen": "GloFNDClipLoss minibatch (GloFND, filter only)",
    "clip_minibatch_paper": "GloFNDClipLoss minibatch (GloFND, paper's rule)",
    "fastclip_frozen": "GloFNDClipLoss fastclip (GloFND, filter only)",
    "fastclip_paper": "GloFNDClipLoss fastclip (GloFND, paper's rule)",
}
"""Rungs of ``benchmarks/cost_ladder.py`` (not in this script's default run): ``filter only`` is the
steady state's loss in ``eval()`` mode (the learned thresholds mask the negatives, nothing is
learned or written), ``paper's rule`` learns with ``ThresholdOptimizer.paper()`` (no score spread,
no stop at the batch quantile)."""
ALL_CASES = {**CASES, **LADDER_CASES}
CLIP_CASES = {
    "open_clip", "clip_minibatch_plain", "clip_minibatch", "fastclip_plain",
    "fastclip_glofnd", "clip_minibatch_frozen", "clip_minibatch_paper", "fastclip_frozen", "fastclip_paper",
    "open_clip_siglip", "siglip_plain", "siglip_glofnd",
}  # fmt: skip
SIGLIP_CASES = {"open_clip_siglip", "siglip_plain", "siglip_glofnd"}
SIGLIP_BIAS = -10.0
"""SigLIP's initial logit bias (open_clip's ``init_logit_bias`` for SigLIP models)."""


def build(case: str, num_samples: int) -> Any:
    from glofnd_losses import GloFNDClipLoss, GloFNDNTXent, GloFNDSigLipLoss, GloFNDSogCLRLoss, ThresholdOptimizer

    optimizer = ThresholdOptimizer.paper() if case.endswith("_paper") else None
    if case == "open_clip":
        from open_clip.loss import ClipLoss

        return ClipLoss()
    if case == "open_clip_siglip":
        from open_clip.loss import SigLipLoss

        return SigLipLoss()
    if case.startswith("siglip"):
        return GloFNDSigLipLoss(num_samples, alpha=1e-3, detector=None if "plain" in case else "glofnd")
    if case.startswith("clip_minibatch"):
        return GloFNDClipLoss(
            num_samples,
            estimator="minibatch",
            alpha=1e-3,
            detector=None if "plain" in case else "glofnd",
            threshold_optimizer=optimizer,
        )
    if case.startswith("fastclip"):
        return GloFNDClipLoss(
            num_samples,
            estimator="fastclip",
            alpha=1e-3,
            detector=None if "plain" in case else "glofnd",
            threshold_optimizer=optimizer,
        )
    if case == "lightly_ntxent":
        from lightly.loss import NTXentLoss

        return NTXentLoss(temperature=0.5)
    if case == "glofnd_ntxent":
        return GloFNDNTXent(num_samples, temperature=0.5, alpha=0.01)
    if case == "sogclr_plain":
        return GloFNDSogCLRLoss(num_samples, detector=None)
    if case == "sogclr_glofnd_no_stop":
        return GloFNDSogCLRLoss(num_samples, alpha=0.01, threshold_optimizer=ThresholdOptimizer.clipped())
    return GloFNDSogCLRLoss(num_samples, alpha=0.01, threshold_optimizer=optimizer)


def settle(loss_fn: Any) -> None:
    """Put a GloFND loss in its steady state: every sample counts as visited (see the module doc)."""
    for name in loss_fn.state.fields:
        if name.endswith("threshold_visits"):
            loss_fn.state.buffer(name).clamp_(min=1)
    loss_fn.set_epoch(loss_fn.epoch)  # starts the loss's own check of the visit counts


class QuantileRowCounter:
    """Counts the anchors whose batch quantile the losses compute with a ``topk``."""

    def __init__(self) -> None:
        from glofnd_losses import functional

        self.rows = 0
        self.original = functional.pooled_quantile
        functional.pooled_quantile = self.counting  # type: ignore[assignment]

    def counting(self, scores: torch.Tensor, *args: Any) -> torch.Tensor:
        self.rows += scores.shape[1]
        return self.original(scores, *args)  # type: ignore[no-any-return]


class Workload:
    """One case's loss on the benchmark's data set, ready to time after :meth:`warm_up`.

    The data set is ``min(num_samples, POOL_BATCHES * batch)`` fixed random embeddings (seed 0:
    the same for every case of a batch size and data set size), reshuffled into new batches at
    every draw. Steady-state cases first train ``WARMUP_EPOCHS`` epochs over it (the thresholds
    learn its quantiles); every sample is then marked visited (:func:`settle`). The first-epoch
    case is timed on batches of samples it has never seen (fresh indices from the top of
    ``num_samples`` at every draw).
    """

    def __init__(
        self, case: str, batch: int, dim: int, num_samples: int, device: str, compiled: bool, loss_fn: Any = None
    ) -> None:
        torch.manual_seed(0)
        self.case, self.batch, self.device, self.num_samples = case, batch, device, num_samples
        if loss_fn is None:  # another script may hand in the case's loss built its own way (large_batch.py)
            loss_fn = build(case, num_samples)
        if hasattr(loss_fn, "to"):
            loss_fn = loss_fn.to(device)
        if compiled:
            loss_fn.compile()
        self.loss_fn = loss_fn
        self.pool_size = min(num_samples, POOL_BATCHES * batch)
        self.pool = torch.randn(2, self.pool_size, dim, device=device)  # two views of pool_size samples
        self.pool_indices = torch.randperm(num_samples, device=device)[: self.pool_size]
        self.first_epoch = case.endswith("first_epoch")
        self.logit_scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
        self.logit_bias = torch.tensor(SIGLIP_BIAS, device=device, requires_grad=True)
        self.generator = torch.Generator(device=device).manual_seed(1)
        self.compiled = compiled
        self.cuda = device.startswith("cuda")
        self.draws = 0

    def warm_up(self) -> Workload:
        """Untimed steps up to the state to time (the first one reaches the peak memory)."""
        warmup_steps = 1 if self.first_epoch else WARMUP_EPOCHS * (self.pool_size // self.batch)
        for _ in range(warmup_steps):
            self.step(self.draw())
        if hasattr(self.loss_fn, "state") and not self.first_epoch:
            settle(self.loss_fn)
            if self.compiled:  # the steady state is a phase of its own (no first-visit work): compile it untimed
                for _ in range(2):
                    self.step(self.draw())
        if self.case.endswith("_frozen"):
            self.loss_fn.eval()  # filters with the learned thresholds, learns and writes nothing
        return self

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch of the pool (shuffled anew each time, as epochs reshuffle a data set)."""
        rows = torch.randperm(self.pool_size, generator=self.generator, device=self.device)[: self.batch]
        out0, out1 = (view[rows].requires_grad_() for view in self.pool)
        self.draws += 1
        if self.first_epoch:  # never-seen samples: the same embeddings under fresh indices
            first = self.num_samples - self.batch * self.draws
            if first < 0:
                raise ValueError(f"num_samples={self.num_samples} is too small for {self.draws} first-epoch batches")
            return out0, out1, first + torch.arange(self.batch, device=self.device)
        return out0, out1, self.pool_indices[rows]

    def step(self, batch_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """One forward + backward."""
        out0, out1, batch_indices = batch_inputs
        if self.case in CLIP_CASES:  # open_clip's models hand the loss normalised features
            images, texts = torch.nn.functional.normalize(out0, dim=1), torch.nn.functional.normalize(out1, dim=1)
            extra = {} if self.case.startswith("open_clip") else {"indices": batch_indices}
            if self.case in SIGLIP_CASES:
                extra["logit_bias"] = self.logit_bias
            loss = self.loss_fn(images, texts, self.logit_scale, **extra)
        elif self.case == "lightly_ntxent":
            loss = self.loss_fn(out0, out1)
        else:
            loss = self.loss_fn(out0, out1, batch_indices)
        loss.backward()

    def timed_steps(self, count: int) -> float:
        """Mean seconds of ``count`` steps on freshly drawn batches (drawn before the clock starts)."""
        inputs = [self.draw() for _ in range(count)]
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch_inputs in inputs:
            self.step(batch_inputs)
        if self.cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / count


class PeakMemory:
    """The peak extra memory of this process from its creation on, in MiB (see the module doc).

    On CUDA, ``torch.cuda.max_memory_allocated`` over what was allocated at creation (the peak
    statistics are reset); on CPU, the growth of the process's peak RSS (``ru_maxrss``) over its
    value at creation, so a process measures one case: its high-water mark never comes down.
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_cuda = torch.cuda.memory_allocated()

    def mib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.baseline_cuda) / 2**20
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.baseline_rss) / 1024


def measure(
    case: str, batch: int, dim: int, num_samples: int, device: str, repeats: int, compiled: bool = False
) -> dict[str, float]:
    """Run in a fresh process: median forward+backward seconds and peak extra memory in MiB.

    ``quantile_rows`` is the number of anchors per anchor and step whose batch quantile (a
    ``topk``) was computed (2 at most: CLIP's two banks); ``ops`` the ATen operators per step.
    """
    workload = Workload(case, batch, dim, num_samples, device, compiled)
    peak = PeakMemory(device)
    workload.warm_up()
    counter = None if compiled else QuantileRowCounter()  # replacing a function a graph calls would recompile it
    times = [workload.timed_steps(1) for _ in range(repeats)]
    peak_mib = peak.mib()
    quantile_rows = float("nan") if counter is None else counter.rows / (repeats * batch)
    ops = float("nan") if compiled else count_ops(workload.step, [workload.draw() for _ in range(OP_COUNT_STEPS)])
    return {
        "seconds": statistics.median(times), "peak_mib": peak_mib, "quantile_rows": quantile_rows, "ops": ops
    }  # fmt: skip


def abba_group_ratios(time_blocks: list[Callable[[], float]], groups: int) -> tuple[list[list[float]], list[float]]:
    """Time two sides in groups of blocks ``A B B A``; each group gives the ratio ``A / B``.

    Each side's two blocks sit symmetrically around the group's middle, so a drift of the
    machine's speed within a group cancels to first order.

    Args:
        time_blocks: Two callables (A, then B), each running one block and returning its seconds.
        groups: Number of groups.

    Returns:
        Each side's block times, and one ratio per group (A's two blocks over B's two).
    """
    seconds: list[list[float]] = [[], []]
    for _ in range(groups):
        for side in (0, 1, 1, 0):
            seconds[side].append(time_blocks[side]())
    ratios = [
        (seconds[0][block] + seconds[0][block + 1]) / (seconds[1][block] + seconds[1][block + 1])
        for block in range(0, 2 * groups, 2)
    ]
    return seconds, ratios


def measure_paired(
    mine: str,
    peer: str,
    batch: int,
    dim: int,
    num_samples: int,
    device: str,
    blocks: int,
    steps_per_block: int,
    compiled: bool = False,
    sample_counts: tuple[int, int] | None = None,
) -> dict[str, float]:
    """Run in a fresh process: the time ratio ``mine / peer`` from interleaved blocks of steps.

    Both losses live in this one process. After one untimed block of each (so that a switch
    between them is in every timed block, the first included), they take turns in groups of four
    blocks, mine-peer-peer-mine: within a group each side runs once after a switch and once after
    the other side's switch, and each side's two blocks sit symmetrically around the group's middle,
    so that a drift of the machine's speed within the group cancels to first order. Each group
    gives one ratio: mine's two blocks over peer's two. A slow phase of the machine (other tenants,
    clock changes: seconds to minutes long) then slows both sides of a ratio alike, where separate
    processes (:func:`measure`) catch it on one side only.

    Args:
        mine: Case in the numerator.
        peer: Case in the denominator.
        batch: Batch size.
        dim: Embedding dimension.
        num_samples: Data set size of both sides (raised for both, alike, to what a first-epoch
            case needs for never-seen indices in every block).
        device: Device.
        blocks: Timed blocks per side, even and at least 2 (two per group; checked by ``main``).
        steps_per_block: Steps per block.
        compiled: ``torch.compile`` both losses.
        sample_counts: Different data set sizes for the two sides (as given), instead of
            ``num_samples``.

    Returns:
        The median ratio over the groups and its quartiles (the range below 4 groups), and each
        side's median step time.
    """
    if sample_counts is None:
        first_epoch_draws = (blocks + 2) * steps_per_block * batch
        needs_fresh = mine.endswith("first_epoch") or peer.endswith("first_epoch")
        sample_counts = (max(num_samples, first_epoch_draws),) * 2 if needs_fresh else (num_samples, num_samples)
    workloads = [
        Workload(case, batch, dim, samples, device, compiled).warm_up()
        for case, samples in zip((mine, peer), sample_counts)
    ]
    for workload in workloads:
        workload.timed_steps(steps_per_block)
    seconds, group_ratios = abba_group_ratios(
        [functools.partial(workload.timed_steps, steps_per_block) for workload in workloads], blocks // 2
    )
    return paired_summary(seconds, group_ratios)


def paired_summary(seconds: list[list[float]], group_ratios: list[float]) -> dict[str, float]:
    """What :func:`abba_group_ratios` gave, as reported: the median ratio over the groups and its
    quartiles (the range below 4 groups), and each side's median block time."""
    low, high = (
        statistics.quantiles(group_ratios, n=4)[::2]
        if len(group_ratios) >= 4
        else (min(group_ratios), max(group_ratios))
    )
    return {
        "ratio": statistics.median(group_ratios),
        "ratio_q1": low,
        "ratio_q3": high,
        "mine_seconds": statistics.median(seconds[0]),
        "peer_seconds": statistics.median(seconds[1]),
    }


OP_COUNT_STEPS = 3
"""Untimed steps over which ``count_ops`` averages (after the timed ones)."""


def count_ops(step: Any, inputs: list[Any]) -> float:
    """Mean number of ATen operators dispatched per forward+backward step.

    Each is a dispatch on the host whatever the batch size, so they dominate small batches.
    Counted in untimed steps, because counting slows them.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            Counter.calls += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        for batch_inputs in inputs:
            step(batch_inputs)
    return Counter.calls / len(inputs)


POOL_BATCHES = 4
"""Size of the benchmark's data set, in batches."""
WARMUP_EPOCHS = 3
"""Epochs over those batches before the steady-state cases are timed."""


KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36)}


def paired_cell(row: dict[str, float]) -> str:
    """A paired ratio as printed: median and quartiles."""
    return f"{row['ratio']:.2f}x ({row['ratio_q1']:.2f}-{row['ratio_q3']:.2f})"


def run_child(child_args: list[str], env: dict[str, str] | None, script: str = __file__) -> dict[str, Any]:
    """Run ``script`` (this one by default) with ``child_args`` in a fresh process, with this
    process's torch thread count; its last output line is a JSON dict."""
    command = [sys.executable, script, *child_args, "--threads", str(torch.get_num_threads())]
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if completed.returncode:  # the child's traceback, rather than only its exit status
        sys.stderr.write(completed.stderr)
        completed.check_returncode()
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def run_isolated(
    case: str,
    batch: int,
    dim: int,
    num_samples: int,
    device: str,
    repeats: int,
    env: dict[str, str] | None,
    compiled: bool = False,
) -> dict[str, float]:
    return run_child(
        [
            "--child", case, "--batch-sizes", str(batch), "--dim", str(dim), "--num-samples", str(num_samples),
            "--device", device, "--repeats", str(repeats),
        ] + (["--compile"] if compiled else []),
        env,
    )  # fmt: skip


def run_paired(
    mine: str,
    peer: str,
    batch: int,
    args: argparse.Namespace,
    env: dict[str, str] | None,
    sample_counts: tuple[int, int] | None = None,
) -> dict[str, float]:
    counts = [] if sample_counts is None else ["--pair-num-samples", *map(str, sample_counts)]
    return run_child(
        [
            "--child-pair", mine, peer, *counts, "--batch-sizes", str(batch), "--dim", str(args.dim),
            "--num-samples", str(args.num_samples), "--device", args.device,
            "--paired-blocks", str(args.paired_blocks), "--steps-per-block", str(args.steps_per_block),
        ] + (["--compile"] if args.compile else []),
        env,
    )  # fmt: skip


def combine_rounds(runs: list[dict[str, float]]) -> dict[str, float]:
    """Median time and largest peak memory over the rounds of one case."""
    return {
        "seconds": statistics.median(run["seconds"] for run in runs),
        "peak_mib": max(run["peak_mib"] for run in runs),
        "quantile_rows": statistics.median(run["quantile_rows"] for run in runs),
        "ops": statistics.median(run["ops"] for run in runs),
    }


def add_machine_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments this script shares with the scripts that run its cases (``cost_ladder.py``)."""
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=100_000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="measured processes keep freed memory for reuse (glibc settings; see speed.py's docstring)",
    )


def device_label(device: str) -> str:
    """The measuring machine, as the reports name it."""
    return torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"


PAIRS = (
    ("GloFNDNTXent / lightly", "glofnd_ntxent", "lightly_ntxent"),
    ("SogCLR GloFND on / off", "sogclr_glofnd", "sogclr_plain"),
    ("SogCLR 1st epoch on / off", "sogclr_glofnd_first_epoch", "sogclr_plain"),
    ("SogCLR no-stop rule on / off", "sogclr_glofnd_no_stop", "sogclr_plain"),
    ("Clip minibatch / open_clip", "clip_minibatch", "open_clip"),
    ("Clip minibatch on / off", "clip_minibatch", "clip_minibatch_plain"),
    ("FastCLIP GloFND on / off", "fastclip_glofnd", "fastclip_plain"),
)
"""The ratios reported: (title, case in the numerator, case in the denominator)."""


def parse_arguments() -> argparse.Namespace:
    """This script's flags, checked (the hidden ``--child*`` ones run one measurement in a fresh process)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_machine_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per process (median taken)")
    parser.add_argument("--rounds", type=int, default=3, help="processes per case, interleaved (median taken)")
    parser.add_argument(
        "--scaling-batch", type=int, default=512, help="batch of the data set size sweep (<= 1000; 0: no sweep)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile every loss (see the module docstring)")
    parser.add_argument("--cases", nargs="+", choices=sorted(ALL_CASES), default=list(CASES), help="cases to measure")
    parser.add_argument(
        "--paired-blocks",
        type=int,
        default=16,
        help="timed blocks per side of the paired time ratios, even (0: no paired ratios)",
    )
    parser.add_argument("--steps-per-block", type=int, default=2, help="steps per block of the paired ratios")
    parser.add_argument("--out", default=None, help="write all measurements as JSON")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-pair", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pair-num-samples", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.paired_blocks < 0 or args.paired_blocks % 2 or args.steps_per_block < 1:
        parser.error("--paired-blocks must be even and >= 0, --steps-per-block >= 1")
    return args


def child_measurement(args: argparse.Namespace) -> dict[str, float]:
    """What a ``--child`` (one case) or ``--child-pair`` (a paired ratio) process measures."""
    if args.child:
        return measure(
            args.child, args.batch_sizes[0], args.dim, args.num_samples, args.device, args.repeats, args.compile
        )
    mine, peer = args.child_pair
    return measure_paired(
        mine, peer, args.batch_sizes[0], args.dim, args.num_samples, args.device, args.paired_blocks,
        args.steps_per_block, args.compile, args.pair_num_samples,
    )  # fmt: skip


def announce_run(args: argparse.Namespace) -> dict[str, Any]:
    """Print the run's settings; the results' skeleton, with the same settings."""
    device_name = device_label(args.device)
    allocator = "glibc keeps freed memory" if args.keep_freed_memory else "default allocator settings"
    mode = "torch.compile (inductor), every loss" if args.compile else "eager"
    print(
        f"device: {device_name}, torch {torch.__version__}, dim {args.dim}, median of {args.repeats} steps "
        f"x {args.rounds} rounds, {allocator}, {mode}\n"
    )
    return {"device": device_name, "allocator": allocator, "mode": mode, "batches": {}, "scaling": {}}


def measure_cases(
    cases: list[str], args: argparse.Namespace, child_env: dict[str, str] | None
) -> dict[int, dict[str, dict[str, float]]]:
    """Every case at every batch size, each in processes of its own; printed as a table, row by row."""
    header = f"{'batch':>6} | {'case':<38} | {'time ms':>9} | {'peak MiB':>9} | {'topk rows':>9} | {'ops':>5}"
    print(header + "\n" + "-" * len(header))
    by_batch: dict[int, dict[str, dict[str, float]]] = {}
    for batch in args.batch_sizes:
        runs: dict[str, list[dict[str, float]]] = {case: [] for case in cases}
        for _ in range(args.rounds):  # rounds interleave the cases, so slow phases of the machine hit all
            for case in cases:
                runs[case].append(
                    run_isolated(
                        case, batch, args.dim, args.num_samples, args.device, args.repeats, child_env, args.compile
                    )
                )
        rows = {case: combine_rounds(case_runs) for case, case_runs in runs.items()}
        by_batch[batch] = rows
        for case, row in rows.items():
            print(
                f"{batch:>6} | {ALL_CASES[case]:<38} | {1e3 * row['seconds']:>9.1f} | {row['peak_mib']:>9.1f} "
                f"| {row['quantile_rows']:>9.3f} | {row['ops']:>5.0f}"
            )
    return by_batch


def print_same_run_ratios(pairs: list[tuple[str, str, str]], by_batch: dict[int, dict[str, dict[str, float]]]) -> None:
    """Time and peak memory ratios of each pair, from the separate processes of :func:`measure_cases`."""
    print("\nratios (same run): time, peak memory")
    print(f"{'batch':>6} | " + " | ".join(f"{title:>27}" for title, _, _ in pairs))
    for batch, rows in by_batch.items():
        cells = []
        for _, mine, peer in pairs:
            time_ratio = rows[mine]["seconds"] / rows[peer]["seconds"]
            memory_ratio = rows[mine]["peak_mib"] / max(rows[peer]["peak_mib"], 1e-9)
            cells.append(f"{time_ratio:12.2f}x {memory_ratio:12.2f}x")
        print(f"{batch:>6} | " + " | ".join(cells))


def measure_paired_ratios(
    pairs: list[tuple[str, str, str]], args: argparse.Namespace, child_env: dict[str, str] | None
) -> dict[int, dict[str, dict[str, float]]]:
    """Each pair's paired time ratio (one process per pair) at every batch size, printed as a table."""
    print(
        f"\ntime ratios, paired: both losses in one process per pair, {args.paired_blocks // 2} groups of "
        f"blocks of {args.steps_per_block} steps (A B B A); median (quartiles) of the groups' ratios"
    )
    print(f"{'batch':>6} | " + " | ".join(f"{title:>27}" for title, _, _ in pairs))
    by_batch: dict[int, dict[str, dict[str, float]]] = {}
    for batch in args.batch_sizes:
        paired = {title: run_paired(mine, peer, batch, args, child_env) for title, mine, peer in pairs}
        by_batch[batch] = paired
        print(f"{batch:>6} | " + " | ".join(f"{paired_cell(row):>27}" for row in paired.values()))
    return by_batch


def measure_scaling(args: argparse.Namespace, child_env: dict[str, str] | None) -> dict[str, Any]:
    """``GloFNDSogCLRLoss``'s step time at data set sizes 10^3 and 10^7, printed.

    Returns:
        The results' ``"scaling"`` entry (a row per data set size) and, with paired ratios on,
        their ``"scaling_paired"`` entry (the paired ratio 10^7 / 10^3).
    """
    print(f"\nper-step time vs data set size (GloFNDSogCLRLoss, batch {args.scaling_batch})")
    scaling: dict[int, dict[str, float]] = {}
    for num_samples in (10**3, 10**7):
        row = combine_rounds(
            [
                run_isolated(
                    "sogclr_glofnd", args.scaling_batch, args.dim, num_samples, args.device, args.repeats,
                    child_env, args.compile,
                )
                for _ in range(args.rounds)
            ]
        )  # fmt: skip
        scaling[num_samples] = row
        print(f"  num_samples {num_samples:>10,}: {1e3 * row['seconds']:8.1f} ms")
    small, large = scaling[10**3]["seconds"], scaling[10**7]["seconds"]
    print(f"  ratio 10^7 / 10^3: {large / small:.2f}x")
    entries: dict[str, Any] = {"scaling": scaling}
    if args.paired_blocks > 0:
        row = run_paired("sogclr_glofnd", "sogclr_glofnd", args.scaling_batch, args, child_env, (10**7, 10**3))
        entries["scaling_paired"] = row
        print(f"  ratio 10^7 / 10^3, paired: {paired_cell(row)}")
    return entries


def write_json(path: str, results: dict[str, Any]) -> None:
    """Write ``results`` to ``path`` as indented JSON (the ``--out`` file of the benchmark scripts)."""
    with open(path, "w") as handle:
        json.dump(results, handle, indent=2)


def main() -> None:
    args = parse_arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    child_env = {**os.environ, **KEEP_FREED_MEMORY} if args.keep_freed_memory else None
    if args.child or args.child_pair:
        print(json.dumps(child_measurement(args)))
        return

    results = announce_run(args)
    cases = [case for case in ALL_CASES if case in args.cases]
    results["batches"] = measure_cases(cases, args, child_env)
    pairs = [(title, mine, peer) for title, mine, peer in PAIRS if mine in cases and peer in cases]
    print_same_run_ratios(pairs, results["batches"])
    if args.paired_blocks > 0 and pairs:
        results["paired"] = measure_paired_ratios(pairs, args, child_env)
    if args.scaling_batch > 0:
        results.update(measure_scaling(args, child_env))
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
