"""GloFND with lightly and PyTorch Lightning (lightly 1.6, pytorch-lightning 2.x).

Two pieces; the loss itself is :class:`~glofnd_losses.GloFNDNTXent`, a drop-in for lightly's
``NTXentLoss`` that also takes the data set indices of the batch:

* :class:`WithIndex`: wraps any map-style data set so that its items end with their index,
  ``(*item, index)`` (lightly's and torchvision's data sets return none).
* :class:`GloFNDCallback`: the Lightning wiring. In ``setup`` (which Lightning runs after the
  process group exists and *before* the strategy wraps the module in DDP) it excludes the loss
  buffers from DDP's buffer broadcast; at every train epoch start it calls ``set_epoch``. The
  loss state is made of buffers of a submodule, so Lightning checkpoints carry it without help.

The model is yours: any module that maps views to projections (the repository's
``examples/simclr_model.py`` builds a timm backbone with lightly's ``SimCLRProjectionHead``).

Needs ``pip install glofnd-losses[lightly]``.

Examples:
    >>> import pytorch_lightning as pl
    >>> from lightly.models.modules import SimCLRProjectionHead
    >>> from torch import nn
    >>> from glofnd_losses import GloFNDNTXent
    >>> from glofnd_losses.integrations.lightly import GloFNDCallback
    >>> class SimCLR(pl.LightningModule):
    ...     def __init__(self, num_samples: int) -> None:
    ...         super().__init__()
    ...         self.model = nn.Sequential(nn.Flatten(), SimCLRProjectionHead(784, 256, 128))
    ...         self.criterion = GloFNDNTXent(num_samples, gather_distributed=True)
    ...     def configure_callbacks(self):
    ...         return [GloFNDCallback()]
    >>> SimCLR(num_samples=100).criterion.thresholds.shape
    torch.Size([100])
"""

from __future__ import annotations

from collections.abc import Sequence, Sized
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import Dataset

from glofnd_losses.base import GloFNDLossBase
from glofnd_losses.ddp import ignore_loss_buffers_in_ddp

__all__ = ["GloFNDCallback", "WithIndex", "glofnd_losses_in"]


