"""What --allow_tf32 does to the numbers, emulated on the CPU: image scores of a class fitted and scored
in full float32 against the same with TF32 convolutions.

TF32 keeps float32's range but only 10 of its 23 mantissa bits for the products of a
convolution (sums stay float32). The emulation rounds every convolution's input and weights
to 10 mantissa bits (round to nearest even) before a float32 convolution, as a GPU's tensor
cores do under TF32. The Gaussian's matmuls are left in float32 here; on a GPU --allow_tf32
lets them round too. Prints the relative change of the test images' scores, the image AUROC
both ways and how many calls (score > threshold) change.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

import trainer
from benchmarks import bench
from utils.padim.backbone_specs import BACKBONES
from utils.padim.backbones import build_extractor

TF32_DROPPED_BITS = 13  # float32 has 23 mantissa bits, TF32 10


def to_tf32(values: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to TF32's 10 mantissa bits, to nearest even, still stored as float32."""
    bits = values.contiguous().view(torch.int32)
    half = (1 << (TF32_DROPPED_BITS - 1)) - 1
    lowest_kept = (bits >> TF32_DROPPED_BITS) & 1
    return ((bits + half + lowest_kept) & ~((1 << TF32_DROPPED_BITS) - 1)).view(torch.float32)


def emulate_tf32_convolutions(extractor: torch.nn.Module) -> None:
    """Round every convolution's weights now and its input on every call (a forward pre-hook)."""
    for module in extractor.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.weight.data = to_tf32(module.weight.data)
            module.register_forward_pre_hook(lambda _, inputs: (to_tf32(inputs[0]),))


def scores_and_threshold(extractor, split, config, devices) -> tuple[np.ndarray, float]:
    model_config = config.models[0]
    model = trainer.build_model(extractor, model_config, devices)
    threshold = bench.fit(model, split, config).image
    geometry = bench.geometry_of(config)
    scored = trainer.score_samples(model, split.test, geometry, config.fit, model_config.seed, "score")
    return scored.scores, threshold


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data_path", type=Path, default=bench.DEFAULT_DATA, help="an MVTec-layout class folder")
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="efficientnet_lite0")
    parser.add_argument("--cropsize", type=int, default=224, help="centre crop; 0 = none")
    args = parser.parse_args(argv)
    flags = ["--data_path", str(args.data_path), "--cropsize", str(args.cropsize), "--device", "cpu"]
    bench_args = bench.parse_args(flags)
    config = bench.pipeline_config(bench_args, args.backbone)
    devices = {part: torch.device("cpu") for part in ("backbone", "stats", "mahalanobis")}
    split = bench.class_splits(bench_args, config)[0]
    weights = config.models[0].weights
    extractor, _ = build_extractor(args.backbone, weights, devices["backbone"], config.models[0].seed)
    exact, exact_threshold = scores_and_threshold(extractor, split, config, devices)
    emulate_tf32_convolutions(extractor)
    rounded, rounded_threshold = scores_and_threshold(extractor, split, config, devices)
    change = np.abs(rounded - exact) / np.abs(exact)
    labels = np.array([sample.label for sample in split.test])
    calls = int(((exact > exact_threshold) != (rounded > rounded_threshold)).sum())
    print(
        f"{split.name}, {args.backbone} ({weights}), crop {args.cropsize}, {len(exact)} test images: "
        f"score change relative median {np.median(change):.2e}, p99 {np.quantile(change, 0.99):.2e}, "
        f"max {change.max():.2e}; threshold change {abs(rounded_threshold / exact_threshold - 1):.2e}; "
        f"image AUROC {roc_auc_score(labels, exact):.6f} float32, {roc_auc_score(labels, rounded):.6f} TF32; "
        f"{calls} calls change"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
