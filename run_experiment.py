"""PaDiM anomaly detection and localization: train on good images, score and evaluate every class.

Writes <base_results_dir>/<results_subdir>/master_results.csv (one row per class),
experiment_log.log, report.html and a folder per class with its model file and figures.
Every flag is checked before any work starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from datasets import DATASET_LAYOUTS
from utils.cli import (
    StrictParser,
    add_allow_tf32,
    add_engine_flags,
    at_least,
    non_negative_float,
    resize_value,
    run_main,
    unit_interval,
)
from utils.config import (
    COMPARISON_SUFFIX,
    COVARIANCES,
    IMAGE_SCORES,
    NEIGHBOURHOODS,
    PROJECTIONS,
    DeviceConfig,
    FitConfig,
    Flips,
    FolderLayout,
    ModelConfig,
    RunConfig,
    default_workers,
    model_configs,
)
from utils.padim.backbone_specs import BACKBONES, OFFLINE_BACKBONE

DEMO_DATA_DIR = Path("demo_data")


def build_parser() -> argparse.ArgumentParser:
    parser = StrictParser(__doc__)
    parser.add_argument(
        "--model_architecture",
        nargs="+",
        default=[ModelConfig.architecture],
        choices=sorted(BACKBONES),
        metavar="ARCH",
        help=f"backbone(s) of {', '.join(sorted(BACKBONES))}; {OFFLINE_BACKBONE} has ImageNet weights that "
        "work offline",
    )
    parser.add_argument(
        "--weights",
        default=ModelConfig.weights,
        help="'imagenet', 'none' (random init, for tests only) or a path to a state dict",
    )
    parser.add_argument(
        "--dataset",
        default=FitConfig.layout,
        choices=DATASET_LAYOUTS,
        help="data layout; auto: folder with --normal_dir, csv with --manifest, bowtie for class folders "
        "data/process_data.py prepared, mvtec for other class folders",
    )
    parser.add_argument(
        "--data_path",
        type=Path,
        help="a folder of classes, or one class folder (train/ and test/); with --manifest, the folder its "
        "relative paths start from (None: the manifest's folder)",
    )
    parser.add_argument("--normal_dir", type=Path, help="folder layout: the good images to train on")
    parser.add_argument(
        "--abnormal_dir", type=Path, nargs="+", help="folder layout: defect images, a folder per defect type"
    )
    parser.add_argument(
        "--normal_test_dir",
        type=Path,
        help="folder layout: good images to test on (None: a seeded --test_sample_ratio share of --normal_dir)",
    )
    parser.add_argument(
        "--mask_dir",
        type=Path,
        help="folder layout: masks named by their image's stem (_mask suffix optional), directly in it or in a "
        "sub-folder named after the defect type",
    )
    parser.add_argument(
        "--manifest",
        type=Path,
        help="csv layout: a CSV of object,split,label,image,mask (VisA's) or image,split,label[,mask][,class][,defect]",
    )
    parser.add_argument(
        "--class_name",
        help="folder layout: the class's name (None: the name of --normal_dir's parent); csv layout: the class "
        "to run (None: every class)",
    )
    parser.add_argument(
        "--max_image_pixels",
        type=at_least(0),
        default=FitConfig.max_image_pixels,
        help="larger images are refused as possible decompression bombs; raise it for your own large images "
        "(0: no limit)",
    )
    parser.add_argument("--base_results_dir", type=Path, default=RunConfig.base_results_dir, help="where results go")
    parser.add_argument(
        "--results_subdir",
        help="sub-folder of the results, holding one experiment (None: <dataset>_<arch>_resize-<R|HxW>_crop-<C>, "
        "plus _layers-... for non-default --layers and _proj-, _nbhd-, _score-, _cov-, _eps-... for non-default "
        "variants); with several configurations, the folder that holds one "
        f"such folder per configuration and the comparison (None: <dataset>_{COMPARISON_SUFFIX})",
    )
    parser.add_argument(
        "--resize",
        type=resize_value,
        nargs="+",
        default=[ModelConfig.resize],
        metavar="S|HxW",
        help="S: the image's short side is resized to S (square S x S with --cropsize 0); HxW (e.g. 256x512, "
        "only with --cropsize 0): resized to H x W, for elongated parts that keep their proportions",
    )
    parser.add_argument(
        "--cropsize",
        type=at_least(0),
        nargs="+",
        default=[ModelConfig.cropsize],
        help="centre crop; 0 = no crop, resize to resize x resize and keep the whole part",
    )
    parser.add_argument(
        "--layers",
        nargs="+",
        metavar="STAGES",
        help="backbone stages to hook, by the backbone's names (layer1 layer2 layer3 for the ResNets, 2 3 4 for "
        "the EfficientNets' features); several choices as comma-separated lists (2,3,4 3,4,5); None: the "
        "backbone's default",
    )
    parser.add_argument(
        "--reduced_dim",
        type=at_least(1),
        nargs="+",
        help="channels kept (None: the backbone's default, e.g. 550 for wide_resnet50_2, "
        "capped at the hooked stages' channels)",
    )
    parser.add_argument(
        "--projection",
        choices=PROJECTIONS,
        nargs="+",
        default=[ModelConfig.projection],
        help="how the --reduced_dim channels are had: random, a seeded subset of the hooked channels (PaDiM); "
        "semi_orthogonal, all of them projected by a seeded D x k matrix W with W^T W = I (Kim et al. 2021)",
    )
    parser.add_argument(
        "--neighbourhood",
        type=int,
        choices=NEIGHBOURHOODS,
        nargs="+",
        default=[ModelConfig.neighbourhood],
        help="3: each grid cell's embedding is the mean over its 3 x 3 neighbours inside the grid, before the "
        "Gaussian (as PatchCore); 1: the cell's own",
    )
    parser.add_argument(
        "--image_score",
        choices=IMAGE_SCORES,
        nargs="+",
        default=[ModelConfig.image_score],
        help="an image's score (and threshold): map_max, the maximum of its up-sampled, blurred map; grid_max, "
        "of the raw Mahalanobis grid; grid_top_k_mean, the mean of the grid's 9 highest cells",
    )
    parser.add_argument(
        "--covariance",
        nargs="+",
        choices=COVARIANCES,
        default=[ModelConfig.covariance],
        help="per-position covariance: empirical (unbiased, PaDiM's), ledoit_wolf or oas (maximum likelihood "
        "shrunk towards a multiple of the identity, as scikit-learn's LedoitWolf / OAS); several run side by side",
    )
    parser.add_argument(
        "--epsilon",
        type=non_negative_float,
        nargs="+",
        default=[ModelConfig.epsilon],
        help="added to every covariance's diagonal; 0 with empirical fails (covariance not positive definite) "
        "when a class has fewer fit images than dimensions or a constant channel",
    )
    parser.add_argument(
        "--distribute",
        choices=["jobs", "images"],
        default=RunConfig.distribute,
        help="under torchrun: share out whole (configuration, class) jobs, or every class's images",
    )
    parser.add_argument(
        "--dist_timeout_s",
        type=at_least(1),
        default=RunConfig.dist_timeout_s,
        help="under torchrun: a rank silent this long is taken as lost and the run stops",
    )
    parser.add_argument(
        "--seed", type=int, default=ModelConfig.seed, help="seed for channel subset, splits, augmentation"
    )
    parser.add_argument(
        "--save_distribution",
        action="store_true",
        help="save the model file (needed by predict.py) and reuse it on reruns when it matches",
    )
    parser.add_argument("--batch_size", type=at_least(1), default=FitConfig.batch_size, help="images per forward pass")
    parser.add_argument(
        "--num_workers",
        type=at_least(0),
        default=default_workers(),
        help="data loading processes (by default from the cores: none on up to 3, then one per 4, at most 2)",
    )
    parser.add_argument("--augmentations_enabled", action="store_true", help="random flips of training images")
    parser.add_argument("--horizontal_flip", action="store_true", help="with augmentations: horizontal flips")
    parser.add_argument("--vertical_flip", action="store_true", help="with augmentations: vertical flips")
    parser.add_argument(
        "--augmentation_prob",
        type=unit_interval(True, True),
        default=Flips.probability,
        help="probability of each flip, applied independently",
    )
    parser.add_argument("--test_class_name", help="train on --data_path's class, test on this class")
    parser.add_argument(
        "--test_class_path",
        type=Path,
        help="folder that holds the test class (None: the folder that holds --data_path)",
    )
    parser.add_argument(
        "--device", default=DeviceConfig.device, choices=["auto", "cpu", "cuda"], help="device of the backbone"
    )
    parser.add_argument("--stats_on_gpu", action="store_true", help="accumulate the Gaussian on the GPU")
    parser.add_argument("--mahalanobis_on_gpu", action="store_true", help="compute Mahalanobis distances on the GPU")
    add_allow_tf32(parser)
    add_engine_flags(parser)
    parser.add_argument(
        "--test_sample_ratio",
        type=unit_interval(True, False),
        default=FitConfig.test_sample_ratio,
        help="bowtie, and folder without --normal_test_dir: share of the good training images moved (seeded, "
        "disjoint) to the test normals",
    )
    parser.add_argument(
        "--holdout_ratio",
        type=unit_interval(True, False),
        default=FitConfig.holdout_ratio,
        help="share of training normals held out of the fit to choose the operating threshold",
    )
    parser.add_argument(
        "--threshold_quantile",
        type=unit_interval(False, True),
        default=FitConfig.threshold_quantile,
        help="operating threshold = this quantile of the held-out normal scores",
    )
    parser.add_argument(
        "--max_visualizations",
        type=at_least(-1),
        default=FitConfig.max_visualizations,
        help="per-image figures per TN/FP/FN/TP category (the furthest from the threshold), plus the report's "
        "closest calls; 0 none, -1 all",
    )
    parser.add_argument(
        "--no_report", action="store_true", help="skip report.html (and comparison.html), the run's one-page summary"
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="build a small texture dataset (once, in ./demo_data) and run efficientnet_lite0 on it",
    )
    return parser


def layer_choices(values: list[str] | None) -> list[list[str] | None]:
    """--layers as a list of stage choices: `2 3 4` is one choice, `2,3,4 3,4,5` two (any comma makes
    every value one choice); None is the backbone's default."""
    if values is None:
        return [None]
    if any("," in value for value in values):
        return [[stage for stage in value.split(",") if stage] for value in values]
    return [values]


