"""What every rank's loss must share, compared once at the first call of a multi-rank run.

A loss built differently on some rank (another ``num_samples``, detector, estimator, threshold
rule, treatment, state sharding) or holding another state (a checkpoint loaded on one rank only) would crash the
state's all-gather or silently diverge; :func:`glofnd_losses.validation.raise_if_settings_differ`
compares these settings across ranks and names every difference on every rank.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

import torch

from glofnd_losses import distributed
from glofnd_losses.sharding import current_layout
from glofnd_losses.thresholds import ThresholdOptimizer

if TYPE_CHECKING:
    from glofnd_losses.base import GloFNDLossBase


def loss_settings(loss: GloFNDLossBase) -> dict[str, str]:
    """Configuration, state fields, schedule position and a state digest, as text.

    Not ``chunk_size``, which changes how the rows are computed, not what.
    """
    settings = {
        "loss": type(loss).__name__,
        "num_samples": str(loss.num_samples),
        "alpha": repr(loss.alpha),
        "detector": repr(loss.detector.name),
        "treatment": repr(loss.treatment),
        "start_epoch": str(loss.start_epoch),
        "start_step": str(loss.start_step),
        "filter_start_epoch": str(loss.filter_start_epoch),
    }
    for part in filter(None, loss._loss_settings().split(", ")):
        key, _, value = part.partition("=")
        settings[key] = value
    optimizer = getattr(loss.detector, "optimizer", None)
    if isinstance(optimizer, ThresholdOptimizer):
        settings.update({f"threshold_optimizer.{key}": repr(value) for key, value in asdict(optimizer).items()})
    settings["state_sharding"] = repr(loss.state.sharding)
    settings["state fields"] = ", ".join(f"{name}: {field.dtype}" for name, field in loss.state.fields.items())
    settings["(epoch, step)"] = f"({loss.epoch}, {loss.step})"
    if loss.state.sharding == "sharded":
        # Each rank holds its own block: the ranks' blocks differ by design and have no common digest.
        settings["state ownership"] = current_layout(loss.num_samples, "sharded").describe()
        # A rank that trained or loaded its table before the process group holds every row.
        settings["state held"] = loss.state.layout_held()
        # False where DistributedDataParallel copied rank 0's buffers over this rank's block.
        settings[
            "each rank's state block its own (call ignore_loss_buffers_in_ddp(model) before wrapping it in DDP)"
        ] = str(loss.state.blocks_untouched())
    elif loss.state.fields:
        # Differs where one rank loaded a checkpoint and another did not, or another one. Ten
        # digits: equal states on different device models may round the last bits apart.
        digests = torch.stack([_sum_and_squares(loss.state.buffer(name)) for name in loss.state.fields])
        for name, (total, squares) in zip(loss.state.fields, digests.tolist()):  # once per run
            settings[f"state.{name} (sum, sum of squares)"] = f"({total:.10g}, {squares:.10g})"
    return settings


def state_device(loss: GloFNDLossBase) -> torch.device:
    """Where the comparison's gathers run: the state's device, else the process group's."""
    for buffer in loss.state.buffers():
        return buffer.device
    return distributed.collective_device()


def _sum_and_squares(values: torch.Tensor) -> torch.Tensor:
    """``[sum, sum of squares]`` of a state buffer in float64 (one float64 copy at a time)."""
    values = values.double()
    return torch.stack([values.sum(), values.square().sum()])
