"""Speed and memory of the PaDiM pipeline against its lower bound, the backbone's forward pass.

The only cost PaDiM cannot avoid is running the backbone over every image; statistics,
inversion, Mahalanobis distances, up-sampling and blur are overhead on top of it. For each
backbone and class this prints one row: the forward-only time over the train and test
images (same DataLoader, same batch size) on each engine (torch, ONNX Runtime, OpenVINO, all
float32, interleaved), the time of the pipeline users run on `--engine` (fit with its threshold,
then scoring; no metrics, no plots), its ratio to the fastest forward, the metrics and plot times, and
the peak resident memory of the fit with a few and with all training images, each measured
in a fresh process next to that process's baseline after the model is loaded.

Every step calls the project's own code (trainer, utils.padim.model, build_extractor), so the
numbers are those of `run_experiment.py`, not of a copy.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import experiment
import trainer
from datasets.images import Geometry, readable_batches
from datasets.split import ClassSplit, DataError, split_class
from utils.cli import add_engine_flags, at_least
from utils.config import DeviceConfig, FitConfig, RunConfig, default_workers, model_configs
from utils.evaluation.results import evaluate
from utils.evaluation.summary import MapSummary
from utils.padim.anomaly_map import Thresholds
from utils.padim.backbone_specs import BACKBONES
from utils.padim.backbones import WeightsError, build_extractor, float32_precision
from utils.padim.engines import EngineError, engine_extractor
from utils.padim.model import Padim
from utils.reporting.plotting import plot_class_results
from utils.runtime.distributed import World

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "magnetic_tile"
DEFAULT_BACKBONES = ("efficientnet_lite0", "resnet18", "wide_resnet50_2")
QUICK_BACKBONES = ("efficientnet_lite0", "resnet18")
QUICK_IMAGES = 64
MEMORY_SMALL_FIT = 100
OFFLINE_PRETRAINED = {"efficientnet_lite0"}
TARGET_RATIO = 1.3
TARGET_MEMORY_GROWTH = 1.10
TARGET_WIDE_PEAK_MIB = 6 * 1024
TARGET_METRICS_S = 15.0
FORWARD_ENGINES = ("torch", "onnxruntime", "openvino")

log = logging.getLogger("padim.bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(
        "--data_path",
        type=Path,
        default=DEFAULT_DATA,
        help="MVTec-layout class folder, or a folder of classes (one row per backbone and class)",
    )
    parser.add_argument(
        "--backbones",
        nargs="+",
        choices=sorted(BACKBONES),
        help=f"backbones to measure (default: {' '.join(DEFAULT_BACKBONES)}; with --quick: "
        f"{' '.join(QUICK_BACKBONES)}); only efficientnet_lite0 loads ImageNet weights, the "
        "others run with random weights, which cost the same",
    )
    parser.add_argument("--batch_size", type=at_least(1), default=32, help="images per forward pass")
    parser.add_argument(
        "--num_workers",
        type=at_least(0),
        default=default_workers(),
        help="DataLoader processes (by default run_experiment.py's, from the cores)",
    )
    parser.add_argument("--resize", type=at_least(1), default=256, help="short side of the image is resized to this")
    parser.add_argument("--cropsize", type=int, default=224, help="centre crop; 0 = no crop (resize x resize)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a quick subset: {QUICK_IMAGES} train / {QUICK_IMAGES} test images, "
        f"{' and '.join(QUICK_BACKBONES)} unless --backbones/--max_* say otherwise",
    )
    parser.add_argument(
        "--max_train",
        type=at_least(1),
        help="at most this many training images per class (fit and hold-out shares kept), spread evenly",
    )
    parser.add_argument(
        "--max_test",
        type=at_least(1),
        help="at most this many test images per class, spread evenly so every defect type stays",
    )
    parser.add_argument(
        "--repeat",
        type=at_least(1),
        default=1,
        help="time forward-only and pipeline this many times, alternating, and report the median of "
        "each (the run with the median total for the pipeline's columns): with the loader's "
        "workers sharing the cores, single timings of the same code spread by 10-20%%",
    )
    parser.add_argument("--skip_memory", action="store_true", help="skip the peak-memory fits (two extra fits per row)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device of the backbone")
    for flag in ("--stats_on_gpu", "--mahalanobis_on_gpu", "--allow_tf32"):
        parser.add_argument(flag, action="store_true", help=f"as run_experiment.py {flag}")
    add_engine_flags(parser)
    parser.add_argument("--output", type=Path, help="also write the table to this CSV file")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags, with --quick filling in only what was not given explicitly."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cropsize < 0 or args.cropsize > args.resize:
        parser.error(f"--cropsize must be in 0..--resize ({args.resize}), got {args.cropsize}")
    if args.quick:
        args.max_train = args.max_train or QUICK_IMAGES
        args.max_test = args.max_test or QUICK_IMAGES
    args.backbones = args.backbones or list(QUICK_BACKBONES if args.quick else DEFAULT_BACKBONES)
    return args


def pipeline_config(args: argparse.Namespace, backbone: str) -> RunConfig:
    """The configuration `run_experiment.py` runs for this backbone: every other setting at the users' default."""
    weights = "imagenet" if backbone in OFFLINE_PRETRAINED else "none"
    return RunConfig(
        data_path=args.data_path,
        models=model_configs([backbone], [None], [args.resize], [args.cropsize], [None], weights),
        fit=FitConfig(
            layout="mvtec",
            batch_size=args.batch_size,
            num_workers=args.num_workers,
        ),
        devices=DeviceConfig(
            args.device, args.stats_on_gpu, args.mahalanobis_on_gpu, args.allow_tf32, args.engine, args.precision
        ),
    )