def run_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> RunConfig:
    """The checked flags as the run's configuration; a combination that cannot run is a parser error."""
    try:
        models = model_configs(
            args.model_architecture,
            layer_choices(args.layers),
            args.resize,
            args.cropsize,
            args.reduced_dim or [None],
            args.weights,
            args.seed,
            tuple(args.projection),
            tuple(args.neighbourhood),
            tuple(args.image_score),
            tuple(args.covariance),
            tuple(args.epsilon),
        )
    except ValueError as err:
        parser.error(str(err))
    flips = Flips(args.horizontal_flip, args.vertical_flip, args.augmentation_prob)
    fit = FitConfig(
        layout=args.dataset,
        test_sample_ratio=args.test_sample_ratio,
        holdout_ratio=args.holdout_ratio,
        threshold_quantile=args.threshold_quantile,
        flips=flips if args.augmentations_enabled else None,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        save_distribution=args.save_distribution,
        max_visualizations=args.max_visualizations,
        max_image_pixels=args.max_image_pixels,
    )
    devices = DeviceConfig(
        args.device, args.stats_on_gpu, args.mahalanobis_on_gpu, args.allow_tf32, args.engine, args.precision
    )
    return RunConfig(
        data_path=args.data_path,
        models=models,
        fit=fit,
        devices=devices,
        base_results_dir=args.base_results_dir,
        results_subdir=args.results_subdir,
        test_class_name=args.test_class_name,
        test_class_path=args.test_class_path,
        demo=args.demo,
        distribute=args.distribute,
        dist_timeout_s=args.dist_timeout_s,
        write_report=not args.no_report,
        folder=folder_layout(args),
        manifest=args.manifest,
        class_name=args.class_name,
    )


