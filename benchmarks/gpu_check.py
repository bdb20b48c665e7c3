"""Everything this package checks on a GPU, in one run (``make gpu-check``), into one results file.

On one CUDA device, within ``--budget-s`` seconds (450 by default: under 8 minutes), four stages,
each in its own process:

1. ``tests``: the CUDA tests, ``pytest tests -k cuda``: ``tests/test_devices.py``'s CUDA tests
   (no synchronisation in a step, CUDA against CPU, fp16/bf16 autocast), and any other test whose
   name, parameters or markers say ``cuda`` (``-k`` matches marker names too). They must pass, and
   none may be skipped (a skip on a CUDA machine means they did not see the device).
2. ``sync_free_bf16_steps``: each loss (``GloFNDSogCLRLoss``, ``GloFNDNTXent``, ``GloFNDClipLoss``
   with the ``"minibatch"``, ``"sogclr"`` and ``"fastclip"`` estimators, ``GloFNDSigLipLoss``; GloFND learning and
   filtering from the first step) trains a small linear encoder for two epochs of bf16-autocast
   steps (forward, backward, SGD step, ``set_epoch``) under ``torch.cuda.set_sync_debug_mode("error")``:
   any synchronising call (``.item()``, a blocking copy, ``nonzero``) raises. Afterwards, outside
   that mode, ``check_errors()`` must find nothing wrong and the losses must be finite. Where the
   losses accept ``chunk_size``, each also runs with a chunk a quarter of the batch (several chunks).
3. ``large_batch``: ``benchmarks/large_batch.py --device cuda`` (memory and time against
   open_clip's and lightly's losses at batches up to 16384).
4. ``train_step``: ``benchmarks/train_step.py --device cuda`` (the whole resnet18 SimCLR step,
   paired against lightly).

Everything goes into ``benchmarks/results/gpu_check_<device name>.json`` (the pytest output, the
benchmarks' tables and JSON) with a summary beside it (``.md``), under the device's name
(``torch.cuda.get_device_name``). The exit status is 0 only if every stage ran and passed; the
benchmarks' targets are reported (met / MISSED) but fail the run only with ``--strict-targets``.
Without a CUDA device the script says so and exits with status 2, writing nothing. It needs no
network access.

Run: ``make gpu-check`` (after ``make install``), or ``python benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
NO_CUDA_STATUS = 2

STEP_BATCH, STEP_DIM, STEP_INPUT_DIM, STEP_NUM_SAMPLES = 256, 64, 32, 1024
"""The sync-free steps' batch, embedding and input widths, and data set size (four batches an epoch)."""
STEP_EPOCHS = 2
STEP_LOSSES = ("sogclr", "ntxent", "clip_minibatch", "clip_sogclr", "clip_fastclip", "siglip")


def loss_class(name: str) -> Any:
    """The loss class of a step case's name."""
    from glofnd_losses import GloFNDClipLoss, GloFNDNTXent, GloFNDSigLipLoss, GloFNDSogCLRLoss

    return {"sogclr": GloFNDSogCLRLoss, "ntxent": GloFNDNTXent, "siglip": GloFNDSigLipLoss}.get(name, GloFNDClipLoss)


def build_loss(name: str, chunk_size: int | None) -> Any:
    """A loss learning and filtering from the first step, with ``chunk_size`` where it is accepted and asked for."""
    cls = loss_class(name)
    kwargs: dict[str, Any] = {"detector": "glofnd", "start_epoch": 0, "alpha": 0.05}
    if name.startswith("clip_"):
        kwargs["estimator"] = name.removeprefix("clip_")
    if chunk_size is not None:
        kwargs["chunk_size"] = chunk_size
    return cls(STEP_NUM_SAMPLES, **kwargs)


def accepts_chunk_size(name: str) -> bool:
    return "chunk_size" in inspect.signature(loss_class(name)).parameters


