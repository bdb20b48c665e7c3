"""Functions run on every rank by tests/test_faults_distributed.py and benchmarks/fault_times.py.

Module-level so that spawn can pickle them. Each returns what the test compares: the error each
step raised on this rank (or None), how long the failing call took to raise, and the state.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from glofnd_losses import GloFNDClipLoss, GloFNDNTXent, GloFNDSogCLRLoss, ThresholdOptimizer
from tests import dist_cases

NUM_SAMPLES = 40
LOSSES = {
    "sogclr": lambda **kwargs: GloFNDSogCLRLoss(**{"num_samples": NUM_SAMPLES, "alpha": 0.1, **kwargs}),
    "ntxent": lambda **kwargs: GloFNDNTXent(
        **{"num_samples": NUM_SAMPLES, "alpha": 0.1, "gather_distributed": True, **kwargs}
    ),
    "clip": lambda **kwargs: GloFNDClipLoss(
        **{"num_samples": NUM_SAMPLES, "alpha": 0.1, "estimator": "fastclip", **kwargs}
    ),
}


def make_batches(steps: int, global_batch: int, dim: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Global batches of two L2-normalised views and distinct indices."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        base = torch.randn(global_batch, dim, generator=generator)
        views = [base + 0.3 * torch.randn(global_batch, dim, generator=generator) for _ in range(2)]
        view_a, view_b = (nn.functional.normalize(view, dim=1) for view in views)
        batches.append((view_a, view_b, torch.randperm(NUM_SAMPLES, generator=generator)[:global_batch]))
    return batches


def spoil(batch: tuple[torch.Tensor, ...], problem: str) -> tuple[torch.Tensor, ...]:
    """This rank's batch with one problem: ``"nan"`` (first view), ``"index"`` (out of range) or ``"size"``."""
    view_a, view_b, indices = (tensor.clone() for tensor in batch)
    if problem == "nan":
        view_a[1, 0] = float("nan")
    elif problem == "index":
        indices[1] = NUM_SAMPLES
    elif problem == "size":
        view_a, view_b, indices = view_a[:-1], view_b[:-1], indices[:-1]
    return view_a, view_b, indices


