"""GloFND inside open_clip's training script (``open_clip_train``, open_clip_torch 3.x).

:func:`patch_open_clip_train` swaps six names that ``open_clip_train.main`` imports into its own
namespace (never their home modules) for the duration of a ``with`` block:

* ``parse_args``: the ``--glofnd-*`` flags (:func:`add_glofnd_arguments`) are parsed with
  ``parse_known_args``, everything else goes to open_clip's parser; unsupported set-ups are
  refused before anything is written (:func:`check_supported`).
* ``get_data``: the train split yields ``(image, text, index)``. CSV: the row number
  (:class:`IndexedCsvDataset`). Webdataset: the sample's ``__key__`` mapped to an int right before
  ``to_tuple`` (:class:`SampleKeyIndex`: img2dataset's numeric keys, or a key list).
* ``create_loss``: a :class:`~glofnd_losses.GloFNDClipLoss` on the training device, its state
  restored from beside ``--resume``'s checkpoint.
* ``train_one_epoch``: ``loss.set_epoch(epoch)``; open_clip's loop gets a data loader that strips
  the indices from each batch and a loss that adds them back as ``indices=...``; the flagged
  fraction and mean thresholds are logged at open_clip's logging steps (text log, TensorBoard,
  W&B).
* ``torch`` and ``os``: stand-ins whose ``torch.save``, ``os.replace`` and ``os.remove`` also
  write, move and delete the loss state beside each checkpoint file at the moment open_clip's main
  does it to the checkpoint (after the epoch's evaluation), so that a run stopped at any point
  leaves every checkpoint with the state of its own epoch (``_LossStateFiles``). Every other
  attribute is the real module's.

Two patches have no home in ``open_clip_train.main``'s namespace and are scoped to the same block:
while ``get_data`` builds the *train* split, ``open_clip_train.data``'s ``CsvDataset`` and ``wds``
names are swapped for the indexed versions; and ``torch.nn.parallel.DistributedDataParallel`` is a
subclass that drops ``device_ids`` for CPU modules (open_clip passes ``device_ids=[cpu]``, which
DDP rejects), so multi-process CPU runs work. Nothing else changes behaviour.

The loss state is saved as ``epoch_<n>.glofnd.pth`` (and ``epoch_latest.glofnd.pth``) beside
``epoch_<n>.pt``: not ending in ``.pt``, so ``--resume latest`` never picks it up as a checkpoint.
It records the checkpoint's epoch; a resume whose checkpoint and state disagree stops with an error
before the first step.

``--glofnd-disable`` runs open_clip's own loss and data pipeline untouched (then accum-freq,
distillation, SigLIP and CoCa are open_clip's business as usual).

Examples:
    >>> from glofnd_losses.integrations.open_clip import patch_open_clip_train
    >>> import open_clip_train.main
    >>> with patch_open_clip_train():
    ...     args = open_clip_train.main.parse_args(
    ...         ["--train-data", "train.csv", "--glofnd-alpha", "0.01", "--glofnd-estimator", "sogclr"]
    ...     )
    >>> args.glofnd_alpha, args.glofnd_estimator, args.train_data
    (0.01, 'sogclr', 'train.csv')
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import open_clip_train.data as oc_data
import open_clip_train.main as oc_main
import torch
import webdataset
from open_clip_train.distributed import is_master
from open_clip_train.file_utils import check_exists, pt_load
from torch.nn.parallel import DistributedDataParallel

from glofnd_losses.clip import GloFNDClipLoss
from glofnd_losses.thresholds import ThresholdOptimizer

__all__ = [
    "IndexedCsvDataset",
    "SampleKeyIndex",
    "add_glofnd_arguments",
    "check_supported",
    "create_glofnd_loss",
    "load_loss_state",
    "loss_state_path",
    "patch_open_clip_train",
    "save_loss_state",
    "threshold_optimizer_from_args",
]

_INDEX_FIELD = "__glofnd_index__"
_STATE_SUFFIX = ".glofnd.pth"
_STATE_FORMAT = "glofnd-open_clip-loss-state-v1"
_THRESHOLD_OVERRIDES = {  # flag dest -> ThresholdOptimizer field
    "glofnd_threshold_update": "rule",
    "glofnd_threshold_lr": "lr",
    "glofnd_threshold_min_lr": "min_lr",
    "glofnd_threshold_init": "init",
    "glofnd_threshold_decay": "lr_decay",
    "glofnd_threshold_normalize_grad": "normalize_grad",
    "glofnd_threshold_grad_clip": "grad_clip",
    "glofnd_threshold_step_unit": "step_unit",
    "glofnd_threshold_stop_at_batch_quantile": "stop_at_batch_quantile",
}


# ---------------------------------------------------------------------------------------------- flags
def add_glofnd_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``--glofnd-*`` flags (dest ``glofnd_*``) to ``parser``.

    Args:
        parser: Parser to extend; in :func:`patch_open_clip_train` a parser of its own, run with
            ``parse_known_args`` before open_clip's.
    """
    group = parser.add_argument_group("GloFND (glofnd_losses)")
    add = group.add_argument
    add("--glofnd-disable", action="store_true", help="Train with open_clip's own loss and data pipeline, untouched.")
    add(
        "--glofnd-alpha",
        type=float,
        default=1e-3,
        help="Target fraction of each anchor's negatives flagged as false negatives (paper: 5e-4 with sogclr, "
        "1e-3 with fastclip).",
    )
    add(
        "--glofnd-estimator",
        choices=("minibatch", "sogclr", "fastclip"),
        default="minibatch",
        help="Contrastive loss: 'minibatch' (open_clip's ClipLoss with filtered negatives), 'sogclr' (FastCLIP-v1) "
        "or 'fastclip' (FastCLIP-v3, learned temperature).",
    )
    add(
        "--glofnd-detector",
        choices=("glofnd", "fnc", "none"),
        default="glofnd",
        help="False-negative detector: learned global thresholds, FNC's mini-batch quantile, or none.",
    )
    add(
        "--glofnd-start-epoch",
        type=int,
        default=0,
        help="First 0-based epoch in which the thresholds learn (paper: 15 sogclr, 20 fastclip).",
    )
    add(
        "--glofnd-filter-start-epoch",
        type=int,
        default=None,
        help="First epoch in which flagged negatives leave the loss (default: --glofnd-start-epoch).",
    )
    add(
        "--glofnd-data-size",
        type=int,
        default=None,
        help="Rows of the per-sample state: every sample index must be below it. Default: the CSV row count, "
        "or the length of --glofnd-key-list. Required for webdataset with numeric keys (the largest key + 1; "
        "CC3M via img2dataset: 3318333).",
    )
    add(
        "--glofnd-key-list",
        default=None,
        metavar="FILE",
        help="Webdataset only: a file with one sample __key__ per line; a sample's index is its line number. "
        "Without it, keys must be decimal numbers (img2dataset's).",
    )
    add(
        "--glofnd-threshold-rule",
        choices=("default", "paper"),
        default="default",
        help="Preset of the threshold update: the package default, or the paper's per-sample Adam (lr 0.05, "
        "epoch-number bias correction).",
    )
    add("--glofnd-threshold-update", choices=("adam", "sgd"), default=None, help="Override the preset's rule.")
    add("--glofnd-threshold-lr", type=float, default=None, help="Override the preset's threshold step size.")
    add("--glofnd-threshold-min-lr", type=float, default=None, help="Override the preset's step-size floor.")
    add(
        "--glofnd-threshold-init",
        choices=("one", "minibatch_quantile"),
        default=None,
        help="Override the preset's initial threshold.",
    )
    add(
        "--glofnd-threshold-decay",
        choices=("constant", "inverse_sqrt"),
        default=None,
        help="Override the preset's per-sample step-size decay.",
    )
    add(
        "--glofnd-threshold-normalize-grad",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Override whether the preset divides the threshold subgradient by alpha.",
    )
    add(
        "--glofnd-threshold-grad-clip",
        type=float,
        default=None,
        help="Override the preset's clip of the (normalised) threshold subgradient.",
    )
    add(
        "--glofnd-threshold-step-unit",
        choices=("similarity", "score_std"),
        default=None,
        help="Override the unit of the threshold step size: cosine units, or the anchor's score standard deviation.",
    )
    add(
        "--glofnd-threshold-stop-at-batch-quantile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Override whether a threshold step stops at the mini-batch quantile (robust to abrupt score "
        "changes; costs a per-row topk every step).",
    )
    add("--glofnd-temperature", type=float, default=0.03, help="Fixed temperature of --glofnd-estimator sogclr.")
    add("--glofnd-rho", type=float, default=6.5, help="FastCLIP-v3's temperature penalty (fastclip).")
    add(
        "--glofnd-gamma",
        type=float,
        default=None,
        help="Constant moving-average weight of u (sogclr, fastclip) instead of the cosine schedule.",
    )
    add("--glofnd-gamma-min", type=float, default=0.2, help="Final gamma of the cosine schedule.")
    add("--glofnd-gamma-decay-epochs", type=int, default=18, help="Length of the gamma schedule in epochs.")
    add(
        "--glofnd-fresh-state",
        action="store_true",
        help="With --resume: start a new GloFND state if none was saved beside the checkpoint (default: error).",
    )


