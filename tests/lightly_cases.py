"""Lightning modules and per-rank functions for tests/test_lightly_integration.py (importable by spawned ranks)."""

from __future__ import annotations

import os
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from glofnd_losses import GloFNDNTXent, GloFNDSogCLRLoss
from glofnd_losses.integrations.lightly import GloFNDCallback

NUM_ITEMS = 32  # data set items; the loss has one more row, MARKER, that no batch ever touches
MARKER = NUM_ITEMS


def tiny_loader(batch_size: int = 8, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(NUM_ITEMS, 6, generator=generator)
    view_0 = base + 0.2 * torch.randn(NUM_ITEMS, 6, generator=generator)
    view_1 = base + 0.2 * torch.randn(NUM_ITEMS, 6, generator=generator)
    dataset = TensorDataset(view_0, view_1, torch.arange(NUM_ITEMS))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)


class TinySimCLR(pl.LightningModule):
    """A linear encoder with GloFNDNTXent (or GloFNDSogCLRLoss); ``use_callback`` toggles the GloFND wiring."""

    def __init__(self, use_callback: bool = True, start_epoch: int = 0, sogclr: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, 4)
        self.criterion: GloFNDNTXent | GloFNDSogCLRLoss = (
            GloFNDSogCLRLoss(NUM_ITEMS + 1, alpha=0.1, start_epoch=start_epoch)
            if sogclr
            else GloFNDNTXent(NUM_ITEMS + 1, gather_distributed=True, alpha=0.1, start_epoch=start_epoch)
        )
        self.use_callback = use_callback
        self.marker_at_start: float | None = None
        self.epochs_seen: list[int] = []

    def configure_callbacks(self) -> list[pl.Callback]:
        return [GloFNDCallback()] if self.use_callback else []

    def mark_rank(self) -> None:
        """Give each rank its own value in a row no batch touches; only DDP's buffer broadcast
        (from rank 0, before every forward) can change it from here on.

        Set after the first step: the loss compares the ranks' states at its first call and would
        refuse states that differ (a checkpoint loaded on one rank only), which is not what this
        case is about.
        """
        self.criterion.state.buffer("threshold")[MARKER] = -0.5 - self.global_rank * 0.25
        self.marker_at_start = float(self.criterion.state.buffer("threshold")[MARKER])

    def on_train_epoch_start(self) -> None:  # runs after the callbacks' hook
        assert self.criterion.epoch == self.current_epoch
        self.epochs_seen.append(self.criterion.epoch)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        view_0, view_1, indices = batch
        loss: torch.Tensor = self.criterion(self.encoder(view_0), self.encoder(view_1), indices)
        if self.global_step == 0:
            self.mark_rank()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(**kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    options.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pl.Trainer(**options)


def loss_state(module: TinySimCLR) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.criterion.state.named_buffers()}


def lightning_ddp_case(rank: int, world_size: int) -> dict[str, Any]:
    """Two Lightning DDP fits on an existing gloo group, without and with GloFNDCallback."""
    # Lightning's default cluster environment joins an externally launched job when LOCAL_RANK is
    # set; the process group already exists (tests/multiprocess.py), so Lightning reuses it.
    os.environ.update({"LOCAL_RANK": str(rank), "NODE_RANK": "0", "WORLD_SIZE": str(world_size)})
    results: dict[str, Any] = {}
    for use_callback in (False, True):
        torch.manual_seed(0)
        module = TinySimCLR(use_callback=use_callback)
        fit_trainer = trainer(devices=world_size, strategy="ddp", max_steps=3, use_distributed_sampler=True)
        fit_trainer.fit(module, tiny_loader(batch_size=4))
        state = loss_state(module)
        results["callback" if use_callback else "plain"] = {
            "marker_at_start": module.marker_at_start,
            "marker_at_end": float(state["threshold"][MARKER]),
            "rows": {name: value[:MARKER] for name, value in state.items()},
            "ignored": getattr(module, "_ddp_params_and_buffers_to_ignore", []),
        }
    return results
