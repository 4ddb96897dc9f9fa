"""Teach a saved model new good images without refitting: an exact incremental update.

`update.py --model <class results folder | padim_model.pt> --add <image | folder | glob>... --output <folder>`
writes <folder>/padim_model.pt: PaDiM's statistics are sums, so adding the new images' sums gives the
statistics of one fit on the old and the new good images together, for the cost of the new images'
forward passes. The model's hold-out share of the new images is held out, and the threshold (and the
map threshold regions are drawn against) is set again on the images it was set on (those still there
unchanged) and the new held-out ones. The input model is never modified; the update is recorded in the
new model (predict.py logs it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from datasets.files import InputError, collect_images
from utils.cli import StrictParser, add_allow_tf32, add_model_flags, at_least, log_to_console, run_main
from utils.config import ENGINES, DeviceConfig

log = logging.getLogger("padim.update")


class UpdateError(Exception):
    """A user error (no image to add, an output that would overwrite the model): one line on stderr, exit 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = StrictParser(__doc__)
    add_model_flags(
        parser,
        "a class results folder (holding padim_model.pt) or the model file; saved by run_experiment.py "
        "--save_distribution or by an earlier update",
    )
    parser.add_argument(
        "--add",
        action="append",
        required=True,
        metavar="IMAGE|FOLDER|GLOB",
        help="good images to add: an image file, a folder (its images, not sub-folders) or a quoted glob "
        "('**' recurses); repeat the flag for more",
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="folder for the updated padim_model.pt (not the input model's)"
    )
    parser.add_argument("--batch_size", type=at_least(1), default=32, help="images per forward pass")
    parser.add_argument("--num_workers", type=at_least(0), default=0, help="image decoding processes")
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where the backbone runs (auto: CUDA when available)",
    )
    add_allow_tf32(parser)
    parser.add_argument(
        "--engine",
        default=DeviceConfig.engine,
        choices=ENGINES,
        help="runtime of the backbone on the CPU, as run_experiment.py's (the model's precision is kept)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Refuse a model that cannot be updated, or bad inputs, before the heavy work; then update and write."""
    from trainer import update_model
    from utils.config import FitConfig
    from utils.padim.backbones import float32_precision, pick_device
    from utils.padim.loading import build, read_model
    from utils.padim.model_file import MODEL_FILENAME, require_updatable, save_model
    from utils.runtime.output_files import folder_lock, prove_writable

    content, model_path, weights = read_model(args.model, args.weights)
    require_updatable(content, model_path)
    target = args.output / MODEL_FILENAME
    if target.resolve() == model_path.resolve():
        raise UpdateError(
            f"--output {args.output} holds the model to update: write the updated model to another folder"
        )
    paths = collect_images(args.add, "--add")
    prove_writable(args.output, "output folder", UpdateError)
    device = pick_device(args.device, "--device cuda")
    with folder_lock(args.output, "output folder", UpdateError), float32_precision(args.allow_tf32):
        precision = content["training_config"].get("precision", DeviceConfig.precision)
        model = build(content, model_path, weights, device, args.batch_size, args.engine, precision, args.num_workers)
        loading = FitConfig(batch_size=args.batch_size, num_workers=args.num_workers)
        updated = update_model(content, model.scorer, paths, model.geometry, loading)
        save_model(target, updated)
    last = updated["updates"][-1]
    print(
        f"{last['fitted']} images added to the fit and {last['held_out']} to the threshold's, {last['skipped']} "
        f"unreadable; {updated['n_train']} fitted images in all; threshold {content['threshold']:.4f} -> "
        f"{updated['threshold']:.4f}, map threshold {content['map_threshold']:.4f} -> {updated['map_threshold']:.4f}, "
        f"from {updated['threshold_provenance']['n_images']} images"
    )
    print(f"model: {target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_to_console()
    from datasets.split import DataError
    from trainer import NonFiniteError
    from utils.padim.loading import LOAD_ERRORS
    from utils.padim.model import GridMismatchError
    from utils.runtime.output_files import OutputWriteError

    return run_main(
        run,
        args,
        (UpdateError, InputError, *LOAD_ERRORS, OutputWriteError, DataError, NonFiniteError, GridMismatchError),
        "no updated model was written",
    )


if __name__ == "__main__":
    sys.exit(main())
