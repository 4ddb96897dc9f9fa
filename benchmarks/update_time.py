"""What an exact update costs against a full refit, and what keeping the sums costs in the model file.

A model is fitted (run_experiment.py --save_distribution) on 90% of a class's good training images
(every tenth left out), then update.py adds the left-out 10%; a full refit on all of them is timed
the same way. The refit's time is run_experiment's fit_seconds (the fit and the held-out threshold),
the update's is update.py's whole run (loading and writing the model files, building the backbone,
the factorisation and the threshold's rescoring included); an update with one image gives that fixed
part, so the difference is the cost per added image. The file-size table
is computed from the shapes of every backbone's statistics (random weights: the shapes are the same).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

import run_experiment
import update
from benchmarks.distributed import DEFAULT_DATA, link_class, statistics_shape
from datasets.files import list_images
from utils.padim.backbone_specs import BACKBONES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data_path", type=Path, default=DEFAULT_DATA, help="one MVTec-layout class folder")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="the backbone of the timed runs")
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--cropsize", type=int, default=224)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--skip_runs", action="store_true", help="only the file-size table")
    return parser


def file_sizes(resize: int, cropsize: int) -> pd.DataFrame:
    """MiB of the statistics every model file holds (mean, precision factor) and of the sums it keeps for
    updates (shift float32, first moments float64, upper blocks of the second moments float32)."""
    rows = []
    for name in BACKBONES:
        grid, dims, triangle = statistics_shape(name, resize, cropsize)
        positions = grid[0] * grid[1]
        statistics = positions * dims * 4 + triangle
        sums = positions * dims * (4 + 8) + triangle
        rows.append(
            {
                "backbone": name,
                "grid": f"{grid[0]}x{grid[1]}",
                "dims": dims,
                "statistics_MiB": statistics / 2**20,
                "sums_MiB": sums / 2**20,
                "growth": (statistics + sums) / statistics,
            }
        )
    return pd.DataFrame(rows)


def fit_seconds(data: Path, results: Path, flags: list[str]) -> tuple[float, Path]:
    assert run_experiment.main([*flags, "--data_path", str(data), "--base_results_dir", str(results)]) == 0
    table = pd.read_csv(results / "r" / "master_results.csv")
    return float(table.fit_seconds[0]), results / "r" / data.name


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    print(f"model file contents per backbone (resize {args.resize}, crop {args.cropsize}, default dims):")
    table = file_sizes(args.resize, args.cropsize)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if args.skip_runs:
        return
    with tempfile.TemporaryDirectory(prefix="padim-update-bench-") as scratch:
        full = Path(scratch) / "all" / "tile"
        link_class(args.data_path, full, None, None)
        most = Path(scratch) / "most" / "tile"
        shutil.copytree(full, most, symlinks=True)
        added = Path(scratch) / "added"
        added.mkdir()
        for path in list_images(most / "train" / "good")[::10]:
            path.rename(added / path.name)
        flags = ["--dataset", "mvtec", "--model_architecture", args.backbone, "--resize", str(args.resize)]
        flags += ["--cropsize", str(args.cropsize), "--num_workers", str(args.num_workers), "--device", "cpu"]
        flags += ["--max_visualizations", "0", "--no_report", "--results_subdir", "r", "--save_distribution"]
        _, model = fit_seconds(most, Path(scratch) / "r90", flags)

        def timed_update(images: str, output: str) -> float:
            start = time.perf_counter()
            code = update.main(
                ["--model", str(model), "--add", images, "--output", f"{scratch}/{output}", "--device", "cpu"]
                + ["--num_workers", str(args.num_workers)]
            )
            assert code == 0
            return time.perf_counter() - start

        one_seconds = timed_update(str(list_images(added)[0]), "one")
        update_seconds = timed_update(str(added), "up")
        refit, refitted = fit_seconds(full, Path(scratch) / "r100", flags)
        count, total = len(list_images(added)), len(list_images(full / "train" / "good"))
        size = (refitted / "padim_model.pt").stat().st_size / 2**20
    print(
        f"{args.backbone}, {total} good training images; {count} added to a model fitted on the other {total - count}"
    )
    print(f"update.py (whole run): {update_seconds:.1f} s, {update_seconds / count * 1000:.0f} ms per added image")
    marginal = (update_seconds - one_seconds) / (count - 1)
    print(f"update.py with 1 image: {one_seconds:.1f} s; each further image {marginal * 1000:.0f} ms")
    print(f"full refit (fit + threshold): {refit:.1f} s, {refit / total * 1000:.0f} ms per training image")
    print(f"update / refit: {update_seconds / refit:.2f}; model file {size:.1f} MiB")


if __name__ == "__main__":
    main()
