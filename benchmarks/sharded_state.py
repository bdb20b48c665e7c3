"""Per-rank memory and step time of a sharded vs a replicated per-sample state, on real ranks.

Measured on ``--world-size`` (default 2) CPU processes with a gloo process group (spawned as
tests/multiprocess.py does; one OpenMP / torch thread per rank), for
``GloFNDClipLoss(num_samples, estimator, detector="glofnd", start_epoch=0, state_sharding=...)``
(estimator ``"minibatch"`` unless ``--estimator``), at each ``--num-samples`` (default 1e3, 1e6,
1e8) and each ``state_sharding`` (``"replicated"``, ``"sharded"``):

1. **Memory.** Per-rank state bytes, summed over ``loss.state.fields`` from this rank's buffers
   (``loss.state.buffer(name)``: rows x element size), bytes per row, and bytes per data set
   sample per rank; also the growth of the process's resident set (``VmRSS`` of
   ``/proc/self/status``) across building the loss, a rough cross-check of the buffers' bytes (the
   state is the only large allocation; at small ``num_samples`` the growth is allocator noise).
2. **Step time.** A whole training step without a model: fixed random unit-norm features
   ``(batch, dim)`` per rank (default 256 x 256) as leaf tensors requiring grad, a ``logit_scale``
   requiring grad, ``loss(img, txt, logit_scale, output_dict=True, indices=idx)`` and
   ``backward()`` of ``"contrastive_loss"``. The indices of a step are ``world_size * batch``
   distinct indices drawn from ``[0, num_samples)`` with a generator seeded alike on every rank
   (the same draws for both sharding modes), sliced per rank, so every rank's anchors hit every
   rank's block. Each loss is built once (the 1e8-row state is allocated once per configuration)
   and reused. The configurations are interleaved so that load on a shared machine hits each
   alike: in each of ``--rounds`` rounds every configuration takes ``--warmup-steps`` untimed
   steps, then the configurations take turns (the order rotates each round), ``--block`` steps at a
   turn after a ``dist.barrier()``, until each has taken ``--steps`` steps, each timed with
   ``time.perf_counter``. Reported: the median over rounds of each rank's per-round median step
   time (rank 0's, and the largest over ranks).
3. **Ratios** of the same run: time at the largest / smallest ``num_samples`` per mode (target
   <= 1.05x for sharded: flat in ``num_samples``), sharded / replicated step time at each
   ``num_samples`` (target <= 1.10x), and per-rank state memory sharded / replicated (expected
   ``ceil(N / W) / N``, about ``1 / world_size``).
4. **Where the time goes** (``--profile-steps`` extra steps per configuration after the rounds,
   not part of the timings above): every ``torch.distributed`` collective of the step is counted,
   with its payload (bytes of the result each rank receives, its own block included) and wall
   time, by phase: ``state.read`` (sharded: index all-gather + ``all_to_all_single``),
   ``state.commit`` (the packed all-gather), ``size check`` (the gathers' batch-size all-gather,
   made on CPU only) and the rest (the feature gather and its backward all-reduce). Also the time
   of one ``_check_seeding()`` (a scan of every owned row's visit counts, made every
   ``glofnd_losses.base.seeding_check_interval(num_samples, global batch)`` training steps: at
   least 256, at most 16 per epoch's worth of steps; so not in the timed steps) and its cost
   amortised per step.
5. **Arithmetic** (no measurement; bytes per row and field counts taken from the measurement):
   state bytes per rank and state traffic per step per rank on 8, 64 and 512 GPUs at a per-GPU
   batch of 1024 (open_clip's common setting), for DataComp-1B taken as 1.28e9 samples (the
   figure asked for; the DataComp paper reports about 1.4e9 pairs for DataComp-1B, given as a
   second row, every figure scales linearly with N) and LAION-2B-en as 2.32e9. With
   ``B = W * 1024`` the global batch, ``F_c`` the fields a commit writes and ``F_r`` the fields a
   read fetches (glofnd_losses/state.py)::

       replicated: state/rank = N * bytes_per_row
                   received/step/rank = B * (2 + F_c) * 8     (commit all-gather of float64
                                                               (index, error bits, F_c fields))
       sharded:    state/rank = ceil(N / W) * bytes_per_row
                   received/step/rank = B * (2 + F_c) * 8     (the same commit all-gather)
                                      + B * 8                 (read: index all-gather, int64)
                                      + B * F_r * 8           (read: all_to_all_single of float64
                                                               rows; as many bytes sent)

   Payloads count the rank's own block (the all_to_all's block to itself, the all-gather's own
   rows); a ring all-gather moves (W - 1) / W of them over the wire. The all_to_all has equal
   splits (no host read of split sizes): each rank sends every rank a block of ``B / W`` rows,
   zeros where it does not own the anchor, so it carries W times the rows the anchors need. The feature gather and the
   batch-size checks (CPU only) are not state traffic and are left out.

Absolute times on a shared CPU are noise; compare the ratios of one run. Run from the
repository root::

    python benchmarks/sharded_state.py --out benchmarks/results/sharded_state_cpu.json
    python benchmarks/sharded_state.py --num-samples 1000 100000 --steps 5 --rounds 1 --out /tmp/quick.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

# One thread per rank; set before torch is imported here and inherited by the spawned ranks.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import multiprocess  # noqa: E402 - after the path: tests/ is not installed

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "sharded_state_cpu.json")
SHARDINGS = ("replicated", "sharded")
FLAT_TARGET = 1.05
"""Sharded step time at the largest num_samples over the smallest, at most."""
SHARDED_TIME_TARGET = 1.10
"""Sharded over replicated step time at each num_samples, at most."""
ARITHMETIC_GPUS = (8, 64, 512)
ARITHMETIC_BATCH_PER_GPU = 1024
DATASETS = (
    ("DataComp-1B (as 1.28e9)", 1.28e9),
    ("DataComp-1B (paper: ~1.4e9)", 1.4e9),
    ("LAION-2B-en (2.32e9)", 2.32e9),
)


# ---------------------------------------------------------------------------------------------- ranks
def rss_bytes() -> int:
    """This process's resident set size (``VmRSS``), or 0 where ``/proc`` has none."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def loadavg() -> list[float]:
    try:
        with open("/proc/loadavg") as handle:
            return [float(value) for value in handle.read().split()[:3]]
    except OSError:
        return []


