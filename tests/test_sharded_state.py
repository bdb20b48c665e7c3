"""Sharded per-sample state: identical to the replicated state on real 2- and 3-rank runs (gloo).

Every case runs the same global batches through a replicated and a sharded loss in the same
processes: losses, gradients and every state row must be bit-identical (the rows travel as float64,
which holds every stored value exactly). Checkpoints go through torch.distributed.checkpoint and
resume at another world size.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from glofnd_losses import GloFNDClipLoss, GloFNDSogCLRLoss
from tests import sharded_cases
from tests.multiprocess import run_ranks
from tests.test_distributed import make_batches

NUM_SAMPLES = 40


def batches_with_duplicates(steps: int, global_batch: int, seed: int) -> list:
    """Batches whose indices repeat inside a rank (positions 0, 1) and across ranks (first and last).

    Unit-norm rows: the image-text losses take normalised features, as open_clip's models return.
    """
    batches = make_batches(steps, global_batch, dim=8, num_samples=NUM_SAMPLES, seed=seed)
    for _, _, indices, _ in batches:
        indices[1] = indices[0]
    normalize = torch.nn.functional.normalize
    return [(normalize(view_a, dim=1), normalize(view_b, dim=1), indices, labels)
            for view_a, view_b, indices, labels in batches]  # fmt: skip


CASES = {
    "sogclr-default": ("sogclr", {"num_samples": NUM_SAMPLES, "alpha": 0.1}),
    "sogclr-adam": ("sogclr", {"num_samples": NUM_SAMPLES, "alpha": 0.1, "optimizer": {"rule": "adam", "lr": 0.2}}),
    "ntxent": ("ntxent", {"num_samples": NUM_SAMPLES, "alpha": 0.1}),
    "clip-sogclr": ("clip", {"num_samples": NUM_SAMPLES, "alpha": 0.1, "estimator": "sogclr"}),
    "siglip": ("siglip", {"num_samples": NUM_SAMPLES, "alpha": 0.1}),
}


def full_state(blocks: list[dict[str, torch.Tensor]], owned: list[range]) -> dict[str, torch.Tensor]:
    """Every rank's blocks of each per-sample entry, in rank order, as one tensor (others from rank 0)."""
    assembled = {}
    for key, value in blocks[0].items():
        if value.dim() == 1 and key.startswith("state."):
            assert all(block[key].shape[0] == len(rows) for block, rows in zip(blocks, owned))
            assembled[key] = torch.cat([block[key] for block in blocks])
        else:
            assembled[key] = value
    return assembled


def assert_identical(replicated: dict[str, Any], sharded: dict[str, Any], owned: range) -> None:
    for step, (value, grads) in enumerate(zip(replicated["values"], replicated["grads"])):
        assert torch.equal(sharded["values"][step], value), f"loss differs at step {step}"
        for grad, sharded_grad in zip(grads, sharded["grads"][step]):
            assert torch.equal(sharded_grad, grad), f"gradient differs at step {step}"
    for key, value in replicated["state"].items():
        expected = value[owned.start : owned.stop] if key.startswith("state.") else value
        assert torch.equal(sharded["state"][key], expected), f"{key} differs"


