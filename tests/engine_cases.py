"""Chunked against dense runs of every loss, estimator and detector (module-level so spawn can pickle them)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from glofnd_losses import GloFNDClipLoss, GloFNDNTXent, GloFNDSigLipLoss, GloFNDSogCLRLoss, ThresholdOptimizer
from glofnd_losses.base import GloFNDLossBase

NUM_SAMPLES = 40
GLOBAL_BATCH = 12
DIM = 8

DETECTORS: dict[str, dict[str, Any]] = {
    "glofnd": {"detector": "glofnd"},
    "glofnd_paper": {"detector": "glofnd", "threshold_optimizer": ThresholdOptimizer.paper()},
    "glofnd_clipped": {"detector": "glofnd", "threshold_optimizer": ThresholdOptimizer.clipped()},
    "fnc": {"detector": "fnc"},
    "oracle": {"detector": "oracle"},
    "none": {"detector": None},
}
LOSSES = ("sogclr", "ntxent", "clip_minibatch", "clip_sogclr", "clip_fastclip", "siglip")


def make_loss(loss: str, detector: str, chunk_size: int | None) -> GloFNDLossBase:
    """A loss that learns from the first step and filters from the second epoch."""
    options = {**DETECTORS[detector], "alpha": 0.15, "filter_start_epoch": 1, "chunk_size": chunk_size}
    if loss == "sogclr":
        return GloFNDSogCLRLoss(NUM_SAMPLES, **options)
    if loss == "ntxent":
        return GloFNDNTXent(NUM_SAMPLES, gather_distributed=True, **options)
    if loss == "siglip":
        return GloFNDSigLipLoss(NUM_SAMPLES, **options)
    return GloFNDClipLoss(NUM_SAMPLES, loss.removeprefix("clip_"), **options)


def global_batches() -> list[tuple[torch.Tensor, ...]]:
    """Three global batches (two epochs) with class structure, so detectors flag something."""
    generator = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, DIM, generator=generator), dim=1)
    labels = torch.arange(NUM_SAMPLES) % 4
    batches = []
    for _ in range(3):
        indices = torch.randperm(NUM_SAMPLES, generator=generator)[:GLOBAL_BATCH]
        views = [centres[labels[indices]] + 0.5 * torch.randn(GLOBAL_BATCH, DIM, generator=generator) for _ in "ab"]
        batches.append((F.normalize(views[0], dim=1), F.normalize(views[1], dim=1), indices, labels[indices]))
    return batches


def run(loss: str, detector: str, chunk_size: int | None, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Losses, gradients (features, logit_scale, logit_bias) and the final state of three steps on this rank's slice."""
    loss_fn = make_loss(loss, detector, chunk_size)
    log_scale = torch.tensor(2.5, requires_grad=True)
    logit_bias = torch.tensor(-4.0, requires_grad=True)
    values, grads = [], []
    for epoch, (view_a, view_b, indices, labels) in enumerate(global_batches()):
        local = GLOBAL_BATCH // world_size
        part = slice(rank * local, (rank + 1) * local)
        first, second = view_a[part].clone().requires_grad_(), view_b[part].clone().requires_grad_()
        loss_fn.set_epoch(epoch // 2)
        if loss == "siglip":
            value = loss_fn(first, second, log_scale.exp(), logit_bias, indices=indices[part], labels=labels[part])
        elif loss.startswith("clip"):
            value = loss_fn(first, second, log_scale.exp(), indices=indices[part], labels=labels[part])
        else:
            value = loss_fn(first, second, indices[part], labels=labels[part])
        value.backward()
        values.append(value.detach())
        grads.append((first.grad, second.grad))
    return {
        "values": values,
        "grads": grads,
        "scale_grad": log_scale.grad,
        "bias_grad": logit_bias.grad,
        "state": {name: tensor.clone() for name, tensor in loss_fn.state_dict().items()},
        "stats": {name: tensor.clone() for name, tensor in loss_fn.last_stats.items()},
    }


def chunked_and_dense_case(rank: int, world_size: int, configs: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
    """For each ``(loss, detector, chunk_size)``: the dense run and the chunked run on this rank."""
    return [
        {"dense": run(loss, detector, GLOBAL_BATCH, rank, world_size), "chunked": run(loss, detector, size, rank,
                                                                                       world_size)}
        for loss, detector, size in configs
    ]  # fmt: skip