def draw_indices(num_samples: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct indices from ``[0, num_samples)`` in random order, without an O(num_samples) permutation."""
    if num_samples <= 8 * count:
        return torch.randperm(num_samples, generator=generator)[:count]
    while True:
        unique = torch.unique(torch.randint(num_samples, (count + count // 4 + 16,), generator=generator))
        if unique.numel() >= count:
            return unique[torch.randperm(unique.numel(), generator=generator)[:count]]


def index_batches(num_samples: int, round_: int, count: int, world_size: int, batch: int, rank: int) -> list:
    """This rank's slices of ``count`` global batches of distinct indices, seeded alike on every rank."""
    generator = torch.Generator().manual_seed(1_000_003 * round_ + num_samples % 1_000_000_007)
    batches = [draw_indices(num_samples, world_size * batch, generator) for _ in range(count)]
    return [indices[rank * batch : (rank + 1) * batch].clone() for indices in batches]


def build_loss(num_samples: int, sharding: str, estimator: str) -> torch.nn.Module:
    from glofnd_losses import GloFNDClipLoss

    loss_fn = GloFNDClipLoss(num_samples, estimator, detector="glofnd", start_epoch=0, state_sharding=sharding)
    loss_fn.set_epoch(0)  # no "set_epoch() was never called" warning at small num_samples
    return loss_fn


def state_memory(loss_fn: torch.nn.Module) -> dict[str, Any]:
    state = loss_fn.state
    fields = {}
    for name in state.fields:
        buffer = state.buffer(name)
        fields[name] = {
            "dtype": str(buffer.dtype),
            "rows": buffer.numel(),
            "bytes": buffer.numel() * buffer.element_size(),
        }
    rows = len(state.owned_rows)
    return {
        "fields": fields,
        "rows": rows,
        "owned_rows": [state.owned_rows.start, state.owned_rows.stop],
        "bytes": sum(field["bytes"] for field in fields.values()),
        "bytes_per_row": sum(torch.empty((), dtype=state.fields[name].dtype).element_size() for name in state.fields),
    }


class Step:
    """One training step of the loss on fixed features: forward and backward."""

    def __init__(self, loss_fn: torch.nn.Module, batch: int, dim: int, rank: int) -> None:
        generator = torch.Generator().manual_seed(12345 + rank)
        self.loss_fn = loss_fn
        self.image = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=1)
        self.text = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=1)
        self.image.requires_grad_(True)
        self.text.requires_grad_(True)
        self.logit_scale = torch.tensor(1 / 0.07, requires_grad=True)

    def __call__(self, indices: torch.Tensor) -> None:
        self.image.grad = self.text.grad = self.logit_scale.grad = None
        out = self.loss_fn(self.image, self.text, self.logit_scale, output_dict=True, indices=indices)
        out["contrastive_loss"].backward()