@pytest.mark.parametrize(
    ("case", "world_size", "accelerator_path"),
    [
        ("sogclr-default", 2, False),
        ("sogclr-adam", 3, False),
        ("ntxent", 3, True),
        ("clip-sogclr", 2, False),
        ("clip-sogclr", 3, True),
        ("siglip", 2, False),
    ],  # fmt: skip
)
def test_sharded_state_equals_replicated(case: str, world_size: int, accelerator_path: bool) -> None:
    name, kwargs = CASES[case]
    batches = batches_with_duplicates(steps=4, global_batch=6 * world_size, seed=world_size)
    ranks = run_ranks(sharded_cases.sharded_and_replicated_case, world_size, name, kwargs, batches, accelerator_path)
    owned = [result["sharded"]["owned"] for result in ranks]
    assert [rows.start for rows in owned] == [rank * -(-NUM_SAMPLES // world_size) for rank in range(world_size)]
    assert owned[-1].stop == NUM_SAMPLES
    for result in ranks:
        assert_identical(result["replicated"], result["sharded"], result["sharded"]["owned"])
    visits = [key for key in ranks[0]["replicated"]["state"] if key.endswith("threshold_visits")]
    assert visits and all(ranks[0]["replicated"]["state"][key].count_nonzero() > 0 for key in visits)
    assert any(int(result["sharded"]["state"][visits[0]].count_nonzero()) > 0 for result in ranks[1:]), (
        "no rank but the first owned a visited row: the test would not exercise the fetch"
    )


def test_tables_with_fewer_rows_than_ranks_and_refused_steps() -> None:
    generator = torch.Generator().manual_seed(3)
    commits = []
    for step in range(6):
        indices = torch.randint(0, 2, (6,), generator=generator)
        values = torch.randn(6, generator=generator)
        counts = torch.randint(0, 255, (6,), generator=generator).to(torch.uint8)
        commits.append((indices, values, counts, 1 if step == 3 else -1))  # rank 1 refuses step 3
    ranks = run_ranks(sharded_cases.table_case, 3, 2, commits)
    assert [len(result["owned"]) for result in ranks] == [1, 1, 0]
    for result in ranks:
        for replicated_read, sharded_read in zip(result["reads"]["replicated"], result["reads"]["sharded"]):
            for name, value in replicated_read.items():
                assert torch.equal(sharded_read[name], value) and sharded_read[name].dtype == value.dtype
    for name in ("value", "count"):
        assembled = torch.cat([result["sharded"][name] for result in ranks])
        assert torch.equal(assembled, ranks[0]["replicated"][name])


def test_checkpoint_saved_on_two_ranks_resumes_on_one_and_three(tmp_path: Any) -> None:
    # CLIP with a global estimator: two threshold banks and u, six fields.
    loss_name, kwargs = CASES["clip-sogclr"]
    path = str(tmp_path / "checkpoint")
    first, later = batches_with_duplicates(2, 12, seed=11), batches_with_duplicates(2, 12, seed=12)
    saved = run_ranks(sharded_cases.save_case, 2, loss_name, kwargs, first, path)
    expected = full_state([result["state"] for result in saved], [result["owned"] for result in saved])

    # One process, no process group: the sharded loss holds every row, loaded from both ranks' files.
    single = sharded_cases.make_loss(loss_name, kwargs, "sharded")
    loaded = {"loss": single.state_dict()}
    dcp.load(loaded, checkpoint_id=path)
    single.load_state_dict(loaded["loss"])
    for key, value in expected.items():
        assert torch.equal(single.state_dict()[key], value), key

    ranks = run_ranks(sharded_cases.resume_case, 3, loss_name, kwargs, later, path)
    for sharding in ("sharded", "replicated"):
        after_load = (
            full_state(
                [result[sharding]["loaded"] for result in ranks], [result[sharding]["owned"] for result in ranks]
            )
            if sharding == "sharded"
            else ranks[0][sharding]["loaded"]
        )  # noqa: E501
        for key, value in expected.items():
            assert torch.equal(after_load[key], value), f"{sharding}: {key}"
    for result in ranks:
        assert_identical(result["replicated"], result["sharded"], result["sharded"]["owned"])
    assert ranks[0]["sharded"]["state"]["_extra_state"].tolist() == [1, 4]  # epoch of the last batch, 4 steps
    for result in ranks:  # a checkpoint of another size: refused by DCP on every rank, naming the entry
        message = result["another size"]
        assert message.startswith("CheckpointException"), message
        assert "Size mismatch between saved torch.Size([40]) and current: torch.Size([41]) for loss.state." in message


def test_a_state_dict_of_another_size_is_refused_by_name() -> None:
    bigger = GloFNDSogCLRLoss(NUM_SAMPLES + 1, state_sharding="sharded")
    with pytest.raises(ValueError, match=r"state\.threshold must have shape \(num_samples=41,\)"):
        bigger.load_state_dict(GloFNDSogCLRLoss(NUM_SAMPLES, state_sharding="sharded").state_dict())


def test_ranks_with_different_sharding_modes_all_raise() -> None:
    for message in run_ranks(sharded_cases.mixed_sharding_case, 2):
        assert "state_sharding: rank 0 = 'sharded', rank 1 = 'replicated'" in message, message


def test_a_loss_built_before_the_process_group_allocates_nothing_until_used() -> None:
    loss_fn = GloFNDClipLoss(num_samples=10**9, state_sharding="sharded")
    assert all(buffer.numel() == 0 for buffer in loss_fn.state._buffers.values() if buffer is not None)
    assert "state_sharding='sharded'" in repr(loss_fn)
    small = GloFNDClipLoss(num_samples=10, state_sharding="sharded")
    assert small.state.owned_rows == range(10)  # used without a process group: every row here
    assert small.image_thresholds.shape == (10,)


def test_state_sharding_is_checked_by_name() -> None:
    with pytest.raises(ValueError, match=r"state_sharding must be one of \('replicated', 'sharded'\), got 'rows'"):
        GloFNDSogCLRLoss(10, state_sharding="rows")


def test_dcp_checkpoint_of_a_replicated_single_process_loss_loads_sharded(tmp_path: Any) -> None:
    path = str(tmp_path / "checkpoint")
    replicated = GloFNDSogCLRLoss(NUM_SAMPLES, alpha=0.1)
    z1, z2 = torch.randn(8, 8, requires_grad=True), torch.randn(8, 8, requires_grad=True)
    replicated(z1, z2, torch.arange(8)).backward()
    dcp.save({"loss": replicated.state_dict()}, checkpoint_id=path)
    assert os.path.isdir(path)
    sharded = GloFNDSogCLRLoss(NUM_SAMPLES, alpha=0.1, state_sharding="sharded")
    loaded = {"loss": sharded.state_dict()}
    dcp.load(loaded, checkpoint_id=path)
    sharded.load_state_dict(loaded["loss"])
    assert torch.equal(sharded.thresholds, replicated.thresholds) and sharded.step == 1


def test_a_sharded_loss_inside_ddp_needs_its_buffers_ignored() -> None:
    # DDP copies rank 0's buffers over every rank's at each forward: rank 1's block would be lost.
    for messages in run_ranks(sharded_cases.ddp_cases, 2):
        assert "each rank's state block its own" in messages[False], messages[False]
        assert "rank 0 = True, rank 1 = False" in messages[False], messages[False]
        assert messages[True] == "no error"


def test_a_state_dict_one_rank_saved_with_torch_save_is_refused(tmp_path: Any) -> None:
    # Its DTensors hold rank 0's rows; taken as every rank's own block they would be silently wrong.
    for message in run_ranks(sharded_cases.torch_saved_by_rank_zero_case, 2, str(tmp_path / "state.pt")):
        assert "state.threshold is a DTensor that is not this loss's own state_dict() entry" in message, message


def test_a_table_first_laid_out_in_an_inference_mode_forward_still_trains() -> None:
    # Lightning's sanity check validates under inference_mode before the first training step.
    from glofnd_losses import GloFNDNTXent

    loss_fn = GloFNDNTXent(16, alpha=0.1, state_sharding="sharded")
    z1, z2 = torch.randn(8, 8), torch.randn(8, 8)
    with torch.inference_mode():
        loss_fn.eval()(z1, z2, torch.arange(8))
    loss_fn.train()(z1.requires_grad_(), z2, torch.arange(8)).backward()
    assert loss_fn.threshold_visits[:8].tolist() == [1] * 8


def test_a_checkpoint_with_counts_of_another_dtype_is_refused_by_name(tmp_path: Any) -> None:
    # DCP would copy int32 counts into the uint8 buffer in place: 300 visits would read as 44.
    from glofnd_losses import GloFNDNTXent, ThresholdOptimizer
    from glofnd_losses.checkpoint import load_state, save_state

    forever = ThresholdOptimizer(rule="sgd", lr_decay="inverse_sqrt")  # reads the count for ever: int32
    source = GloFNDNTXent(16, threshold_optimizer=forever)
    assert source.threshold_visits.dtype == torch.int32
    save_state(source, tmp_path / "state")
    target = GloFNDNTXent(16, state_sharding="sharded")
    with pytest.raises(ValueError, match=r"state.threshold_visits was saved as torch.int32, this module stores it"):
        load_state(target, tmp_path / "state")
