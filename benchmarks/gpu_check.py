"""The GPU path checked on a lent GPU in a few minutes; one table of what was measured.

On small demo textures (random-init resnet18, so no weights to fetch): a model trained on the
CPU is scored by predict.py on CUDA and on the CPU again, each against run_experiment's
scores.csv (within 1e-4 relative); the same with --allow_tf32, to show what TF32 moves; a run
with the backbone, the statistics and the distances all on CUDA, whose model predict.py then
scores on the CPU against that run's scores.csv; blocking syncs per batch while the model
scores on CUDA (torch.cuda.set_sync_debug_mode); whether batches reach the backbone pinned;
and gaussian_steps.py's timings on CUDA. `--device cpu` runs the same steps on the CPU, to
check the script itself where no GPU is lent.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import trainer
from benchmarks import gaussian_steps
from data.demo_data import make_demo_dataset
from datasets.images import Geometry, Sample
from utils.config import FitConfig, model_configs
from utils.padim.backbones import float32_precision
from utils.padim.loading import build, read_model

ROOT = Path(__file__).resolve().parents[1]
AGREEMENT = 1e-4  # relative: predict.py must reproduce run_experiment's scores across devices
RUN_FLAGS = [
    "--dataset",
    "mvtec",
    "--model_architecture",
    "resnet18",
    "--weights",
    "none",
    "--resize",
    "128",
    "--cropsize",
    "112",
    "--batch_size",
    "16",
    "--num_workers",
    "2",
    "--max_visualizations",
    "0",
    "--save_distribution",
    "--results_subdir",
    "r",
]


def train(data: Path, results: Path, device_flags: list[str]) -> tuple[Path, pd.Series]:
    """run_experiment.py on the brick texture; (its class folder, its test scores by path)."""
    argv = [*RUN_FLAGS, "--data_path", str(data), "--base_results_dir", str(results), *device_flags]
    code = subprocess.run([sys.executable, str(ROOT / "run_experiment.py"), *argv], cwd=ROOT).returncode
    if code != 0:
        raise SystemExit(f"run_experiment.py {' '.join(device_flags)} exited {code}")
    folder = results / "r" / "brick"
    scores = pd.read_csv(folder / "scores.csv")
    return folder, scores.set_index("path").score


def predicted(model: Path, images: list[Path], output: Path, flags: list[str]) -> pd.Series:
    """predict.py's scores of `images` by path."""
    argv = ["--model", str(model), "--output", str(output), *flags]
    for image in images:
        argv += ["--input", str(image)]
    if subprocess.run([sys.executable, str(ROOT / "predict.py"), *argv], cwd=ROOT).returncode != 0:
        raise SystemExit(f"predict.py {' '.join(flags)} failed")
    return pd.read_csv(output / "predictions.csv").set_index("path").score


def relative_gap(scores: pd.Series, reference: pd.Series) -> float:
    """Largest |a - b| / |b| over the images both scored."""
    paired = pd.concat([scores, reference], axis=1, join="inner").to_numpy()
    return float(np.max(np.abs(paired[:, 0] - paired[:, 1]) / np.abs(paired[:, 1])))


# RUN_FLAGS as configurations: the loaders below use the run's settings
[RUN_MODEL] = model_configs(["resnet18"], [None], [128], [112], [None], weights="none")
RUN_FIT = FitConfig(layout="mvtec", batch_size=16, num_workers=2, max_visualizations=0, save_distribution=True)


def loaded_batches(images: list[Path], device: torch.device) -> list[torch.Tensor]:
    """The images as the run's loader hands them to a backbone on `device`."""
    geometry = Geometry(RUN_MODEL.resize, RUN_MODEL.cropsize)
    loader = trainer.class_loader([Sample(p, 0, "") for p in images], geometry, RUN_FIT, RUN_MODEL.seed, device)
    return [batch.images for batch in loader]