@contextlib.contextmanager
def syncs_raise(device: torch.device) -> Iterator[None]:
    """On CUDA, any synchronising call raises inside (``tests/test_devices.py``'s ``cuda_syncs_raise``)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def step_batches(device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """The sync-free steps' inputs, on ``device``: two noisy views and the indices of each batch.

    ``STEP_EPOCHS`` reshuffled epochs of ``STEP_BATCH``-item batches of ``STEP_NUM_SAMPLES`` fixed
    random inputs; drawn on the CPU from a generator of their own (seed 0).
    """
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(STEP_NUM_SAMPLES, STEP_INPUT_DIM, generator=generator)
    steps = []
    for _ in range(STEP_EPOCHS):
        order = torch.randperm(STEP_NUM_SAMPLES, generator=generator)
        for start in range(0, STEP_NUM_SAMPLES, STEP_BATCH):
            indices = order[start : start + STEP_BATCH]
            views = [base[indices] + 0.3 * torch.randn(len(indices), STEP_INPUT_DIM, generator=generator) for _ in "ab"]
            steps.append(tuple(tensor.to(device) for tensor in (*views, indices)))
    return steps


def sync_free_steps(name: str, device: torch.device, chunk_size: int | None) -> dict[str, Any]:
    """Train a linear encoder with loss ``name`` for ``STEP_EPOCHS`` epochs of bf16-autocast steps.

    Everything the steps need is on ``device`` before they start; on CUDA the steps run under
    ``torch.cuda.set_sync_debug_mode("error")``. Returns what was checked after them.
    """
    from glofnd_losses.image_text import ImageTextLossBase

    torch.manual_seed(0)
    loss_fn = build_loss(name, chunk_size).to(device)
    clip = isinstance(loss_fn, ImageTextLossBase)
    bias = (torch.nn.Parameter(torch.tensor(-10.0, device=device)),) if name == "siglip" else ()
    encoders = torch.nn.ModuleList(torch.nn.Linear(STEP_INPUT_DIM, STEP_DIM) for _ in range(2 if clip else 1)).to(
        device
    )
    logit_scale = torch.nn.Parameter(torch.tensor(10.0, device=device))
    optimizer = torch.optim.SGD([*encoders.parameters(), logit_scale, *bias], lr=0.1, momentum=0.9)
    steps = step_batches(device)
    losses, phase = [], "set-up"
    try:
        with syncs_raise(device):
            for step, (view_a, view_b, indices) in enumerate(steps):
                phase = f"step {step}: set_epoch"
                if step % (STEP_NUM_SAMPLES // STEP_BATCH) == 0:
                    loss_fn.set_epoch(step // (STEP_NUM_SAMPLES // STEP_BATCH))
                phase = f"step {step}: forward"
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    if clip:
                        images = torch.nn.functional.normalize(encoders[0](view_a), dim=1)
                        texts = torch.nn.functional.normalize(encoders[1](view_b), dim=1)
                        loss = loss_fn(images, texts, logit_scale, *bias, indices=indices)
                    else:
                        loss = loss_fn(encoders[0](view_a), encoders[0](view_b), indices)
                phase = f"step {step}: backward"
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                phase = f"step {step}: optimizer step"
                optimizer.step()
                losses.append(loss.detach())
    except Exception as error:  # which part of which step raised, for the report
        raise RuntimeError(f"in {phase}: {type(error).__name__}: {error}") from error
    loss_fn.check_errors()  # the one blocking read, outside the steps: raises if an input was wrong
    values = torch.stack(losses).float().cpu()
    thresholds = [buffer for key, buffer in loss_fn.state_dict().items() if key.endswith("threshold")]
    return {
        "steps": len(steps),
        "losses_finite": bool(torch.isfinite(values).all()),
        "first_loss": float(values[0]),
        "last_loss": float(values[-1]),
        "thresholds_float32_finite": all(
            buffer.dtype == torch.float32 and bool(torch.isfinite(buffer).all()) for buffer in thresholds
        ),
        "learning": bool(loss_fn.learning),
        "filtering": bool(loss_fn.filtering),
    }


def sync_free_stage(device: torch.device) -> dict[str, Any]:
    """Every loss's sync-free bf16 steps (and with a small chunk where ``chunk_size`` is accepted)."""
    runs: dict[str, Any] = {}
    for name in STEP_LOSSES:
        variants: list[tuple[str, int | None]] = [(name, None)]
        if accepts_chunk_size(name):
            variants.append((f"{name} chunk_size={STEP_BATCH // 4}", STEP_BATCH // 4))
        for label, chunk_size in variants:
            start = time.perf_counter()
            try:
                run = sync_free_steps(name, device, chunk_size)
                run["ok"] = run["losses_finite"] and run["thresholds_float32_finite"] and run["filtering"]
            except Exception as error:  # noqa: BLE001 - every failure is recorded, the other losses still run
                run = {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
            run["seconds"] = time.perf_counter() - start
            runs[label] = run
    return {"ok": all(run["ok"] for run in runs.values()), "runs": runs}


def run_process(command: list[str], timeout: float) -> dict[str, Any]:
    """Run ``command`` in the repository root; its exit status and output (a timeout counts as a failure)."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        returncode = None
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        stderr = (expired.stderr.decode() if isinstance(expired.stderr, bytes) else (expired.stderr or "")) + (
            f"\n[gpu_check: killed after {timeout:.0f} s]"
        )
    return {
        "command": " ".join(shown(part) for part in command),
        "returncode": returncode,
        "timed_out": returncode is None,
        "seconds": time.perf_counter() - start,
        "stdout": stdout,
        "stderr": stderr,
    }


def shown(part: str) -> str:
    """A command's part as the reports show it: ``python`` for this interpreter, paths from the repository root."""
    if part == sys.executable:
        return "python"
    return part.replace(str(ROOT) + os.sep, "")


def junit_counts(path: Path) -> dict[str, Any]:
    """Passed, failed, errors and skipped tests of a pytest JUnit XML report, and the names of the bad ones."""
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "not_passed": []}
    if not path.exists():
        return counts
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), None)
        key = {"failure": "failed", "error": "errors", "skipped": "skipped", None: "passed"}[outcome]
        counts[key] += 1
        if outcome is not None:
            counts["not_passed"].append(f"{key}: {name}")
    return counts


