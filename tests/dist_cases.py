"""Functions run on every rank by tests/test_distributed.py (module-level so spawn can pickle them)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from glofnd_losses import GloFNDNTXent, GloFNDSogCLRLoss, ThresholdOptimizer, ignore_loss_buffers_in_ddp

LOSSES = {"sogclr": GloFNDSogCLRLoss, "ntxent": GloFNDNTXent}


def make_loss(name: str, kwargs: dict[str, Any]) -> nn.Module:
    kwargs = dict(kwargs)
    if "optimizer" in kwargs:
        kwargs["threshold_optimizer"] = ThresholdOptimizer(**kwargs.pop("optimizer"))
    return LOSSES[name](**kwargs)


def run_steps(
    loss_fn: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    rank: int,
    world_size: int,
) -> dict[str, Any]:
    """Run the loss over global batches; this rank takes its contiguous slice of each."""
    values, grads = [], []
    for epoch, (view_a, view_b, indices, labels) in enumerate(batches):
        local = view_a.shape[0] // world_size
        part = slice(rank * local, (rank + 1) * local)
        z1 = view_a[part].clone().requires_grad_(True)
        z2 = view_b[part].clone().requires_grad_(True)
        loss_fn.set_epoch(epoch)
        loss = loss_fn(z1, z2, indices[part], labels=labels[part])
        loss.backward()
        assert z1.grad is not None and z2.grad is not None
        values.append(loss.detach())
        grads.append((z1.grad.clone(), z2.grad.clone()))
    return {
        "values": values,
        "grads": grads,
        "state": {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in loss_fn.state_dict().items()},
    }


def equivalence_case(
    rank: int, world_size: int, name: str, kwargs: dict[str, Any], batches: list, use_accelerate: bool
) -> dict[str, Any]:
    used_accelerate = False
    if use_accelerate:
        import os

        from accelerate import PartialState

        from glofnd_losses import distributed

        # What `accelerate launch` / torchrun would export; the gloo group already exists.
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
        os.environ.update({"LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"})
        PartialState(cpu=True)
        used_accelerate = distributed._accelerate_agrees()
    result = run_steps(make_loss(name, kwargs), batches, rank, world_size)
    result["used_accelerate"] = used_accelerate
    return result


def lightly_parity_case(rank: int, world_size: int, out0: torch.Tensor, out1: torch.Tensor) -> dict[str, Any]:
    from lightly.loss import NTXentLoss

    local = out0.shape[0] // world_size
    part = slice(rank * local, (rank + 1) * local)
    results = {}
    for label, criterion in {
        "lightly": NTXentLoss(temperature=0.3, gather_distributed=True),
        "glofnd": GloFNDNTXent(num_samples=out0.shape[0], temperature=0.3, gather_distributed=True, detector=None),
    }.items():
        a = out0[part].clone().requires_grad_(True)
        b = out1[part].clone().requires_grad_(True)
        if label == "lightly":
            loss = criterion(a, b)
        else:
            loss = criterion(a, b, torch.arange(out0.shape[0])[part])
        loss.backward()
        results[label] = (loss.detach(), a.grad, b.grad)
    return results


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.criterion = GloFNDNTXent(num_samples=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def ddp_broadcast_case(rank: int, world_size: int, use_helper: bool) -> torch.Tensor:
    """Give rank 1 a different threshold, run one DDP forward, return the threshold it ends with."""
    torch.manual_seed(0)
    model = _Model()
    if use_helper:
        ignore_loss_buffers_in_ddp(model)
    ddp_model = nn.parallel.DistributedDataParallel(model)
    model.criterion.state.threshold.fill_(0.5 if rank == 1 else 1.0)
    ddp_model(torch.randn(2, 4)).sum().backward()
    return model.criterion.thresholds.clone()
