"""Score new images with a saved PaDiM model: predictions.csv, heat maps and overlays at the original resolution.

Everything needed to score comes from the model file that `run_experiment.py --save_distribution`
writes (<results>/<class>/padim_model.pt): no training data and no training flags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from datasets.files import InputError, collect_images
from utils.cli import (
    StrictParser,
    add_allow_tf32,
    add_engine_flags,
    add_model_flags,
    at_least,
    log_to_console,
    positive_float,
    run_main,
)
from utils.config import DeviceConfig, PredictConfig


def build_parser() -> argparse.ArgumentParser:
    """Every flag with its help; defaults shown by --help."""
    parser = StrictParser(__doc__)
    add_model_flags(
        parser,
        "a class results folder (holding padim_model.pt), the model file itself, or a graph "
        "written by export.py (.onnx: ONNX Runtime by default; .xml: OpenVINO)",
    )
    parser.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="IMAGE|FOLDER|GLOB",
        help="an image file, a folder (its images, not sub-folders) or a quoted glob "
        "('**' recurses); repeat the flag for more",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=PredictConfig.output,
        help="folder for predictions.csv, heatmaps/, overlays/ and masks/",
    )
    parser.add_argument(
        "--batch_size", type=at_least(1), default=PredictConfig.batch_size, help="images per forward pass"
    )
    parser.add_argument(
        "--num_workers", type=at_least(0), default=PredictConfig.num_workers, help="image decoding processes"
    )
    parser.add_argument(
        "--device",
        default=DeviceConfig.device,
        choices=["auto", "cpu", "cuda"],
        help="where the backbone and the distances run (auto: CUDA when available)",
    )
    add_allow_tf32(parser)
    add_engine_flags(parser)
    parser.add_argument(
        "--threshold",
        type=positive_float,
        help="anomaly threshold on the image score, overriding the model's (held-out normal quantile); with the "
        "map_max score it also moves the map threshold regions are drawn against (the same quantity); with a grid "
        "score the model's map threshold stays (other units)",
    )
    parser.add_argument(
        "--min_region_area",
        type=at_least(1),
        default=PredictConfig.min_region_area,
        help="regions above the map threshold smaller than this many pixels (at the original "
        "resolution) are specks: not in regions.csv, not boxed",
    )
    parser.add_argument(
        "--save_masks", action="store_true", help="also write masks/<stem>.png: 0/255 pixels above the map threshold"
    )
    parser.add_argument(
        "--max_image_pixels",
        type=at_least(0),
        default=PredictConfig.max_image_pixels,
        help="larger images are refused as possible decompression bombs; raise it for your own large images "
        "(0: no limit)",
    )
    return parser


def predict_config(args: argparse.Namespace, images: list[Path]) -> PredictConfig:
    """The flags as the run's configuration."""
    return PredictConfig(
        model=args.model,
        images=tuple(images),
        output=args.output,
        weights=args.weights,
        threshold=args.threshold,
        min_region_area=args.min_region_area,
        save_masks=args.save_masks,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        max_image_pixels=args.max_image_pixels,
        devices=DeviceConfig(
            device=args.device, allow_tf32=args.allow_tf32, engine=args.engine, precision=args.precision
        ),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_to_console()
    try:
        images = collect_images(args.input, "--input")
    except InputError as err:  # before the heavy imports
        print(f"error: {err}", file=sys.stderr)
        return 1
    import prediction  # torch and the model: only once the flags and the inputs are known to be good
    from utils.padim.loading import LOAD_ERRORS
    from utils.padim.onnx_graph import OnnxModelError
    from utils.runtime.output_files import OutputWriteError

    progress = prediction.Progress(len(images))
    return run_main(
        lambda config: prediction.run(config, progress),
        predict_config(args, images),
        (prediction.PredictError, *LOAD_ERRORS, OnnxModelError, OutputWriteError),
        progress.interrupted,
    )


if __name__ == "__main__":
    sys.exit(main())
