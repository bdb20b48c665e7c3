"""The whole SimCLR training step with ``GloFNDNTXent`` against lightly's ``NTXentLoss``: a paired time ratio.

The model is timm's ``resnet18`` (``pretrained=False, num_classes=0``, its stem adapted to 32x32
images: a 3x3 stride-1 ``conv1`` and no max-pool, as ``build_simclr_model(small_images=True)``
does) and lightly's ``SimCLRProjectionHead(512, 512, 128)``; a step is the forward of both views
(one forward of the concatenated batch), the loss, the backward and an SGD step (momentum 0.9,
weight decay 5e-4). The inputs are random 32x32 images: a pool of four batches of fixed pairs of
views, reshuffled into a new batch at every step, with a data set index per pair (``num_samples``
indices drawn at random).

Both sides live in one process per batch size, each with its own copy of the same initial model
and its own optimizer, on the same sequence of batches: ``GloFNDNTXent(num_samples,
temperature=0.5)`` learning thresholds and filtering from the first step (``detector="glofnd"``,
``start_epoch=0``, training mode) and ``NTXentLoss(temperature=0.5)``. After ``--warmup-steps``
untimed steps of each, they take turns in groups of four blocks of ``--steps`` steps, ours-peer-
peer-ours (``speed.abba_group_ratios``); each group gives one ratio, ours over the peer, and the
median over the groups is reported with its quartiles (``speed.paired_summary``). A slow phase of
a shared machine then slows both sides of a ratio alike.

After the timed steps, each side's loss alone (forward and backward on one batch's projections,
held fixed: ``--loss-repeats`` timings, median) gives the ratio the losses alone would make of the
peer's step, ``1 + (ours - peer's) / peer's step``: a step ratio far from it is the machine's noise.

``--chunk-size N`` passes ``chunk_size=N`` to ``GloFNDNTXent`` where its constructor accepts it.
``--autocast bf16`` runs the forward under ``torch.autocast`` in bfloat16 (both sides).

The defaults depend on the device: on CPU 1 warm-up step and 1 group of 1-step blocks per batch
size: 6 steps of each batch size, the fewest that give a ratio. A step of batch 128 took
about 30 s on a shared 2-core machine under load (load average about 6), one of batch 512 about
four times that: run ``--batch-sizes 128`` there (3 minutes). Elsewhere 3 warm-up steps and 8
groups of 5-step blocks.

Run: ``python benchmarks/train_step.py --device cuda --out train_step.json`` (CPU: ``--device cpu``).
"""

from __future__ import annotations

import argparse
import copy
import functools
import inspect
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import speed  # benchmarks/speed.py, beside this script
import torch
from torch import nn

IMAGE_SIZE = 32
POOL_BATCHES = speed.POOL_BATCHES
TIME_TARGET = 1.01
"""Our step time over the peer's, at most (the paper reports +2% per epoch for GloFND)."""
DEVICE_DEFAULTS = {
    "cpu": {"warmup_steps": 1, "groups": 1, "steps": 1},
    "other": {"warmup_steps": 3, "groups": 8, "steps": 5},
}


def build_model() -> nn.Module:
    """resnet18 with a 32x32 stem and lightly's SimCLR projection head (random initialisation)."""
    import timm
    from lightly.models.modules import SimCLRProjectionHead

    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0)
    backbone.conv1 = nn.Conv2d(3, backbone.bn1.num_features, kernel_size=3, stride=1, padding=1, bias=False)
    backbone.maxpool = nn.Identity()
    head = SimCLRProjectionHead(input_dim=backbone.num_features, hidden_dim=512, output_dim=128)
    return nn.Sequential(backbone, head)


def build_losses(num_samples: int, chunk_size: int | None) -> tuple[nn.Module, nn.Module, bool]:
    """Ours (learning and filtering from the first step) and lightly's, and whether ours took ``chunk_size``."""
    from lightly.loss import NTXentLoss

    from glofnd_losses import GloFNDNTXent

    accepts = "chunk_size" in inspect.signature(GloFNDNTXent).parameters
    extra = {"chunk_size": chunk_size} if accepts and chunk_size is not None else {}
    ours = GloFNDNTXent(num_samples, temperature=0.5, detector="glofnd", start_epoch=0, **extra)
    return ours, NTXentLoss(temperature=0.5), accepts


