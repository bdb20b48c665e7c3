"""Every collective the package performs lives in this module.

The rest of the package asks three questions (is there a process group, how many ranks, which one
am I) and calls two gathers in the training step:

* :func:`gather_with_grad` for embeddings: an all-gather whose backward sums the incoming gradient
  over ranks and hands each rank its own slice, so that with DDP's gradient averaging the result
  equals the single-process gradient of the global batch.
* :func:`gather_rows` for everything that carries no gradient (indices, per-sample state rows,
  labels). It uses accelerate's gather when accelerate has been initialised by the user *and*
  agrees with ``torch.distributed`` about the number of processes, and ``torch.distributed``
  otherwise. accelerate's default state on a CPU-only host can report a single process while two
  ranks are running, which would make its gather silently return only the local rows.

The sharded per-sample state (:mod:`glofnd_losses.sharding`) adds :func:`exchange_blocks`, an
all-to-all that brings each rank the rows its anchors need from their owners, and
:func:`all_ranks_true`, a logical and over ranks.

Two more serve agreement between ranks: :func:`gather_host_ints` (the CPU step's batch sizes and
input check results) and :func:`gather_texts` (the configurations, compared once).

``torch.distributed.is_initialized()`` is the source of truth. Nothing here constructs
accelerate state or initialises a process group.

All gathers require the same leading size on every rank (as ``torch.distributed.all_gather``
does): use ``drop_last=True`` or a ``DistributedSampler`` for the training loader. Where the
host reads the tensors without a device sync (CPU, gloo) every gather first compares the sizes
and raises a ``ValueError`` naming them on every rank (gloo would abort the processes); on an
accelerator that check would be a host sync per step, and unequal sizes are the backend's
undefined behaviour, as in open_clip's and lightly's gathers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from glofnd_losses import host


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks in the default process group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank of this process in the default process group (0 without one)."""
    return dist.get_rank() if is_distributed() else 0


def collective_device() -> torch.device:
    """The device of the default process group's tensors: CUDA's current device under NCCL, else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_equal_sizes(tensor: torch.Tensor) -> None:
    """Raise on every rank if the ranks' leading sizes differ (CPU only: reading them needs no device sync).

    A collective on CPU (one all-gather of the sizes), nothing elsewhere.
    """
    if not host.reads_without_sync(tensor.device):
        return
    per_rank = [row[0] for row in gather_host_ints([tensor.shape[0]], tensor.device)]
    raise_if_unequal_sizes(per_rank)


def raise_if_unequal_sizes(per_rank: list[int]) -> None:
    """The ``ValueError`` of ranks that passed different batch sizes (``per_rank``, in rank order)."""
    if len(set(per_rank)) > 1:
        raise ValueError(
            f"every rank must pass the loss the same batch size (the batch and the per-sample state rows are "
            f"all-gathered), got {per_rank} on ranks 0..{len(per_rank) - 1}: use drop_last=True or a "
            "DistributedSampler for the training loader"
        )


@torch.compiler.disable
def gather_host_ints(values: list[int], device: torch.device) -> list[list[int]]:
    """Every rank's ``values`` (the same count on each), in rank order, read on the host.

    For host-side agreement between ranks: one all-gather of a small int64 tensor on ``device``.
    Reading the result is free on CPU; elsewhere it is a device sync, so the training step calls
    this on CPU only.
    """
    local = torch.tensor(values, dtype=torch.int64, device=device)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return [part.tolist() for part in parts]


@torch.compiler.disable
def gather_texts(text: str, device: torch.device) -> list[str]:
    """Every rank's ``text``, in rank order (two all-gathers; reading them is a device sync off CPU).

    For comparing the ranks' configurations once; not for the training step. Not
    ``all_gather_object``, which picks the CUDA device from the current device rather than the
    loss's.
    """
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
    lengths = [row[0] for row in gather_host_ints([data.numel()], device)]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded)
    return [bytes(part[:length].tolist()).decode() for part, length in zip(parts, lengths)]


def _all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    check_equal_sizes(tensor)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 with a sum-reduced backward."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        ctx.local_size = tensor.shape[0]
        return _all_gather_cat(tensor)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.local_size
        return grad[start : start + ctx.local_size]


@torch.compiler.disable
def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, keeping the gradient path.

    The backward pass sums the gradient of the gathered tensor over ranks and returns this rank's
    slice, so the gradient of every rank's negatives from every other rank's anchors is kept.
    Without a process group the input is returned unchanged.

    Args:
        tensor: Local tensor of shape ``(b, ...)``; ``b`` must be equal on every rank.

    Returns:
        Tensor of shape ``(world_size * b, ...)`` in rank order.
    """
    if not is_distributed():
        return tensor
    gathered: torch.Tensor = _GatherWithGrad.apply(tensor)
    return gathered


def _accelerate_agrees() -> bool:
    """Whether the user initialised accelerate and it sees the same processes as torch."""
    try:
        from accelerate.state import PartialState
    except ImportError:
        return False
    if not PartialState._shared_state:  # never construct accelerate state ourselves
        return False
    state = PartialState()
    return bool(state.num_processes == dist.get_world_size())


@torch.compiler.disable
def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a gradient-free tensor from every rank along dim 0, in rank order.

    The input is detached first: accelerate's gather returns its input itself with one process
    (keeping the graph) but a gradient-free copy with several.

    Args:
        tensor: Local tensor of shape ``(b, ...)``; ``b`` must be equal on every rank.

    Returns:
        Detached tensor of shape ``(world_size * b, ...)``.
    """
    tensor = tensor.detach()
    if not is_distributed():
        return tensor
    if _accelerate_agrees():
        from accelerate.utils import gather

        check_equal_sizes(tensor)
        gathered: torch.Tensor = gather(tensor.contiguous())
        return gathered
    return _all_gather_cat(tensor)


@torch.compiler.disable
def exchange_blocks(tensor: torch.Tensor) -> torch.Tensor:
    """Send block ``q`` of ``tensor`` to rank ``q``; receive every rank's block for this rank.

    ``tensor`` holds ``world_size`` equal blocks along dim 0, in rank order, and has the same
    shape on every rank (the caller's gathers have compared the sizes). The result holds, in rank
    order, the block each rank addressed to this one (one ``all_to_all_single`` with equal splits:
    the split sizes need no host read). Without a process group the input is returned.
    """
    if not is_distributed():
        return tensor
    received = torch.empty_like(tensor)
    dist.all_to_all_single(received, tensor.contiguous())
    return received


@torch.compiler.disable
def all_ranks_true(condition: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: whether ``condition`` (0-d bool) holds on every rank (one all-reduce)."""
    if not is_distributed():
        return condition
    as_int = condition.to(torch.int32).reshape(1)
    dist.all_reduce(as_int, op=dist.ReduceOp.MIN)
    return as_int[0] > 0
