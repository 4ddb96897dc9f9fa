"""Wall time of one 2-class x 2-configuration run: 1 process x T threads against N processes x T/N
threads (torchrun, --distribute jobs), and the all-reduce volume of --distribute images per backbone.

The two classes are the same real class under two names (symlinks, optionally a subset of its
images spread evenly over the defect types), so both jobs cost the same. Both runs must give
the same comparison.csv; the script says so. Only efficientnet_lite0 has offline ImageNet
weights; the volume table builds every backbone with random weights (the shapes are the same).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from datasets.files import list_images
from datasets.images import Geometry
from utils.cli import at_least
from utils.padim.backbone_specs import BACKBONES
from utils.padim.backbones import build_extractor
from utils.padim.triangular import TriangularBlocks

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "magnetic_tile" / "magnetic_tile"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data_path", type=Path, default=DEFAULT_DATA, help="one MVTec-layout class folder")
    parser.add_argument("--max_train", type=at_least(1), help="training images per class (None: all)")
    parser.add_argument("--max_test", type=at_least(1), help="test images per class (None: all)")
    parser.add_argument("--cropsizes", nargs=2, default=["0", "224"], help="the two configurations' --cropsize")
    parser.add_argument("--threads", type=at_least(1), default=2, help="cores to use in all")
    parser.add_argument("--processes", type=at_least(2), default=2, help="torchrun processes")
    parser.add_argument("--num_workers", type=at_least(0), default=1, help="data loading processes per process")
    parser.add_argument("--skip_runs", action="store_true", help="only the all-reduce volume table")
    return parser


def evenly(items: list, count: int | None) -> list:
    if count is None or count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def link_class(source: Path, target: Path, max_train: int | None, max_test: int | None) -> None:
    """`target` as a class folder of symlinks to (a subset of) `source`'s images and masks."""
    (target / "train" / "good").mkdir(parents=True)
    for path in evenly(list_images(source / "train" / "good"), max_train):
        (target / "train" / "good" / path.name).symlink_to(path)
    tests = [path for folder in sorted((source / "test").iterdir()) for path in list_images(folder)]
    for path in evenly(tests, max_test):
        defect = path.parent.name
        (target / "test" / defect).mkdir(parents=True, exist_ok=True)
        (target / "test" / defect / path.name).symlink_to(path)
        mask = source / "ground_truth" / defect / f"{path.stem}_mask.png"
        if mask.is_file():
            (target / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
            (target / "ground_truth" / defect / mask.name).symlink_to(mask)


def timed_run(command: list[str], threads: int) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    return seconds


def statistics_shape(name: str, resize: int, cropsize: int) -> tuple[tuple[int, int], int, int]:
    """(grid, channels kept, bytes of the upper blocks of one float32 (D, D) matrix per position) of a
    backbone at its default dims and this geometry, measured by one forward pass of random weights."""
    size = Geometry(resize, cropsize).input_size
    extractor, _ = build_extractor(name, "none", torch.device("cpu"))
    grid = extractor(torch.zeros(1, 3, *size).contiguous(memory_format=torch.channels_last))[0].shape[2:]
    positions, dims = grid[0] * grid[1], extractor.reduced_dim(None)
    triangle = sum(p * r * c for p, r, c in TriangularBlocks.shapes(positions, dims, lower=False)) * 4
    return (grid[0], grid[1]), dims, triangle


def all_reduce_volume(resize: int = 256, cropsize: int = 256) -> pd.DataFrame:
    """Bytes each rank all-reduces per class under --distribute images, at the default dims and geometry:
    the first moments (P x D float64) and the upper blocks of the second moments (float32)."""
    rows = []
    for name in BACKBONES:
        grid, dims, second = statistics_shape(name, resize, cropsize)
        first = grid[0] * grid[1] * dims * 8
        rows.append(
            {"backbone": name, "grid": f"{grid[0]}x{grid[1]}", "dims": dims, "all_reduce_MiB": (first + second) / 2**20}
        )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not args.skip_runs:
        with tempfile.TemporaryDirectory(prefix="padim-dist-bench-") as scratch:
            data = Path(scratch) / "data"
            for name in ("tile_a", "tile_b"):
                link_class(args.data_path, data / name, args.max_train, args.max_test)
            flags = ["--dataset", "mvtec", "--data_path", str(data), "--model_architecture", "efficientnet_lite0"]
            flags += ["--cropsize", *args.cropsizes, "--max_visualizations", "0"]
            flags += ["--num_workers", str(args.num_workers)]
            script = str(ROOT / "run_experiment.py")
            single = [sys.executable, script, *flags, "--base_results_dir", f"{scratch}/single"]
            several = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            several += [f"--nproc_per_node={args.processes}", script, *flags, "--base_results_dir", f"{scratch}/dist"]
            one = timed_run(single, args.threads)
            many = timed_run(several, max(1, args.threads // args.processes))
            tables = [
                pd.read_csv(Path(scratch) / run / "mvtec_comparison" / "comparison.csv") for run in ("single", "dist")
            ]
            counts = ["configuration", "class_name", "n_train", "n_test", "status"]
            same = (
                tables[0][counts].equals(tables[1][counts])
                and (tables[0].roc_auc - tables[1].roc_auc).abs().max() < 1e-3
            )
        print(
            f"2 classes x 2 configurations (--cropsize {' '.join(args.cropsizes)}), efficientnet_lite0, "
            f"{int(tables[0].n_train[0] + tables[0].n_holdout[0])} training and {int(tables[0].n_test[0])} test "
            "images per class"
        )
        print(f"1 process x {args.threads} threads: {one:.1f} s")
        print(f"{args.processes} processes x {max(1, args.threads // args.processes)} threads (torchrun): {many:.1f} s")
        print(f"speed-up {one / many:.2f}x; same comparison.csv: {same}")
    print("all-reduce volume per class under --distribute images (resize 256, crop 256, default dims):")
    print(all_reduce_volume().to_string(index=False, float_format=lambda v: f"{v:.1f}"))


if __name__ == "__main__":
    main()