class Accounting:
    """Counts every ``torch.distributed`` collective of the wrapped steps, by phase (patched in, then out)."""

    OPS = ("all_gather", "all_to_all_single", "all_reduce")

    def __init__(self, loss_fn: torch.nn.Module) -> None:
        from glofnd_losses import distributed

        self.loss_fn, self.distributed = loss_fn, distributed
        self.stack: list[str] = []
        self.records: dict[str, dict[str, float]] = {}
        self.saved: list[tuple[Any, str, Any]] = []
        self.commit_fields: int | None = None

    def record(self, key: str, payload: int, seconds: float) -> None:
        entry = self.records.setdefault(key, {"calls": 0, "bytes": 0, "seconds": 0.0})
        entry["calls"] += 1
        entry["bytes"] += payload
        entry["seconds"] += seconds

    def phase(self) -> str:
        return "/".join(self.stack) if self.stack else "other"

    def patch(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        original = getattr(owner, name)
        self.saved.append((owner, name, original))
        setattr(owner, name, make(original))

    def collective(self, op: str) -> Callable[[Any], Any]:
        def make(original: Any) -> Any:
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                result = original(*args, **kwargs)
                seconds = time.perf_counter() - start
                received = args[0]
                parts = received if isinstance(received, list) else [received]
                payload = sum(part.numel() * part.element_size() for part in parts)
                self.record(f"{self.phase()}:{op}", payload, seconds)
                return result

            return wrapped

        return make

    def phased(self, label: str) -> Callable[[Any], Any]:
        def make(original: Any) -> Any:
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                if label == "state.commit":
                    self.commit_fields = len(args[1])
                self.stack.append(label)
                start = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    self.stack.pop()
                    self.record(f"{label} (total)", 0, time.perf_counter() - start)

            return wrapped

        return make

    def __enter__(self) -> Accounting:
        for op in self.OPS:
            self.patch(dist, op, self.collective(op))
        self.patch(self.distributed, "gather_host_ints", self.phased("size check"))
        self.patch(self.loss_fn.state, "read", self.phased("state.read"))
        self.patch(self.loss_fn.state, "commit", self.phased("state.commit"))
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in reversed(self.saved):
            if isinstance(owner, torch.nn.Module):
                del owner.__dict__[name]  # the instance attribute shadowed the method
            else:
                setattr(owner, name, original)
        self.saved.clear()


def profile(step: Step, batches: list, rank: int) -> dict[str, Any]:
    """Collectives per step by phase (calls, payload bytes, ms), over ``batches`` (untimed elsewhere)."""
    with Accounting(step.loss_fn) as accounting:
        start = time.perf_counter()
        for indices in batches:
            step(indices)
        seconds = time.perf_counter() - start
    count = len(batches)
    per_step = {
        key: {"calls": value["calls"] / count, "bytes": value["bytes"] / count, "ms": 1e3 * value["seconds"] / count}
        for key, value in sorted(accounting.records.items())
    }
    return {
        "steps": count,
        "step_ms": 1e3 * seconds / count,
        "per_step": per_step,
        "commit_fields": accounting.commit_fields,
    }


def seeding_check_seconds(loss_fn: torch.nn.Module) -> float:
    """Time of one ``_check_seeding()`` (every rank calls it: a collective when sharded)."""
    dist.barrier()
    start = time.perf_counter()
    loss_fn._check_seeding()
    return time.perf_counter() - start


def rank_run(rank: int, world_size: int, settings: dict[str, Any]) -> dict[str, Any]:
    """On every rank: build every configuration once, time them in interleaved rounds, profile them."""
    from glofnd_losses import base

    torch.set_num_threads(1)
    batch, dim, steps, warmup = settings["batch"], settings["dim"], settings["steps"], settings["warmup_steps"]
    configs = [(n, sharding) for n in settings["num_samples"] for sharding in SHARDINGS]
    losses, results = {}, {}
    build_loss(world_size * batch, "sharded", settings["estimator"])  # imports and first allocations: not in the RSS
    for config in configs:
        dist.barrier()
        before = rss_bytes()
        losses[config] = build_loss(config[0], config[1], settings["estimator"])
        memory = state_memory(losses[config])
        memory["rss_growth_bytes"] = rss_bytes() - before
        results[config] = {"memory": memory, "round_medians": [], "round_steps": []}
    steps_of = {config: Step(losses[config], batch, dim, rank) for config in configs}
    loads = []
    for round_ in range(settings["rounds"]):
        loads.append(loadavg())
        order = configs[round_ % len(configs) :] + configs[: round_ % len(configs)]
        batches = {
            config: index_batches(config[0], round_, warmup + steps, world_size, batch, rank) for config in order
        }
        for config in order:
            for indices in batches[config][:warmup]:
                steps_of[config](indices)
        times: dict[tuple[int, str], list[float]] = {config: [] for config in order}
        # Every configuration takes `block` steps in turn: each one's steps spread over the whole round.
        for first in range(warmup, warmup + steps, settings["block"]):
            for config in order:
                dist.barrier()
                for indices in batches[config][first : min(first + settings["block"], warmup + steps)]:
                    start = time.perf_counter()
                    steps_of[config](indices)
                    times[config].append(time.perf_counter() - start)
        for config in order:
            results[config]["round_medians"].append(statistics.median(times[config]))
            results[config]["round_steps"].append(times[config])
    for config in configs:
        batches = index_batches(config[0], settings["rounds"], settings["profile_steps"], world_size, batch, rank)
        results[config]["profile"] = profile(steps_of[config], batches, rank)
        results[config]["seeding_check_s"] = seeding_check_seconds(losses[config])
        results[config]["seeding_check_interval"] = base.seeding_check_interval(config[0], world_size * batch)
        results[config]["seconds"] = statistics.median(results[config]["round_medians"])
        results[config]["steps_taken"] = losses[config].step
    return {
        "rank": rank,
        "loadavg_per_round": loads,
        "configs": {f"{n}/{sharding}": result for (n, sharding), result in results.items()},
    }


# ---------------------------------------------------------------------------------------------- summary
def state_traffic(profile_per_step: dict[str, Any]) -> dict[str, float]:
    """Payload bytes per step of the state's own collectives (size checks apart), from a profile."""
    read = sum(v["bytes"] for k, v in profile_per_step.items() if k.startswith("state.read:"))
    commit = sum(v["bytes"] for k, v in profile_per_step.items() if k.startswith("state.commit:"))
    return {"read": read, "commit": commit, "total": read + commit}


def combine(ranks: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """Per configuration: rank 0's figures, the largest over ranks, and the ratios."""
    configs: dict[str, Any] = {}
    for key in ranks[0]["configs"]:
        per_rank = [rank["configs"][key] for rank in ranks]
        n, sharding = key.split("/")
        first = per_rank[0]
        profile = first["profile"]
        configs[key] = {
            "num_samples": int(n),
            "sharding": sharding,
            "memory": [result["memory"] for result in per_rank],
            "state_bytes_rank0": first["memory"]["bytes"],
            "state_bytes_max": max(result["memory"]["bytes"] for result in per_rank),
            "bytes_per_row": first["memory"]["bytes_per_row"],
            "bytes_per_sample_per_rank": max(result["memory"]["bytes"] for result in per_rank) / int(n),
            "rss_growth_bytes_max": max(result["memory"]["rss_growth_bytes"] for result in per_rank),
            "seconds_rank0": first["seconds"],
            "seconds_max_over_ranks": max(result["seconds"] for result in per_rank),
            "round_medians": [result["round_medians"] for result in per_rank],
            "step_seconds": [result["round_steps"] for result in per_rank],
            "profile": [result["profile"] for result in per_rank],
            "state_traffic_bytes_per_step_rank0": state_traffic(profile["per_step"]),
            "collectives_per_step_rank0": sum(v["calls"] for k, v in profile["per_step"].items() if "(total)" not in k),
            "commit_fields": profile["commit_fields"],
            "read_fields": len(first["memory"]["fields"]),
            "seeding_check_s_max": max(result["seeding_check_s"] for result in per_rank),
            "seeding_check_interval": first["seeding_check_interval"],
            "steps_taken": first["steps_taken"],
        }
    sizes = sorted({config["num_samples"] for config in configs.values()})
    small, large = sizes[0], sizes[-1]

    def at(n: int, sharding: str) -> dict[str, Any]:
        return configs[f"{n}/{sharding}"]

    rounds = settings["rounds"]
    flat = {}
    for sharding in SHARDINGS:
        value = at(large, sharding)["seconds_max_over_ranks"] / at(small, sharding)["seconds_max_over_ranks"]
        per_round = [
            at(large, sharding)["round_medians"][0][r] / at(small, sharding)["round_medians"][0][r]
            for r in range(rounds)
        ]
        rank0 = at(large, sharding)["seconds_rank0"] / at(small, sharding)["seconds_rank0"]
        flat[sharding] = {"value": value, "rank0": rank0, "per_round_rank0": per_round}
        flat[sharding]["median_per_round_rank0"] = statistics.median(per_round)
    flat["sharded"].update(target=FLAT_TARGET, verdict="met" if flat["sharded"]["value"] <= FLAT_TARGET else "MISSED")
    sharded_over_replicated = {}
    for n in sizes:
        value = at(n, "sharded")["seconds_max_over_ranks"] / at(n, "replicated")["seconds_max_over_ranks"]
        per_round = [
            at(n, "sharded")["round_medians"][0][r] / at(n, "replicated")["round_medians"][0][r] for r in range(rounds)
        ]
        sharded_over_replicated[str(n)] = {
            "value": value,
            "rank0": at(n, "sharded")["seconds_rank0"] / at(n, "replicated")["seconds_rank0"],
            "per_round_rank0": per_round,
            "median_per_round_rank0": statistics.median(per_round),
            "target": SHARDED_TIME_TARGET,
            "verdict": "met" if value <= SHARDED_TIME_TARGET else "MISSED",
        }
    world = settings["world_size"]
    memory_ratio = {
        str(n): {
            "value": at(n, "sharded")["state_bytes_max"] / at(n, "replicated")["state_bytes_max"],
            "expected": math.ceil(n / world) / n,
        }
        for n in sizes
    }
    return {
        "configs": configs,
        "ratios": {
            "time_largest_over_smallest_num_samples": {"from": small, "to": large, **flat},
            "sharded_over_replicated_time": sharded_over_replicated,
            "sharded_over_replicated_memory": memory_ratio,
        },
    }


def arithmetic(summary: dict[str, Any]) -> dict[str, Any]:
    """State bytes and state traffic per rank at scale, from the measured bytes per row and field counts."""
    configs = summary["configs"]
    any_replicated = next(c for c in configs.values() if c["sharding"] == "replicated")
    any_sharded = next(c for c in configs.values() if c["sharding"] == "sharded")
    row_bytes = {"replicated": any_replicated["bytes_per_row"], "sharded": any_sharded["bytes_per_row"]}
    commit_fields, read_fields = any_sharded["commit_fields"], any_sharded["read_fields"]
    rows = []
    for name, n in DATASETS:
        for gpus in ARITHMETIC_GPUS:
            global_batch = gpus * ARITHMETIC_BATCH_PER_GPU
            commit = global_batch * (2 + commit_fields) * 8
            index_gather = global_batch * 8
            all_to_all = global_batch * read_fields * 8
            rows.append({
                "dataset": name, "num_samples": n, "gpus": gpus, "global_batch": global_batch,
                "state_bytes_per_rank": {
                    "replicated": n * row_bytes["replicated"],
                    "sharded": math.ceil(n / gpus) * row_bytes["sharded"],
                },
                "received_bytes_per_step_per_rank": {
                    "replicated": commit,
                    "sharded": commit + index_gather + all_to_all,
                    "sharded_parts": {"commit_all_gather": commit, "index_all_gather": index_gather,
                                      "all_to_all_received": all_to_all, "all_to_all_sent": all_to_all},
                },
            })  # fmt: skip
    return {
        "batch_per_gpu": ARITHMETIC_BATCH_PER_GPU,
        "bytes_per_row": row_bytes,
        "commit_fields": commit_fields,
        "read_fields": read_fields,
        "formula": {
            "replicated_state": "N * bytes_per_row",
            "sharded_state": "ceil(N / W) * bytes_per_row",
            "replicated_traffic": "B * (2 + F_c) * 8",
            "sharded_traffic": "B * (2 + F_c) * 8 + B * 8 + B * F_r * 8 (the all_to_all also sends B * F_r * 8)",
            "B": f"W * {ARITHMETIC_BATCH_PER_GPU}",
        },
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------- printing
def fmt_n(n: float) -> str:
    """``1e3``, ``1e8``, ``1.28e9``: a sample count as written in the docstring."""
    exponent = math.floor(math.log10(n))
    return f"{n / 10**exponent:.3g}e{exponent}"


def mib(value: float) -> str:
    return f"{value / 2**20:,.2f}"


def gib(value: float) -> str:
    return f"{value / 2**30:,.2f}"


def ratio_row(label: str, entry: dict[str, Any], target: str, verdict: str) -> str:
    """A row of the ratios table: the value, each round's rank-0 ratio and their median."""
    rounds = ", ".join(f"{value:.3f}" for value in entry["per_round_rank0"])
    rounds += f" ({entry['median_per_round_rank0']:.3f})"
    return f"| {label} | {entry['value']:.3f} | {rounds} | {target} | {verdict} |"


def profile_row(config: dict[str, Any]) -> str:
    """One configuration's row of the "where the time goes" table (rank 0's profile)."""
    per_step = config["profile"][0]["per_step"]

    def ms(key: str) -> float:
        return per_step.get(key, {}).get("ms", 0.0)

    def total(prefix: str) -> tuple[float, float]:
        entries = [v for k, v in per_step.items() if k.startswith(prefix)]
        return sum(v["ms"] for v in entries), sum(v["calls"] for v in entries)

    read_collectives = ["state.read:all_gather", "state.read:all_to_all_single", "state.read/size check:all_gather"]
    commit_collectives = ["state.commit:all_gather", "state.commit/size check:all_gather"]
    read_local = ms("state.read (total)") - sum(ms(key) for key in read_collectives)
    commit_local = ms("state.commit (total)") - sum(ms(key) for key in commit_collectives)
    other_ms, other_calls = total("other:")
    checks_ms, checks_calls = total("size check:")
    check_ms = 1e3 * config["seeding_check_s_max"]
    interval = config["seeding_check_interval"]
    return (
        f"| {fmt_n(config['num_samples'])} | {config['sharding']} | {config['profile'][0]['step_ms']:.2f} "
        f"| {ms('state.read (total)'):.2f} | {ms(read_collectives[0]):.2f} | {ms(read_collectives[1]):.2f} "
        f"| {ms(read_collectives[2]):.2f} | {read_local:.2f} | {ms('state.commit (total)'):.2f} "
        f"| {ms(commit_collectives[0]):.2f} | {ms(commit_collectives[1]):.2f} | {commit_local:.2f} "
        f"| {other_ms:.2f} ({other_calls:.0f}) | {checks_ms:.2f} ({checks_calls:.0f}) "
        f"| {check_ms:.1f} / {interval} = {check_ms / interval:.3f} |"
    )


def print_tables(summary: dict[str, Any], table: dict[str, Any], settings: dict[str, Any]) -> None:
    configs = summary["configs"]
    world = settings["world_size"]
    print(
        f"\n### Measured: GloFNDClipLoss(estimator={settings['estimator']!r}), {world} CPU ranks (gloo), "
        f"per-rank batch {settings['batch']}, dim {settings['dim']}, {settings['warmup_steps']} warm-up + "
        f"{settings['steps']} timed steps x {settings['rounds']} rounds, in turns of {settings['block']} steps\n"
    )
    print(
        "| num_samples | sharding | state MiB/rank | B/row | B/sample/rank | RSS growth MiB | step ms rank 0 "
        "| step ms max rank | collectives/step | state payload KiB/step/rank |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for config in configs.values():
        print(
            f"| {fmt_n(config['num_samples'])} | {config['sharding']} | {mib(config['state_bytes_max'])} "
            f"| {config['bytes_per_row']} | {config['bytes_per_sample_per_rank']:.3f} "
            f"| {mib(config['rss_growth_bytes_max'])} | {1e3 * config['seconds_rank0']:.2f} "
            f"| {1e3 * config['seconds_max_over_ranks']:.2f} | {config['collectives_per_step_rank0']:.0f} "
            f"| {config['state_traffic_bytes_per_step_rank0']['total'] / 1024:.1f} |"
        )
    ratios = summary["ratios"]
    flat = ratios["time_largest_over_smallest_num_samples"]
    print(
        "\n### Ratios (same run; value and verdict: the ratio of the step times' medians over rounds, the largest "
        "over ranks; per round: rank 0's ratio in each round, and their median)\n"
    )
    print("| ratio | value | per round (median) | target | verdict |")
    print("|---|---:|---|---:|---|")
    for sharding in SHARDINGS:
        entry = flat[sharding]
        target = f"<= {entry['target']:.2f}" if "target" in entry else "-"
        label = f"{sharding}: time at {fmt_n(flat['to'])} / at {fmt_n(flat['from'])}"
        print(ratio_row(label, entry, target, entry.get("verdict", "-")))
    for n, entry in ratios["sharded_over_replicated_time"].items():
        label = f"time sharded / replicated at {fmt_n(int(n))}"
        print(ratio_row(label, entry, f"<= {entry['target']:.2f}", entry["verdict"]))
    for n, entry in ratios["sharded_over_replicated_memory"].items():
        as_expected = "met" if abs(entry["value"] - entry["expected"]) < 1e-9 else "off"
        print(
            f"| state memory sharded / replicated at {fmt_n(int(n))} | {entry['value']:.4f} | - "
            f"| expected {entry['expected']:.4f} | {as_expected} |"
        )

    print(
        f"\n### Where the time goes (rank 0, ms per step, mean over {settings['profile_steps']} instrumented steps "
        "per configuration; a collective's time includes waiting for the other rank)\n"
    )
    print(
        "| num_samples | sharding | step | state.read | read: index gather | read: all_to_all | read: size checks "
        "| read: local | state.commit | commit: all_gather | commit: size check | commit: local "
        "| other collectives (calls) | other size checks (calls) | seeding check ms / steps between checks = ms/step |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for config in configs.values():
        print(profile_row(config))

    print(
        f"\n### Arithmetic (no measurement): per-GPU batch {table['batch_per_gpu']}, B = W * "
        f"{table['batch_per_gpu']}, bytes/row {table['bytes_per_row']['replicated']}, F_c = {table['commit_fields']} "
        f"fields committed, F_r = {table['read_fields']} fields read\n"
    )
    formula = table["formula"]
    print(f"state per rank: replicated {formula['replicated_state']}, sharded {formula['sharded_state']}")
    print(
        f"received per step per rank: replicated {formula['replicated_traffic']}; "
        f"sharded {formula['sharded_traffic']}\n"
    )
    print(
        "| data set | N | GPUs | global batch | state GiB/rank replicated | state GiB/rank sharded "
        "| state traffic MiB/step/rank replicated | sharded (commit + index gather + all_to_all) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for row in table["rows"]:
        state, traffic = row["state_bytes_per_rank"], row["received_bytes_per_step_per_rank"]
        parts = traffic["sharded_parts"]
        print(
            f"| {row['dataset']} | {fmt_n(row['num_samples'])} | {row['gpus']} | {row['global_batch']:,} "
            f"| {gib(state['replicated'])} | {gib(state['sharded'])} | {mib(traffic['replicated'])} "
            f"| {mib(traffic['sharded'])} ({mib(parts['commit_all_gather'])} + {mib(parts['index_all_gather'])} "
            f"+ {mib(parts['all_to_all_received'])}) |"
        )


# ---------------------------------------------------------------------------------------------- main
def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=float, nargs="+", default=[1e3, 1e6, 1e8], help="rows of the state")
    parser.add_argument("--estimator", choices=("minibatch", "sogclr", "fastclip"), default="minibatch")
    parser.add_argument("--world-size", type=int, default=2, help="CPU ranks (gloo processes)")
    parser.add_argument("--batch", type=int, default=256, help="per-rank batch")
    parser.add_argument("--dim", type=int, default=256, help="feature dimension")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per configuration and round")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over every configuration (median)")
    parser.add_argument("--block", type=int, default=5, help="steps a configuration takes before the next one's turn")
    parser.add_argument("--profile-steps", type=int, default=10, help="instrumented steps per configuration")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before the ranks are killed")
    parser.add_argument("--out", default=OUT, help="JSON of the measurements, ratios and arithmetic")
    args = parser.parse_args()
    args.num_samples = sorted({int(n) for n in args.num_samples})
    if min(args.num_samples) < args.world_size * args.batch:
        parser.error(f"--num-samples must be at least world size * batch = {args.world_size * args.batch}")
    if len(args.num_samples) < 2 or args.steps < 1 or args.rounds < 1 or args.warmup_steps < 1:
        parser.error("two --num-samples or more; --steps, --rounds and --warmup-steps >= 1")
    if args.world_size < 2 or args.profile_steps < 1 or args.block < 1:
        parser.error("--world-size >= 2 (sharding needs ranks); --profile-steps and --block >= 1")
    return args


def main() -> None:
    args = parse_arguments()
    settings = {
        "num_samples": args.num_samples, "estimator": args.estimator, "world_size": args.world_size,
        "batch": args.batch, "dim": args.dim, "steps": args.steps, "warmup_steps": args.warmup_steps,
        "rounds": args.rounds, "block": args.block, "profile_steps": args.profile_steps,
    }  # fmt: skip
    environment = {
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "threads_per_rank": 1, "backend": "gloo",
        "loadavg_before": loadavg(),
    }  # fmt: skip
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average before: {environment['loadavg_before']}")
    multiprocess.TIMEOUT_SECONDS = args.timeout  # the whole run is one spawn
    start = time.perf_counter()
    ranks = multiprocess.run_ranks(rank_run, args.world_size, settings)
    environment["wall_seconds"] = time.perf_counter() - start
    environment["loadavg_after"] = loadavg()
    environment["loadavg_per_round_rank0"] = ranks[0]["loadavg_per_round"]
    summary = combine(ranks, settings)
    table = arithmetic(summary)
    print_tables(summary, table, settings)
    print(
        f"\nload average per round (rank 0, 1/5/15 min; includes this run's {args.world_size} busy ranks): "
        f"{environment['loadavg_per_round_rank0']}, after: {environment['loadavg_after']}; "
        f"wall {environment['wall_seconds']:.0f} s"
    )
    results = {"environment": environment, "settings": settings, **summary, "arithmetic": table}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
