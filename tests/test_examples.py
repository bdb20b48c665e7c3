"""The training examples end to end on tiny real data: 1 process in-process, 2 processes with the CPU launchers.

Every run dumps each rank's loss state at its start and end (``--dump-state``); the tests compare
those dumps across ranks, with the checkpoints the runs wrote, and across a resume.
"""

from __future__ import annotations

import csv
import doctest
import importlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from glofnd_losses import GloFNDClipLoss
from glofnd_losses.checkpoint import load_state

# Expected Lightning warnings: mid-epoch resume of a plain DataLoader, a resumed run writing elsewhere,
# and Lightning's own use of a deprecated torch pytree API.
pytestmark = [
    pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended"),
    pytest.mark.filterwarnings("ignore:The dirpath has changed"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.* is deprecated"),
]

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
STEPS = ["--max-steps", "4", "--save-every", "2", "--log-every", "2", "--start-epoch", "0", "--no-progress"]
DATA = ["--limit", "256"]
SOGCLR = [*DATA, "--backbone", "resnet10t", "--stem", "imagenet", "--hidden-dim", "64", "--projection-dim", "32"]
CLIP = [*DATA, "--width", "8", "--embed-dim", "16"]
LIGHTLY = SOGCLR
ONE_PROCESS_BATCH = ["--batch-size", "32"]
TWO_PROCESS_BATCH = ["--batch-size", "16"]  # per process: the same global batch of 32


@pytest.fixture(scope="module")
def examples() -> Iterator[dict[str, ModuleType]]:
    sys.path.insert(0, str(EXAMPLES))
    try:
        names = ("train_sogclr", "train_clip", "lightly_simclr", "simclr_model")
        yield {name: importlib.import_module(name) for name in names}
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    """In-process runs create an Accelerator; drop accelerate's process-wide state afterwards."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ------------------------------------------------------------------------------------------ helpers
def outputs(out: Path) -> list[str]:
    return ["--out", str(out), "--dump-state", str(out / "dump")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(command: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420, check=False)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


def accelerate_launch(script: str, args: list[str]) -> None:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch([*launcher, "--main_process_port", str(free_port()), str(EXAMPLES / script), *args])


def torchrun(script: str, args: list[str]) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch([*launcher, "--master_port", str(free_port()), str(EXAMPLES / script), *args])


def dumps(directory: Path, when: str, world: int) -> list[dict[str, Any]]:
    found = [torch.load(directory / f"{when}_rank{rank}.pt", weights_only=False) for rank in range(world)]
    assert [dump["process_index"] for dump in found] == list(range(world))
    assert all(dump["num_processes"] == world for dump in found)
    return found


def assert_same_state(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(actual[name], value), name
        else:
            assert actual[name] == value, name


def accelerate_checkpoint_loss(out: Path, step: int) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(
        out / "checkpoints" / f"step_{step:07d}" / "custom_checkpoint_0.pkl", weights_only=False
    )
    return state


def lightning_checkpoint_loss(path: Path) -> dict[str, Any]:
    state = torch.load(path, weights_only=False)["state_dict"]
    return {name.removeprefix("criterion."): value for name, value in state.items() if name.startswith("criterion.")}


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def assert_learned(state: dict[str, Any], threshold: str, items: int) -> None:
    """Thresholds moved, and exactly ``items`` distinct items were visited (4 steps x 32: no overlap across ranks)."""
    assert (state[f"state.{threshold}"] < 1).any()
    assert int((state[f"state.{threshold}_visits"] > 0).sum()) == items


def check_two_process_run(out: Path, final_checkpoint: dict[str, Any], threshold: str) -> None:
    start, end = dumps(out / "dump", "start", 2), dumps(out / "dump", "end", 2)
    assert [dump["step"] for dump in end] == [4, 4]
    assert_same_state(end[1]["loss_state"], end[0]["loss_state"])  # identical on both ranks...
    assert_same_state(final_checkpoint, end[0]["loss_state"])  # ...and what the checkpoint holds
    assert_same_state(start[1]["loss_state"], start[0]["loss_state"])
    assert_learned(end[0]["loss_state"], threshold, items=128)


# ------------------------------------------------------------------------------------------ accelerate examples
@pytest.mark.parametrize(
    ("script", "model_args", "threshold", "columns"),
    [
        ("train_sogclr", SOGCLR, "threshold", {"flagged_fraction", "mean_threshold", "fn_precision", "fn_recall"}),
        ("train_clip", CLIP, "image_threshold", {"image_flagged_fraction", "text_mean_threshold", "temperature"}),
    ],
)
def test_accelerate_example_one_process_logs_checkpoints_and_resumes_exactly(
    examples: dict[str, ModuleType],
    tmp_path: Path,
    script: str,
    model_args: list[str],
    threshold: str,
    columns: set[str],
) -> None:
    main = examples[script].main
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    summary = main([*model_args, *ONE_PROCESS_BATCH, *STEPS, *outputs(first)])
    assert summary["step"] == 4 and summary["num_processes"] == 1 and summary["steps_per_epoch"] == 8
    (end,) = dumps(first / "dump", "end", 1)
    assert_same_state(accelerate_checkpoint_loss(first, 4), end["loss_state"])
    assert_learned(end["loss_state"], threshold, items=128)
    rows = csv_rows(first / "metrics.csv")
    assert [row["step"] for row in rows] == ["2", "4"]
    assert {"loss", "fn_recall" if script == "train_sogclr" else "image_fn_recall"} | columns <= set(rows[0])
    assert list((first / "tensorboard").glob("events.out.tfevents.*"))

    resume_from = first / "checkpoints" / "step_0000002"
    summary = main([*model_args, *ONE_PROCESS_BATCH, *STEPS, *outputs(resumed)] + ["--resume", str(resume_from)])
    assert summary["step"] == 4
    (start,) = dumps(resumed / "dump", "start", 1)
    assert start["step"] == 2 and start["loss_state"]["_extra_state"][1] == 2
    assert_same_state(start["loss_state"], accelerate_checkpoint_loss(first, 2))
    # Same batches and augmentations after the resume: the run ends exactly where the first one did.
    assert_same_state(dumps(resumed / "dump", "end", 1)[0]["loss_state"], end["loss_state"])
    assert [row["step"] for row in csv_rows(resumed / "metrics.csv")] == ["4"]


@pytest.mark.parametrize("detector", ["fnc", "none"])
def test_sogclr_baseline_detectors(examples: dict[str, ModuleType], tmp_path: Path, detector: str) -> None:
    steps = ["--max-steps", "2", "--log-every", "2", "--start-epoch", "0", "--no-progress"]
    summary = examples["train_sogclr"].main(
        [*SOGCLR, *ONE_PROCESS_BATCH, *steps, "--detector", detector, "--out", str(tmp_path)]
    )
    flagged = summary["metrics"]["flagged_fraction"]
    assert flagged == 0.0 if detector == "none" else 0.0 < flagged < 0.1


def test_sogclr_two_processes_with_accelerate_launch_and_resume(tmp_path: Path) -> None:
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    accelerate_launch("train_sogclr.py", [*SOGCLR, *TWO_PROCESS_BATCH, *STEPS, *outputs(first)])
    check_two_process_run(first, accelerate_checkpoint_loss(first, 4), "threshold")
    assert [row["step"] for row in csv_rows(first / "metrics.csv")] == ["2", "4"]

    resume = ["--resume", str(first / "checkpoints" / "step_0000002")]
    accelerate_launch("train_sogclr.py", [*SOGCLR, *TWO_PROCESS_BATCH, *STEPS, *outputs(resumed), *resume])
    start = dumps(resumed / "dump", "start", 2)
    assert [dump["step"] for dump in start] == [2, 2]
    for dump in start:
        assert_same_state(dump["loss_state"], accelerate_checkpoint_loss(first, 2))
    assert_same_state(
        dumps(resumed / "dump", "end", 2)[1]["loss_state"], dumps(first / "dump", "end", 2)[0]["loss_state"]
    )


def test_clip_two_processes_with_torchrun(tmp_path: Path) -> None:
    torchrun("train_clip.py", [*CLIP, *TWO_PROCESS_BATCH, *STEPS, *outputs(tmp_path), "--estimator", "sogclr"])
    check_two_process_run(tmp_path, accelerate_checkpoint_loss(tmp_path, 4), "image_threshold")
    state = dumps(tmp_path / "dump", "end", 2)[0]["loss_state"]
    assert int((state["state.u_image"] > 0).sum()) == 128


def test_clip_with_a_sharded_state_on_two_processes_resumes_on_one(
    examples: dict[str, ModuleType], tmp_path: Path
) -> None:
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    sharded = ["--estimator", "sogclr", "--state-sharding", "sharded"]
    torchrun("train_clip.py", [*CLIP, *TWO_PROCESS_BATCH, *STEPS, *outputs(first), *sharded])
    blocks = [dump["loss_state"] for dump in dumps(first / "dump", "end", 2)]
    assert blocks[0]["state.image_threshold"].shape == (128,)  # each process its half of the 256 items
    whole = {key: torch.cat([blocks[0][key], blocks[1][key]]) if key.startswith("state.") else blocks[0][key]
             for key in blocks[0]}  # fmt: skip
    assert_learned(whole, "image_threshold", items=128)

    # One process resumes the 2-process run's step-2 checkpoint: every row, read from both processes' files.
    resume = ["--resume", str(first / "checkpoints" / "step_0000002")]
    examples["train_clip"].main([*CLIP, *ONE_PROCESS_BATCH, *STEPS, *outputs(resumed), *sharded, *resume])
    saved = GloFNDClipLoss(256, estimator="sogclr")
    load_state(saved, first / "checkpoints" / "step_0000002" / "glofnd_state")
    (start,) = dumps(resumed / "dump", "start", 1)
    assert start["step"] == 2
    assert_same_state(start["loss_state"], saved.state_dict())
    (end,) = dumps(resumed / "dump", "end", 1)
    assert_learned(end["loss_state"], "image_threshold", items=128)


def test_clip_siglip_loss_trains_a_logit_bias_and_refuses_an_estimator(
    examples: dict[str, ModuleType], tmp_path: Path
) -> None:
    train_clip = examples["train_clip"]
    steps = ["--max-steps", "2", "--log-every", "2", "--start-epoch", "0", "--no-progress", "--out", str(tmp_path)]
    metrics = train_clip.main([*CLIP, *ONE_PROCESS_BATCH, *steps, "--loss", "siglip"])["metrics"]
    assert 0.0 < metrics["image_flagged_fraction"] < 0.1 and 0.0 < metrics["text_flagged_fraction"] < 0.1
    assert metrics["logit_bias"] != -10.0 and {"image_fn_recall", "text_fn_precision"} <= set(metrics)
    with pytest.raises(SystemExit):
        train_clip.parse_args(["--loss", "siglip", "--estimator", "sogclr"])


def test_clip_help_says_captions_come_from_labels(
    examples: dict[str, ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        examples["train_clip"].parse_args(["--help"])
    assert "generated from the class labels" in capsys.readouterr().out
    assert "CAPTIONS COME FROM THE LABELS" in (examples["train_clip"].__doc__ or "")


# ------------------------------------------------------------------------------------------ lightly + Lightning
def test_lightly_one_device_checkpoints_and_resumes(examples: dict[str, ModuleType], tmp_path: Path) -> None:
    main = examples["lightly_simclr"].main
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    summary = main([*LIGHTLY, *ONE_PROCESS_BATCH, *STEPS, *outputs(first)])
    assert summary["step"] == 4
    assert {"loss", "flagged_fraction", "mean_threshold", "fn_precision", "fn_recall"} <= set(summary["metrics"])
    (end,) = dumps(first / "dump", "end", 1)
    assert_same_state(lightning_checkpoint_loss(first / "checkpoints" / "last.ckpt"), end["loss_state"])
    assert_learned(end["loss_state"], "threshold", items=128)
    (metrics_csv,) = (first / "csv").glob("version_*/metrics.csv")
    assert len(csv_rows(metrics_csv)) == 2
    assert list((first / "tensorboard").glob("version_*/events.out.tfevents.*"))

    checkpoint = first / "checkpoints" / "step_0000002.ckpt"
    summary = main([*LIGHTLY, *ONE_PROCESS_BATCH, *STEPS, *outputs(resumed)] + ["--resume", str(checkpoint)])
    assert summary["step"] == 4
    (start,) = dumps(resumed / "dump", "start", 1)
    assert start["step"] == 2
    assert_same_state(start["loss_state"], lightning_checkpoint_loss(checkpoint))
    assert dumps(resumed / "dump", "end", 1)[0]["loss_state"]["_extra_state"][1] == 4


def test_lightly_two_devices_ddp(tmp_path: Path) -> None:
    script = [sys.executable, str(EXAMPLES / "lightly_simclr.py"), "--accelerator", "cpu", "--devices", "2"]
    launch(
        [*script, *LIGHTLY, *TWO_PROCESS_BATCH, *STEPS, "--out", str(tmp_path), "--dump-state", str(tmp_path / "dump")]
    )
    check_two_process_run(tmp_path, lightning_checkpoint_loss(tmp_path / "checkpoints" / "last.ckpt"), "threshold")


# ------------------------------------------------------------------------------------------ the SimCLR model
@pytest.mark.parametrize("name", ["resnet18", "resnet10t"])
def test_small_image_stem_keeps_full_resolution(examples: dict[str, ModuleType], name: str) -> None:
    build_simclr_model = examples["simclr_model"].build_simclr_model
    model = build_simclr_model(name, in_chans=1, small_images=True, hidden_dim=32, output_dim=16)
    conv1 = model.backbone.conv1
    assert isinstance(conv1, torch.nn.Conv2d) and conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
    assert isinstance(model.backbone.maxpool, torch.nn.Identity)
    images = torch.randn(2, 1, 28, 28)
    stem = model.backbone.act1(model.backbone.bn1(conv1(images)))
    assert stem.shape[-2:] == (28, 28)
    assert model(images).shape == (2, 16) and model.embed(images).shape == (2, 512)


def test_imagenet_stem_by_default_and_no_stem_to_replace(examples: dict[str, ModuleType]) -> None:
    build_simclr_model = examples["simclr_model"].build_simclr_model
    model = build_simclr_model("resnet10t", in_chans=3)
    assert isinstance(model.backbone.maxpool, torch.nn.MaxPool2d)
    with pytest.raises(ValueError, match="small_images=False"):
        build_simclr_model("mobilenetv3_small_050", small_images=True)


# ------------------------------------------------------------------------------------------ docstrings
def test_example_docstrings(examples: dict[str, ModuleType]) -> None:
    for module in [*examples.values(), sys.modules["accelerate_common"]]:
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
