"""The loss state files beside open_clip's checkpoints: their names, saving, loading and restoring.

The loss state is saved as ``epoch_<n>.glofnd.pth`` (and ``epoch_latest.glofnd.pth``) beside
``epoch_<n>.pt``: not ending in ``.pt``, so ``--resume latest`` never picks it up as a checkpoint.
It records the checkpoint's epoch; a resume whose checkpoint and state disagree stops with an error
before the first step.

With ``--glofnd-state-sharding sharded`` no process holds the whole state: every process writes its
rows with ``torch.distributed.checkpoint`` into the folder ``epoch_<n>.glofnd.dcp`` (and
``epoch_latest.glofnd.dcp``) at the end of the epoch's training, before open_clip's rank 0 writes
the checkpoint; the folder is complete once rank 0 has written its ``glofnd.json``. Either form
resumes either mode at any number of processes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
from typing import Any

import open_clip_train.main as oc_main
import torch
from open_clip_train.distributed import broadcast_object
from open_clip_train.file_utils import check_exists, pt_load

from glofnd_losses import checkpoint, distributed
from glofnd_losses.image_text import ImageTextLossBase
from glofnd_losses.integrations.open_clip.flags import loss_kind

__all__ = [
    "LossStateFiles",
    "check_resumed_epoch",
    "load_loss_state",
    "loss_state_path",
    "restore_loss_state",
    "save_loss_state",
    "load_sharded_loss_state",
    "save_sharded_loss_state",
    "sharded_state_path",
]

_STATE_SUFFIX = ".glofnd.pth"
_SHARDED_SUFFIX = ".glofnd.dcp"
_SHARDED_RECORD = "glofnd.json"
_STAGED_LATEST = "tmp.pt.staged" + _SHARDED_SUFFIX
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


def sharded_state_path(checkpoint_path: str) -> str:
    """The folder of a sharded loss state: ``epoch_3.pt`` -> ``epoch_3.glofnd.dcp``.

    Examples:
        >>> sharded_state_path("logs/run/checkpoints/epoch_3.pt")
        'logs/run/checkpoints/epoch_3.glofnd.dcp'
    """
    return loss_state_path(checkpoint_path)[: -len(_STATE_SUFFIX)] + _SHARDED_SUFFIX


def _record(loss: ImageTextLossBase, checkpoint_epoch: int | None) -> dict[str, Any]:
    """What a saved state records of its loss, checked on resume."""
    return {
        "format": _STATE_FORMAT,
        "num_samples": loss.num_samples,
        "estimator": loss_kind(loss),
        "detector": loss.detector.name,
        "checkpoint_epoch": checkpoint_epoch,
    }


def _check_saved_loss(path: str, record: Any, saved_keys: list[str], loss: ImageTextLossBase) -> None:
    """A ValueError unless the state at ``path`` (its ``record`` and entry names) fits ``loss``."""
    if not isinstance(record, dict) or record.get("format") != _STATE_FORMAT:
        raise ValueError(f"{path} is not a GloFND loss state written by glofnd_losses.integrations.open_clip")
    saved = {name: record[name] for name in ("num_samples", "estimator", "detector")}
    current = {"num_samples": loss.num_samples, "estimator": loss_kind(loss), "detector": loss.detector.name}
    if saved != current:
        raise ValueError(
            f"{path} was saved by a loss with {saved}, this run has {current} "
            "(--glofnd-data-size, --glofnd-estimator or --siglip, --glofnd-detector)"
        )
    current_keys = sorted(loss.state_dict(keep_vars=True))
    if sorted(saved_keys) != current_keys:
        raise ValueError(
            f"{path} holds the loss state entries {sorted(saved_keys)}, this run's loss has {current_keys}: "
            "the threshold rule (--glofnd-threshold-rule, --glofnd-threshold-update) decides which are stored, "
            "so resume with the rule the state was saved with (or remove the file and pass "
            "--glofnd-fresh-state to start GloFND anew)"
        )


def save_loss_state(loss: ImageTextLossBase, path: str, checkpoint_epoch: int | None = None) -> None:
    """Write ``loss``'s state (per-sample buffers, epoch and step) atomically to a local ``path``.

    ``checkpoint_epoch`` is the ``"epoch"`` of the open_clip checkpoint the state belongs to; a
    resume checks that the two match (:func:`load_loss_state`).

    The state is written to a temporary file named after the process (open_clip saves on rank 0
    only, but two processes saving to one path must not write into each other's file) and moved
    onto ``path`` with ``os.replace``: a process killed while saving leaves ``path`` holding the
    previous complete state. A save that fails removes its temporary file.
    """
    payload = {**_record(loss, checkpoint_epoch), "state_dict": loss.state_dict()}
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
    saved_keys = list(payload["state_dict"]) if isinstance(payload, dict) and "state_dict" in payload else []
    _check_saved_loss(path, payload, saved_keys, loss)
    loss.load_state_dict(payload["state_dict"])
    checkpoint_epoch = payload.get("checkpoint_epoch")
    return None if checkpoint_epoch is None else int(checkpoint_epoch)


def save_sharded_loss_state(loss: ImageTextLossBase, path: str, checkpoint_epoch: int | None = None) -> None:
    """Every process: write ``loss``'s state into the local folder ``path`` (torch.distributed.checkpoint).

    A collective: every process writes its rows, then rank 0 records the loss (the
    :func:`_record`) in ``glofnd.json``, last: a folder without it is incomplete and is not loaded.
    An earlier state in the folder is removed first.
    """
    if distributed.rank() == 0 and os.path.isdir(path):
        shutil.rmtree(path)
    if distributed.is_distributed():
        torch.distributed.barrier()  # no process writes into the folder before it is emptied
    checkpoint.save_state(loss, path)
    if distributed.rank() == 0:
        temporary = os.path.join(path, f"{_SHARDED_RECORD}.{os.getpid()}.tmp")
        with open(temporary, "w") as file:
            json.dump(_record(loss, checkpoint_epoch), file)
        os.replace(temporary, os.path.join(path, _SHARDED_RECORD))


def load_sharded_loss_state(loss: ImageTextLossBase, path: str) -> int | None:
    """Every process: restore ``loss`` from :func:`save_sharded_loss_state`'s folder, at any number of processes.

    Returns:
        The epoch of the open_clip checkpoint the state was saved with (None if not recorded).

    Raises:
        ValueError: The folder holds another kind of loss or another state size, or is incomplete.
    """
    record_path = os.path.join(path, _SHARDED_RECORD)
    if not os.path.exists(record_path):
        raise ValueError(f"{path} has no {_SHARDED_RECORD}: the state was not saved completely")
    with open(record_path) as file:
        record = json.load(file)
    _check_saved_loss(path, record, checkpoint.saved_keys(path), loss)
    checkpoint.load_state(loss, path)
    checkpoint_epoch = record.get("checkpoint_epoch")
    return None if checkpoint_epoch is None else int(checkpoint_epoch)


def restore_loss_state(loss: ImageTextLossBase, args: argparse.Namespace) -> int | None:
    """Load the state saved beside ``args.resume``; a missing state is an error unless asked otherwise.

    Returns:
        The checkpoint epoch recorded with the state, or None.

    Raises:
        FileNotFoundError: No state beside the checkpoint, and no ``--glofnd-fresh-state``.
    """
    sharded = sharded_state_path(args.resume)
    # Rank 0 decides for all (a shared file system may show the files to some ranks before others,
    # and the sharded load is a collective).
    found = "sharded" if os.path.isdir(sharded) else "file" if check_exists(loss_state_path(args.resume)) else None
    if distributed.is_distributed():
        found = broadcast_object(args, found)
    if found == "sharded":
        checkpoint_epoch = load_sharded_loss_state(loss, sharded)
        logging.info(f"GloFND: restored the loss state from {sharded} (epoch {loss.epoch}, step {loss.step})")
        return checkpoint_epoch
    path = loss_state_path(args.resume)
    if found == "file":
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

    A sharded state (``--glofnd-state-sharding sharded``) is written by every process in
    :meth:`save_sharded_after_training`, before open_clip's checkpoints of the epoch: the epoch's
    folder in place, the latest one staged and moved into place by :meth:`replace`.

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

    def save_sharded_after_training(self, args: argparse.Namespace, completed_epoch: int) -> None:
        """Every process, after an epoch's training: write the sharded state open_clip's checkpoints will need.

        The folder of ``epoch_<completed_epoch>.pt`` when open_clip saves that epoch, and the staged
        folder of ``epoch_latest.pt`` with ``--save-most-recent`` (the conditions of open_clip's
        ``main``, which saves on rank 0 only).
        """
        if self.loss is None or self.loss.state.sharding != "sharded" or not _saves_checkpoints(args):
            return
        due = completed_epoch == args.epochs or (args.save_frequency > 0 and completed_epoch % args.save_frequency == 0)
        if due:
            path = sharded_state_path(os.path.join(args.checkpoint_path, f"epoch_{completed_epoch}.pt"))
            save_sharded_loss_state(self.loss, path, completed_epoch)
        if args.save_most_recent:
            save_sharded_loss_state(self.loss, os.path.join(args.checkpoint_path, _STAGED_LATEST), completed_epoch)

    def save(self, obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        """``torch.save``, with the loss state written beside a checkpoint (a sharded one is already there)."""
        name = self._checkpoint_name(f)
        if name is None or self.loss is None or self.loss.state.sharding == "sharded":
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
        if name is None:
            return
        staged = os.fspath(source) + _STAGED_SUFFIX
        if os.path.exists(staged):
            os.replace(staged, loss_state_path(os.fspath(destination)))
        staged_folder = os.path.join(os.path.dirname(os.fspath(source)), _STAGED_LATEST)
        if os.path.isdir(staged_folder):
            target = sharded_state_path(os.fspath(destination))
            previous = f"{target}.previous.{os.getpid()}"
            if os.path.isdir(target):  # renamed aside, not deleted, until the new one is in place
                os.replace(target, previous)
            os.replace(staged_folder, target)
            shutil.rmtree(previous, ignore_errors=True)

    def remove(self, path: Any) -> None:
        """``os.remove``, with the loss state beside an epoch checkpoint removed too."""
        os.remove(path)
        name = self._checkpoint_name(path)
        if name is not None and _EPOCH_CHECKPOINT.fullmatch(name):
            beside = loss_state_path(os.fspath(path))
            if os.path.exists(beside):
                os.remove(beside)
            folder = sharded_state_path(os.fspath(path))
            if os.path.isdir(folder):
                shutil.rmtree(folder)


def _saves_checkpoints(args: argparse.Namespace) -> bool:
    """Whether open_clip's ``main`` writes checkpoints (on rank 0; the same answer on every process)."""
    return bool(args.logs) and str(args.logs).lower() != "none"
