"""Functions run on every rank by tests/test_sharded_state.py (module-level so spawn can pickle them)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from glofnd_losses import GloFNDClipLoss, GloFNDNTXent, GloFNDSigLipLoss, GloFNDSogCLRLoss, ThresholdOptimizer
from glofnd_losses.state import Field, PerSampleState
from tests import dist_cases

LOSSES: dict[str, type[nn.Module]] = {
    "sogclr": GloFNDSogCLRLoss,
    "ntxent": GloFNDNTXent,
    "clip": GloFNDClipLoss,
    "siglip": GloFNDSigLipLoss,
}


def make_loss(name: str, kwargs: dict[str, Any], state_sharding: str) -> nn.Module:
    kwargs = dict(kwargs)
    if "optimizer" in kwargs:
        kwargs["threshold_optimizer"] = ThresholdOptimizer(**kwargs.pop("optimizer"))
    return LOSSES[name](state_sharding=state_sharding, **kwargs)


def run(loss_fn: nn.Module, name: str, batches: list, rank: int, world_size: int) -> dict[str, Any]:
    if name in ("clip", "siglip"):
        scale = 10.0 if name == "siglip" else 1 / 0.07
        return dist_cases.run_clip_steps(loss_fn, batches, rank, world_size, scale=scale)
    return dist_cases.run_steps(loss_fn, batches, rank, world_size)


def sharded_and_replicated_case(
    rank: int, world_size: int, name: str, kwargs: dict[str, Any], batches: list, accelerator_path: bool
) -> dict[str, Any]:
    """The same steps with a replicated and a sharded state; the sharded loss's owned rows too."""
    if accelerator_path:
        dist_cases.take_accelerator_path()
    results = {}
    for sharding in ("replicated", "sharded"):
        loss_fn = make_loss(name, kwargs, sharding)
        results[sharding] = run(loss_fn, name, batches, rank, world_size)
        results[sharding]["owned"] = loss_fn.state.owned_rows
    return results


def table_case(rank: int, world_size: int, num_samples: int, commits: list) -> dict[str, Any]:
    """Random commits and reads on a replicated and a sharded table (fewer rows than ranks allowed)."""
    fields = {"value": Field(torch.float32, 1.0), "count": Field(torch.uint8, 0, 0, 255, saturates=True)}
    tables = {sharding: PerSampleState(num_samples, fields, sharding) for sharding in ("replicated", "sharded")}
    reads: dict[str, list] = {sharding: [] for sharding in tables}
    for indices, values, counts, bad_rank in commits:
        local = indices.shape[0] // world_size
        part = slice(rank * local, (rank + 1) * local)
        bits = torch.tensor(int(rank == bad_rank))
        for sharding, table in tables.items():
            reads[sharding].append(table.read(indices[part]))
            table.commit(indices[part], {"value": values[part], "count": counts[part]}, error_bits=bits)
    empty = PerSampleState(num_samples, {}, "sharded")  # a detector without state: no fields, no collective
    assert empty.read(commits[0][0][:1]) == {}
    return {
        "reads": reads,
        "sharded": {name: tables["sharded"].buffer(name).clone() for name in fields},
        "replicated": {name: tables["replicated"].buffer(name).clone() for name in fields},
        "owned": tables["sharded"].owned_rows,
    }


def save_case(rank: int, world_size: int, name: str, kwargs: dict[str, Any], batches: list, path: str) -> Any:
    """Train a sharded loss, save it with torch.distributed.checkpoint; return this rank's blocks."""
    loss_fn = make_loss(name, kwargs, "sharded")
    result = run(loss_fn, name, batches, rank, world_size)
    dcp.save({"loss": loss_fn.state_dict()}, checkpoint_id=path)
    return {"state": result["state"], "owned": loss_fn.state.owned_rows}


