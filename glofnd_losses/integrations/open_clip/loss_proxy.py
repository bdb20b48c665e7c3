"""What open_clip's training loop calls as its loss: the GloFND loss given each batch's indices.

open_clip calls ``loss(image_features, text_features, logit_scale, ...)``; :class:`IndexedLoss` adds
the indices the :class:`~glofnd_losses.integrations.open_clip.indices.IndexStrippingLoader` kept
for the batch, and :class:`StatsLogger` writes the loss's stats at open_clip's logging steps.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from typing import Any

import torch
from open_clip_train.distributed import is_master

from glofnd_losses.image_text import ImageTextLossBase
from glofnd_losses.integrations.open_clip.indices import IndexStrippingLoader

__all__ = ["IndexedLoss", "StatsLogger"]


class StatsLogger:
    """Logs ``loss.last_stats`` at open_clip's logging steps (text log, TensorBoard, W&B).

    Args:
        args: open_clip's parsed arguments (``log_every_n_steps``, ``wandb``, the rank).
        epoch: The 0-based epoch being trained.
        num_batches: Batches per epoch.
        tb_writer: open_clip's TensorBoard writer, or None.
    """

    def __init__(self, args: argparse.Namespace, epoch: int, num_batches: int, tb_writer: Any) -> None:
        self.args = args
        self.epoch = epoch
        self.num_batches = num_batches
        self.tb_writer = tb_writer

    def due(self, batch: int) -> bool:
        """open_clip's condition for logging after ``batch`` (0-based, within the epoch)."""
        every = self.args.log_every_n_steps
        return is_master(self.args) and (batch % every == 0 or batch + 1 == self.num_batches)

    def log(self, batch: int, stats: Mapping[str, torch.Tensor]) -> None:
        """Convert the stats to floats (one host sync) and write them."""
        if not stats:
            return
        values = dict(zip(stats, torch.stack([value.float() for value in stats.values()]).tolist()))
        logging.info(
            f"GloFND epoch {self.epoch} step {batch + 1}/{self.num_batches}: "
            + " ".join(f"{name} {value:.4g}" for name, value in values.items())
        )
        step = self.num_batches * self.epoch + batch
        scalars = {f"train/glofnd/{name}": value for name, value in values.items()}
        if self.tb_writer is not None:
            for name, value in scalars.items():
                self.tb_writer.add_scalar(name, value, step)
        if self.args.wandb:
            import wandb

            wandb.log(scalars, step=step)


class CaptionLoss:
    """CoCa's captioning term, as open_clip's ``CoCaLoss`` adds it to the contrastive one.

    ``caption_weight * cross_entropy(logits, labels)`` over the caption tokens, padding (token 0
    of open_clip's tokenizers) ignored; the contrastive loss is scaled by ``contrastive_weight``.

    Args:
        caption_weight: open_clip's ``--coca-caption-loss-weight``.
        contrastive_weight: open_clip's ``--coca-contrastive-loss-weight``.
        pad_id: The padding token of the captions.
    """

    def __init__(self, caption_weight: float, contrastive_weight: float, pad_id: int = 0) -> None:
        self.caption_weight = caption_weight
        self.contrastive_weight = contrastive_weight
        self.pad_id = pad_id

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The weighted caption loss of token ``logits`` ``(b, n, vocab)`` against ``labels`` ``(b, n)``."""
        per_token = torch.nn.functional.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=self.pad_id)
        return self.caption_weight * per_token


class IndexedLoss:
    """Calls the GloFND loss with the current step's indices; logs its stats when due.

    With ``--accum-freq N`` open_clip loads N batches, then calls the loss N times on all of them
    (one micro-batch's features with gradients each time): those calls get the N batches'
    indices and form one accumulated step of the loss (:meth:`GloFNDLossBase.begin_accumulation`).

    Args:
        loss: The run's GloFND loss.
        loader: The loader whose batches' indices the loss takes.
        logger: Writes the loss's stats.
        device: Where the indices go (the training device).
        accum_freq: open_clip's ``--accum-freq``: loss calls (and batches) per optimiser step.
        caption: CoCa's captioning term (the model's ``logits`` and caption ``labels``), or None.
    """

    def __init__(
        self,
        loss: ImageTextLossBase,
        loader: IndexStrippingLoader,
        logger: StatsLogger,
        device: torch.device,
        accum_freq: int = 1,
        caption: CaptionLoss | None = None,
    ) -> None:
        self.loss = loss
        self.caption = caption
        self.loader = loader
        self.logger = logger
        self.device = device
        self.accum_freq = accum_freq
        self.batch = 0
        self.calls_in_step = 0
        self.indices: torch.Tensor | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.calls_in_step == 0:
            self.indices = self.loader.take_indices(self.accum_freq).to(self.device, non_blocking=True)
            self.loss.begin_accumulation(self.accum_freq)
        out = self._losses(*args, **kwargs)
        self.calls_in_step += 1
        if self.calls_in_step == self.accum_freq:
            self.calls_in_step = 0
            if self.logger.due(self.batch):
                self.logger.log(self.batch, self.loss.last_stats)
            self.batch += 1
        return out

    def _losses(self, *args: Any, **kwargs: Any) -> Any:
        """The GloFND loss's output, with CoCa's weighted contrastive and caption terms where there is a caption."""
        if self.caption is None:
            return self.loss(*args, indices=self.indices, **kwargs)
        # CoCa's model outputs: the caption's token logits and labels are not the contrastive loss's.
        logits, labels = kwargs.pop("logits"), kwargs.pop("labels")
        output_dict = kwargs.pop("output_dict", False)
        contrastive = self.loss(*args, indices=self.indices, **kwargs) * self.caption.contrastive_weight
        caption = self.caption(logits, labels)
        return {"contrastive_loss": contrastive, "caption_loss": caption} if output_dict else (contrastive, caption)