def call_loss(loss_fn: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step of any of the three losses; returns the loss and the first view's gradient."""
    view_a, view_b, indices = (tensor.clone() for tensor in batch)
    view_a.requires_grad_(True)
    if isinstance(loss_fn, GloFNDClipLoss):
        loss = loss_fn(view_a, view_b, torch.tensor(1 / 0.07), indices=indices)
    else:
        loss = loss_fn(view_a, view_b, indices)
    loss.backward()
    assert view_a.grad is not None
    return loss.detach(), view_a.grad


def local_part(batch: tuple[torch.Tensor, ...], rank: int, world_size: int) -> tuple[torch.Tensor, ...]:
    local = batch[0].shape[0] // world_size
    return tuple(tensor[rank * local : (rank + 1) * local] for tensor in batch)


def state_rows(loss_fn: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in loss_fn.state.state_dict().items()}


CPU_FAULTS = {1: (1, "nan"), 2: (0, "index"), 3: (1, "size")}
"""Step: (bad rank, problem) of the CPU runs (checks read on the host; errors raise in the bad step)."""
CPU_STEPS = 5
ACCELERATOR_FAULTS = {1: (1, "nan"), 4: (0, "index")}
"""The same for the accelerator path (deferred checks; unequal sizes are the backend's undefined behaviour)."""
ACCELERATOR_STEPS = 8

MISMATCHES: list[tuple[str, str, list[dict[str, Any]]]] = [
    ("num_samples", "sogclr", [{}, {"num_samples": NUM_SAMPLES + 1}]),
    ("detector", "sogclr", [{}, {"detector": "fnc"}]),
    ("estimator", "clip", [{}, {"estimator": "sogclr"}]),
    ("threshold_optimizer.rule", "ntxent", [{"rule": "adam"}, {"rule": "sgd"}]),
    ("alpha", "clip", [{}, {"alpha": 0.2}]),
    ("treatment", "ntxent", [{}, {"treatment": "attract"}]),
    ("gather_distributed", "ntxent", [{}, {"gather_distributed": False}]),
    ("state fields", "sogclr", [{}, {"detector": None}]),
    ("loss", "sogclr", [{}, {"loss": "ntxent"}]),
    ("state.threshold (sum, sum of squares)", "sogclr", [{"load_scaled": 0.5}, {}]),
]
"""``(setting the error must name, loss, each rank's settings)`` of the configuration checks."""
PROCESS_GROUP_TIMEOUT_S = 10.0
"""The process group timeout of the lost-rank runs (``init_process_group(timeout=...)``)."""


def faulty_runs(
    rank: int, world_size: int, batches: list, faults: dict[int, tuple[int, str]], accelerator: bool
) -> dict[str, dict[str, Any]]:
    """:func:`faulty_run` of every loss in ``LOSSES``, one after the other in this process."""
    if accelerator:
        dist_cases.take_accelerator_path()
    return {name: faulty_run(rank, world_size, name, batches, faults) for name in LOSSES}


def faulty_run(
    rank: int, world_size: int, loss_name: str, batches: list, faults: dict[int, tuple[int, str]]
) -> dict[str, Any]:
    """Run ``batches``; at step ``s`` in ``faults`` rank ``faults[s][0]`` spoils its batch with ``faults[s][1]``.

    Records per step the error raised on this rank (or None), the seconds the call took, and
    whether the per-sample state changed. Then runs a reference loss over the steps that
    returned a loss everywhere (the steps that raised and, on the accelerator path, the bad
    steps themselves left out), for the comparison of the final results.
    """
    loss_fn, reference = LOSSES[loss_name](), LOSSES[loss_name]()
    loss_fn.set_epoch(0)
    reference.set_epoch(0)
    steps: list[dict[str, Any]] = []
    for step, batch in enumerate(batches):
        part = local_part(batch, rank, world_size)
        bad_rank, problem = faults.get(step, (-1, ""))
        if rank == bad_rank:
            part = spoil(part, problem)
        before = state_rows(loss_fn)
        start = time.perf_counter()
        record: dict[str, Any] = {"error": None}
        try:
            record["value"], record["grad"] = call_loss(loss_fn, part)
        except ValueError as error:
            record["error"] = str(error)
        record["seconds"] = time.perf_counter() - start
        after = state_rows(loss_fn)
        record["state_unchanged"] = all(torch.equal(after[name], value) for name, value in before.items())
        steps.append(record)
    clean = [step for step, record in enumerate(steps) if record["error"] is None and step not in faults]
    reference_steps = [call_loss(reference, local_part(batches[step], rank, world_size)) for step in clean]
    return {
        "steps": steps,
        "state": state_rows(loss_fn),
        "reference_state": state_rows(reference),
        "clean_steps": clean,
        "reference_steps": reference_steps,
    }


def build(loss_name: str, settings: dict[str, Any]) -> nn.Module:
    """A loss of ``LOSSES`` with ``settings`` (``"rule"`` becomes a ThresholdOptimizer, ``"loss"`` picks another)."""
    settings = dict(settings)
    loss_name = settings.pop("loss", loss_name)
    if "rule" in settings:
        settings["threshold_optimizer"] = ThresholdOptimizer(rule=settings.pop("rule"))
    return LOSSES[loss_name](**settings)


def mismatch_run(rank: int, world_size: int, cases: list[tuple[str, str, list[dict[str, Any]]]]) -> list[dict]:
    """For each ``(label, loss, settings per rank)``: build this rank's loss, take one step, record the error.

    A settings dict may hold ``"load_scaled": factor``: this rank loads its state times
    ``factor`` before the first call (a checkpoint loaded on some ranks only). After every case
    a loss built alike on every rank takes a step: the ranks must still be in step.
    """
    batch = local_part(make_batches(1, 4 * world_size, seed=7)[0], rank, world_size)
    results = []
    for label, loss_name, per_rank in cases:
        settings = dict(per_rank[rank])
        scale = settings.pop("load_scaled", None)
        loss_fn = build(loss_name, settings)
        if scale is not None:
            loaded = {
                name: value * scale if name.startswith("state.") else value
                for name, value in loss_fn.state_dict().items()
            }
            loss_fn.load_state_dict(loaded)
        start = time.perf_counter()
        error = None
        try:
            call_loss(loss_fn, batch)
        except ValueError as raised:
            error = str(raised)
        seconds = time.perf_counter() - start
        value, _ = call_loss(LOSSES["sogclr"](), batch)  # lockstep after the error
        results.append({"label": label, "error": error, "seconds": seconds, "after": value})
    return results


def lost_rank_run(rank: int, world_size: int, loss_name: str, how: str) -> dict[str, Any]:
    """Rank 1 dies (``how="exit"``: ``os._exit``) or stalls (``"stall"``) in a step, before the state's all-gather.

    Rank 0 reports the error it got and how long after the start of the step.
    """
    loss_fn = LOSSES[loss_name]()
    batches = make_batches(2, 4 * world_size, seed=3)
    call_loss(loss_fn, local_part(batches[0], rank, world_size))  # a first step in lockstep
    if rank == 1:

        def lost_commit(*args: Any, **kwargs: Any) -> torch.Tensor:
            if how == "exit":
                os._exit(3)
            time.sleep(600)
            raise AssertionError("not reached: the test ends this process")

        loss_fn.state.commit = lost_commit
    start = time.perf_counter()
    try:
        call_loss(loss_fn, local_part(batches[1], rank, world_size))
    except Exception as error:  # noqa: BLE001 - the collective's error, whatever its type
        return {"error_type": type(error).__name__, "error": str(error), "seconds": time.perf_counter() - start}
    return {"error_type": None, "error": None, "seconds": time.perf_counter() - start}