def resume_case(
    rank: int, world_size: int, name: str, kwargs: dict[str, Any], batches: list, path: str
) -> dict[str, Any]:
    """Load the checkpoint into a sharded and a replicated loss at this world size, then train both."""
    results = {}
    for sharding in ("sharded", "replicated"):
        loss_fn = make_loss(name, kwargs, sharding)
        loaded = {"loss": loss_fn.state_dict()}
        dcp.load(loaded, checkpoint_id=path)
        loss_fn.load_state_dict(loaded["loss"])
        after_load = dist_cases.local_state(loss_fn)
        results[sharding] = run(loss_fn, name, batches, rank, world_size)
        results[sharding]["loaded"] = after_load
        results[sharding]["owned"] = loss_fn.state.owned_rows
    results["another size"] = wrong_size_message(name, {**kwargs, "num_samples": kwargs["num_samples"] + 1}, path)
    return results


def wrong_size_message(name: str, kwargs: dict[str, Any], path: str) -> str:
    """Load a checkpoint into a sharded loss of another num_samples: the error's text (nothing is loaded)."""
    loss_fn = make_loss(name, kwargs, "sharded")
    before = dist_cases.local_state(loss_fn)
    loaded = {"loss": loss_fn.state_dict()}
    try:
        dcp.load(loaded, checkpoint_id=path)
    except CheckpointException as error:  # a BaseException, raised on every rank with every rank's error
        message = f"{type(error).__name__}: {error}"
    except Exception as error:  # noqa: BLE001 - the test reads the message
        message = f"{type(error).__name__}: {error}"
    else:
        message = "no error"
    after = dist_cases.local_state(loss_fn)
    assert all(torch.equal(before[key], after[key]) for key in before)
    return message


def mixed_sharding_case(rank: int, world_size: int) -> str:
    """Rank 0 shards its state, rank 1 does not: every rank's error."""
    sharding = "sharded" if rank == 0 else "replicated"
    loss_fn = GloFNDSogCLRLoss(num_samples=40, alpha=0.1, state_sharding=sharding)
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    try:
        loss_fn(z1, z2, torch.arange(4) + 4 * rank)
    except ValueError as error:
        return str(error)
    return "no error"


class _ModelWithLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(8, 8)
        self.criterion = GloFNDSogCLRLoss(num_samples=40, alpha=0.1, state_sharding="sharded")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def ddp_cases(rank: int, world_size: int) -> dict[bool, str]:
    """:func:`ddp_case` without and with ``ignore_loss_buffers_in_ddp`` (one spawn for both)."""
    return {use_helper: ddp_case(rank, world_size, use_helper) for use_helper in (False, True)}


def ddp_case(rank: int, world_size: int, use_helper: bool) -> str:
    """A sharded loss inside a DDP-wrapped model, its buffers ignored by DDP or not: the error, if any."""
    import gc

    from glofnd_losses import ignore_loss_buffers_in_ddp

    torch.manual_seed(0)
    model = _ModelWithLoss()
    if use_helper:
        ignore_loss_buffers_in_ddp(model)
    ddp_model = nn.parallel.DistributedDataParallel(model)
    try:
        for step in range(2):
            x = torch.randn(4, 8)
            z = ddp_model(x)
            model.criterion(z, z + 0.1 * torch.randn(4, 8), torch.arange(4) + 4 * rank + 8 * step).backward()
        message = "no error"
    except ValueError as error:
        message = str(error)
    del ddp_model
    gc.collect()
    return message


def torch_saved_by_rank_zero_case(rank: int, world_size: int, path: str) -> str:
    """Rank 0 saves a sharded state_dict with torch.save (its rows only); every rank loads it: the error."""
    source = GloFNDSogCLRLoss(40, state_sharding="sharded")
    if rank == 0:
        torch.save(source.state_dict(), path)
    torch.distributed.barrier()
    target = GloFNDSogCLRLoss(40, state_sharding="sharded")
    try:
        target.load_state_dict(torch.load(path, weights_only=True))
    except ValueError as error:
        return str(error)
    return "no error"