def syncs_per_batch(model_dir: Path, batches: list[torch.Tensor], device: torch.device) -> float:
    """Blocking syncs per scoring batch of predict.py's model on `device` (CUDA's sync debug mode warns
    once per sync); the first batch is a warm-up."""
    content, path, weights = read_model(model_dir, None)
    model = build(content, path, weights, device, len(batches[0]))
    model.scorer.anomaly_maps(batches[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for images_batch in batches[1:]:
                model.scorer.anomaly_maps(images_batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchronizing" in str(warning.message).lower() for warning in caught)
    return syncs / max(1, len(batches) - 1)


def pinned_share(batches: list[torch.Tensor]) -> float:
    """Share of the batches whose images arrived in pinned memory."""
    return sum(images.is_pinned() for images in batches) / len(batches)


def gaussian_step_seconds(device: torch.device) -> str:
    """gaussian_steps.py's median line on `device`: wide_resnet50_2's shapes on CUDA, efficientnet_lite0's
    once on the CPU (wide_resnet50_2's take minutes there)."""
    shapes = ["--repeat", "3"] if device.type == "cuda" else ["--dims", "144", "--repeat", "1"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        gaussian_steps.main(["--device", device.type, *shapes])
    header, values = printed.getvalue().strip().splitlines()[-2:]
    return ", ".join(f"{name} {value}" for name, value in zip(header.split(), values.split()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="the device under check")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here (--device cpu checks the script on the CPU)", file=sys.stderr)
        return 1
    device = torch.device(args.device)
    gpu_flags = ["--device", "cuda", "--stats_on_gpu", "--mahalanobis_on_gpu"] if device.type == "cuda" else []
    rows = []

    def row(check: str, value: float | str, target: str, ok: bool | None = None) -> None:
        shown = f"{value:.2e}" if isinstance(value, float) else value
        rows.append({"check": check, "value": shown, "target": target, "ok": "-" if ok is None else ok})

    def agreement(check: str, gap: float) -> None:
        row(check, gap, f"<= {AGREEMENT:g}", gap <= AGREEMENT)

    with tempfile.TemporaryDirectory(prefix="padim-gpu-check-") as work:
        work = Path(work)
        data = make_demo_dataset(work / "data", textures=("brick",), n_train=96, n_test_good=24, n_test_defect=24)
        brick = data / "brick"
        tests = sorted((brick / "test").rglob("*.png"))
        cpu_model, cpu_scores = train(brick, work / "cpu", ["--device", "cpu"])
        on_device = predicted(cpu_model, tests, work / "p1", ["--device", device.type])
        agreement(f"CPU-trained model scored on {device.type}", relative_gap(on_device, cpu_scores))
        back = predicted(cpu_model, tests, work / "p2", ["--device", "cpu"])
        agreement("the same model scored on the CPU again", relative_gap(back, cpu_scores))
        tf32 = predicted(cpu_model, tests, work / "p3", ["--device", device.type, "--allow_tf32"])
        row(f"... scored on {device.type} with --allow_tf32", relative_gap(tf32, cpu_scores), "(informative)")
        gpu_model, gpu_scores = train(brick, work / "gpu", gpu_flags)
        cpu_rescored = predicted(gpu_model, tests, work / "p4", ["--device", "cpu"])
        flags = " ".join(gpu_flags) or "--device cpu"
        agreement(f"run with {flags}, its model by predict.py on the CPU", relative_gap(cpu_rescored, gpu_scores))
        if device.type == "cuda":
            cuda_batches = loaded_batches(tests, device)
            syncs = syncs_per_batch(cpu_model, cuda_batches, device)
            row("blocking syncs per scoring batch", syncs, "<= 2", syncs <= 2)
            share = pinned_share(cuda_batches)
            row("share of batches pinned for a CUDA backbone", share, "1", share == 1.0)
        share = pinned_share(loaded_batches(tests, torch.device("cpu")))
        row("share of batches pinned for a CPU backbone", share, "0", share == 0.0)
        with float32_precision():
            row(f"gaussian_steps.py on {device.type}, seconds", gaussian_step_seconds(device), "(informative)")
    with pd.option_context("display.max_colwidth", 120, "display.width", 250):
        print(pd.DataFrame(rows).to_string(index=False))
    return 0 if all(entry["ok"] in (True, "-") for entry in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
