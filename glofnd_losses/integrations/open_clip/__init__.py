"""GloFND inside open_clip's training script (``open_clip_train``, open_clip_torch 3.x).

``python -m glofnd_losses.integrations.open_clip <open_clip_train flags> --glofnd-...`` runs
``open_clip_train.main`` with :func:`patch_open_clip_train` (docs/open_clip.md has the launch
commands). The patches swap six names that ``open_clip_train.main`` imports into its own namespace
(never their home modules) for the duration of a ``with`` block:

* ``parse_args``: the ``--glofnd-*`` flags (:func:`add_glofnd_arguments`) are parsed with
  ``parse_known_args``, everything else goes to open_clip's parser; unsupported set-ups are
  refused before anything is written (:func:`check_supported`).
* ``get_data``: the train split yields ``(image, text, index)``. CSV: the row number
  (:class:`IndexedCsvDataset`). Webdataset: the sample's ``__key__`` mapped to an int right before
  ``to_tuple`` (:class:`SampleKeyIndex`: img2dataset's numeric keys, or a key list).
* ``create_loss``: a :class:`~glofnd_losses.GloFNDClipLoss` (with ``--siglip``, a
  :class:`~glofnd_losses.GloFNDSigLipLoss`) on the training device, its state restored from beside
  ``--resume``'s checkpoint.
* ``train_one_epoch``: ``loss.set_epoch(epoch)``; open_clip's loop gets a data loader that strips
  the indices from each batch and a loss that adds them back as ``indices=...``; the flagged
  fraction and mean thresholds are logged at open_clip's logging steps (text log, TensorBoard,
  W&B).
* ``torch`` and ``os``: stand-ins whose ``torch.save``, ``os.replace`` and ``os.remove`` also
  write, move and delete the loss state beside each checkpoint file at the moment open_clip's main
  does it to the checkpoint (after the epoch's evaluation), so that a run stopped at any point
  leaves every checkpoint with the state of its own epoch
  (:class:`~glofnd_losses.integrations.open_clip.checkpoint_files.LossStateFiles`). Every other
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

``--glofnd-disable`` runs open_clip's own loss and data pipeline untouched (then distillation is
open_clip's business as usual). A CoCa model trains GloFND on its contrastive part and open_clip's
caption loss unchanged (both weighted by open_clip's ``--coca-*-loss-weight``). With
``--accum-freq N`` the N loss calls of an optimiser step form one accumulated step of the GloFND
loss: it learns once, from the whole accumulated batch.

The modules: :mod:`~glofnd_losses.integrations.open_clip.flags` (the flags, the checks, the loss
they describe), :mod:`~glofnd_losses.integrations.open_clip.indices` (sample indices from the
data), :mod:`~glofnd_losses.integrations.open_clip.loss_proxy` (the loss open_clip's loop calls),
:mod:`~glofnd_losses.integrations.open_clip.checkpoint_files` (the state files),
:mod:`~glofnd_losses.integrations.open_clip.patches` (the patches) and
:mod:`~glofnd_losses.integrations.open_clip.cli` (the command line).

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

from glofnd_losses.integrations.open_clip.checkpoint_files import (
    load_loss_state,
    load_sharded_loss_state,
    loss_state_path,
    save_loss_state,
    save_sharded_loss_state,
    sharded_state_path,
)
from glofnd_losses.integrations.open_clip.flags import (
    add_glofnd_arguments,
    check_supported,
    create_glofnd_loss,
    threshold_optimizer_from_args,
)
from glofnd_losses.integrations.open_clip.indices import IndexedCsvDataset, SampleKeyIndex
from glofnd_losses.integrations.open_clip.patches import patch_open_clip_train

__all__ = [
    "IndexedCsvDataset",
    "SampleKeyIndex",
    "add_glofnd_arguments",
    "check_supported",
    "create_glofnd_loss",
    "load_loss_state",
    "load_sharded_loss_state",
    "loss_state_path",
    "patch_open_clip_train",
    "save_loss_state",
    "save_sharded_loss_state",
    "sharded_state_path",
    "threshold_optimizer_from_args",
]
