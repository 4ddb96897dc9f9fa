"""Seconds of PaDiM's Gaussian steps alone, on random embeddings of a backbone's shape.

bench.py's ratio mixes these steps with the forward pass and data loading, whose spread
between runs (10-20% on 2 cores) hides a change of a second or two. This times only
utils.padim.gaussian, as the pipeline calls it: `--fit_batches` batches through
GaussianAccumulator (in the groups and bands of grid rows Padim hands over), finalize and
the precision factor, then `--score_batches` batches through mahalanobis, in the groups
Padim scores together (GROUP_IMAGES images). Each batch starts on `--backbone_device` and is
copied to `--device` (the statistics' and distances' device), as Padim moves the chosen maps
there before building the embedding. The defaults are
wide_resnet50_2's on magnetic_tile at crop 224: 550 dims, a 56x56 grid, batch 32, 22 fit
batches (686 images), 22 scoring batches (76 hold-out + 582 test images).
"""

from __future__ import annotations

import argparse
import sys
import time

import pandas as pd
import torch

from benchmarks.bench import synchronize
from utils.cli import at_least
from utils.config import COVARIANCES, ModelConfig
from utils.padim.backbones import pick_device
from utils.padim.embedding import embedding_bands
from utils.padim.gaussian import GaussianAccumulator, band_positions, mahalanobis, precision_factor_
from utils.padim.model import BAND_ELEMENTS, GROUP_IMAGES, image_groups


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dims", type=at_least(1), default=550, help="embedding dimensions D")
    parser.add_argument("--grid", type=at_least(1), default=56, help="grid side: H = W")
    parser.add_argument("--batch_size", type=at_least(1), default=32, help="images per batch")
    parser.add_argument("--fit_batches", type=at_least(1), default=22, help="batches accumulated")
    parser.add_argument("--score_batches", type=at_least(1), default=22, help="batches scored")
    parser.add_argument(
        "--covariance", choices=COVARIANCES, default=ModelConfig.covariance, help="the covariance estimator finalised"
    )
    parser.add_argument("--repeat", type=at_least(1), default=3, help="runs; the median of each column is printed")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where the statistics live")
    parser.add_argument(
        "--backbone_device",
        choices=("auto", "cpu", "cuda"),
        help="where each batch's maps come from (default: --device)",
    )
    return parser


def time_steps(embedding: torch.Tensor, args: argparse.Namespace, device: torch.device) -> dict:
    """One run: fit (accumulate + finalize), factor, scoring; seconds of each."""

    def batches(count: int):
        """Each batch's chosen maps (the embedding itself, channels last) moved to the statistics' device."""
        for _ in range(count):
            yield [embedding.to(device)], args.batch_size

    start = time.perf_counter()
    accumulator = GaussianAccumulator(args.dims, args.grid * args.grid, device)
    for group in image_groups(batches(args.fit_batches), GROUP_IMAGES):
        accumulator.update(embedding_bands(group, BAND_ELEMENTS))
    mean, covariance = accumulator.finalize(args.covariance)
    synchronize(device)
    fitted = time.perf_counter()
    factor = precision_factor_(covariance)
    synchronize(device)
    factored = time.perf_counter()
    for group in image_groups(batches(args.score_batches), GROUP_IMAGES):
        for top, band in embedding_bands(group, BAND_ELEMENTS):
            positions = band_positions(top, band)
            mahalanobis(band, mean[positions], factor[positions])
    synchronize(device)
    scored = time.perf_counter()
    return {"fit_s": fitted - start, "factor_s": factored - fitted, "mahalanobis_s": scored - factored}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = pick_device(args.device, "--device")
    backbone_device = pick_device(args.backbone_device or args.device, "--backbone_device")
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(args.batch_size, args.grid, args.grid, args.dims, generator=generator).to(backbone_device)
    runs = pd.DataFrame([time_steps(embedding, args, device) for _ in range(args.repeat)])
    runs["total_s"] = runs.sum(axis=1)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, maps from {backbone_device.type}, "
        f"statistics on {device.type}, {args.dims} dims, {args.covariance} covariance, "
        f"{args.grid}x{args.grid} grid, batch {args.batch_size}, {args.fit_batches} fit / {args.score_batches} "
        f"scoring batches, median of {args.repeat} (each run: {', '.join(f'{v:.3f}' for v in runs.total_s)} s)"
    )
    print(runs.median().to_frame().T.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
