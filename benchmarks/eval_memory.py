"""Whole-run peak memory against the number of test images: evaluation must not grow with the test set.

For each size N, a temporary class is built from a real one: a fixed subset of its training
images, and its test images (with their masks) repeated under new names until there are N.
Each run is `run_experiment.py` in a fresh process (efficientnet_lite0, offline weights,
--cropsize 0 by default); its peak resident memory is the largest of that process and the
children it waited for, read with getrusage in a wrapper process of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from datasets.files import list_images
from utils.cli import at_least

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "magnetic_tile" / "magnetic_tile"
PEAK_OF_CHILD = (
    "import json, resource, subprocess, sys, time; start = time.perf_counter(); "
    "code = subprocess.run(sys.argv[1:]).returncode; "
    "print(json.dumps({'code': code, 'seconds': time.perf_counter() - start, "
    "'peak_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data_path", type=Path, default=DEFAULT_DATA, help="one MVTec-layout class folder")
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1000, 4000], help="test images per run")
    parser.add_argument("--train_images", type=at_least(2), default=100, help="training images (fixed subset)")
    parser.add_argument("--cropsize", default="0")
    parser.add_argument("--max_visualizations", default="20")
    return parser


def replicated_class(source: Path, target: Path, train_images: int, test_images: int) -> None:
    """`target` as a class of symlinks: `train_images` training images spread over the source's, and its
    test images (and masks) repeated under new names up to `test_images`."""
    train = list_images(source / "train" / "good")
    (target / "train" / "good").mkdir(parents=True)
    for i in range(train_images):
        path = train[i * len(train) // train_images]
        (target / "train" / "good" / path.name).symlink_to(path)
    tests = [path for folder in sorted((source / "test").iterdir()) for path in list_images(folder)]
    for i in range(test_images):
        path = tests[i % len(tests)]
        defect, stem = path.parent.name, f"r{i // len(tests)}_{path.stem}"
        (target / "test" / defect).mkdir(parents=True, exist_ok=True)
        (target / "test" / defect / f"{stem}{path.suffix}").symlink_to(path)
        mask = source / "ground_truth" / defect / f"{path.stem}_mask.png"
        if mask.is_file():
            (target / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
            (target / "ground_truth" / defect / f"{stem}_mask.png").symlink_to(mask)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="padim-eval-memory-") as scratch:
            data = Path(scratch) / "data" / "tiles"
            replicated_class(args.data_path, data, args.train_images, size)
            command = [sys.executable, str(ROOT / "run_experiment.py"), "--dataset", "mvtec", "--data_path", str(data)]
            command += ["--model_architecture", "efficientnet_lite0", "--cropsize", args.cropsize]
            command += ["--max_visualizations", args.max_visualizations, "--base_results_dir", f"{scratch}/results"]
            quiet = {**os.environ, "TQDM_DISABLE": "1"}
            wrapped = [sys.executable, "-c", PEAK_OF_CHILD, *command]
            done = subprocess.run(wrapped, capture_output=True, text=True, env=quiet)
            measured = json.loads(done.stdout.splitlines()[-1])
            if measured["code"]:
                sys.exit(f"run with {size} test images failed ({measured['code']}):\n{done.stderr[-3000:]}")
            table = pd.read_csv(next(Path(scratch, "results").glob("*/master_results.csv")))
            row = table.iloc[0]
            rows.append(
                {
                    "test_images": int(row.n_test),
                    "peak_MiB": round(measured["peak_mib"]),
                    "run_s": round(measured["seconds"], 1),
                    "eval_s": row.eval_seconds,
                    "pixel_roc_auc": row.pixel_roc_auc,
                    "pixel_aupro": row.pixel_aupro,
                }
            )
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    table["peak_vs_first"] = table.peak_MiB / table.peak_MiB.iloc[0]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
