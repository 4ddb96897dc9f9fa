"""One run of run_experiment.py once its flags are parsed: find the classes, build the backbones,
hold the results folders, call trainer per (configuration, class) job, write master_results.csv,
the logs and, for several configurations, the comparison.

Under torchrun the same command runs as several ranks (utils.runtime.distributed): the jobs are shared
out (`--distribute jobs`) or every class's images are (`--distribute images`), and rank 0
writes the tables as the rows arrive."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from data.demo_data import make_demo_dataset
from datasets import BOWTIE_MARKER
from datasets.manifest import manifest_files
from datasets.split import (
    LAYOUT_FLAGS,
    ClassFiles,
    DataError,
    class_folder_files,
    find_classes,
    folder_layout_files,
    is_class_dir,
)
from trainer import geometry_of, resolve_devices, run_class
from utils.cli import ConsoleHandler, install_log_handler, remove_log_handler
from utils.config import ModelConfig, RunConfig
from utils.evaluation.comparison import RANKING_RULE, best_per_class
from utils.evaluation.results import RESULT_COLUMNS
from utils.padim.backbones import FeatureExtractor, WeightsError, build_extractor, float32_precision
from utils.padim.engines import EngineError, EngineExtractor, engine_extractor
from utils.padim.model_file import MODEL_FILENAME, ModelFileError
from utils.reporting.plotting import save_comparison_figure
from utils.reporting.report import write_comparison_report, write_report
from utils.reporting.text import with_interval
from utils.runtime.distributed import PeerLost, World
from utils.runtime.output_files import OutputWriteError, atomic_write, folder_lock, prove_writable, remove_output

log = logging.getLogger("padim")

USER_ERRORS = (DataError, WeightsError, EngineError, ModelFileError, OutputWriteError)
EXPERIMENT_FILENAME = "experiment.json"
LOG_FILE_HANDLER = "padim-log-file"
COMPARISON_CSV = "comparison.csv"
COMPARISON_PNG = "comparison.png"


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


def choose_layout(config: RunConfig) -> tuple[str, str]:
    """The layout of the run's data and why: --dataset when it names one; for `auto`, folder or csv when
    their flags are given, else bowtie for class folders that data/process_data.py marked (BOWTIE_MARKER),
    mvtec for class folders without the mark; DataError naming the layouts and their flags otherwise."""
    layout = config.fit.layout
    if layout != "auto":
        return layout, "--dataset"
    if config.manifest is not None:
        return "csv", "--manifest given"
    if config.folder is not None:
        return "folder", "--normal_dir given"
    root = config.data_path
    if root is None or not root.is_dir():
        raise DataError(f"--data_path {root} is not a folder")
    classes = find_classes(root)
    if not classes:
        raise DataError(f"no class folder (with train/ and test/) in {root}, so no layout found: use {LAYOUT_FLAGS}")
    marked = [class_dir.name for class_dir in classes if (class_dir / BOWTIE_MARKER).is_file()]
    if len(marked) == len(classes):
        return "bowtie", f"found: {BOWTIE_MARKER} of data/process_data.py in the class folders"
    if marked:
        raise DataError(
            f"{len(marked)} of {len(classes)} class folders in {root} were prepared by data/process_data.py "
            f"({', '.join(marked)}) and the others not: choose --dataset bowtie or --dataset mvtec"
        )
    return "mvtec", (
        f"found: class folders with train/ and test/, no {BOWTIE_MARKER}; for BowTie folders prepared before "
        "data/process_data.py left that mark, give --dataset bowtie"
    )


def with_layout(config: RunConfig) -> tuple[RunConfig, str]:
    """The configuration with `--dataset auto` resolved to the layout of the data, and why it was chosen."""
    layout, reason = choose_layout(config)
    return dataclasses.replace(config, fit=dataclasses.replace(config.fit, layout=layout)), reason


def class_jobs(config: RunConfig) -> list[tuple[str, ClassFiles, ClassFiles | None]]:
    """(result folder name, training class's images, test class's images or None) for every class to run,
    in the layout of the data; a manifest with a bad row stops the run here, before any work."""
    config, _ = with_layout(config)
    layout = config.fit.layout
    if layout == "folder":
        files = folder_layout_files(config.folder)
        return [(files.name, files, None)]
    if layout == "csv":
        listed = manifest_files(config.manifest, config.data_path, config.class_name)
        return [(files.name, files, None) for files in listed]
    if not config.data_path.is_dir():
        raise DataError(f"--data_path {config.data_path} is not a folder")
    classes = find_classes(config.data_path)
    if config.test_class_name:
        if len(classes) != 1:
            names = ", ".join(c.name for c in classes) or "none"
            raise DataError(f"--test_class_name needs --data_path to be one class folder; found classes: {names}")
        search_root = config.test_class_path or config.data_path.parent
        test_dir = (
            search_root
            if is_class_dir(search_root) and search_root.name == config.test_class_name
            else search_root / config.test_class_name
        )
        if not is_class_dir(test_dir):
            raise DataError(f"test class {test_dir} has no train/ and test/ folders")
        name = f"train_{classes[0].name}_test_{test_dir.name}"
        return [(name, class_folder_files(layout, classes[0]), class_folder_files(layout, test_dir))]
    if not classes:
        raise DataError(f"no class folder (with train/ and test/) in {config.data_path}")
    return [(c.name, class_folder_files(layout, c), None) for c in classes]


def claim_results_folder(out_dir: Path, settings: dict, notes: dict | None = None) -> None:
    """Record the experiment in experiment.json; a folder that holds another experiment's results is refused,
    so that master_results.csv, scores.csv and the model files of a folder always come from one experiment.
    `notes` (the engine that ran) are recorded beside the settings but do not make another experiment."""
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
    record = {**settings, **(notes or {})}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8"))


def clear_class_folder(folder: Path) -> None:
    """Remove an earlier run's files from a class folder, but for its model file (trainer decides whether it
    still fits): the folder then only ever holds files of this run."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name != MODEL_FILENAME:
            remove_output(entry)


