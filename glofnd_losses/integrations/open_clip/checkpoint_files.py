"""The loss state files beside open_clip's checkpoints: their names, saving, loading and restoring.

The loss state is saved as ``epoch_<n>.glofnd.pth`` (and ``epoch_latest.glofnd.pth``) beside
``epoch_<n>.pt``: not ending in ``.pt``, so ``--resume latest`` never picks it up as a checkpoint.
It records the checkpoint's epoch; a resume whose checkpoint and state disagree stops with an error
before the first step.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
from typing import Any

import open_clip_train.main as oc_main
import torch
from open_clip_train.file_utils import check_exists, pt_load

from glofnd_losses.image_text import ImageTextLossBase
from glofnd_losses.integrations.open_clip.flags import loss_kind

__all__ = [
    "LossStateFiles",
    "check_resumed_epoch",
    "load_loss_state",
    "loss_state_path",
    "restore_loss_state",
    "save_loss_state",
]

_STATE_SUFFIX = ".glofnd.pth"
_STATE_FORMAT = "glofnd-open_clip-loss-state-v1"
_EPOCH_CHECKPOINT = re.compile(r"epoch_\d+\.pt")
_STAGED_SUFFIX = ".staged"


def loss_state_path(checkpoint_path: str) -> str:
    """Where the loss state of an open_clip checkpoint lives: ``epoch_3.pt`` -> ``epoch_3.glofnd.pth``.

    Examples:
        >>> loss_state_path("logs/run/checkpoints/epoch_3.pt")
        'logs/run/checkpoints/epoch_3.glofnd.pth'
    """
    stem = checkpoint_path[: -len(".pt")] if checkpoint_path.endswith(".pt") else checkpoint_path
    return stem + _STATE_SUFFIX


def save_loss_state(loss: ImageTextLossBase, path: str, checkpoint_epoch: int | None = None) -> None:
    """Write ``loss``'s state (per-sample buffers, epoch and step) atomically to a local ``path``.

    ``checkpoint_epoch`` is the ``"epoch"`` of the open_clip checkpoint the state belongs to; a
    resume checks that the two match (:func:`load_loss_state`).

    The state is written to a temporary file named after the process (open_clip saves on rank 0
    only, but two processes saving to one path must not write into each other's file) and moved
    onto ``path`` with ``os.replace``: a process killed while saving leaves ``path`` holding the
    previous complete state. A save that fails removes its temporary file.
    """
    payload = {
        "format": _STATE_FORMAT,
        "num_samples": loss.num_samples,
        "estimator": loss_kind(loss),
        "detector": loss.detector.name,
        "checkpoint_epoch": checkpoint_epoch,
        "state_dict": loss.state_dict(),
    }
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def load_loss_state(loss: ImageTextLossBase, path: str) -> int | None:
    """Restore ``loss`` from :func:`save_loss_state`'s file (local path or fsspec URL).

    Returns:
        The epoch of the open_clip checkpoint the state was saved with (None if not recorded).

    Raises:
        ValueError: The file holds another kind of loss or another state size.
    """
    payload = pt_load(path, map_location="cpu")
    if not isinstance(payload, dict) or payload.get("format") != _STATE_FORMAT:
        raise ValueError(f"{path} is not a GloFND loss state written by glofnd_losses.integrations.open_clip")
    saved = {name: payload[name] for name in ("num_samples", "estimator", "detector")}
    current = {"num_samples": loss.num_samples, "estimator": loss_kind(loss), "detector": loss.detector.name}
    if saved != current:
        raise ValueError(
            f"{path} was saved by a loss with {saved}, this run has {current} "
            "(--glofnd-data-size, --glofnd-estimator or --siglip, --glofnd-detector)"
        )
    saved_fields, current_fields = sorted(payload["state_dict"]), sorted(loss.state_dict())
    if saved_fields != current_fields:
        raise ValueError(
            f"{path} holds the loss state entries {saved_fields}, this run's loss has {current_fields}: "
            "the threshold rule (--glofnd-threshold-rule, --glofnd-threshold-update) decides which are stored, "
            "so resume with the rule the state was saved with (or remove the file and pass "
            "--glofnd-fresh-state to start GloFND anew)"
        )
    loss.load_state_dict(payload["state_dict"])
    checkpoint_epoch = payload.get("checkpoint_epoch")
    return None if checkpoint_epoch is None else int(checkpoint_epoch)


def restore_loss_state(loss: ImageTextLossBase, args: argparse.Namespace) -> int | None:
    """Load the state saved beside ``args.resume``; a missing state is an error unless asked otherwise.

    Returns:
        The checkpoint epoch recorded with the state, or None.

    Raises:
        FileNotFoundError: No state beside the checkpoint, and no ``--glofnd-fresh-state``.
    """
    path = loss_state_path(args.resume)
    if check_exists(path):
        checkpoint_epoch = load_loss_state(loss, path)
        logging.info(f"GloFND: restored the loss state from {path} (epoch {loss.epoch}, step {loss.step})")
        return checkpoint_epoch
    if args.glofnd_fresh_state:
        logging.warning(f"GloFND: no loss state at {path}; starting a fresh one (--glofnd-fresh-state)")
        return None
    raise FileNotFoundError(
        f"--resume {args.resume}: no GloFND loss state at {path}. Pass --glofnd-fresh-state to start GloFND "
        "from scratch on top of this checkpoint."
    )


def check_resumed_epoch(args: argparse.Namespace, checkpoint_epoch: int, start_epoch: int) -> None:
    """The restored loss state must belong to the checkpoint the run resumes from.

    Raises:
        ValueError: The state was saved with another epoch's checkpoint.
    """
    if checkpoint_epoch != start_epoch:
        raise ValueError(
            f"--resume {args.resume}: the GloFND loss state beside it was saved with the checkpoint of epoch "
            f"{checkpoint_epoch}, but the checkpoint resumes at epoch {start_epoch} (the files are out of step). "
            f"Resume from epoch_{checkpoint_epoch}.pt if it exists, or pass --glofnd-fresh-state with a checkpoint "
            "that has no loss state beside it."
        )


@dataclasses.dataclass
class LossStateFiles:
    """Writes, moves and deletes the loss state in step with open_clip's own checkpoint files.

    open_clip's ``main`` writes ``epoch_<n>.pt`` with ``torch.save``; moves ``tmp.pt`` onto
    ``epoch_latest.pt`` with ``os.replace`` (``--save-most-recent``); and deletes
    ``epoch_<n-1>.pt`` with ``os.remove`` (``--delete-previous-checkpoint``), after evaluating the
    epoch. :meth:`save`, :meth:`replace` and :meth:`remove` do the same to the ``.glofnd.pth``
    beside each file at that moment, so a run stopped at any point (during evaluation, say) leaves
    every checkpoint with the state of its own epoch:

    * ``epoch_<n>.glofnd.pth`` is written just before ``epoch_<n>.pt`` (a checkpoint never exists
      without its state) and deleted just after it;
    * ``epoch_latest.glofnd.pth`` is staged when ``tmp.pt`` is written and moved into place right
      after open_clip's move of the checkpoint.

    The state records the checkpoint's epoch, checked when a run resumes from it.

    Attributes:
        loss: The run's GloFND loss (None until ``create_loss``, or when GloFND is disabled).
        checkpoint_path: ``args.checkpoint_path``.
        resumed_epoch: The checkpoint epoch recorded with a restored state, until the first epoch
            checks it.
    """

    loss: ImageTextLossBase | None = None
    checkpoint_path: str | None = None
    resumed_epoch: int | None = None

    def _checkpoint_name(self, path: Any) -> str | None:
        """The file name of ``path`` if it is in the checkpoint folder and GloFND runs, else None."""
        if self.loss is None or self.checkpoint_path is None or not isinstance(path, (str, os.PathLike)):
            return None
        path = os.fspath(path)
        if os.path.dirname(os.path.abspath(path)) != os.path.abspath(self.checkpoint_path):
            return None
        return os.path.basename(path)

    def save(self, obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        """``torch.save``, with the loss state written beside a checkpoint."""
        name = self._checkpoint_name(f)
        if name is None or self.loss is None:
            torch.save(obj, f, *args, **kwargs)
            return
        epoch = obj.get("epoch") if isinstance(obj, dict) else None
        if _EPOCH_CHECKPOINT.fullmatch(name) or name == oc_main.LATEST_CHECKPOINT_NAME:
            save_loss_state(self.loss, loss_state_path(os.fspath(f)), epoch)
            torch.save(obj, f, *args, **kwargs)
        else:  # a temporary file that ``replace`` moves into place
            torch.save(obj, f, *args, **kwargs)
            save_loss_state(self.loss, os.fspath(f) + _STAGED_SUFFIX, epoch)

    def replace(self, source: Any, destination: Any) -> None:
        """``os.replace``, with the staged loss state moved beside the checkpoint."""
        os.replace(source, destination)
        name = self._checkpoint_name(destination)
        staged = os.fspath(source) + _STAGED_SUFFIX
        if name is not None and os.path.exists(staged):
            os.replace(staged, loss_state_path(os.fspath(destination)))

    def remove(self, path: Any) -> None:
        """``os.remove``, with the loss state beside an epoch checkpoint removed too."""
        os.remove(path)
        name = self._checkpoint_name(path)
        if name is not None and _EPOCH_CHECKPOINT.fullmatch(name):
            beside = loss_state_path(os.fspath(path))
            if os.path.exists(beside):
                os.remove(beside)
