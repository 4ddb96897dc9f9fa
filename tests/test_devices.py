"""The GPU path without a GPU: fit, scoring and the model file with every part on a fake "cuda"
device (torch's FakeTensorMode: shapes and devices without data, so a tensor on the wrong
device is an error), full float32 during the suite's runs, and what is pinned."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode

import predict
import run_experiment
from datasets.images import Batch, Geometry, ImageDataset, Sample, image_loader
from tests.helpers import TRAIN_FLAGS
from utils.padim import gaussian
from utils.padim import model as padim
from utils.padim.backbones import FeatureExtractor, build_extractor, float32_precision
from utils.padim.embedding import split_channel_index
from utils.padim.model import GaussianStats, Padim
from utils.padim.model_file import load_model, stats_content, stats_from_content
from utils.padim.triangular import TriangularBlocks

CPU, CUDA = torch.device("cpu"), torch.device("cuda:0")
ARRANGEMENTS = list(itertools.product((CPU, CUDA), repeat=3))  # backbone, statistics, Mahalanobis


class ExtractorOn:
    """The real extractor on the CPU, seen by Padim as if on `device`: images must arrive there and the
    maps leave from there (torchvision's modules cannot be moved onto fake tensors)."""

    def __init__(self, extractor, device: torch.device):
        self.extractor, self.device, self.channels = extractor, device, extractor.channels

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        assert images.device == self.device, f"images on {images.device}, backbone on {self.device}"
        return [level.to(self.device) for level in self.extractor(images.cpu())]


class SameThread:
    """ThreadPoolExecutor's map in the calling thread: the fake mode holds for its own thread only."""

    def __init__(self, workers: int):
        pass

    def __enter__(self) -> SameThread:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def map(self, function, items):
        return map(function, items)


class CrossingCopies(TorchFunctionMode):
    """Counts the elements of the 4-D tensors (images, maps, embeddings) that Tensor.to moves from one device
    type to another: (from, to) -> elements."""

    def __init__(self):
        super().__init__()
        self.elements: dict[tuple[str, str], int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        source = args[0] if args else None
        if func is torch.Tensor.to and source.dim() == 4 and result.device.type != source.device.type:
            key = (source.device.type, result.device.type)
            self.elements[key] = self.elements.get(key, 0) + source.numel()
        return result


@dataclass(frozen=True)
class SavedModel:
    """The session's trained model (conftest.trained) as predict.py reads it, and 6 images of its input size."""

    extractor: FeatureExtractor
    index: torch.Tensor
    stats: GaussianStats
    images: torch.Tensor

    def chosen_elements(self) -> int:
        """Values in the images' chosen maps: what may cross from the backbone's device to the Gaussian's."""
        with torch.no_grad():
            maps = self.extractor(self.images)
        split = split_channel_index(self.index, self.extractor.channels)
        return sum(len(local) * math.prod(level.shape[2:]) * len(self.images) for level, local in zip(maps, split))


@pytest.fixture(scope="module")
def saved(trained) -> SavedModel:
    content = load_model(trained.model_dir)
    seed = content["training_config"]["seed"]
    extractor, _ = build_extractor(content["backbone"], "none", CPU, seed, content["layers"])
    size = Geometry(content["resize"], content["cropsize"]).input_size
    images = torch.randn(6, 3, *size, generator=torch.Generator().manual_seed(0))
    return SavedModel(extractor, torch.as_tensor(content["channel_index"]), stats_from_content(content), images)


@pytest.fixture
def fake_cuda(monkeypatch) -> FakeTensorMode:
    """The points that read tensor values, kept out of the fake mode: the channel split runs on the real
    index, NumPy's Cholesky gives way to torch's, and the positive-definite check to nothing; the CPU
    factor's worker threads run in the calling thread (the fake mode holds in its own thread only)."""
    split = padim.split_channel_index

    def real_split(index: torch.Tensor, channels: list[int]) -> list[torch.Tensor]:
        with unset_fake_temporarily():
            return split(index, channels)

    monkeypatch.setattr(padim, "split_channel_index", real_split)
    monkeypatch.setattr(gaussian, "cholesky_ex", torch.linalg.cholesky_ex)
    monkeypatch.setattr(gaussian, "require_positive_definite", lambda info: None)
    monkeypatch.setattr(gaussian, "ThreadPoolExecutor", SameThread)
    return FakeTensorMode(allow_non_fake_inputs=True)


@pytest.mark.parametrize("devices", ARRANGEMENTS, ids=lambda d: "-".join(device.type for device in d))
def test_every_device_arrangement_fits_saves_loads_and_scores_on_the_cpu(devices, saved, fake_cuda):
    """The backbone, the statistics and the distances each on the CPU or "cuda" (predict.py's arrangement
    is cuda-cpu-cuda): fit, the model file's entries, the saved model loaded, scoring. No device mismatch;
    the file's tensors, the maps and the scores on the CPU; the Gaussian where the distances are computed;
    only the chosen maps cross from the backbone's device to the Gaussian's."""
    backbone, statistics, distances = devices
    size = tuple(saved.images.shape[-2:])
    with fake_cuda:
        model = Padim(ExtractorOn(saved.extractor, backbone), saved.index, size, *devices, images_together=4)
        with CrossingCopies() as fit_copies:
            stats = model.fit([saved.images[:3], saved.images[3:]], keep_sums=True)
        content = stats_content(stats)
        model.use(saved.stats)
        with CrossingCopies() as score_copies:
            maps, scores = model.anomaly_maps(saved.images)
    assert content["mean"].device == CPU and all(block.device == CPU for block in content["precision_factor"])
    sums = [content["sums_shift"], content["sums_first"], *content["sums_second"]]
    assert all(tensor.device == CPU for tensor in sums)
    assert model.stats.mean.device == distances
    assert all(block.device == distances for block in stats.factor.blocks + model.stats.factor.blocks)
    assert (maps.device, scores.device, tuple(maps.shape), tuple(scores.shape)) == (CPU, CPU, (6, *size), (6,))
    if backbone != statistics:
        assert fit_copies.elements[(backbone.type, statistics.type)] == saved.chosen_elements()
    if backbone != distances:
        assert score_copies.elements[(backbone.type, distances.type)] == saved.chosen_elements()


def test_runs_compute_in_full_float32_and_restore_the_callers_setting(tmp_path, texture_root, monkeypatch):
    """TF32 is off while run_experiment.py and predict.py fit and score (on with --allow_tf32), and the
    caller's setting is back afterwards."""
    seen = []
    fit, stream = Padim.fit, Padim.stream_anomaly_maps

    def settings() -> tuple[str, str]:
        return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision

    def spying_fit(self, *args, **kwargs):
        seen.append(("fit", *settings()))
        return fit(self, *args, **kwargs)

    def spying_stream(self, *args, **kwargs):
        seen.append(("score", *settings()))
        yield from stream(self, *args, **kwargs)

    monkeypatch.setattr(Padim, "fit", spying_fit)
    monkeypatch.setattr(Padim, "stream_anomaly_maps", spying_stream)
    caller = settings()
    with float32_precision(allow_tf32=True):  # a library user who chose TF32
        base = [*TRAIN_FLAGS, "--data_path", str(texture_root / "brick")]
        assert run_experiment.main([*base, "--base_results_dir", str(tmp_path / "a")]) == 0
        assert {setting[1:] for setting in seen} == {("ieee", "ieee")} and {s[0] for s in seen} == {"fit", "score"}
        seen.clear()
        model = tmp_path / "a" / "r" / "brick"
        image = next((texture_root / "brick" / "test" / "good").iterdir())
        argv = ["--model", str(model), "--input", str(image), "--output", str(tmp_path / "p"), "--device", "cpu"]
        assert predict.main(argv) == 0
        assert {setting[1:] for setting in seen} == {("ieee", "ieee")}
        seen.clear()
        assert run_experiment.main([*base, "--base_results_dir", str(tmp_path / "b"), "--allow_tf32"]) == 0
        assert {setting[1:] for setting in seen} == {("tf32", "tf32")}
        assert settings() == ("tf32", "tf32")
    assert settings() == caller


def test_batches_are_pinned_only_for_a_backbone_on_cuda(texture_root):
    """Pinning asks CUDA for its context: a CPU run must not, even on a machine with a GPU."""
    config = run_experiment.parse_args([*TRAIN_FLAGS, "--data_path", str(texture_root / "brick")])
    samples = [Sample(path, 0, "") for path in (texture_root / "brick" / "train" / "good").iterdir()]
    model, fit = config.models[0], config.fit
    dataset = ImageDataset(samples, Geometry(model.resize, model.cropsize))
    assert not image_loader(dataset, fit.batch_size, fit.num_workers, CPU, model.seed).pin_memory
    assert image_loader(dataset, fit.batch_size, fit.num_workers, CUDA, model.seed).pin_memory


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA: no CUDA device here")
def test_batch_pin_memory_pins_every_tensor():
    batch = Batch(
        torch.zeros(2, 3, 8, 8),
        torch.zeros(2, 8, 8, dtype=torch.bool),
        [0, 1],
        [(2, "unreadable")],
        [(8, 8)] * 2,
        [None, None],
    )
    pinned = batch.pin_memory()
    assert pinned.images.is_pinned() and pinned.masks.is_pinned()
    assert (pinned.indices, pinned.failures) == (batch.indices, batch.failures)


def test_on_a_gpu_the_factor_runs_in_a_few_large_chunks_and_checks_once(fake_cuda, monkeypatch):
    """wide_resnet50_2's shape (3136 positions, 550 dims) on "cuda": 8 chunks of up to 443 matrices (on the
    CPU it would be 523 chunks of 6), and one positive-definite check, after the last chunk."""
    chunks, checks = [], []
    monkeypatch.setattr(gaussian, "cholesky_ex", lambda m: chunks.append(len(m)) or torch.linalg.cholesky_ex(m))
    monkeypatch.setattr(gaussian, "require_positive_definite", lambda info: checks.append(tuple(info.shape)))
    with fake_cuda:
        covariance = TriangularBlocks.zeros(3136, 550, lower=False, dtype=torch.float32, device=CUDA)
        factor = gaussian.precision_factor_(covariance)
    assert chunks == [443] * 7 + [3136 - 7 * 443] and checks == [(3136,)]
    assert all(block.device == CUDA for block in factor.blocks)