def tests_stage(timeout: float, workdir: Path) -> dict[str, Any]:
    report = workdir / "pytest.xml"
    command = [
        sys.executable, "-m", "pytest", "tests", "-k", "cuda", "-p", "no:cacheprovider", "-rfEs",
        f"--junitxml={report}",
    ]  # fmt: skip
    result = run_process(command, timeout)
    result.update(junit_counts(report))
    result["ok"] = (
        result["returncode"] == 0
        and result["passed"] > 0
        and not result["failed"] + result["errors"] + result["skipped"]
    )
    return result


def benchmark_stage(script: str, extra: list[str], timeout: float, workdir: Path) -> dict[str, Any]:
    out = workdir / f"{Path(script).stem}.json"
    result = run_process(
        [sys.executable, str(BENCHMARKS / script), "--device", "cuda", "--out", str(out), *extra], timeout
    )
    result["results"] = json.loads(out.read_text()) if out.exists() else None
    result["ok"] = result["returncode"] == 0 and result["results"] is not None
    return result


def missed_targets(results: dict[str, Any]) -> list[str]:
    """The benchmarks' targets that were missed (a large-batch time ratio between target and bar is not a miss)."""
    missed = []
    large = (results.get("large_batch") or {}).get("results") or {}
    for key, comparison in large.get("comparisons", {}).items():
        targets = comparison["targets"]
        for name in ("memory_ratio_at_largest", "our_growth"):
            if targets[name]["verdict"] != "met":
                missed.append(
                    f"large_batch {key} {name}: {targets[name]['value']:.3f} (target {targets[name]['target']:.2f})"
                )
        for batch, target in targets["time_ratio"].items():
            if target["verdict"] == "MISSED":
                missed.append(
                    f"large_batch {key} time ratio at {batch}: {target['value']:.2f}x (bar {target['bar']:.2f}x)"
                )
    steps = (results.get("train_step") or {}).get("results") or {}
    for batch, row in steps.get("batches", {}).items():
        if row["verdict"] == "MISSED":
            missed.append(
                f"train_step time ratio at {batch}: {row['ratio']:.2f}x (target {steps['targets']['time_ratio']:.2f}x)"
            )
    return missed


def summary_markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# GPU check: {results['device']}",
        "",
        f"- date (UTC): {results['date']}; commit {results['commit']}",
        f"- torch {results['torch']}, CUDA {results['cuda']}",
        f"- device: {results['device']} ({results['device_memory_gib']:.0f} GiB), {results['python']}",
        f"- total {results['seconds']:.0f} s (budget {results['budget_s']:.0f} s); command `{results['command']}`",
        f"- result: **{'PASS' if results['ok'] else 'FAIL'}**",
        "",
        "| stage | result | seconds |",
        "| --- | --- | ---: |",
    ]
    for name in ("tests", "sync_free_bf16_steps", "large_batch", "train_step"):
        stage = results["stages"].get(name)
        if stage is None:
            lines.append(f"| {name} | not run | |")
            continue
        verdict = "pass" if stage["ok"] else ("not run (budget)" if stage.get("not_run") else "**FAIL**")
        lines.append(f"| {name} | {verdict} | {stage.get('seconds', 0):.0f} |")
    tests = results["stages"].get("tests")
    if tests and not tests.get("not_run"):
        lines += [
            "",
            "## CUDA tests",
            "",
            f"`{tests['command']}`: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped",
        ]
        lines += [f"- {name}" for name in tests["not_passed"]]
    steps = results["stages"].get("sync_free_bf16_steps")
    if steps and not steps.get("not_run"):
        lines += ["", '## bf16 steps under `torch.cuda.set_sync_debug_mode("error")`', ""]
        lines += ["| loss | result | loss first -> last |", "| --- | --- | --- |"]
        for label, run in steps.get("runs", {}).items():
            detail = run.get("error") or f"{run['first_loss']:.4f} -> {run['last_loss']:.4f}"
            lines.append(f"| {label} | {'pass' if run['ok'] else '**FAIL**'} | {detail} |")
        if steps.get("error"):
            lines.append(f"\n{steps['error']}")
    for name in ("large_batch", "train_step"):
        stage = results["stages"].get(name)
        if stage and not stage.get("not_run"):
            lines += ["", f"## {name}", "", f"`{stage['command']}`", "", "```", stage["stdout"].rstrip(), "```"]
    missed = results.get("missed_targets", [])
    lines += ["", "## Targets missed", ""] + ([f"- {item}" for item in missed] or ["none"])
    return "\n".join(lines) + "\n"


