"""Save and load a loss's state with ``torch.distributed.checkpoint``, at any world size.

A sharded per-sample state (``state_sharding="sharded"``) exists only as every rank's block, so a
trainer that saves on rank 0 alone cannot hold it. These two functions write and read it from every
rank; the folder they use loads at another world size and into either sharding mode. They take the
loss, or any module holding losses (its whole ``state_dict()``).

Examples:
    >>> import tempfile
    >>> from glofnd_losses import GloFNDNTXent
    >>> from glofnd_losses.checkpoint import load_state, save_state
    >>> folder = tempfile.mkdtemp()
    >>> save_state(GloFNDNTXent(num_samples=100), folder)  # on every rank
    >>> load_state(GloFNDNTXent(num_samples=100, state_sharding="sharded"), folder)
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

KEY = "state"
"""The top-level entry of the checkpoint that holds the module's state dict."""


def save_state(module: nn.Module, path: str | os.PathLike[str]) -> None:
    """Every rank: write ``module.state_dict()`` into the folder ``path`` (each rank its rows).

    A collective when a process group is active. Without one (a single process) it writes alone.
    """
    dcp.save({KEY: module.state_dict()}, checkpoint_id=path, no_dist=not dist.is_initialized())


def load_state(module: nn.Module, path: str | os.PathLike[str]) -> None:
    """Every rank: load :func:`save_state`'s folder into ``module`` (any world size, either sharding mode).

    DCP reads each rank's rows in place into the module's buffers; ``load_state_dict`` then checks
    them. A saved field of another size is refused by DCP, naming it (a ``CheckpointException``,
    which is a ``BaseException``).

    Raises:
        ValueError: A saved field of another dtype (DCP would convert it in place: a count saved
            as ``int32`` would wrap in a ``uint8`` buffer), naming it.
    """
    target = module.state_dict()
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    for key, value in target.items():
        saved = getattr(stored.get(f"{KEY}.{key}"), "properties", None)
        if isinstance(value, torch.Tensor) and saved is not None and saved.dtype != value.dtype:
            raise ValueError(
                f"{key} was saved as {saved.dtype}, this module stores it as {value.dtype}: was the state saved "
                "under another threshold rule? (a rule that reads visit counts for ever keeps them as int32)"
            )
    loaded = {KEY: target}
    dcp.load(loaded, checkpoint_id=path, no_dist=not dist.is_initialized())
    module.load_state_dict(loaded[KEY])


def saved_keys(path: str | os.PathLike[str]) -> list[str]:
    """The state dict keys :func:`save_state` wrote into ``path`` (read from its metadata)."""
    metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    prefix = KEY + "."
    return [key.removeprefix(prefix) for key in metadata if key.startswith(prefix)]
