"""The patches of ``open_clip_train.main`` that route its training through GloFND.

:func:`patch_open_clip_train` swaps names in ``open_clip_train.main``'s namespace (never their
home modules) and two names elsewhere for the duration of a ``with`` block; the package docstring
(:mod:`glofnd_losses.integrations.open_clip`) lists them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import open_clip_train.data as oc_data
import open_clip_train.main as oc_main
import torch
from open_clip_train.distributed import is_master
from torch.nn.parallel import DistributedDataParallel

from glofnd_losses.integrations.open_clip.checkpoint_files import (
    LossStateFiles,
    check_resumed_epoch,
    restore_loss_state,
)
from glofnd_losses.integrations.open_clip.flags import (
    check_supported,
    create_glofnd_loss,
    dataset_kind,
    glofnd_parser,
    is_coca,
    is_enabled,
    key_index_from_args,
    resolve_data_size,
)
from glofnd_losses.integrations.open_clip.indices import IndexedCsvDataset, IndexedWebdataset, IndexStrippingLoader
from glofnd_losses.integrations.open_clip.loss_proxy import CaptionLoss, IndexedLoss, StatsLogger

__all__ = ["patch_open_clip_train"]


@contextlib.contextmanager
def _swapped(owner: Any, **replacements: Any) -> Iterator[None]:
    """Set attributes of ``owner`` for the duration of the block."""
    saved = {name: getattr(owner, name) for name in replacements}
    for name, value in replacements.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(owner, name, value)


class _ModuleStandIn:
    """A module with some attributes replaced; every other attribute is the module's own."""

    def __init__(self, module: Any, **replacements: Any) -> None:
        self._module = module
        self.__dict__.update(replacements)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _train_split_only(build: Callable[..., Any], **substitutions: Any) -> Callable[..., Any]:
    """Wrap an ``open_clip_train.data.get_*_dataset`` to build its train split with substituted names."""

    def build_split(args: argparse.Namespace, preprocess_fn: Any, is_train: bool, *rest: Any, **kwargs: Any) -> Any:
        if not is_train:
            return build(args, preprocess_fn, is_train, *rest, **kwargs)
        with _swapped(oc_data, **substitutions):
            return build(args, preprocess_fn, is_train, *rest, **kwargs)

    return build_split


class _CpuTolerantDDP(DistributedDataParallel):
    """``DistributedDataParallel`` that ignores ``device_ids`` for a CPU module instead of raising."""

    def __init__(
        self, module: torch.nn.Module, device_ids: Any = None, output_device: Any = None, *args: Any, **kwargs: Any
    ) -> None:
        if device_ids is not None and all(p.device.type == "cpu" for p in module.parameters()):
            device_ids, output_device = None, None
        super().__init__(module, device_ids, output_device, *args, **kwargs)