FOLDER_FLAGS = ("normal_dir", "abnormal_dir", "normal_test_dir", "mask_dir")


def folder_layout(args: argparse.Namespace) -> FolderLayout | None:
    if args.normal_dir is None:
        return None
    return FolderLayout(
        args.normal_dir, tuple(args.abnormal_dir or ()), args.normal_test_dir, args.mask_dir, args.class_name
    )


def check_layout_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Each layout's flags only with that layout (or auto, which they choose); parser error otherwise."""
    folder_given = [f"--{name}" for name in FOLDER_FLAGS if getattr(args, name) is not None]
    layout = args.dataset
    if args.manifest is not None and folder_given:
        parser.error(f"--manifest (csv layout) and {' '.join(folder_given)} (folder layout) exclude each other")
    if folder_given and layout not in ("auto", "folder"):
        parser.error(f"{' '.join(folder_given)}: only with --dataset folder")
    if args.manifest is not None and layout not in ("auto", "csv"):
        parser.error("--manifest: only with --dataset csv")
    if layout == "csv" and args.manifest is None:
        parser.error("--dataset csv needs --manifest FILE")
    if layout == "folder" or folder_given:
        if args.normal_dir is None or not args.abnormal_dir:
            parser.error("the folder layout needs --normal_dir DIR and --abnormal_dir DIR...")
        if args.data_path is not None:
            parser.error("--data_path is not used with the folder layout (--normal_dir, --abnormal_dir)")
    if args.class_name is not None and not (folder_given or args.manifest is not None):
        parser.error("--class_name: only with the folder layout or --manifest")
    if args.test_class_name and (folder_given or args.manifest is not None):
        parser.error("--test_class_name: only with class folders (--dataset mvtec or bowtie)")