def _glofnd_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, usage=argparse.SUPPRESS)
    add_glofnd_arguments(parser)
    return parser


def _enabled(args: argparse.Namespace) -> bool:
    """Whether GloFND is active for these parsed arguments."""
    return not getattr(args, "glofnd_disable", True)


def threshold_optimizer_from_args(args: argparse.Namespace) -> ThresholdOptimizer:
    """The threshold update rule: the ``--glofnd-threshold-rule`` preset with the given overrides.

    Examples:
        >>> import argparse
        >>> parser = argparse.ArgumentParser()
        >>> add_glofnd_arguments(parser)
        >>> args = parser.parse_args(["--glofnd-threshold-rule", "paper", "--glofnd-threshold-lr", "0.02"])
        >>> threshold_optimizer_from_args(args).lr, threshold_optimizer_from_args(args).bias_correction
        (0.02, 'epoch')
    """
    preset = ThresholdOptimizer.paper() if args.glofnd_threshold_rule == "paper" else ThresholdOptimizer.default()
    overrides = {field: getattr(args, dest) for dest, field in _THRESHOLD_OVERRIDES.items()}
    return dataclasses.replace(preset, **{field: value for field, value in overrides.items() if value is not None})


def create_glofnd_loss(args: argparse.Namespace, num_samples: int | None = None) -> GloFNDClipLoss:
    """The :class:`~glofnd_losses.GloFNDClipLoss` the ``--glofnd-*`` flags describe (on the CPU).

    Args:
        args: Parsed arguments with the ``glofnd_*`` attributes.
        num_samples: State size; default ``args.glofnd_data_size``.

    Raises:
        ValueError: An invalid option, or no state size known.
    """
    size = args.glofnd_data_size if num_samples is None else num_samples
    if size is None:
        raise ValueError("the GloFND state size is unknown: pass --glofnd-data-size")
    return GloFNDClipLoss(
        num_samples=size,
        estimator=args.glofnd_estimator,
        alpha=args.glofnd_alpha,
        start_epoch=args.glofnd_start_epoch,
        detector=None if args.glofnd_detector == "none" else args.glofnd_detector,
        threshold_optimizer=threshold_optimizer_from_args(args),
        temperature=args.glofnd_temperature,
        rho=args.glofnd_rho,
        gamma=args.glofnd_gamma,
        gamma_min=args.glofnd_gamma_min,
        gamma_decay_epochs=args.glofnd_gamma_decay_epochs,
        filter_start_epoch=args.glofnd_filter_start_epoch,
    )