def git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = done.stdout.strip() or "unknown"
    return commit + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=450, help="wall-clock budget of the whole check")
    parser.add_argument("--out-dir", default=str(BENCHMARKS / "results"), help="where the results files go")
    parser.add_argument("--strict-targets", action="store_true", help="a missed benchmark target fails the run")
    parser.add_argument("--child-steps", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def exit_without_cuda() -> None:
    """Say why nothing can be checked here, and exit with ``NO_CUDA_STATUS``."""
    print(
        f"gpu_check: no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, built for "
        f"CUDA {torch.version.cuda}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). "
        "Nothing was checked and no results were written; run this on a machine with an NVIDIA GPU.",
        file=sys.stderr,
    )
    sys.exit(NO_CUDA_STATUS)


def run_description(device_name: str, budget_s: float) -> dict[str, Any]:
    """The results' skeleton: the machine, the software, the commit, the command; no stage yet."""
    return {
        "device": device_name,
        "device_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": f"Python {platform.python_version()}",
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "command": " ".join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]]),
        "budget_s": budget_s,
        "stages": {},
    }


def run_stages(deadline: float) -> dict[str, dict[str, Any]]:
    """The four stages in turn, each capped at its share and at what is left before ``deadline``.

    A stage that would start with under 20 s left is recorded as not run (and failed).
    """
    this_script = str(Path(__file__).resolve())
    stages: list[tuple[str, float, Any]] = [
        ("tests", 200, lambda timeout, workdir: tests_stage(timeout, workdir)),
        ("sync_free_bf16_steps", 120, lambda timeout, workdir: child_steps_stage(this_script, timeout)),
        ("large_batch", 200, lambda timeout, workdir: benchmark_stage(
            "large_batch.py", ["--steps", "5", "--warmup-steps", "1"], timeout, workdir)),
        ("train_step", 150, lambda timeout, workdir: benchmark_stage("train_step.py", [], timeout, workdir)),
    ]  # fmt: skip
    outcomes: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cap, stage in stages:
            left = deadline - time.perf_counter()
            if left < 20:
                outcomes[name] = {"ok": False, "not_run": True, "seconds": 0.0}
                print(f"  {name}: not run (budget spent)", flush=True)
                continue
            print(f"  {name} ...", end=" ", flush=True)
            outcome = stage(min(cap, left), Path(tmp))
            outcomes[name] = outcome
            print(f"{'pass' if outcome['ok'] else 'FAIL'} ({outcome['seconds']:.0f} s)", flush=True)
    return outcomes


def write_reports(results: dict[str, Any], out_dir: Path) -> Path:
    """The results as JSON and their summary as Markdown, named after the device; their common stem."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check_" + (re.sub(r"[^A-Za-z0-9]+", "_", results["device"]).strip("_") or "cuda")
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (out_dir / f"{stem}.md").write_text(summary_markdown(results))
    return out_dir / stem


def main() -> None:
    args = parse_arguments()
    if not torch.cuda.is_available():
        exit_without_cuda()
    if args.child_steps:
        print(json.dumps(sync_free_stage(torch.device("cuda"))))
        return

    start = time.perf_counter()
    device_name = torch.cuda.get_device_name()
    results = run_description(device_name, args.budget_s)
    print(f"gpu_check on {device_name} (torch {torch.__version__}, CUDA {torch.version.cuda})", flush=True)
    results["stages"] = run_stages(start + args.budget_s)
    results["seconds"] = time.perf_counter() - start
    results["missed_targets"] = missed_targets(results["stages"])
    results["ok"] = all(stage["ok"] for stage in results["stages"].values()) and not (
        args.strict_targets and results["missed_targets"]
    )
    stem = write_reports(results, Path(args.out_dir))
    print(f"\n{'PASS' if results['ok'] else 'FAIL'}: wrote {stem}.json and .md")
    for item in results["missed_targets"]:
        print(f"  target missed: {item}")
    sys.exit(0 if results["ok"] else 1)


def child_steps_stage(script: str, timeout: float) -> dict[str, Any]:
    """The sync-free steps in a fresh process (a CUDA error there cannot poison this one)."""
    result = run_process([sys.executable, script, "--child-steps"], timeout)
    try:
        result.update(json.loads(result["stdout"].strip().splitlines()[-1]))
    except (IndexError, json.JSONDecodeError):
        result["ok"] = False
        result["error"] = f"the child process gave no results (exit status {result['returncode']})"
    if result["returncode"] != 0:
        result["ok"] = False
    return result


if __name__ == "__main__":
    main()