def log_file_handler(folder: Path, world: World) -> None:
    """This rank's log in `folder`: experiment_log.log, or experiment_log.rank<k>.log when there are several ranks."""
    name = f"experiment_log.rank{world.rank}.log" if world.distributed else "experiment_log.log"
    folder.mkdir(parents=True, exist_ok=True)
    install_log_handler(
        LOG_FILE_HANDLER,
        logging.FileHandler(folder / name, encoding="utf-8"),
        logging.INFO,
        "%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def console_handler(world: World) -> None:
    """Warnings and errors to the console, prefixed with the rank when there are several."""
    prefix = f"[rank {world.rank}] " if world.distributed else ""
    install_log_handler("padim-console", ConsoleHandler(), logging.WARNING, f"{prefix}%(levelname)s: %(message)s")


def interval_column(table: pd.DataFrame, rate: str) -> pd.Series:
    """'0.750 [0.47, 0.91]': a rate at the operating threshold with its 95% Wilson interval, for the summary."""

    def text(row) -> str:
        if pd.isna(row[rate]):
            return "-"
        return with_interval(row[rate], row[f"{rate}_ci_low"], row[f"{rate}_ci_high"])

    return table.apply(text, axis=1) if len(table) else pd.Series(dtype=str)


def write_results(rows: list[dict], path: Path) -> pd.DataFrame:
    table = pd.DataFrame(rows).reindex(columns=RESULT_COLUMNS)
    numeric = RESULT_COLUMNS[1:-1]
    table[numeric] = table[numeric].apply(pd.to_numeric)
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g"))
    return table


@dataclass
class Configuration:
    """One configuration of the run while it runs: its settings, folder, backbone and result rows."""

    model: ModelConfig
    folder: Path
    extractor: FeatureExtractor | EngineExtractor | None = None
    weights_id: str = ""
    rows: dict[str, dict] = field(default_factory=dict)
    logged: bool = False

    @property
    def reduced_dim(self) -> int:
        return self.extractor.reduced_dim(self.model.reduced_dim)


@dataclass(frozen=True)
class Job:
    """One class of one configuration: the unit `--distribute jobs` shares out, sized by its images."""

    configuration: int
    name: str
    files: ClassFiles
    test_files: ClassFiles | None
    images: int


class ResultBook:
    """Rank 0's record of every class's row: each configuration's master_results.csv is rewritten,
    in class order, whenever a row arrives (from this rank or, on the heartbeat's thread, another)."""

    def __init__(self, configurations: list[Configuration], class_names: list[str]):
        self.configurations, self.class_names = configurations, class_names
        self.lock = threading.Lock()

    def rows(self, configuration: Configuration) -> list[dict]:
        return [configuration.rows[name] for name in self.class_names if name in configuration.rows]

    def record(self, item: tuple[int, str, dict]) -> None:
        index, name, row = item
        configuration = self.configurations[index]
        with self.lock:
            configuration.rows[name] = {"class_name": name, **row}
            write_results(self.rows(configuration), configuration.folder / "master_results.csv")


def share_jobs(jobs: list[Job], world: World) -> list[Job]:
    """This rank's jobs: largest first, each to the rank with the fewest images so far, so the ranks finish
    together; every rank computes the same assignment."""
    loads, mine = [0] * world.size, []
    for job in sorted(jobs, key=lambda job: -job.images):
        rank = loads.index(min(loads))
        loads[rank] += job.images
        if rank == world.rank:
            mine.append(job)
    return mine


def on_rank(devices: dict[str, torch.device], world: World) -> dict[str, torch.device]:
    """The devices with CUDA meaning this rank's GPU (cuda:LOCAL_RANK)."""
    return {key: torch.device("cuda", world.local_rank) if d.type == "cuda" else d for key, d in devices.items()}


def prepare(
    config: RunConfig,
    configurations: list[Configuration],
    world: World,
    devices: dict[str, torch.device],
    held: contextlib.ExitStack,
) -> list[Job]:
    """Check what can fail early (output writable, classes, weights, dims) before creating anything, then
    (rank 0) hold and claim the results folders for the rest of the run, so no other run writes there."""
    classes = class_jobs(config)
    parent = config.comparison_folder()
    folders = ([parent] if parent else []) + [configuration.folder for configuration in configurations]
    if world.is_root:
        for folder in folders:
            prove_writable(folder, "results folder", DataError)
    extractors, engines = {}, {}
    for configuration in configurations:
        model = configuration.model
        key = (model.architecture, model.layers)
        if key not in extractors:
            extractors[key] = build_extractor(
                model.architecture, model.weights, devices["backbone"], model.seed, list(model.layers)
            )
        extractor, configuration.weights_id = extractors[key]
        if model.reduced_dim is not None and model.reduced_dim > extractor.dims:
            raise DataError(
                f"--reduced_dim {model.reduced_dim} exceeds the {extractor.dims} channels of "
                f"{model.architecture} at stages {' '.join(model.layers)}"
            )
        input_size = geometry_of(model).input_size
        if (key, input_size) not in engines:
            engines[key, input_size] = engine_extractor(
                extractor,
                config.devices.engine,
                config.devices.precision,
                devices["backbone"],
                input_size,
                configuration.weights_id,
                model.seed,
                config.fit.num_workers,
            )
        configuration.extractor = engines[key, input_size]
    if world.is_root:
        for folder in folders:
            held.enter_context(folder_lock(folder, "results folder", DataError))
        for configuration in configurations:
            engine = {"engine": configuration.extractor.engine, "engine_requested": config.devices.engine}
            claim_results_folder(configuration.folder, config.identity(configuration.model), engine)
    return [
        Job(index, name, files, test_files, files.images)
        for index in range(len(configurations))
        for name, files, test_files in classes
    ]


def run(config: RunConfig) -> int:
    """Every (configuration, class) job, shared out over the ranks when torchrun started several; rank 0
    writes each configuration's master_results.csv as rows arrive, and the comparison at the end."""
    if config.demo:
        ensure_demo_data(config.data_path)
    config, reason = with_layout(config)
    configurations = [Configuration(model, config.results_folder(model)) for model in config.models]
    book = ResultBook(configurations, [])
    devices = resolve_devices(config.devices)
    cuda = any(device.type == "cuda" for device in devices.values())
    world = World.join(book.record, config.dist_timeout_s, cuda)
    devices = on_rank(devices, world)
    console_handler(world)
    remove_log_handler(LOG_FILE_HANDLER)  # an earlier run's in this process (tests): this one's gets no line of it
    try:
        with contextlib.ExitStack() as held:
            held.enter_context(float32_precision(config.devices.allow_tf32))
            error = None
            try:
                jobs = prepare(config, configurations, world, devices, held)
            except USER_ERRORS as err:
                error = err
            world.agree(error)
            book.class_names = list(dict.fromkeys(job.name for job in jobs))
            if config.distribute == "images":  # every rank takes part in every class
                mine, class_ranks = jobs, world
            else:  # each rank runs its own classes whole
                mine, class_ranks = share_jobs(jobs, world), World()
            for job in mine:
                row = run_job(config, job, configurations[job.configuration], class_ranks, world, devices)
                if row is not None:
                    world.post((job.configuration, job.name, row))
            world.close()
            return report(config, configurations, book, reason) if world.is_root else 0
    except (PeerLost, KeyboardInterrupt) as stopped:
        if isinstance(stopped, KeyboardInterrupt) and not world.lost_peer:
            raise
        # the heartbeat stopped this rank (not an interrupt): why, and what is kept now that nothing runs
        log.error("%s; %s", world.lost_peer_reason, config.what_was_kept())
        return 1


def run_job(
    config: RunConfig,
    job: Job,
    configuration: Configuration,
    class_ranks: World,
    world: World,
    devices: dict[str, torch.device],
) -> dict | None:
    """Fit, score and evaluate one class of one configuration; its row, or None on a rank that only helped
    (--distribute images). A class that fails is a `failed:` row and the run goes on."""
    model, out_dir = configuration.model, configuration.folder / job.name
    log_file_handler(configuration.folder, world)
    if not configuration.logged:
        configuration.logged = True
        log.info("configuration: %s, %s, %s", model, config.fit, config.devices)
        log.info(
            "backbone %s, weights %s, engine %s (%s), devices %s, rank %d of %d",
            model.architecture,
            configuration.weights_id,
            configuration.extractor.engine,
            configuration.extractor.precision,
            {k: str(v) for k, v in devices.items()},
            world.rank,
            world.size,
        )
    test = f", testing on {job.test_files.test_where}" if job.test_files else ""
    log.info("class %s: training on %s%s", job.name, job.files.train_where, test)
    if class_ranks.is_root:
        clear_class_folder(out_dir)
    try:
        row = run_class(
            job.files,
            job.test_files,
            model,
            config.fit,
            configuration.extractor,
            configuration.weights_id,
            out_dir,
            devices,
            class_ranks,
        )
    except (DataError, ModelFileError, ValueError) as err:
        log.error("class %s failed: %s", job.name, err)
        row = {"status": f"failed: {err}"}
    if not class_ranks.is_root:
        return None
    log.info("class %s: %s", job.name, row)
    return row


SUMMARY_COLUMNS = ["class_name", "roc_auc", "pixel_roc_auc", "pixel_aupro", "f1_score", "n_holdout", "n_skipped"]


def report(config: RunConfig, configurations: list[Configuration], book: ResultBook, layout_reason: str) -> int:
    """Rank 0, after the last job: the final tables, the summary and the layout (and why it was chosen) on
    stdout, and with several configurations comparison.csv / comparison.png and the best configuration per
    class with whether it is clearly better (utils.evaluation.comparison); 0 when any class succeeded."""
    tables = [write_results(book.rows(c), c.folder / "master_results.csv") for c in configurations]
    parent = config.comparison_folder()
    best = None
    if parent is None:
        [table], [configuration] = tables, configurations
        summary = table[[*SUMMARY_COLUMNS, "status"]].copy()
        for count in ("n_holdout", "n_skipped"):  # whole numbers, also beside a failed class's empty cells
            summary[count] = summary[count].map(lambda value: "-" if pd.isna(value) else str(int(value)))
        summary.insert(5, "recall (95% CI)", interval_column(table, "recall"))
        summary.insert(6, "FPR (95% CI)", interval_column(table, "false_positive_rate"))
        print(summary.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.3f}"))
        print(f"results: {configuration.folder / 'master_results.csv'}")
        log.info("summary:\n%s", summary.to_string(index=False, na_rep="-"))
    else:
        comparison = comparison_table(configurations, tables)
        atomic_write(parent / COMPARISON_CSV, lambda tmp: comparison.to_csv(tmp, index=False, float_format="%.6g"))
        save_comparison_figure(comparison, parent / COMPARISON_PNG)
        best = best_per_class(comparison)
        print(f"best configuration per class. {RANKING_RULE}")
        print(best.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.3f}"))
        print(f"comparison: {parent / COMPARISON_CSV}")
        log.info("best configuration per class (%s):\n%s", RANKING_RULE, best.to_string(index=False, na_rep="-"))
    print(f"dataset: {config.fit.layout} ({layout_reason})")
    log.info("dataset: %s (%s)", config.fit.layout, layout_reason)
    if config.write_report:
        for configuration in configurations:
            print(f"report: {write_report(configuration.folder, configuration.folder.name)}")
        if best is not None:
            page = write_comparison_report(parent, parent / COMPARISON_CSV, parent / COMPARISON_PNG, best)
            print(f"comparison report: {page}")
    return 0 if any((table["status"] == "ok").any() for table in tables) else 1


def comparison_table(configurations: list[Configuration], tables: list[pd.DataFrame]) -> pd.DataFrame:
    """One row per configuration x class: the configuration's settings, then the master_results columns."""
    parts = []
    for configuration, table in zip(configurations, tables):
        model = configuration.model
        settings = {
            "configuration": configuration.folder.name,
            "model_architecture": model.architecture,
            "layers": ",".join(model.layers),
            "resize": model.resize_label,
            "cropsize": model.cropsize,
            "reduced_dim": configuration.reduced_dim,
            "projection": model.projection,
            "neighbourhood": model.neighbourhood,
            "image_score": model.image_score,
            "covariance": model.covariance,
            "epsilon": model.epsilon,
        }
        parts.append(table.assign(**settings)[[*settings, *RESULT_COLUMNS]])
    return pd.concat(parts, ignore_index=True)