def _dataset_kind(args: argparse.Namespace) -> str:
    """``"csv"``, ``"webdataset"`` or ``"synthetic"``, resolved as open_clip resolves it."""
    build = oc_data.get_dataset_fn(args.train_data, args.dataset_type)
    kinds = {oc_data.get_csv_dataset: "csv", oc_data.get_wds_dataset: "webdataset"}
    return kinds.get(build, "synthetic")


def check_supported(args: argparse.Namespace) -> None:
    """Refuse set-ups the GloFND loss cannot serve (call on open_clip's parsed arguments).

    Raises:
        ValueError: With what to change.
    """
    problems = [
        (
            args.accum_freq > 1,
            "--accum-freq > 1",
            "open_clip calls the loss several times per optimiser step with the same samples, which would update "
            "their GloFND state several times; use a larger --batch-size (or more processes) instead",
        ),
        (
            bool(args.distill_model and args.distill_pretrained),
            "distillation (--distill-model)",
            "it trains with open_clip's DistillClipLoss",
        ),
        (args.siglip, "--siglip", "SigLIP's sigmoid loss is not CLIP's softmax loss"),
        ("coca" in args.model.lower(), "CoCa models", "they train with open_clip's CoCaLoss (with a captioning term)"),
        (args.horovod, "--horovod", "the GloFND losses communicate through torch.distributed"),
    ]
    for present, what, why in problems:
        if present:
            raise ValueError(
                f"GloFND does not support {what}: {why}. Pass --glofnd-disable to train with open_clip's own loss."
            )
    if args.train_data is None and args.dataset_type != "synthetic":
        return
    kind = _dataset_kind(args)
    if kind == "synthetic":
        raise ValueError("GloFND needs real samples with stable identities: use a CSV or webdataset --train-data")
    if kind == "webdataset" and "::" in args.train_data:
        raise ValueError(
            "GloFND does not support several webdataset sources joined with '::' in --train-data: the sample "
            "index comes from __key__, and img2dataset numbers every source's keys from 0, so samples of two "
            "sources would share GloFND state rows; write the sources as one set of shards with unique keys"
        )
    if args.glofnd_key_list is not None and kind != "webdataset":
        raise ValueError("--glofnd-key-list applies to webdataset training data only")
    if args.glofnd_key_list is not None:
        if not os.path.isfile(args.glofnd_key_list):
            raise ValueError(f"--glofnd-key-list: no such file {args.glofnd_key_list!r}")
        _key_index(args)  # duplicate keys, more keys than --glofnd-data-size: refused before anything is written
    if kind == "webdataset" and args.glofnd_data_size is None and args.glofnd_key_list is None:
        raise ValueError(
            "webdataset training needs --glofnd-data-size (the largest numeric sample key + 1; 3318333 for CC3M "
            "downloaded with img2dataset) or --glofnd-key-list FILE"
        )
    if args.glofnd_data_size is not None and args.glofnd_data_size < 1:
        raise ValueError(f"--glofnd-data-size must be positive, got {args.glofnd_data_size}")
    if kind == "csv" and args.glofnd_data_size is not None and os.path.isfile(args.train_data):
        # Before open_clip creates the run's log folder (a rerun under the same --name is refused).
        import pandas

        rows = len(pandas.read_csv(args.train_data, sep=args.csv_separator, usecols=[args.csv_img_key]))
        _check_data_size(args, rows)
    create_glofnd_loss(args, num_samples=1)  # validates every other loss option without allocating the state


