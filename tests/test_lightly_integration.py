"""glofnd_losses.integrations.lightly: WithIndex and the Lightning wiring."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from glofnd_losses.integrations.lightly import GloFNDCallback, WithIndex, glofnd_losses_in
from tests import lightly_cases
from tests.lightly_cases import MARKER, TinySimCLR, loss_state, tiny_loader, trainer
from tests.multiprocess import run_ranks

# Expected Lightning warnings: mid-epoch resume of a plain DataLoader, a resumed run writing elsewhere,
# and Lightning's own use of a deprecated torch pytree API.
pytestmark = [
    pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended"),
    pytest.mark.filterwarnings("ignore:The dirpath has changed"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.* is deprecated"),
]


class Encoded(Dataset):
    """Item i is ``(tensor holding 1000 + i, label i % 3)``: the index can be read back from the item."""

    def __len__(self) -> int:
        return 50

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([1000.0 + index]), index % 3


def assert_indices_match(loader: DataLoader) -> list[int]:
    seen = []
    for values, labels, indices in loader:
        assert torch.equal(values[:, 0].long() - 1000, indices)
        assert torch.equal(labels, indices % 3)
        seen += indices.tolist()
    return seen


# ------------------------------------------------------------------------------------------ WithIndex
def test_with_index_appends_to_tuples_and_wraps_other_items() -> None:
    assert WithIndex(Encoded())[7][2] == 7 and len(WithIndex(Encoded())) == 50
    assert WithIndex(["a", "b"])[1] == ("b", 1)
    assert WithIndex([[1, 2]])[0] == ([1, 2], 0)  # a list item is one item, not unpacked
    with pytest.raises(TypeError, match="__len__"):
        WithIndex(iter([1, 2]))  # type: ignore[arg-type]


def test_with_index_under_shuffling_and_two_workers() -> None:
    generator = torch.Generator().manual_seed(0)
    shuffled = DataLoader(WithIndex(Encoded()), batch_size=8, shuffle=True, generator=generator)
    assert sorted(assert_indices_match(shuffled)) == list(range(50))
    workers = DataLoader(WithIndex(Encoded()), batch_size=4, shuffle=True, num_workers=2)
    assert sorted(assert_indices_match(workers)) == list(range(50))


def test_with_index_under_distributed_sampler() -> None:
    dataset = WithIndex(Encoded())
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=3)
        seen.append(assert_indices_match(DataLoader(dataset, batch_size=5, sampler=sampler)))
    assert len(seen[0]) == len(seen[1]) == 25
    assert sorted(seen[0] + seen[1]) == list(range(50))


# ------------------------------------------------------------------------------------------ Lightning
def test_callback_needs_a_loss() -> None:
    module = TinySimCLR()
    del module.criterion
    with pytest.raises(ValueError, match="no GloFND loss"):
        GloFNDCallback().setup(trainer(), module, stage="fit")


def test_setup_runs_before_ddp_wrapping_and_ddp_no_longer_overwrites_the_loss_buffers() -> None:
    ranks = run_ranks(lightly_cases.lightning_ddp_case, 2)
    plain = [result["plain"] for result in ranks]
    wired = [result["callback"] for result in ranks]
    assert [rank["marker_at_start"] for rank in plain] == [-0.5, -0.75]
    # Without the callback DDP broadcasts rank 0's buffers before every forward: rank 1's row is lost.
    assert [rank["marker_at_end"] for rank in plain] == [-0.5, -0.5]
    # With it the loss buffers are DDP-ignored (set in setup, before wrapping) and each rank keeps its own.
    assert [rank["marker_at_end"] for rank in wired] == [-0.5, -0.75]
    assert all(f"criterion.state.{name}" in wired[0]["ignored"] for name in wired[0]["rows"])
    for runs in (plain, wired):
        # The synced rows are identical on both ranks either way (the loss's own index-scatter sync).
        for name, rows in runs[0]["rows"].items():
            assert torch.equal(rows, runs[1]["rows"][name]), name
        assert (runs[0]["rows"]["threshold"] < 1).any()


def test_callback_sets_the_epoch() -> None:
    module = TinySimCLR(start_epoch=1)
    trainer(max_epochs=3).fit(module, tiny_loader())
    assert module.epochs_seen == [0, 1, 2] and module.criterion.epoch == 2
    assert module.criterion in glofnd_losses_in(module)


def test_lightning_checkpoint_holds_and_restores_the_loss_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    first = TinySimCLR()
    first_trainer = trainer(max_steps=3, default_root_dir=tmp_path)
    first_trainer.fit(first, tiny_loader())
    path = tmp_path / "three.ckpt"
    first_trainer.save_checkpoint(path)
    saved = loss_state(first)
    assert (saved["threshold"][:MARKER] < 1).any()

    checkpoint = torch.load(path, weights_only=False)
    for name, value in saved.items():
        assert torch.equal(checkpoint["state_dict"][f"criterion.state.{name}"], value)
    assert checkpoint["state_dict"]["criterion._extra_state"].tolist() == [0, 3]

    class Probe(TinySimCLR):
        def on_train_start(self) -> None:
            self.restored = loss_state(self)
            self.restored_step = self.criterion.step

    resumed = Probe()
    trainer(max_steps=5, default_root_dir=tmp_path).fit(resumed, tiny_loader(), ckpt_path=path)
    for name, value in saved.items():
        assert torch.equal(resumed.restored[name], value), name
    assert resumed.restored_step == 3 and resumed.criterion.step == 5
    # set_epoch ran for both epochs of the resumed run (Lightning's epoch count; TinySimCLR checks it equals).
    assert len(resumed.epochs_seen) == 2


def test_with_index_on_a_lightly_dataset_with_the_default_collate() -> None:
    from lightly.data import LightlyDataset
    from lightly.transforms import SimCLRTransform
    from PIL import Image

    class Shades(Dataset):
        transform = None  # LightlyDataset.from_torch_dataset sets it

        def __len__(self) -> int:
            return 12

        def __getitem__(self, index: int) -> tuple[object, int]:
            image = Image.new("RGB", (16, 16), color=(20 * index, 0, 0))
            return (self.transform(image) if self.transform else image), index % 3

    dataset = WithIndex(LightlyDataset.from_torch_dataset(Shades(), transform=SimCLRTransform(input_size=16)))
    for (view_0, view_1), targets, filenames, indices in DataLoader(dataset, batch_size=4, shuffle=True):
        assert view_0.shape == view_1.shape == (4, 3, 16, 16)
        assert torch.equal(targets, indices % 3) and list(filenames) == [str(i) for i in indices.tolist()]


@pytest.mark.parametrize(("averaging_first", "sogclr"), [(True, False), (False, False), (True, True)])
def test_weight_averaging_does_not_replace_the_loss_state(averaging_first: bool, sogclr: bool) -> None:
    # Lightning's WeightAveraging copies every buffer of the module from its averaged copy when
    # training ends: the loss state must stay the one training left, whatever the callback order.
    from pytorch_lightning.callbacks import WeightAveraging

    class LastTrainingState(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: object) -> None:
            self.state = {name: value.clone() for name, value in module.criterion.state.named_buffers()}

    torch.manual_seed(0)
    module = TinySimCLR(use_callback=False, sogclr=sogclr)  # SogCLR: a 0/1 flag per sample, averaged too
    probe = LastTrainingState()
    glofnd, averaging = GloFNDCallback(), WeightAveraging()
    callbacks = [averaging, glofnd] if averaging_first else [glofnd, averaging]
    trainer(max_epochs=3, callbacks=[*callbacks, probe]).fit(module, tiny_loader())
    assert (probe.state["threshold"] < 1).any() and int(probe.state["threshold_visits"].max()) >= 2
    for name, value in module.criterion.state.named_buffers():
        assert torch.equal(value, probe.state[name]), name


def test_weight_averaging_checkpoints_carry_the_schedule_position(tmp_path: Path) -> None:
    # WeightAveraging writes its averaged copy's state_dict: its loss must be at training's epoch and step.
    from pytorch_lightning.callbacks import ModelCheckpoint, WeightAveraging

    torch.manual_seed(0)
    module = TinySimCLR(start_epoch=1)
    saving = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=3)
    trainer(max_steps=6, callbacks=[WeightAveraging(), saving], enable_checkpointing=True).fit(module, tiny_loader())
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert "current_model_state" in checkpoint, "WeightAveraging did not write the checkpoint: the test is vacuous"
    assert checkpoint["state_dict"]["criterion._extra_state"].tolist() == [1, 6]


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")  # the resumed run's own
def test_resuming_from_the_last_batch_of_an_epoch_sets_the_next_epoch(tmp_path: Path) -> None:
    # Lightning resumes such a checkpoint at the next epoch without calling on_train_epoch_start.
    from pytorch_lightning.callbacks import ModelCheckpoint

    class EpochTrace(TinySimCLR):
        def on_train_epoch_start(self) -> None:
            self.epochs_seen.append(self.criterion.epoch)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.seen.append((self.current_epoch, self.criterion.epoch))
            return super().training_step(batch, batch_idx)

    for max_steps, resume in ((4, None), (8, "last")):  # 4 batches per epoch
        module = EpochTrace(start_epoch=1)
        module.seen = []
        saving = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=4)
        trainer(max_steps=max_steps, callbacks=[saving], enable_checkpointing=True).fit(
            module, tiny_loader(), ckpt_path=resume
        )
    assert module.epochs_seen == [], "Lightning called on_train_epoch_start: the case is not the one tested"
    assert module.seen == [(1, 1)] * 4
    assert (module.criterion.thresholds[:MARKER] < 1).any()  # learned from epoch 1 = start_epoch