class WithIndex(Dataset[tuple[Any, ...]]):
    """A map-style data set whose items end with their own index.

    ``dataset[i]`` becomes ``(*dataset[i], i)`` when the item is a tuple (lightly's
    ``LightlyDataset`` returns ``(views, target, filename)``, torchvision's data sets
    ``(sample, target)``), and ``(dataset[i], i)`` otherwise. The index is the one the sampler
    asked for, so it is right under shuffling, ``DistributedSampler`` and any number of workers.

    Args:
        dataset: A map-style data set with ``__len__``.

    Examples:
        >>> from glofnd_losses.integrations.lightly import WithIndex
        >>> pairs = WithIndex([("a", 0), ("b", 1)])
        >>> pairs[1]
        ('b', 1, 1)
        >>> WithIndex(["x", "y"])[0]
        ('x', 0)
        >>> len(pairs)
        2
    """

    def __init__(self, dataset: Dataset[Any] | Sequence[Any]) -> None:
        if not isinstance(dataset, Sized):
            raise TypeError(f"dataset must be a map-style data set with __len__, got {type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index]
        if isinstance(item, tuple):
            return (*item, index)
        return (item, index)


def _averages_weights(callback: pl.Callback) -> bool:
    """Whether ``callback`` is Lightning's ``WeightAveraging`` (Lightning >= 2.5) or a subclass."""
    try:
        from pytorch_lightning.callbacks import WeightAveraging
    except ImportError:
        return False
    return isinstance(callback, WeightAveraging)


def glofnd_losses_in(module: nn.Module) -> list[GloFNDLossBase]:
    """Every GloFND loss among ``module`` and its submodules, in registration order."""
    return [child for child in module.modules() if isinstance(child, GloFNDLossBase)]


class GloFNDCallback(pl.Callback):
    """Lightning wiring of the GloFND losses held by a ``LightningModule``.

    * ``setup``: calls :func:`~glofnd_losses.ignore_loss_buffers_in_ddp` on the module. Lightning
      runs ``setup`` after the process group is initialised and before ``strategy.setup``
      wraps the module in ``DistributedDataParallel``, so DDP neither broadcasts the loss state
      at wrapping nor before every forward (the state is already identical on every rank; the
      broadcast would only cost time and bandwidth).
    * ``on_train_epoch_start`` and ``on_train_batch_start``: ``loss.set_epoch(trainer.current_epoch)``
      for every loss, so ``start_epoch`` and ``filter_start_epoch`` work, also after resuming
      (from a checkpoint saved on an epoch's last batch Lightning starts the next epoch without
      ``on_train_epoch_start``).
    * With Lightning's ``WeightAveraging`` (EMA, SWA) among the callbacks: that callback copies
      *every* buffer of the module from its averaged copy when training ends, which would replace
      the loss's per-sample state (thresholds, visit counts) by averaged or stale values. The
      state as training left it is kept at the end of each training epoch and put back in
      ``on_fit_end``, which runs after every callback's ``on_train_end``. Validation runs with
      the averaged module, loss state included, as ``WeightAveraging`` intends. The averaged
      copy's losses follow the epoch and step of training, so the checkpoints it writes (the
      averaged module's ``state_dict``) resume and validate at the right point of the schedule.
      Lightning's older ``StochasticWeightAveraging`` runs one more training epoch to recompute
      BatchNorm statistics, which the losses count and learn from: use ``WeightAveraging``.

    The loss state needs nothing here: it is made of buffers of the module, so it is in every
    Lightning checkpoint and restored with it.

    Return it from ``LightningModule.configure_callbacks`` to keep module and wiring together,
    or pass it to ``Trainer(callbacks=[...])``.

    Attributes:
        ignored_buffers: Names of the buffers excluded from DDP's broadcast (relative to the
            module), after ``setup``.

    Examples:
        >>> import pytorch_lightning as pl
        >>> from glofnd_losses import GloFNDNTXent
        >>> from glofnd_losses.integrations.lightly import GloFNDCallback
        >>> module = pl.LightningModule()
        >>> module.criterion = GloFNDNTXent(num_samples=10)
        >>> callback = GloFNDCallback()
        >>> callback.setup(pl.Trainer(logger=False, enable_progress_bar=False), module, stage="fit")
        >>> callback.ignored_buffers[:2]
        ['criterion.state.threshold', 'criterion.state.threshold_visits']
    """

    def __init__(self) -> None:
        super().__init__()
        self.ignored_buffers: list[str] = []
        self._guards_weight_averaging = False
        self._averaging_callbacks: list[pl.Callback] = []
        self._trained_states: list[dict[str, torch.Tensor]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not glofnd_losses_in(pl_module):
            raise ValueError(
                f"GloFNDCallback found no GloFND loss in {type(pl_module).__name__}: assign the loss as an "
                "attribute of the LightningModule (e.g. self.criterion = GloFNDNTXent(...))"
            )
        self.ignored_buffers = ignore_loss_buffers_in_ddp(pl_module)
        callbacks: list[pl.Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set in Trainer.__init__
        self._averaging_callbacks = [callback for callback in callbacks if _averages_weights(callback)]
        self._guards_weight_averaging = bool(self._averaging_callbacks)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for loss in glofnd_losses_in(pl_module):
            loss.set_epoch(trainer.current_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        for loss in glofnd_losses_in(pl_module):
            if loss.epoch != trainer.current_epoch:  # resumed from an epoch's last batch
                loss.set_epoch(trainer.current_epoch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        live = glofnd_losses_in(pl_module)
        for callback in self._averaging_callbacks:
            averaged = getattr(callback, "_average_model", None)  # WeightAveraging's copy, made in its setup
            if averaged is None:
                continue
            for loss, copy in zip(live, glofnd_losses_in(averaged)):
                copy.epoch, copy.step = loss.epoch, loss.step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._guards_weight_averaging:
            self._trained_states = [
                {name: buffer.clone() for name, buffer in loss.state.named_buffers()}
                for loss in glofnd_losses_in(pl_module)
            ]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every callback's on_train_end, where WeightAveraging copies its averaged buffers.
        for loss, trained in zip(glofnd_losses_in(pl_module), self._trained_states):
            for name, buffer in loss.state.named_buffers():
                buffer.copy_(trained[name])
        self._trained_states = []