def parse_args(argv: list[str] | None) -> RunConfig:
    """The flags, checked, as the run's configuration."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        args.dataset, args.model_architecture, args.data_path = "mvtec", ["efficientnet_lite0"], DEMO_DATA_DIR
        args.cropsize = [min(cropsize, 224) for cropsize in args.cropsize]
        args.results_subdir = args.results_subdir or "demo"
    check_layout_flags(args, parser)
    if args.data_path is None and args.normal_dir is None and args.manifest is None:
        parser.error("--data_path is required (or --demo, or --normal_dir / --manifest for the folder and csv layouts)")
    config = run_config(args, parser)
    if args.augmentations_enabled and not (args.horizontal_flip or args.vertical_flip):
        parser.error("--augmentations_enabled needs --horizontal_flip and/or --vertical_flip")
    if args.test_class_path and not args.test_class_name:
        parser.error("--test_class_path needs --test_class_name")
    return config


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    if config.data_path is not None and not config.demo and not config.data_path.is_dir():
        print(f"error: --data_path {config.data_path} is not a folder", file=sys.stderr)  # before the imports
        return 1
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, progress bars on rank 0 only (read at tqdm's import)
        os.environ["TQDM_DISABLE"] = "1"
    import experiment  # torch, pandas, matplotlib: only once the flags are known to be good

    return run_main(experiment.run, config, experiment.USER_ERRORS, config.what_was_kept)


if __name__ == "__main__":
    sys.exit(main())