def backbone_on(engine: str, precision: str, config: RunConfig, devices: dict[str, torch.device], built=None):
    """The configuration's backbone on `engine` (as run_experiment.py builds it), from `built` (build_extractor's
    (extractor, weights id)) when given."""
    model_config = config.models[0]
    extractor, weights_id = built or build_extractor(
        model_config.architecture, model_config.weights, devices["backbone"], model_config.seed
    )
    input_size = geometry_of(config).input_size
    return engine_extractor(
        extractor,
        engine,
        precision,
        devices["backbone"],
        input_size,
        weights_id,
        model_config.seed,
        config.fit.num_workers,
    )


def geometry_of(config: RunConfig) -> Geometry:
    return trainer.geometry_of(config.models[0])


def loader_of(samples: list, config: RunConfig, device: torch.device):
    """The pipeline's DataLoader over `samples`."""
    return trainer.class_loader(samples, geometry_of(config), config.fit, config.models[0].seed, device)


def evenly(items: list, count: int | None) -> list:
    """At most `count` items spread evenly over the (sorted) list, so a subset keeps every defect type."""
    if count is None or count >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def limit_train(split: ClassSplit, count: int | None) -> ClassSplit:
    """At most `count` training images, fit and hold-out in their usual proportion (the threshold keeps its source)."""
    total = len(split.fit) + len(split.holdout)
    if count is None or count >= total:
        return split
    holdout = round(count * len(split.holdout) / total)
    return replace(split, fit=evenly(split.fit, count - holdout), holdout=evenly(split.holdout, holdout))


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def synchronize(device: torch.device) -> None:
    """CUDA runs asynchronously: wait for it, so a timer stops when the work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit(model: Padim, split: ClassSplit, config: RunConfig) -> Thresholds:
    """trainer.fit_or_load as users run it (no saved model): the Gaussian fit, then the held-out thresholds."""
    seed = config.models[0].seed
    thresholds, _, _ = trainer.fit_or_load(model, split, geometry_of(config), config.fit, seed, {}, Path(), World())
    return thresholds


def warm_file_cache(split: ClassSplit) -> None:
    """Read every file once, so neither timing pays for a cold disk cache that the other one then enjoys."""
    for sample in split.fit + split.holdout + split.test:
        sample.path.read_bytes()
        if sample.mask_path is not None:
            sample.mask_path.read_bytes()


def warm_up(model: Padim, split: ClassSplit, config: RunConfig) -> None:
    """One untimed forward per batch size the loaders will yield (full batches and each set's remainder).

    oneDNN builds its kernels for each new input shape (0.1-0.5 s each): without this, the
    first timing would pay for every shape and the second would get them free.
    """
    batch_size = config.fit.batch_size
    first = next(iter(loader_of(split.fit, config, model.device))).images
    sizes = {min(len(samples), batch_size) for samples in (split.fit, split.holdout, split.test) if samples}
    sizes |= {len(samples) % batch_size for samples in (split.fit, split.holdout, split.test)} - {0}
    for size in sorted(sizes):
        images = first.repeat(-(-size // len(first)), 1, 1, 1)[:size]
        model.features(images)
    synchronize(model.device)


def forward_only(model: Padim, split: ClassSplit, config: RunConfig) -> float:
    """Seconds of the lower bound: the fit, hold-out and test loaders of the pipeline, the backbone alone
    (Padim.features, the very call the pipeline makes)."""
    start = time.perf_counter()
    for samples in (split.fit, split.holdout, split.test):
        loader = loader_of(samples, config, model.device)
        for batch in readable_batches(loader, "forward", lambda index, reason: None):
            model.features(batch.images)
    synchronize(model.device)
    return time.perf_counter() - start


def timed_pipeline(extractor, split: ClassSplit, config: RunConfig, devices: dict[str, torch.device]) -> dict:
    """Seconds of fit, scoring, metrics and plots, each through the project's own functions."""
    geometry = geometry_of(config)
    model = trainer.build_model(extractor, config.models[0], devices)
    start = time.perf_counter()
    thresholds = fit(model, split, config)
    fitted = time.perf_counter()
    summary = MapSummary(thresholds, geometry.input_size, config.fit.max_visualizations)
    seed = config.models[0].seed
    scored = trainer.score_samples(model, split.test, geometry, config.fit, seed, "score", summary)
    scoring_done = time.perf_counter()
    result = evaluate(scored, thresholds, split.name, split.has_ground_truth)
    metrics_done = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="padim-bench-plots-") as out_dir:
        plots_start = time.perf_counter()
        plot_class_results(result, Path(out_dir))
        plots_s = time.perf_counter() - plots_start
    return {
        "fit_s": fitted - start,
        "score_s": scoring_done - fitted,
        "metrics_s": metrics_done - scoring_done,
        "plots_s": plots_s,
    }