# ---------------------------------------------------------------------------------------------- indices
class IndexedCsvDataset(oc_data.CsvDataset):
    r"""open_clip's ``CsvDataset`` whose items also carry their row number: ``(image, text, row)``.

    The row number (0-based, header excluded) is the sample's stable index into the GloFND state.

    Examples:
        >>> import pathlib, tempfile
        >>> from PIL import Image
        >>> folder = tempfile.TemporaryDirectory()
        >>> image = pathlib.Path(folder.name) / "cat.png"
        >>> Image.new("RGB", (4, 4)).save(image)
        >>> _ = (pathlib.Path(folder.name) / "train.csv").write_text(f"filepath\ttitle\n{image}\ta cat\n")
        >>> data = IndexedCsvDataset(
        ...     f"{folder.name}/train.csv", lambda im: im.size, img_key="filepath", caption_key="title",
        ...     tokenizer=lambda texts: texts,
        ... )
        >>> data[0]
        ((4, 4), 'a cat', 0)
        >>> folder.cleanup()
    """

    def __getitem__(self, idx: int) -> tuple[Any, Any, int]:
        image, text = super().__getitem__(idx)
        return image, text, int(idx)


class SampleKeyIndex:
    """Maps a webdataset sample's ``__key__`` to its row in the GloFND state.

    Without ``keys``, a key must be a decimal number (img2dataset writes
    ``shard * samples_per_shard + offset``, zero-padded) and the number is the index. With ``keys``
    (a precomputed list of every key of the data set), a key's index is its position in the list.
    Either way an index must be below ``num_samples``. Picklable and compact (a sorted byte array,
    not a dict), for data loader workers.

    Args:
        num_samples: Size of the GloFND state.
        keys: Every sample key, in index order; unique.

    Raises:
        ValueError: Duplicate keys, or more keys than ``num_samples``.

    Examples:
        >>> SampleKeyIndex(num_samples=100)("000000042")
        42
        >>> SampleKeyIndex(num_samples=3, keys=["b", "c", "a"])("a")
        2
        >>> SampleKeyIndex(num_samples=100)("cat_01")
        Traceback (most recent call last):
        ...
        ValueError: webdataset sample key 'cat_01' is not a decimal number, so it cannot index the GloFND state. ...
    """

    def __init__(self, num_samples: int, keys: Sequence[str] | None = None) -> None:
        self.num_samples = int(num_samples)
        self._sorted_keys: np.ndarray | None = None
        self._positions: np.ndarray | None = None
        if keys is not None:
            if len(keys) > self.num_samples:
                raise ValueError(f"the key list has {len(keys)} keys but --glofnd-data-size is {self.num_samples}")
            encoded = np.array([key.encode() for key in keys], dtype=np.bytes_)
            order = np.argsort(encoded, kind="stable")
            self._sorted_keys, self._positions = encoded[order], order
            duplicate = np.flatnonzero(self._sorted_keys[1:] == self._sorted_keys[:-1])
            if duplicate.size:
                raise ValueError(f"duplicate key {self._sorted_keys[duplicate[0]].decode()!r} in the key list")

    @classmethod
    def from_file(cls, path: str, num_samples: int | None = None) -> SampleKeyIndex:
        """Read one key per line; ``num_samples`` defaults to the number of keys."""
        with open(path, encoding="utf-8") as file:
            keys = [line.rstrip("\r\n") for line in file]
        return cls(len(keys) if num_samples is None else num_samples, keys)

    def __len__(self) -> int:
        return self.num_samples

    def __call__(self, key: str) -> int:
        index = self._numeric(key) if self._sorted_keys is None else self._listed(key)
        if index >= self.num_samples:
            raise ValueError(
                f"webdataset sample key {key!r} has index {index}, outside the GloFND state of {self.num_samples} "
                "rows: raise --glofnd-data-size above the largest sample index"
            )
        return index

    @staticmethod
    def _numeric(key: str) -> int:
        if not (key.isascii() and key.isdigit()):
            raise ValueError(
                f"webdataset sample key {key!r} is not a decimal number, so it cannot index the GloFND state. "
                "img2dataset writes numeric keys; for other data sets pass --glofnd-key-list FILE (every key, "
                "one per line; the line number is the index)"
            )
        return int(key)

    def _listed(self, key: str) -> int:
        assert self._sorted_keys is not None and self._positions is not None
        encoded = np.bytes_(key.encode())
        position = int(np.searchsorted(self._sorted_keys, encoded))
        if position == len(self._sorted_keys) or self._sorted_keys[position] != encoded:
            raise ValueError(f"webdataset sample key {key!r} is not in --glofnd-key-list")
        return int(self._positions[position])