class Side:
    """One side of the pair: a model, its optimizer and its loss, stepping through the shared data."""

    def __init__(
        self,
        loss_fn: nn.Module,
        model: nn.Module,
        data: tuple[torch.Tensor, torch.Tensor],
        batch: int,
        device: str,
        autocast: torch.dtype | None,
        takes_indices: bool,
    ) -> None:
        self.loss_fn, self.model = loss_fn.to(device), model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
        self.views, self.indices = data
        self.batch, self.device, self.autocast, self.takes_indices = batch, device, autocast, takes_indices
        self.generator = torch.Generator(device=device).manual_seed(1)  # both sides draw the same batches
        self.cuda = device.startswith("cuda")
        self.losses: list[torch.Tensor] = []

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randperm(self.views.shape[1], generator=self.generator, device=self.device)[: self.batch]
        return self.views[:, rows].flatten(0, 1), self.indices[rows]  # view 0's batch, then view 1's

    def step(self, images: torch.Tensor, indices: torch.Tensor) -> None:
        with self.autocast_context():
            projection_0, projection_1 = self.model(images).chunk(2)
            args = (projection_0, projection_1, indices) if self.takes_indices else (projection_0, projection_1)
            loss = self.loss_fn(*args)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.detach())

    def timed_steps(self, count: int) -> float:
        """Seconds of ``count`` steps on freshly drawn batches (drawn before the clock starts)."""
        inputs = [self.draw() for _ in range(count)]
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch_inputs in inputs:
            self.step(*batch_inputs)
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def loss_seconds(self, repeats: int) -> float:
        """Median seconds of the loss alone (forward and backward) on one batch's projections, held fixed."""
        images, indices = self.draw()
        with torch.no_grad(), self.autocast_context():
            projections = self.model(images).chunk(2)
        times = []
        for _ in range(repeats):
            leaves = [projection.detach().requires_grad_() for projection in projections]
            if self.cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with self.autocast_context():
                loss = self.loss_fn(*leaves, indices) if self.takes_indices else self.loss_fn(*leaves)
            loss.backward()
            if self.cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def autocast_context(self) -> torch.autocast:
        device_type = torch.device(self.device).type
        return torch.autocast(device_type, dtype=self.autocast, enabled=self.autocast is not None)