def fit_peak_rss(config: RunConfig, split: ClassSplit) -> tuple[float, float]:
    """(MiB after the model is loaded, peak MiB after the fit) of this process; run it in a fresh one."""
    devices = trainer.resolve_devices(config.devices)
    backbone = backbone_on(config.devices.engine, config.devices.precision, config, devices)
    model = trainer.build_model(backbone, config.models[0], devices)
    baseline = peak_rss_mib()
    fit(model, split, config)
    return baseline, peak_rss_mib()


def in_fresh_process(function, *arguments):
    """Run `function` in a new process forked from a small forkserver.

    ru_maxrss is a high-water mark that survives exec: a child started with spawn or
    subprocess reports at least the parent's peak, so after the timings it would read several
    GiB whatever the fit used. Forkserver children start from a small process instead.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([function.__module__])  # children start with torch imported, as users' runs do
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *arguments).result()


def memory_columns(config: RunConfig, split: ClassSplit) -> dict:
    """Peak RSS of the fit with MEMORY_SMALL_FIT (at most half the set) and with all training images."""
    total = len(split.fit) + len(split.holdout)
    small = min(MEMORY_SMALL_FIT, max(1, total // 2))
    baseline, small_peak = in_fresh_process(fit_peak_rss, config, limit_train(split, small))
    _, full_peak = in_fresh_process(fit_peak_rss, config, split)
    return {
        "rss_base_mib": baseline,
        "mem_n_small": small,
        "rss_small_mib": small_peak,
        "rss_all_mib": full_peak,
        "all_vs_small": full_peak / small_peak,
    }


def class_splits(args: argparse.Namespace, config: RunConfig) -> list[ClassSplit]:
    """The split of every class under --data_path, limited by --max_train/--max_test.

    Read once, before any model is loaded: a bad folder fails at once, and every backbone
    sees the same images (the split depends only on settings that are the same for all).
    """
    splits = []
    fit, seed = config.fit, config.models[0].seed
    for _, files, _ in experiment.class_jobs(config):
        split = split_class(files, holdout_ratio=fit.holdout_ratio, seed=seed, test_sample_ratio=fit.test_sample_ratio)
        splits.append(replace(limit_train(split, args.max_train), test=evenly(split.test, args.max_test)))
    return splits


def benchmark_backbone(args: argparse.Namespace, backbone: str, splits: list[ClassSplit]) -> list[dict]:
    """One row per class for this backbone."""
    config = pipeline_config(args, backbone)
    model_config = config.models[0]
    devices = trainer.resolve_devices(config.devices)
    built = build_extractor(backbone, model_config.weights, devices["backbone"], model_config.seed)
    pipeline_backbone = backbone_on(config.devices.engine, config.devices.precision, config, devices, built)
    engines = FORWARD_ENGINES if devices["backbone"].type == "cpu" else ("torch",)
    forward_backbones = {}
    for engine in engines:  # full float32 each: the lower bound is the fastest exact forward
        candidate = backbone_on(engine, "fp32", config, devices, built)
        forward_backbones.setdefault(candidate.engine, candidate)  # an engine that fell back to torch is not timed
    rows = []
    for split in splits:
        n_train, n_test = len(split.fit) + len(split.holdout), len(split.test)
        log.info("%s / %s: %d train, %d test images", backbone, split.name, n_train, n_test)
        warm_file_cache(split)
        backbone_only = {
            engine: trainer.build_model(candidate, model_config, devices)
            for engine, candidate in forward_backbones.items()
        }
        for model in backbone_only.values():
            warm_up(model, split, config)
        forwards, attempts = {engine: [] for engine in backbone_only}, []
        for run in range(1, args.repeat + 1):
            for engine, model in backbone_only.items():  # engines interleaved, so drifts of the machine hit all
                forwards[engine].append(forward_only(model, split, config))
            attempts.append(timed_pipeline(pipeline_backbone, split, config, devices))
            pipeline_run_s = attempts[-1]["fit_s"] + attempts[-1]["score_s"]
            fastest_run_s = min(times[-1] for times in forwards.values())
            log.info(
                "%s / %s run %d: forward %s, pipeline (%s) %.2f s, ratio to the fastest forward %.3f",
                backbone,
                split.name,
                run,
                ", ".join(f"{engine} {times[-1]:.2f} s" for engine, times in forwards.items()),
                pipeline_backbone.engine,
                pipeline_run_s,
                pipeline_run_s / fastest_run_s,
            )
        forward_medians = {engine: float(np.median(times)) for engine, times in forwards.items()}
        fastest = min(forward_medians, key=forward_medians.get)
        times = sorted(attempts, key=lambda attempt: attempt["fit_s"] + attempt["score_s"])[len(attempts) // 2]
        pipeline_s = times["fit_s"] + times["score_s"]
        row = {
            "backbone": backbone,
            "class_name": split.name,
            "weights": model_config.weights,
            "devices": "/".join(devices[part].type for part in ("backbone", "stats", "mahalanobis")),
            "engine": f"{pipeline_backbone.engine}/{pipeline_backbone.precision}",
            "n_train": n_train,
            "n_test": n_test,
            **{f"forward_{engine}_s": seconds for engine, seconds in forward_medians.items()},
            "fastest_forward": fastest,
            "forward_s": forward_medians[fastest],
            "pipeline_s": pipeline_s,
            "ratio": pipeline_s / forward_medians[fastest],
            "fit_s": times["fit_s"],
            "score_s": times["score_s"],
            "fit_img_s": n_train / times["fit_s"],
            "score_img_s": n_test / times["score_s"],
            "metrics_s": times["metrics_s"],
            "plots_s": times["plots_s"],
        }
        if not args.skip_memory:
            row.update(memory_columns(config, split))
        rows.append(row)
    return rows


def target_report(table: pd.DataFrame) -> list[str]:
    """One line per target of the issue that this table can judge (PASS/FAIL, with the figure)."""

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    lines = []
    for row in table.itertuples(index=False):
        where = f"{row.backbone}/{row.class_name}"
        lines.append(
            f"{verdict(row.ratio <= TARGET_RATIO)} {where}: pipeline / forward {row.ratio:.3f} "
            f"(target <= {TARGET_RATIO})"
        )
        if row.n_test >= 500:
            lines.append(
                f"{verdict(row.metrics_s < TARGET_METRICS_S)} {where}: metrics of {row.n_test} test images "
                f"{row.metrics_s:.1f} s (target < {TARGET_METRICS_S:g} s)"
            )
        if "all_vs_small" in table.columns:
            lines.append(
                f"{verdict(row.all_vs_small <= TARGET_MEMORY_GROWTH)} {where}: fit peak with {row.n_train} "
                f"images / with {row.mem_n_small} = {row.all_vs_small:.2f} (target <= {TARGET_MEMORY_GROWTH})"
            )
            if row.backbone == "wide_resnet50_2":
                lines.append(
                    f"{verdict(row.rss_all_mib < TARGET_WIDE_PEAK_MIB)} {where}: fit peak "
                    f"{row.rss_all_mib / 1024:.2f} GiB (target < {TARGET_WIDE_PEAK_MIB / 1024:g} GiB)"
                )
    return lines


def run(args: argparse.Namespace) -> int:
    """Measure every backbone, print the table and the target verdicts, write the CSV if asked."""
    first = pipeline_config(args, args.backbones[0])
    splits = class_splits(args, first)
    rows = []
    for backbone in args.backbones:
        rows.extend(benchmark_backbone(args, backbone, splits))
    table = pd.DataFrame(rows)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
        f"{first.fit.num_workers} workers, resize {args.resize} / crop {args.cropsize}, median of {args.repeat}"
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print("\n".join(target_report(table)))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.output, index=False, float_format="%.4g")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        with float32_precision(args.allow_tf32):
            return run(args)
    except (DataError, WeightsError, EngineError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