@dataclasses.dataclass(frozen=True)
class _IndexedToTuple:
    """Pipeline stage replacing ``wds.to_tuple(*fields)``: the same tuples plus the sample index."""

    fields: tuple[str, ...]
    options: Mapping[str, Any]
    key_index: SampleKeyIndex

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[tuple[Any, ...]]:
        to_tuple = webdataset.to_tuple(*self.fields, _INDEX_FIELD, **self.options)
        return to_tuple(self._with_index(samples))

    def _with_index(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in samples:
            sample[_INDEX_FIELD] = self.key_index(sample["__key__"])
            yield sample


class _IndexedWebdataset:
    """Stands in for the ``webdataset`` module inside ``open_clip_train.data`` (train split only)."""

    def __init__(self, key_index: SampleKeyIndex) -> None:
        self._key_index = key_index

    def __getattr__(self, name: str) -> Any:
        return getattr(webdataset, name)

    def to_tuple(self, *fields: str, **options: Any) -> _IndexedToTuple:
        return _IndexedToTuple(fields, options, self._key_index)


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


def _train_split_only(build: Callable[..., Any], **substitutions: Any) -> Callable[..., Any]:
    """Wrap an ``open_clip_train.data.get_*_dataset`` to build its train split with substituted names."""

    def build_split(args: argparse.Namespace, preprocess_fn: Any, is_train: bool, *rest: Any, **kwargs: Any) -> Any:
        if not is_train:
            return build(args, preprocess_fn, is_train, *rest, **kwargs)
        with _swapped(oc_data, **substitutions):
            return build(args, preprocess_fn, is_train, *rest, **kwargs)

    return build_split


def _key_index(args: argparse.Namespace) -> SampleKeyIndex:
    """The webdataset key mapping of the ``--glofnd-*`` flags."""
    if args.glofnd_key_list is not None:
        return SampleKeyIndex.from_file(args.glofnd_key_list, args.glofnd_data_size)
    return SampleKeyIndex(args.glofnd_data_size)


def _check_data_size(args: argparse.Namespace, num_rows: int) -> None:
    """Refuse an explicit ``--glofnd-data-size`` smaller than the training data's ``num_rows``."""
    if args.glofnd_data_size < num_rows:
        raise ValueError(
            f"--glofnd-data-size {args.glofnd_data_size} is smaller than the {num_rows} rows of {args.train_data}: "
            "every row index must fit in the GloFND state"
        )


def _resolve_data_size(args: argparse.Namespace, num_rows: int) -> None:
    """Default ``args.glofnd_data_size`` to ``num_rows``; refuse a smaller explicit size."""
    if args.glofnd_data_size is None:
        args.glofnd_data_size = num_rows
    _check_data_size(args, num_rows)


# ---------------------------------------------------------------------------------------------- training loop
class _IndexStrippingLoader:
    """Yields ``(images, texts)`` from an indexed loader and keeps each batch's indices for the loss."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.num_batches = loader.num_batches
        self.num_samples = loader.num_samples
        self._pending: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for batch in self.loader:
            if len(batch) != 3:
                raise RuntimeError(
                    "expected (images, texts, indices) batches: the train data was not built by the GloFND get_data"
                )
            images, texts, indices = batch
            self._pending = torch.as_tensor(indices)
            yield images, texts

    def take_indices(self) -> torch.Tensor:
        """The current batch's indices; each batch's indices can be taken once."""
        if self._pending is None:
            raise RuntimeError("the loss was called twice for one batch (or before the first batch)")
        indices, self._pending = self._pending, None
        return indices


class _StatsLogger:
    """Logs ``loss.last_stats`` at open_clip's logging steps (text log, TensorBoard, W&B)."""

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


class _IndexedLoss:
    """Calls the GloFND loss with the current batch's indices; logs its stats when due."""

    def __init__(
        self, loss: GloFNDClipLoss, loader: _IndexStrippingLoader, logger: _StatsLogger, device: torch.device
    ) -> None:
        self.loss = loss
        self.loader = loader
        self.logger = logger
        self.device = device
        self.batch = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        indices = self.loader.take_indices().to(self.device, non_blocking=True)
        out = self.loss(*args, indices=indices, **kwargs)
        if self.logger.due(self.batch):
            self.logger.log(self.batch, self.loss.last_stats)
        self.batch += 1
        return out


# ---------------------------------------------------------------------------------------------- checkpoints
def loss_state_path(checkpoint_path: str) -> str:
    """Where the loss state of an open_clip checkpoint lives: ``epoch_3.pt`` -> ``epoch_3.glofnd.pth``.

    Examples:
        >>> loss_state_path("logs/run/checkpoints/epoch_3.pt")
        'logs/run/checkpoints/epoch_3.glofnd.pth'
    """
    stem = checkpoint_path[: -len(".pt")] if checkpoint_path.endswith(".pt") else checkpoint_path
    return stem + _STATE_SUFFIX


def save_loss_state(loss: GloFNDClipLoss, path: str, checkpoint_epoch: int | None = None) -> None:
    """Write ``loss``'s state (per-sample buffers, epoch and step) atomically to a local ``path``.

    ``checkpoint_epoch`` is the ``"epoch"`` of the open_clip checkpoint the state belongs to; a
    resume checks that the two match (:func:`load_loss_state`).
    """
    payload = {
        "format": _STATE_FORMAT,
        "num_samples": loss.num_samples,
        "estimator": loss.estimator,
        "detector": loss.detector.name,
        "checkpoint_epoch": checkpoint_epoch,
        "state_dict": loss.state_dict(),
    }
    temporary = path + ".tmp"
    torch.save(payload, temporary)
    os.replace(temporary, path)


def load_loss_state(loss: GloFNDClipLoss, path: str) -> int | None:
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
    current = {"num_samples": loss.num_samples, "estimator": loss.estimator, "detector": loss.detector.name}
    if saved != current:
        raise ValueError(
            f"{path} was saved by a loss with {saved}, this run has {current} "
            "(--glofnd-data-size, --glofnd-estimator, --glofnd-detector)"
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


def _restore(loss: GloFNDClipLoss, args: argparse.Namespace) -> int | None:
    """Load the state saved beside ``args.resume``; a missing state is an error unless asked otherwise.

    Returns:
        The checkpoint epoch recorded with the state, or None.
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


def _check_resumed_epoch(args: argparse.Namespace, checkpoint_epoch: int, start_epoch: int) -> None:
    """The restored loss state must belong to the checkpoint the run resumes from."""
    if checkpoint_epoch != start_epoch:
        raise ValueError(
            f"--resume {args.resume}: the GloFND loss state beside it was saved with the checkpoint of epoch "
            f"{checkpoint_epoch}, but the checkpoint resumes at epoch {start_epoch} (the files are out of step). "
            f"Resume from epoch_{checkpoint_epoch}.pt if it exists, or pass --glofnd-fresh-state with a checkpoint "
            "that has no loss state beside it."
        )


_EPOCH_CHECKPOINT = re.compile(r"epoch_\d+\.pt")
_STAGED_SUFFIX = ".staged"


class _ModuleStandIn:
    """A module with some attributes replaced; every other attribute is the module's own."""

    def __init__(self, module: Any, **replacements: Any) -> None:
        self._module = module
        self.__dict__.update(replacements)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


@dataclasses.dataclass
class _LossStateFiles:
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

    loss: GloFNDClipLoss | None = None
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
        os.replace(source, destination)
        name = self._checkpoint_name(destination)
        staged = os.fspath(source) + _STAGED_SUFFIX
        if name is not None and os.path.exists(staged):
            os.replace(staged, loss_state_path(os.fspath(destination)))

    def remove(self, path: Any) -> None:
        os.remove(path)
        name = self._checkpoint_name(path)
        if name is not None and _EPOCH_CHECKPOINT.fullmatch(name):
            beside = loss_state_path(os.fspath(path))
            if os.path.exists(beside):
                os.remove(beside)


# ---------------------------------------------------------------------------------------------- the patches
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
    files: _LossStateFiles

    def parse_args(self, argv: Sequence[str] | None) -> argparse.Namespace:
        parser = _glofnd_parser()
        if argv is not None and ("-h" in argv or "--help" in argv):
            parser.print_help()
        ours, rest = parser.parse_known_args(argv)
        args = self.original_parse_args(rest)
        vars(args).update(vars(ours))
        if _enabled(args):
            try:
                check_supported(args)
            except ValueError as error:
                parser.error(str(error))
        return args

    def get_data(self, args: argparse.Namespace, preprocess_fns: Any, epoch: int = 0, tokenizer: Any = None) -> Any:
        if not _enabled(args) or args.train_data is None:
            return self.original_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        if _dataset_kind(args) == "webdataset":
            key_index = _key_index(args)
            _resolve_data_size(args, len(key_index))
            build = _train_split_only(oc_data.get_wds_dataset, wds=_IndexedWebdataset(key_index))
            with _swapped(oc_data, get_wds_dataset=build):
                return self.original_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        build = _train_split_only(oc_data.get_csv_dataset, CsvDataset=IndexedCsvDataset)
        with _swapped(oc_data, get_csv_dataset=build):
            data = self.original_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        _resolve_data_size(args, len(data["train"].dataloader.dataset))
        return data

    def create_loss(self, args: argparse.Namespace) -> Any:
        if not _enabled(args):
            return self.original_create_loss(args)
        loss = create_glofnd_loss(args).to(torch.device(args.device))
        if args.resume is not None:
            self.files.resumed_epoch = _restore(loss, args)
        self.files.loss, self.files.checkpoint_path = loss, args.checkpoint_path
        if is_master(args):
            logging.info(f"GloFND: {type(loss).__name__}({loss.extra_repr()}, estimator={loss.estimator!r})")
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
        if not _enabled(args):
            return self.original_train_one_epoch(
                model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=tb_writer
            )
        if self.files.resumed_epoch is not None:
            resumed_epoch, self.files.resumed_epoch = self.files.resumed_epoch, None
            _check_resumed_epoch(args, resumed_epoch, epoch)
        loss.set_epoch(epoch)
        loader = _IndexStrippingLoader(data["train"].dataloader)
        indexed_data = {**data, "train": dataclasses.replace(data["train"], dataloader=loader)}
        logger = _StatsLogger(args, epoch, loader.num_batches, tb_writer)
        indexed_loss = _IndexedLoss(loss, loader, logger, torch.device(args.device))
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
        return result


@contextlib.contextmanager
def patch_open_clip_train() -> Iterator[None]:
    """Route ``open_clip_train.main.main`` through GloFND for the duration of the block.

    See the module docstring for what is patched and where.

    Examples:
        >>> import open_clip_train.main
        >>> with patch_open_clip_train():  # doctest: +SKIP
        ...     open_clip_train.main.main(["--train-data", "train.csv", "--glofnd-alpha", "1e-3", ...])
    """
    files = _LossStateFiles()
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