@dataclasses.dataclass(frozen=True)
class _Patches:
    """The replacements of ``open_clip_train.main``'s four functions, over the originals."""

    original_parse_args: Callable[..., Any]
    original_get_data: Callable[..., Any]
    original_create_loss: Callable[..., Any]
    original_train_one_epoch: Callable[..., Any]
    files: LossStateFiles

    def parse_args(self, argv: Sequence[str] | None) -> argparse.Namespace:
        parser = glofnd_parser()
        if argv is not None and ("-h" in argv or "--help" in argv):
            parser.print_help()
        ours, rest = parser.parse_known_args(argv)
        args = self.original_parse_args(rest)
        vars(args).update(vars(ours))
        if is_enabled(args):
            try:
                check_supported(args)
            except ValueError as error:
                parser.error(str(error))
        return args

    def get_data(self, args: argparse.Namespace, preprocess_fns: Any, epoch: int = 0, tokenizer: Any = None) -> Any:
        if not is_enabled(args) or args.train_data is None:
            return self.original_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        if dataset_kind(args) == "webdataset":
            key_index = key_index_from_args(args)
            resolve_data_size(args, len(key_index))
            build = _train_split_only(oc_data.get_wds_dataset, wds=IndexedWebdataset(key_index))
            with _swapped(oc_data, get_wds_dataset=build):
                return self.original_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        build = _train_split_only(oc_data.get_csv_dataset, CsvDataset=IndexedCsvDataset)
        with _swapped(oc_data, get_csv_dataset=build):
            data = self.original_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        resolve_data_size(args, len(data["train"].dataloader.dataset))
        return data

    def create_loss(self, args: argparse.Namespace) -> Any:
        if not is_enabled(args):
            return self.original_create_loss(args)
        loss = create_glofnd_loss(args).to(torch.device(args.device))
        if args.resume is not None:
            self.files.resumed_epoch = restore_loss_state(loss, args)
        self.files.loss, self.files.checkpoint_path = loss, args.checkpoint_path
        if is_master(args):
            logging.info(f"GloFND: {type(loss).__name__}({loss.extra_repr()})")
            if args.local_loss or args.gather_with_grad:
                logging.info("GloFND: --local-loss/--gather-with-grad are implied (local anchors x global batch)")
        return loss

    def train_one_epoch(
        self,
        model: Any,
        data: dict[str, Any],
        loss: Any,
        epoch: int,
        optimizer: Any,
        scaler: Any,
        scheduler: Any,
        dist_model: Any,
        args: argparse.Namespace,
        tb_writer: Any = None,
    ) -> Any:
        if not is_enabled(args):
            return self.original_train_one_epoch(
                model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=tb_writer
            )
        if self.files.resumed_epoch is not None:
            resumed_epoch, self.files.resumed_epoch = self.files.resumed_epoch, None
            check_resumed_epoch(args, resumed_epoch, epoch)
        loss.set_epoch(epoch)
        loader = IndexStrippingLoader(data["train"].dataloader)
        indexed_data = {**data, "train": dataclasses.replace(data["train"], dataloader=loader)}
        # open_clip's steps per epoch with --accum-freq: every accum_freq batches make one.
        logger = StatsLogger(args, epoch, loader.num_batches // args.accum_freq, tb_writer)
        caption = None
        if is_coca(args):
            caption = CaptionLoss(args.coca_caption_loss_weight, args.coca_contrastive_loss_weight)
        indexed_loss = IndexedLoss(loss, loader, logger, torch.device(args.device), args.accum_freq, caption)
        result = self.original_train_one_epoch(
            model,
            indexed_data,
            indexed_loss,
            epoch,
            optimizer,
            scaler,
            scheduler,
            dist_model,
            args,
            tb_writer=tb_writer,
        )
        loss.check_errors()
        self.files.save_sharded_after_training(args, epoch + 1)
        return result


@contextlib.contextmanager
def patch_open_clip_train() -> Iterator[None]:
    """Route ``open_clip_train.main.main`` through GloFND for the duration of the block.

    See the docstring of :mod:`glofnd_losses.integrations.open_clip` for what is patched and where.

    Examples:
        >>> import open_clip_train.main
        >>> with patch_open_clip_train():  # doctest: +SKIP
        ...     open_clip_train.main.main(["--train-data", "train.csv", "--glofnd-alpha", "1e-3", ...])
    """
    files = LossStateFiles()
    patches = _Patches(oc_main.parse_args, oc_main.get_data, oc_main.create_loss, oc_main.train_one_epoch, files)
    with (
        _swapped(
            oc_main,
            parse_args=patches.parse_args,
            get_data=patches.get_data,
            create_loss=patches.create_loss,
            train_one_epoch=patches.train_one_epoch,
            torch=_ModuleStandIn(torch, save=files.save),
            os=_ModuleStandIn(os, replace=files.replace, remove=files.remove),
        ),
        _swapped(torch.nn.parallel, DistributedDataParallel=_CpuTolerantDDP),
    ):
        yield
