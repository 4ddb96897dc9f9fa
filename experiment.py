"""One run of run_experiment.py once its flags are parsed: find the classes, build the backbone,
hold the results folder, call trainer per class, write master_results.csv and the log."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path

import pandas as pd
import torch

from data.demo_data import make_demo_dataset
from datasets.split import DataError, find_classes, is_class_dir
from trainer import run_class_processing
from utils.backbone_specs import BACKBONES
from utils.backbones import WeightsError, build_extractor, pick_device
from utils.cli import install_log_handler
from utils.model_io import MODEL_FILENAME, ModelFileError
from utils.output_files import OutputWriteError, atomic_write, folder_lock, prove_writable
from utils.plotting import plot_class_results

log = logging.getLogger("padim")

USER_ERRORS = (DataError, WeightsError, ModelFileError, OutputWriteError)
RESULT_COLUMNS = [
    "class_name",
    "roc_auc",
    "optimal_threshold",
    "precision",
    "recall",
    "f1_score",
    "false_positive_rate",
    "precision_ci_low",
    "precision_ci_high",
    "recall_ci_low",
    "recall_ci_high",
    "false_positive_rate_ci_low",
    "false_positive_rate_ci_high",
    "true_negatives",
    "false_positives",
    "false_negatives",
    "true_positives",
    "roc_auc_ci_low",
    "roc_auc_ci_high",
    "pr_auc",
    "pixel_roc_auc",
    "pixel_aupro",
    "f1_max",
    "n_train",
    "n_holdout",
    "n_test",
    "n_skipped",
    "fit_seconds",
    "eval_seconds",
    "status",
]
EXPERIMENT_FILENAME = "experiment.json"


def resolve_devices(args: argparse.Namespace) -> dict[str, torch.device]:
    """Backbone, statistics and Mahalanobis devices; a GPU request without CUDA falls back with a warning."""
    return {
        "backbone": pick_device(args.device, "--device cuda"),
        "stats": pick_device("cuda" if args.stats_on_gpu else "cpu", "--stats_on_gpu"),
        "mahalanobis": pick_device("cuda" if args.mahalanobis_on_gpu else "cpu", "--mahalanobis_on_gpu"),
    }


def ensure_demo_data(root: Path) -> None:
    """Build the demo dataset once; built in a temporary folder and renamed, so never half there."""
    if root.is_dir():
        return
    log.info("building the demo dataset in %s", root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo_data.", dir=root.parent))
    try:
        make_demo_dataset(staging)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def class_jobs(args: argparse.Namespace) -> list[tuple[str, Path, Path | None]]:
    """(result folder name, training class, test class or None) for every class to run."""
    if not args.data_path.is_dir():
        raise DataError(f"--data_path {args.data_path} is not a folder")
    classes = find_classes(args.data_path)
    if args.test_class_name:
        if len(classes) != 1:
            names = ", ".join(c.name for c in classes) or "none"
            raise DataError(f"--test_class_name needs --data_path to be one class folder; found classes: {names}")
        search_root = args.test_class_path or args.data_path.parent
        test_dir = (
            search_root
            if is_class_dir(search_root) and search_root.name == args.test_class_name
            else search_root / args.test_class_name
        )
        if not is_class_dir(test_dir):
            raise DataError(f"test class {test_dir} has no train/ and test/ folders")
        return [(f"train_{classes[0].name}_test_{test_dir.name}", classes[0], test_dir)]
    if not classes:
        raise DataError(f"no class folder (with train/ and test/) in {args.data_path}")
    return [(c.name, c, None) for c in classes]


def results_folder(args: argparse.Namespace) -> Path:
    """<base_results_dir>/<results_subdir>; by default named after the layout, backbone, resize and crop
    (and the hooked stages when they are not the backbone's default)."""
    default = f"{args.dataset}_{args.model_architecture}_resize-{args.resize}_crop-{args.cropsize}"
    if tuple(args.layers) != BACKBONES[args.model_architecture].default_layers:
        default += f"_layers-{'-'.join(args.layers)}"
    return args.base_results_dir / (args.results_subdir or default)


def experiment_settings(args: argparse.Namespace) -> dict:
    """The settings that make two runs one experiment: only such runs may share a results folder."""
    return {
        "dataset": args.dataset,
        "data_path": str(args.data_path.resolve()),
        "test_class_name": args.test_class_name,
        "test_class_path": str(args.test_class_path.resolve()) if args.test_class_path else None,
        "model_architecture": args.model_architecture,
        "layers": args.layers,
        "weights": args.weights if args.weights in ("imagenet", "none") else str(Path(args.weights).resolve()),
        "resize": args.resize,
        "cropsize": args.cropsize,
        "reduced_dim": args.reduced_dim,
        "seed": args.seed,
        "holdout_ratio": args.holdout_ratio,
        "threshold_quantile": args.threshold_quantile,
        "test_sample_ratio": args.test_sample_ratio if args.dataset == "bowtie" else None,
        "augmentations": [args.horizontal_flip, args.vertical_flip, args.augmentation_prob]
        if args.augmentations_enabled
        else None,
    }


def claim_results_folder(out_dir: Path, settings: dict) -> None:
    """Record the experiment in experiment.json; a folder that holds another experiment's results is refused,
    so that master_results.csv, scores.csv and the model files of a folder always come from one experiment."""
    path = out_dir / EXPERIMENT_FILENAME
    if path.is_file():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            earlier = {}
        changed = [
            f"{key} {earlier.get(key)!r} -> {value!r}" for key, value in settings.items() if earlier.get(key) != value
        ]
        if changed:
            raise DataError(
                f"results folder {out_dir} holds another experiment's results (it differs in "
                f"{'; '.join(changed)}): choose another --results_subdir, or remove that folder"
            )
    elif (out_dir / "master_results.csv").exists():
        log.warning(
            "results folder %s holds results of an earlier version that did not record its experiment; "
            "they are replaced class by class",
            out_dir,
        )
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8"))


def clear_class_folder(folder: Path) -> None:
    """Remove an earlier run's files from a class folder, but for its model file (trainer decides whether it
    still fits): the folder then only ever holds files of this run."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name == MODEL_FILENAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def setup_logging(out_dir: Path) -> None:
    """Everything to experiment_log.log, warnings and errors to the console."""
    install_log_handler(
        "padim-log-file",
        logging.FileHandler(out_dir / "experiment_log.log", encoding="utf-8"),
        logging.INFO,
        "%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    install_log_handler(
        "padim-console", logging.StreamHandler(sys.stderr), logging.WARNING, "%(levelname)s: %(message)s"
    )


def interval_column(table: pd.DataFrame, rate: str) -> pd.Series:
    """'0.750 [0.47, 0.91]': a rate at the operating threshold with its 95% Wilson interval, for the summary."""

    def text(row) -> str:
        if pd.isna(row[rate]):
            return "-"
        return f"{row[rate]:.3f} [{row[f'{rate}_ci_low']:.2f}, {row[f'{rate}_ci_high']:.2f}]"

    return table.apply(text, axis=1) if len(table) else pd.Series(dtype=str)


def write_results(rows: list[dict], path: Path) -> pd.DataFrame:
    table = pd.DataFrame(rows).reindex(columns=RESULT_COLUMNS)
    numeric = RESULT_COLUMNS[1:-1]
    table[numeric] = table[numeric].apply(pd.to_numeric)
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g"))
    return table


def run(args: argparse.Namespace) -> int:
    """Check what can fail early (output writable, classes, weights) before creating anything, then run
    every class with the results folder held, so that no other run writes there meanwhile."""
    if args.demo:
        ensure_demo_data(args.data_path)
    out_dir = results_folder(args)
    prove_writable(out_dir, "results folder", DataError)
    jobs = class_jobs(args)
    devices = resolve_devices(args)
    extractor, weights_id = build_extractor(
        args.model_architecture, args.weights, devices["backbone"], args.seed, args.layers
    )
    if args.reduced_dim is not None and args.reduced_dim > extractor.dims:
        raise DataError(
            f"--reduced_dim {args.reduced_dim} exceeds the {extractor.dims} channels of "
            f"{args.model_architecture} at stages {' '.join(args.layers)}"
        )
    with folder_lock(out_dir, "results folder", DataError):
        claim_results_folder(out_dir, experiment_settings(args))
        setup_logging(out_dir)
        log.info("configuration: %s", {k: str(v) for k, v in sorted(vars(args).items())})
        log.info(
            "backbone %s, weights %s, devices %s",
            args.model_architecture,
            weights_id,
            {k: str(v) for k, v in devices.items()},
        )
        return run_classes(args, out_dir, jobs, extractor, weights_id, devices)


def run_classes(
    args: argparse.Namespace,
    out_dir: Path,
    jobs: list[tuple[str, Path, Path | None]],
    extractor,
    weights_id: str,
    devices: dict[str, torch.device],
) -> int:
    """Fit, score and evaluate each class; master_results.csv is rewritten after every class."""
    plot = partial(plot_class_results, max_visualizations=args.max_visualizations)
    rows = []
    for name, class_dir, test_dir in jobs:
        log.info("class %s: training on %s%s", name, class_dir, f", testing on {test_dir}" if test_dir else "")
        clear_class_folder(out_dir / name)
        try:
            row = run_class_processing(args, class_dir, test_dir, extractor, weights_id, out_dir / name, devices, plot)
        except (DataError, ModelFileError, ValueError) as err:
            log.error("class %s failed: %s", name, err)
            row = {"status": f"failed: {err}"}
        rows.append({"class_name": name, **row})
        log.info("class %s: %s", name, {k: v for k, v in rows[-1].items()})
        table = write_results(rows, out_dir / "master_results.csv")
    summary = table[
        ["class_name", "roc_auc", "pixel_roc_auc", "pixel_aupro", "f1_score", "n_holdout", "n_skipped", "status"]
    ]
    summary.insert(5, "recall (95% CI)", interval_column(table, "recall"))
    summary.insert(6, "FPR (95% CI)", interval_column(table, "false_positive_rate"))
    print(summary.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.3f}"))
    print(f"results: {out_dir / 'master_results.csv'}")
    log.info("summary:\n%s", summary.to_string(index=False, na_rep="-"))
    return 0 if any(row.get("status") == "ok" for row in rows) else 1