def measure(batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """The paired time ratio ours / peer of whole training steps at ``batch``."""
    device = args.device
    torch.manual_seed(0)
    model = build_model().to(device)
    pool = POOL_BATCHES * batch
    views = torch.randn(2, pool, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    indices = torch.randperm(args.num_samples, device=device)[:pool]
    ours_loss, peer_loss, accepts = build_losses(args.num_samples, args.chunk_size)
    autocast = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]
    sides = [
        Side(ours_loss, model, (views, indices), batch, device, autocast, takes_indices=True),
        Side(peer_loss, copy.deepcopy(model), (views, indices), batch, device, autocast, takes_indices=False),
    ]
    for _ in range(args.warmup_steps):  # untimed, alternating: every timed block follows a switch
        for side in sides:
            side.timed_steps(1)
    blocks: list[Callable[[], float]] = [functools.partial(side.timed_steps, args.steps) for side in sides]
    seconds, group_ratios = speed.abba_group_ratios(blocks, args.groups)
    row: dict[str, Any] = speed.paired_summary(seconds, group_ratios)
    row["mine_step_seconds"] = row["mine_seconds"] / args.steps
    row["peer_step_seconds"] = row["peer_seconds"] / args.steps
    row["group_ratios"] = group_ratios
    row["mine_block_seconds"], row["peer_block_seconds"] = seconds
    # The loss alone, ours and the peer's, on one batch's projections: what of the step's
    # difference the losses explain (the rest is the machine's noise).
    row["mine_loss_seconds"], row["peer_loss_seconds"] = (side.loss_seconds(args.loss_repeats) for side in sides)
    row["ratio_from_losses"] = 1 + (row["mine_loss_seconds"] - row["peer_loss_seconds"]) / row["peer_step_seconds"]
    row["losses_finite"] = all(bool(torch.isfinite(torch.stack(side.losses)).all()) for side in sides)
    row["learning"], row["filtering"] = bool(ours_loss.learning), bool(ours_loss.filtering)
    row["accepts_chunk_size"] = accepts
    return row


def parse_arguments() -> argparse.Namespace:
    """This script's flags, checked, with the device's defaults (``DEVICE_DEFAULTS``) for those not given."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-samples", type=int, default=50_000, help="data set size (the loss's thresholds)")
    parser.add_argument("--steps", type=int, default=None, help="steps per block (default: by device, see above)")
    parser.add_argument("--groups", type=int, default=None, help="A B B A groups per batch size (default: by device)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed steps per side (default: by device)")
    parser.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none", help="forward under autocast")
    parser.add_argument("--chunk-size", type=int, default=None, help="to GloFNDNTXent, where it accepts it")
    parser.add_argument(
        "--loss-repeats", type=int, default=5, help="timings of the loss alone per side (median), after the steps"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="write the ratios as JSON")
    args = parser.parse_args()
    defaults = DEVICE_DEFAULTS["cpu" if torch.device(args.device).type == "cpu" else "other"]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps < 1 or args.groups < 1 or args.warmup_steps < 0:
        parser.error("--steps and --groups must be >= 1, --warmup-steps >= 0")
    return args


def announce_run(args: argparse.Namespace) -> dict[str, Any]:
    """Print the run's settings and the table's header; the results' skeleton, with the same settings."""
    device_name = speed.device_label(args.device)
    print(
        f"device: {device_name}, torch {torch.__version__}, resnet18 (32x32 stem) + SimCLRProjectionHead, "
        f"SGD, autocast {args.autocast}; both losses in one process: {args.warmup_steps} untimed steps each, "
        f"then {args.groups} groups of A B B A blocks of {args.steps} steps; median (quartiles) of the groups' "
        f"ratios ours / peer\n"
    )
    header = (
        f"{'batch':>6} | {'GloFNDNTXent ms/step':>20} | {'NTXentLoss ms/step':>18} | "
        f"{'ratio (quartiles)':>19} | {'target <= ' + f'{TIME_TARGET:.2f}x':>16} | "
        f"{'loss alone ms, ours / peer':>26} | {'ratio from losses':>17}"
    )
    print(header + "\n" + "-" * len(header))
    return {
        "device": device_name, "torch": torch.__version__,
        "settings": {
            "steps": args.steps, "groups": args.groups, "warmup_steps": args.warmup_steps,
            "autocast": args.autocast, "num_samples": args.num_samples, "chunk_size": args.chunk_size,
        },
        "targets": {"time_ratio": TIME_TARGET},
        "batches": {},
    }  # fmt: skip


def main() -> None:
    args = parse_arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = announce_run(args)
    for batch in args.batch_sizes:
        row = measure(batch, args)
        ratio = row["ratio"]
        row["verdict"] = "met" if ratio <= TIME_TARGET else "MISSED"
        results["batches"][str(batch)] = row
        print(
            f"{batch:>6} | {1e3 * row['mine_step_seconds']:>20.1f} | {1e3 * row['peer_step_seconds']:>18.1f} | "
            f"{speed.paired_cell(row):>19} | {row['verdict']:>16} | "
            f"{1e3 * row['mine_loss_seconds']:>12.2f} / {1e3 * row['peer_loss_seconds']:<11.2f} | "
            f"{row['ratio_from_losses']:>16.4f}x",
            flush=True,
        )
    if args.out:
        speed.write_json(args.out, results)
        print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
