"""Functions run on every rank by tests/test_distributed.py (module-level so spawn can pickle them)."""

from __future__ import annotations

import gc
from typing import Any

import pytest
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
    return {"values": values, "grads": grads, "state": local_state(loss_fn)}


def local_state(loss_fn: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the loss's state entries: this rank's block of a sharded field, else the tensor."""
    from torch.distributed.tensor import DTensor

    return {
        key: (value.to_local() if isinstance(value, DTensor) else value).clone()
        for key, value in loss_fn.state_dict().items()
        if isinstance(value, torch.Tensor)
    }


def take_accelerator_path(monkeypatch: pytest.MonkeyPatch | None = None) -> None:
    """Make the losses take the accelerator path on CPU tensors (no host reads).

    For the rest of the process (a spawned rank), or until the test ends with ``monkeypatch``.
    """
    from glofnd_losses import host

    if monkeypatch is None:
        host.reads_without_sync = lambda device: False
    else:
        monkeypatch.setattr(host, "reads_without_sync", lambda device: False)


def count_accelerate_gathers() -> list[int]:
    """Wrap ``accelerate.utils.gather`` (still run) with a spy; the returned list grows by one per call."""
    import accelerate.utils

    calls: list[int] = []
    real_gather = accelerate.utils.gather

    def counting_gather(tensor: Any) -> Any:
        calls.append(1)
        return real_gather(tensor)

    accelerate.utils.gather = counting_gather
    return calls


def equivalence_case(
    rank: int,
    world_size: int,
    name: str,
    kwargs: dict[str, Any],
    batches: list,
    use_accelerate: bool,
    accelerator_path: bool = False,
    compiled: bool = False,
) -> dict[str, Any]:
    if accelerator_path:
        take_accelerator_path()
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
    accelerate_gathers = count_accelerate_gathers() if use_accelerate else []
    loss_fn = make_loss(name, kwargs)
    if compiled:
        loss_fn.compile()
    result = run_steps(loss_fn, batches, rank, world_size)
    result["used_accelerate"] = used_accelerate
    result["accelerate_gathers"] = len(accelerate_gathers)
    result["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return result


def accelerate_disagrees_case(
    rank: int, world_size: int, name: str, kwargs: dict[str, Any], batches: list
) -> dict[str, Any]:
    """accelerate initialised without the launcher's variables: it sees one process."""
    from accelerate import PartialState

    from glofnd_losses import distributed

    state = PartialState(cpu=True)
    result = run_steps(make_loss(name, kwargs), batches, rank, world_size)
    result["accelerate_processes"] = state.num_processes
    result["used_accelerate"] = distributed._accelerate_agrees()
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
    result = model.criterion.thresholds.clone()
    # Tear DDP down (its reducer holds the process group) before the group is destroyed.
    del ddp_model
    gc.collect()
    return result


def run_clip_steps(
    loss_fn: nn.Module, batches: list, rank: int, world_size: int, scale: float = 1 / 0.07
) -> dict[str, Any]:
    """Run GloFNDClipLoss over global batches; this rank takes its contiguous slice of each."""
    values, grads = [], []
    for epoch, (images, texts, indices, labels) in enumerate(batches):
        local = images.shape[0] // world_size
        part = slice(rank * local, (rank + 1) * local)
        image_part = images[part].clone().requires_grad_(True)
        text_part = texts[part].clone().requires_grad_(True)
        logit_scale = torch.tensor(scale, requires_grad=True)
        loss_fn.set_epoch(epoch)
        out = loss_fn(image_part, text_part, logit_scale, output_dict=True, indices=indices[part], labels=labels[part])
        out["contrastive_loss"].backward()
        values.append(out["contrastive_loss"].detach())
        grads.append((image_part.grad, text_part.grad, logit_scale.grad))
    return {"values": values, "grads": grads, "state": local_state(loss_fn)}


def clip_equivalence_case(
    rank: int, world_size: int, kwargs: dict[str, Any], batches: list, accelerator_path: bool = False
) -> dict[str, Any]:
    from glofnd_losses import GloFNDClipLoss

    if accelerator_path:
        take_accelerator_path()
    return run_clip_steps(GloFNDClipLoss(**kwargs), batches, rank, world_size)


def open_clip_parity_case(
    rank: int, world_size: int, images: torch.Tensor, texts: torch.Tensor, local_loss: bool, gather_with_grad: bool
) -> dict[str, Any]:
    from open_clip.loss import ClipLoss

    from glofnd_losses import GloFNDClipLoss

    local = images.shape[0] // world_size
    part = slice(rank * local, (rank + 1) * local)
    results = {}
    for label in ("open_clip", "glofnd"):
        image_part = images[part].clone().requires_grad_(True)
        text_part = texts[part].clone().requires_grad_(True)
        logit_scale = torch.tensor(10.0, requires_grad=True)
        if label == "open_clip":
            criterion = ClipLoss(
                local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size
            )
            loss = criterion(image_part, text_part, logit_scale)
        else:
            criterion = GloFNDClipLoss(images.shape[0], estimator="minibatch", detector=None)
            loss = criterion(image_part, text_part, logit_scale, indices=torch.arange(images.shape[0])[part])
        loss.backward()
        results[label] = (loss.detach(), image_part.grad, text_part.grad, logit_scale.grad)
    return results


def deferred_error_case(rank: int, world_size: int, batches: list, bad_rank: int) -> dict[str, Any]:
    """Accelerator path: ``bad_rank`` sends an index out of range in the last step.

    Returns the state before and after that step and what :meth:`check_errors` raised, if anything.
    """
    take_accelerator_path()
    loss_fn = GloFNDSogCLRLoss(num_samples=40, alpha=0.1)
    run_steps(loss_fn, batches[:-1], rank, world_size)
    before = {name: value.clone() for name, value in loss_fn.state.state_dict().items()}  # the per-sample rows
    view_a, view_b, indices, _ = batches[-1]
    local = view_a.shape[0] // world_size
    part = slice(rank * local, (rank + 1) * local)
    local_indices = indices[part].clone()
    if rank == bad_rank:
        local_indices[1] = 40  # == num_samples
    loss = loss_fn(view_a[part].clone().requires_grad_(), view_b[part].clone().requires_grad_(), local_indices)
    loss.backward()  # nothing raised yet: the check's result travels to the host without blocking
    after = {name: value.clone() for name, value in loss_fn.state.state_dict().items()}
    error = None
    try:
        loss_fn.check_errors()
    except ValueError as raised:
        error = str(raised)
    return {"before": before, "after": after, "error": error}


def uneven_batch_case(
    rank: int, world_size: int, name: str, kwargs: dict[str, Any], sizes: list[int]
) -> dict[str, Any]:
    """Rank ``r`` passes ``sizes[r]`` items; returns what the loss raised and whether the state is unchanged."""
    loss_fn = make_loss(name, kwargs)
    before = {key: value.clone() for key, value in loss_fn.state_dict().items()}
    size = sizes[rank]
    generator = torch.Generator().manual_seed(rank)
    view_a, view_b = torch.randn(size, 8, generator=generator), torch.randn(size, 8, generator=generator)
    error = None
    try:
        loss_fn(view_a, view_b, torch.arange(size) + 10 * rank)
    except ValueError as raised:
        error = str(raised)
    unchanged = all(torch.equal(value, before[key]) for key, value in loss_fn.state_dict().items())
    return {"error": error, "state_unchanged": unchanged}


def siglip_parity_cases(
    rank: int, world_size: int, images: torch.Tensor, texts: torch.Tensor, dist_impls: list[str]
) -> dict[str, dict[str, Any]]:
    """:func:`siglip_parity_case` for each of ``dist_impls`` (one spawn for all)."""
    return {dist_impl: siglip_parity_case(rank, world_size, images, texts, dist_impl) for dist_impl in dist_impls}


def siglip_parity_case(
    rank: int, world_size: int, images: torch.Tensor, texts: torch.Tensor, dist_impl: str
) -> dict[str, Any]:
    """open_clip's SigLipLoss with ``dist_impl`` and GloFNDSigLipLoss without a detector, on this rank's slice."""
    from open_clip.loss import SigLipLoss

    from glofnd_losses import GloFNDSigLipLoss

    local = images.shape[0] // world_size
    part = slice(rank * local, (rank + 1) * local)
    results = {}
    for label in ("open_clip", "glofnd"):
        image_part = images[part].clone().requires_grad_(True)
        text_part = texts[part].clone().requires_grad_(True)
        logit_scale = torch.tensor(10.0, requires_grad=True)
        logit_bias = torch.tensor(-4.0, requires_grad=True)
        if label == "open_clip":
            criterion = SigLipLoss(rank=rank, world_size=world_size, dist_impl=dist_impl)
            loss = criterion(image_part, text_part, logit_scale, logit_bias)
        else:
            ours = GloFNDSigLipLoss(
                images.shape[0], detector=None, rank=rank, world_size=world_size, dist_impl=dist_impl
            )
            loss = ours(image_part, text_part, logit_scale, logit_bias, indices=torch.arange(images.shape[0])[part])
        loss.backward()
        results[label] = (loss.detach(), image_part.grad, text_part.grad, logit_scale.grad, logit_bias.grad)
    return results


def siglip_equivalence_case(rank: int, world_size: int, kwargs: dict[str, Any], batches: list) -> dict[str, Any]:
    from glofnd_losses import GloFNDSigLipLoss

    return run_clip_steps(GloFNDSigLipLoss(**kwargs), batches, rank, world_size, scale=10.0)


def make_accumulation_loss(name: str) -> nn.Module:
    """A loss of every kind that accumulation supports, learning and filtering from the first step."""
    from glofnd_losses import GloFNDClipLoss, GloFNDSigLipLoss

    options: dict[str, Any] = {"alpha": 0.15, "chunk_size": 5}
    if name == "siglip":
        return GloFNDSigLipLoss(40, **options)
    if name.startswith("clip_"):
        return GloFNDClipLoss(40, name.removeprefix("clip_"), gamma=0.5, **options)
    return LOSSES[name](40, **options)


def _call(loss_fn: nn.Module, name: str, first: torch.Tensor, second: torch.Tensor, indices: torch.Tensor,
          scalars: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # fmt: skip
    if name == "siglip":
        return loss_fn(first, second, scalars[0], scalars[1], indices=indices)  # type: ignore[no-any-return]
    if name.startswith("clip_"):
        return loss_fn(first, second, scalars[0], indices=indices)  # type: ignore[no-any-return]
    return loss_fn(first, second, indices)  # type: ignore[no-any-return]


def accumulation_cases(
    rank: int, world_size: int, names: list[str], batches: list, num_calls: int
) -> dict[str, dict[str, Any]]:
    """:func:`accumulation_case` for each loss of ``names`` (one spawn for all)."""
    return {name: accumulation_case(rank, world_size, name, batches, num_calls) for name in names}


def accumulation_case(rank: int, world_size: int, name: str, batches: list, num_calls: int) -> dict[str, Any]:
    """Optimiser steps on this rank's slice of each global batch, in ``num_calls`` accumulated calls.

    Each call takes the whole local batch with one micro-batch's rows carrying gradients, as
    open_clip's ``--accum-freq`` loop does; ``num_calls == 1`` is one plain call per step.
    """
    loss_fn = make_accumulation_loss(name)
    values, grads = [], []
    for first_all, second_all, indices_all, _ in batches:
        local = first_all.shape[0] // world_size
        part = slice(rank * local, (rank + 1) * local)
        first, second, indices = first_all[part], second_all[part], indices_all[part]
        scalars = (torch.tensor(10.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True))
        micro = local // num_calls
        leaves = [(first[j * micro:(j + 1) * micro].clone().requires_grad_(), second[j * micro:(j + 1) * micro]
                   .clone().requires_grad_()) for j in range(num_calls)]  # fmt: skip
        with loss_fn.accumulation(num_calls):
            for j, (first_j, second_j) in enumerate(leaves):
                rows = slice(j * micro, (j + 1) * micro)
                mixed = [torch.cat([cached[: rows.start], fresh, cached[rows.stop :]])
                         for cached, fresh in ((first, first_j), (second, second_j))]  # fmt: skip
                value = _call(loss_fn, name, mixed[0], mixed[1], indices, scalars)
                value.backward()
                values.append(value.detach())
        grads.append((torch.cat([leaf[0].grad for leaf in leaves]), torch.cat([leaf[1].grad for leaf in leaves]),
                      scalars[0].grad, scalars[1].grad))  # fmt: skip
    state = {key: value.clone() for key, value in loss_fn.state_dict().items() if key.startswith("state.")}
    return {"values": values, "grads": grads, "state": state, "step": loss_fn.step}
