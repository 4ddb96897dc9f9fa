"""The configuration of a run as frozen dataclasses: run_experiment.py turns its flags into these
once, and everything below the command line receives them (never an argparse Namespace). The
field defaults are the flags' defaults. Torch-free, so that a bad flag fails before torch loads.

- ModelConfig: what the model is (backbone, stages, weights, geometry, channels, seed);
- FitConfig: how a class is split, fitted, thresholded and evaluated, and how images are loaded;
- DeviceConfig: where the backbone, the statistics and the distances run;
- FolderLayout: the folders of `--dataset folder` (good images, defect images, masks);
- RunConfig: the data, the configurations to run, the folders, the distribution over ranks;
- PredictConfig: one predict.py run (model, images, output folder, decision, devices).

`RunConfig.identity(model)` is what makes two runs one experiment (experiment.json); the
model file's identity is built from the same `settings()` (trainer.model_identity).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

from datasets import DEFAULT_MAX_IMAGE_PIXELS, FolderLayout
from utils.padim.backbone_specs import BACKBONES, hooked_layers

COMPARISON_SUFFIX = "comparison"
PROJECTIONS = ("random", "semi_orthogonal")  # how the embedding's channels are chosen (docs/algorithm.md)
NEIGHBOURHOODS = (1, 3)  # side of the square of grid cells each embedding is averaged over
IMAGE_SCORES = ("map_max", "grid_max", "grid_top_k_mean")  # what an image's score is (utils.padim.anomaly_map)
VARIANT_FOLDER_TAGS = {  # the variant settings and their tags in a results folder's name
    "projection": "proj",
    "neighbourhood": "nbhd",
    "image_score": "score",
    "covariance": "cov",
    "epsilon": "eps",
}
DEFAULT_OPSET = 18  # the ONNX opset export.py writes unless told otherwise
COVARIANCES = ("empirical", "ledoit_wolf", "oas")  # per-position covariance estimators (utils.padim.gaussian)


@dataclass(frozen=True)
class Flips:
    """Training-time augmentation: independent random flips, each with `probability`."""

    horizontal: bool
    vertical: bool
    probability: float = 0.5

    def settings(self) -> list:
        return [self.horizontal, self.vertical, self.probability]


@dataclass(frozen=True)
class ModelConfig:
    """What the model is: backbone, hooked stages, weights ('imagenet', 'none' or a path), resize and
    crop (0: no crop), channels kept (None: the backbone's default) and the seed of their choice; how
    they are kept (a random subset or a semi-orthogonal projection), the neighbourhood each embedding is
    averaged over, the image score, the covariance estimator (COVARIANCES) and the epsilon added to its
    diagonal (docs/algorithm.md); `resize_width` (crop 0 only) makes the input resize x resize_width
    (height x width) instead of square."""

    architecture: str = "wide_resnet50_2"
    layers: tuple[str, ...] = ()
    weights: str = "imagenet"
    resize: int = 256
    cropsize: int = 256
    reduced_dim: int | None = None
    seed: int = 1024
    projection: str = PROJECTIONS[0]
    neighbourhood: int = NEIGHBOURHOODS[0]
    image_score: str = IMAGE_SCORES[0]
    resize_width: int | None = None
    covariance: str = COVARIANCES[0]
    epsilon: float = 0.01  # the paper's

    @property
    def resize_label(self) -> str:
        """The resize as --resize takes it: `S` or `HxW`."""
        return f"{self.resize}x{self.resize_width}" if self.resize_width else str(self.resize)

    @property
    def default_layers(self) -> bool:
        return self.layers == BACKBONES[self.architecture].default_layers

    def settings(self) -> dict:
        """The model's part of the experiment's identity."""
        return {
            "model_architecture": self.architecture,
            "layers": list(self.layers),
            "weights": self.weights if self.weights in ("imagenet", "none") else str(Path(self.weights).resolve()),
            "resize": self.resize,
            "cropsize": self.cropsize,
            "reduced_dim": self.reduced_dim,
            "seed": self.seed,
            **({"resize_width": self.resize_width} if self.resize_width else {}),
            **self.variant_settings(),
        }

    def variant_settings(self) -> dict:
        """The embedding, score and Gaussian settings that differ from today's defaults: only those join the
        identity, so that results folders and model files of the defaults keep theirs."""
        defaults = ModelConfig()
        return {key: getattr(self, key) for key in VARIANT_FOLDER_TAGS if getattr(self, key) != getattr(defaults, key)}

    def folder_suffix(self) -> str:
        """`_<tag>-<value>` for every non-default variant setting (_cov-oas, _eps-0.001), so that no two
        configurations share a folder."""
        settings = self.variant_settings().items()
        return "".join(
            f"_{VARIANT_FOLDER_TAGS[key]}-{format(value, 'g' if isinstance(value, float) else '')}"
            for key, value in settings
        )


def cores_here() -> int:
    """This process's share of the cores it may run on (os.sched_getaffinity), divided among torchrun's ranks on
    this machine (LOCAL_WORLD_SIZE)."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, len(os.sched_getaffinity(0)) // max(1, ranks_here))


def default_workers() -> int:
    """DataLoader worker processes when --num_workers is not given: none on up to 3 cores, where they compete
    with the backbone for the cores (benchmarks/README.md), then one per 4 cores, at most 2."""
    return min(2, cores_here() // 4)


@dataclass(frozen=True)
class FitConfig:
    """How a class is split (layout, moved test normals, hold-out), fitted (flips), thresholded
    (quantile of the held-out scores) and evaluated; how images are loaded (the pixel limit of one
    image: 0 none); what is kept. `layout` 'auto' is resolved to a layout before any class is read."""

    layout: str = "auto"
    test_sample_ratio: float = 0.2
    holdout_ratio: float = 0.1
    threshold_quantile: float = 0.99
    flips: Flips | None = None
    batch_size: int = 32
    num_workers: int = field(default_factory=default_workers)
    save_distribution: bool = False
    max_visualizations: int = 20
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def settings(self) -> dict:
        """The settings that change the fitted Gaussian or the threshold (beside the model's seed)."""
        return {
            "holdout_ratio": self.holdout_ratio,
            "threshold_quantile": self.threshold_quantile,
            "augmentations": self.flips.settings() if self.flips else None,
        }


ENGINES = ("auto", "torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class DeviceConfig:
    """Device of the backbone ('auto', 'cpu', 'cuda'), and whether the statistics and the distances
    run on the GPU; TF32 is opt-in; the engine that runs the backbone on a CPU and its precision."""

    device: str = "auto"
    stats_on_gpu: bool = False
    mahalanobis_on_gpu: bool = False
    allow_tf32: bool = False
    engine: str = "auto"
    precision: str = "fp32"


@dataclass(frozen=True)
class RunConfig:
    """One run of run_experiment.py: the data, every configuration to run, and where results go. The data
    is `data_path` (class folders; with a manifest, the folder its relative paths start from), `folder`
    (--dataset folder) or `manifest` (--dataset csv)."""

    data_path: Path | None
    models: tuple[ModelConfig, ...]
    fit: FitConfig = FitConfig()
    devices: DeviceConfig = DeviceConfig()
    base_results_dir: Path = Path("./results")
    results_subdir: str | None = None
    test_class_name: str | None = None
    test_class_path: Path | None = None
    demo: bool = False
    distribute: str = "jobs"
    dist_timeout_s: int = 300
    write_report: bool = True
    folder: FolderLayout | None = None
    manifest: Path | None = None
    class_name: str | None = None  # with a manifest: its class to run (without a class column: the name)

    @property
    def moves_train_share(self) -> bool:
        """Whether a seeded share of the training normals becomes test normals (datasets.MOVES_TRAIN_SHARE)."""
        return self.fit.layout == "bowtie" or (self.fit.layout == "folder" and self.folder.normal_test_dir is None)

    def identity(self, model: ModelConfig) -> dict:
        """The settings that make two runs one experiment: only such runs may share a results folder."""
        fit = self.fit
        return {
            "dataset": fit.layout,
            "data_path": str(self.data_path.resolve()) if self.data_path else None,
            **({"folder": self.folder.settings()} if self.folder else {}),
            **({"manifest": str(self.manifest.resolve()), "class_name": self.class_name} if self.manifest else {}),
            "test_class_name": self.test_class_name,
            "test_class_path": str(self.test_class_path.resolve()) if self.test_class_path else None,
            "test_sample_ratio": fit.test_sample_ratio if self.moves_train_share else None,
            **model.settings(),
            **fit.settings(),
            **({"precision": self.devices.precision} if self.devices.precision != "fp32" else {}),
        }

    def results_folder(self, model: ModelConfig) -> Path:
        """A configuration's folder: <base_results_dir>/<results_subdir>, by default named after the layout,
        backbone, resize and crop (and the stages and variant settings when they are not the defaults); with several
        configurations, that default name (plus _dim-<N> for a given reduced_dim) inside the comparison folder."""
        default = f"{self.fit.layout}_{model.architecture}_resize-{model.resize_label}_crop-{model.cropsize}"
        if not model.default_layers:
            default += f"_layers-{'-'.join(model.layers)}"
        default += model.folder_suffix()
        parent = self.comparison_folder()
        if parent is None:
            return self.base_results_dir / (self.results_subdir or default)
        return parent / (default + (f"_dim-{model.reduced_dim}" if model.reduced_dim else ""))

    def what_was_kept(self) -> str:
        """What a run that stopped early leaves: the master_results.csv that hold finished classes, or that none
        finished."""
        tables = [self.results_folder(model) / "master_results.csv" for model in self.models]
        written = [str(table) for table in tables if table.is_file()]
        if not written:
            return "no class finished; rerun to start again"
        return f"finished classes are in {', '.join(written)}; rerun to complete"

    def comparison_folder(self) -> Path | None:
        """Where a run of several configurations puts their folders and the comparison; None for one."""
        if len(self.models) == 1:
            return None
        return self.base_results_dir / (self.results_subdir or f"{self.fit.layout}_{COMPARISON_SUFFIX}")


@dataclass(frozen=True)
class PredictConfig:
    """One run of predict.py: the model (a class results folder, a model file or an exported graph) and its
    backbone weights file, the images, the output folder; how an image is decided (threshold None: the
    model's) and drawn (regions smaller than `min_region_area` pixels are specks; masks or not); how images
    are loaded; the devices (`devices.device`, `allow_tf32`, `engine`, `precision`)."""

    model: Path
    images: tuple[Path, ...]
    output: Path = Path("./predictions")
    weights: Path | None = None
    threshold: float | None = None
    min_region_area: int = 25
    save_masks: bool = False
    batch_size: int = 32
    num_workers: int = 0
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    devices: DeviceConfig = DeviceConfig()

    def settings(self) -> dict:
        """Beside the model, what changes an image's row or files: a rerun into the same output folder goes on
        from an earlier run's rows only when these (and the model) are the same."""
        devices = self.devices
        return {
            "threshold": self.threshold,
            "min_region_area": self.min_region_area,
            "save_masks": self.save_masks,
            "max_image_pixels": self.max_image_pixels,
            "device": devices.device,
            "allow_tf32": devices.allow_tf32,
            "engine": devices.engine,
            "precision": devices.precision,
        }


def model_configs(
    architectures: list[str],
    layer_choices: list[list[str] | None],
    resizes: list[int | tuple[int, int]],
    cropsizes: list[int],
    reduced_dims: list[int | None],
    weights: str = ModelConfig.weights,
    seed: int = ModelConfig.seed,
    projections: tuple[str, ...] = (ModelConfig.projection,),
    neighbourhoods: tuple[int, ...] = (ModelConfig.neighbourhood,),
    image_scores: tuple[str, ...] = (ModelConfig.image_score,),
    covariances: tuple[str, ...] = (ModelConfig.covariance,),
    epsilons: tuple[float, ...] = (ModelConfig.epsilon,),
) -> tuple[ModelConfig, ...]:
    """The cartesian product of the multi-valued settings, each a ModelConfig with the stages in the
    backbone's order; a resize is the short side or (height, width), as utils.cli.resize_value reads it.
    ValueError names a combination that cannot run (a crop larger than its resize, a height x width resize
    with a crop, a stage its backbone lacks); a repeated combination is not a second configuration."""
    chosen: list[ModelConfig] = []
    combinations = itertools.product(
        architectures,
        layer_choices,
        resizes,
        cropsizes,
        reduced_dims,
        projections,
        neighbourhoods,
        image_scores,
        covariances,
        epsilons,
    )
    for (
        architecture,
        layers,
        size,
        cropsize,
        reduced_dim,
        projection,
        neighbourhood,
        image_score,
        covariance,
        epsilon,
    ) in combinations:
        resize, width = size if isinstance(size, tuple) else (size, None)
        if width is not None and cropsize:
            raise ValueError(
                f"--resize {resize}x{width} needs --cropsize 0 (a centre crop is square), got --cropsize {cropsize}"
            )
        if cropsize > resize:
            raise ValueError(f"--cropsize {cropsize} is larger than --resize {resize}")
        try:
            stages = tuple(hooked_layers(BACKBONES[architecture], layers))
        except ValueError as err:
            raise ValueError(f"--layers: {err}") from err
        config = ModelConfig(
            architecture,
            stages,
            weights,
            resize,
            cropsize,
            reduced_dim,
            seed,
            projection,
            neighbourhood,
            image_score,
            width,
            covariance,
            epsilon,
        )
        if config not in chosen:
            chosen.append(config)
    return tuple(chosen)
