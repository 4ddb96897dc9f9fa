"""Issue 34's embedding and score variants against independent references: the semi-orthogonal projection
(numpy's QR, projecting the whole embedding), the 3 x 3 neighbourhood mean (a hand loop over the grid, and
F.avg_pool2d on the whole grid), the image scores (numpy); and a run of several values of each flag."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import run_experiment
from tests.helpers import CPU_RUN_FLAGS
from utils.config import FitConfig, ModelConfig, RunConfig, model_configs
from utils.padim.anomaly_map import TOP_K_CELLS, image_scores
from utils.padim.backbones import build_extractor
from utils.padim.embedding import (
    channel_index,
    chosen_channels,
    embedding_bands,
    neighbourhood_mean,
    projected_channels,
    semi_orthogonal_matrix,
    split_channel_index,
)
from utils.padim.gaussian import mahalanobis
from utils.padim.grid import resample_centred
from utils.padim.model import Padim

CHANNELS = [4, 3, 5]
CPU = torch.device("cpu")


def three_maps(batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """Three hooked maps of strides 1, 2, 4 over an 8 x 8 grid (4, 3 and 5 channels), channels last in memory."""
    generator = torch.Generator().manual_seed(seed)
    maps = [torch.randn(batch, c, s, s, generator=generator) for c, s in zip(CHANNELS, (8, 4, 2))]
    return [m.contiguous(memory_format=torch.channels_last) for m in maps]


def full_embedding(maps: list[torch.Tensor]) -> torch.Tensor:
    """Every channel of every map on the first grid, side by side: (B, 8, 8, 12)."""
    last = [m.permute(0, 2, 3, 1) for m in maps]
    return torch.cat([last[0], resample_centred(last[1], (8, 8), 2), resample_centred(last[2], (8, 8), 4)], dim=-1)


def grid_mean_by_hand(embedding: np.ndarray) -> np.ndarray:
    """(B, H, W, D): each cell's mean over the cells of its 3 x 3 square that lie inside the grid."""
    height, width = embedding.shape[1:3]
    out = np.empty_like(embedding)
    for i in range(height):
        for j in range(width):
            out[:, i, j] = embedding[:, max(0, i - 1) : i + 2, max(0, j - 1) : j + 2].mean(axis=(1, 2))
    return out


def joined(bands) -> torch.Tensor:
    return torch.cat([band for _, band in bands], dim=1)


def test_semi_orthogonal_matrix_is_numpys_qr_of_the_seeded_gaussian():
    """W is the Q of the seeded Gaussian's QR with R's diagonal positive (numpy's QR, float64): W^T W = I,
    the same for the same seed, another for another seed; k = D is allowed, k > D refused."""
    w = semi_orthogonal_matrix(12, 5, seed=3)
    assert w.shape == (12, 5) and w.dtype == torch.float32
    gaussian = torch.randn(12, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64).numpy()
    q, r = np.linalg.qr(gaussian)
    np.testing.assert_allclose(w.numpy(), q * np.sign(np.diag(r)), atol=1e-6)
    np.testing.assert_allclose(w.double().T @ w.double(), np.eye(5), atol=1e-6)
    assert torch.equal(w, semi_orthogonal_matrix(12, 5, seed=3))
    assert not torch.allclose(w, semi_orthogonal_matrix(12, 5, seed=4))
    square = semi_orthogonal_matrix(6, 6, seed=1).double()
    np.testing.assert_allclose(square @ square.T, np.eye(6), atol=1e-6)
    with pytest.raises(ValueError, match="reduced_dim must be in 1..12"):
        semi_orthogonal_matrix(12, 13, seed=3)


@pytest.mark.parametrize("rows", [None, 1, 3])
def test_projecting_each_level_before_resampling_equals_projecting_the_embedding(rows):
    """Each level projected by its rows of W, resampled and summed (in bands of any height, for a group of
    two batches) equals the whole 12-channel embedding times W."""
    first, second = three_maps(2, seed=0), three_maps(3, seed=1)
    w = semi_orthogonal_matrix(12, 5, seed=7)
    level_rows = list(w.split(CHANNELS))
    group = [projected_channels(first, level_rows), projected_channels(second, level_rows)]
    assert [level.shape[-1] for level in group[0]] == [5, 5, 5]
    limit = None if rows is None else rows * 5 * 8 * 5
    bands = list(embedding_bands(group, limit, projected=True))
    assert [top for top, _ in bands] == list(range(0, 8, rows or 8))
    expected = torch.cat([full_embedding(first), full_embedding(second)]).double() @ w.double()
    torch.testing.assert_close(joined(bands).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [None, 1, 2, 3])
def test_neighbourhood_mean_equals_the_grid_mean_by_hand_and_avg_pool(rows):
    """Band by band (each with its halo rows), the 3 x 3 neighbourhood mean of the embedding equals a hand loop
    over the whole grid (border cells average only their neighbours inside it) and F.avg_pool2d(3, stride 1,
    padding 1, count_include_pad=False) on the whole grid; for the channel subset and the projection alike."""
    maps, other = three_maps(2, seed=2), three_maps(1, seed=3)
    index = channel_index(12, 7, seed=5)
    w = semi_orthogonal_matrix(12, 4, seed=5)
    for group, embedding, projected in (
        (
            [chosen_channels(m, split_channel_index(index, CHANNELS)) for m in (maps, other)],
            torch.cat([full_embedding(maps), full_embedding(other)])[..., index],
            False,
        ),
        (
            [projected_channels(m, list(w.split(CHANNELS))) for m in (maps, other)],
            torch.cat([full_embedding(maps), full_embedding(other)]) @ w,
            True,
        ),
    ):
        dims = embedding.shape[-1]
        limit = None if rows is None else rows * 3 * 8 * dims
        banded = joined(embedding_bands(group, limit, projected=projected, neighbourhood=3))
        by_hand = grid_mean_by_hand(embedding.double().numpy())
        np.testing.assert_allclose(banded.double().numpy(), by_hand, rtol=1e-5, atol=1e-5)
        pooled = F.avg_pool2d(embedding.permute(0, 3, 1, 2), 3, stride=1, padding=1, count_include_pad=False)
        torch.testing.assert_close(banded, pooled.permute(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    corner = embedding[:, :2, :2].mean(dim=(1, 2))  # the corner averages its 4 cells, not 9 with zeros
    torch.testing.assert_close(neighbourhood_mean(embedding, 3)[:, 0, 0], corner)
    assert torch.equal(neighbourhood_mean(embedding, 1), embedding)


def test_image_scores_by_hand():
    """map_max: the map's maximum; grid_max: the raw grid's; grid_top_k_mean: the mean of the TOP_K_CELLS highest
    cells (numpy's sort), of all cells on a smaller grid."""
    generator = torch.Generator().manual_seed(0)
    distances = torch.rand(3, 5, 6, generator=generator) * 10
    maps = torch.rand(3, 20, 24, generator=generator)
    flat = distances.flatten(1).numpy()
    np.testing.assert_allclose(image_scores(maps, distances, "map_max"), maps.flatten(1).numpy().max(axis=1))
    np.testing.assert_allclose(image_scores(maps, distances, "grid_max"), flat.max(axis=1))
    top = np.sort(flat, axis=1)[:, -TOP_K_CELLS:].mean(axis=1)
    np.testing.assert_allclose(image_scores(maps, distances, "grid_top_k_mean"), top, rtol=1e-6)
    small = distances[:, :2, :2]
    np.testing.assert_allclose(
        image_scores(maps, small, "grid_top_k_mean"), small.flatten(1).numpy().mean(axis=1), rtol=1e-6
    )
    with pytest.raises(ValueError, match="unknown image score 'max'"):
        image_scores(maps, distances, "max")


def test_a_projected_neighbourhood_model_fits_and_scores_as_its_definition():
    """Padim with the semi-orthogonal projection, the 3 x 3 mean and the top-k score, in bands of two grid rows
    and groups of one batch: its mean is the training images' whole embeddings projected, pooled and averaged,
    and its scores the top-k mean of the reference embedding's distances (same fitted factor)."""
    extractor, _ = build_extractor("resnet18", "none", CPU)
    torch.manual_seed(0)
    train, test = torch.randn(3, 6, 3, 64, 64).unbind(0), torch.randn(4, 3, 64, 64)
    w = semi_orthogonal_matrix(extractor.dims, 20, seed=1)
    model = Padim(
        extractor,
        torch.arange(extractor.dims),
        (64, 64),
        CPU,
        CPU,
        CPU,
        band_elements=2 * 6 * 16 * 20,
        images_together=1,
        projection=w,
        neighbourhood=3,
        image_score="grid_top_k_mean",
    )
    assert model.dims == 20
    stats = model.fit(iter(train))

    def reference(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            maps = [m.permute(0, 2, 3, 1) for m in extractor(images)]
        size = maps[0].shape[1:3]
        whole = torch.cat([maps[0], *(resample_centred(m, size, size[0] // m.shape[1]) for m in maps[1:])], dim=-1)
        pooled = F.avg_pool2d((whole.double() @ w.double()).permute(0, 3, 1, 2), 3, 1, 1, count_include_pad=False)
        return pooled.permute(0, 2, 3, 1)

    expected_mean = torch.cat([reference(images) for images in train]).mean(dim=0).flatten(0, 1)
    torch.testing.assert_close(stats.mean.double(), expected_mean, rtol=1e-4, atol=1e-4)
    _, scores = model.anomaly_maps(test)
    distances = mahalanobis(reference(test).float(), stats.mean, stats.factor)
    expected = distances.flatten(1).topk(TOP_K_CELLS, dim=1).values.mean(dim=1)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)


def test_variant_settings_join_the_identity_and_the_folder_name_only_when_not_the_defaults(tmp_path: Path):
    """A default configuration keeps today's identity and folder (earlier results are reused); each variant
    adds its key and a folder suffix, so no two configurations of one comparison share a folder."""
    plain = ModelConfig("resnet18", ("layer1", "layer2", "layer3"), "none", 64, 56)
    assert set(plain.settings()) == {
        "model_architecture",
        "layers",
        "weights",
        "resize",
        "cropsize",
        "reduced_dim",
        "seed",
    }
    assert plain.folder_suffix() == ""
    models = model_configs(
        ["resnet18"],
        [None],
        [64],
        [56],
        [None],
        "none",
        projections=("random", "semi_orthogonal"),
        neighbourhoods=(1, 3),
        image_scores=("map_max", "grid_max", "grid_top_k_mean"),
    )
    assert len(models) == 12 and models[0] == plain
    run = RunConfig(tmp_path, models, FitConfig(layout="mvtec"))
    folders = [run.results_folder(model).name for model in models]
    assert len(set(folders)) == 12
    variant = models[-1]
    assert variant.settings() == {
        **plain.settings(),
        "projection": "semi_orthogonal",
        "neighbourhood": 3,
        "image_score": "grid_top_k_mean",
    }
    assert folders[-1] == "mvtec_resnet18_resize-64_crop-56_proj-semi_orthogonal_nbhd-3_score-grid_top_k_mean"
    assert folders[0] == "mvtec_resnet18_resize-64_crop-56"
    assert (
        RunConfig(tmp_path, (plain,), FitConfig(layout="mvtec")).results_folder(plain).name
        == "mvtec_resnet18_resize-64_crop-56"
    )


@pytest.mark.slow
def test_a_run_of_several_variants_records_each_in_its_folder_and_the_comparison(texture_root: Path, tmp_path: Path):
    """--projection, --neighbourhood and --image_score with two values each: one configuration per combination
    (here 2 x 1 x 2 and 1 x 2 x 1 in two runs kept small), each with its settings in experiment.json, the model
    file and comparison.csv's settings columns; scores.csv follows the model's image score."""
    flags = [
        *CPU_RUN_FLAGS,
        "--data_path",
        str(texture_root / "brick"),
        "--base_results_dir",
        str(tmp_path),
        "--save_distribution",
        "--reduced_dim",
        "40",
        "--projection",
        "random",
        "semi_orthogonal",
        "--image_score",
        "map_max",
        "grid_max",
    ]
    assert run_experiment.main(flags) == 0
    comparison = pd.read_csv(tmp_path / "mvtec_comparison" / "comparison.csv")
    assert list(comparison.projection) == ["random", "random", "semi_orthogonal", "semi_orthogonal"]
    assert list(comparison.image_score) == ["map_max", "grid_max"] * 2
    assert set(comparison.neighbourhood) == {1} and set(comparison.reduced_dim) == {40}
    for row in comparison.itertuples():
        folder = tmp_path / "mvtec_comparison" / row.configuration
        recorded = json.loads((folder / "experiment.json").read_text())
        content = torch.load(folder / "brick" / "padim_model.pt", weights_only=True)
        assert content["format_version"] == 8
        for key, default in (("projection", "random"), ("image_score", "map_max")):
            value = getattr(row, key)
            assert recorded.get(key, default) == value == content["training_config"].get(key, default)
            assert (key in recorded) == (value != default)
        if row.projection == "semi_orthogonal":
            w = content["projection_matrix"]
            assert w.shape == (448, 40) and torch.equal(w, semi_orthogonal_matrix(448, 40, 1024))
            assert content["mean"].shape[1] == 40
        else:
            assert "projection_matrix" not in content
    random = tmp_path / "mvtec_comparison" / comparison.configuration[0] / "brick"
    grid = tmp_path / "mvtec_comparison" / comparison.configuration[1] / "brick"
    blurred, raw = pd.read_csv(random / "scores.csv"), pd.read_csv(grid / "scores.csv")
    assert list(blurred.path) == list(raw.path)
    assert (raw.score > blurred.score).all()  # the blur and up-sampling average: the raw grid peaks higher

    neighbourhoods = [*CPU_RUN_FLAGS, "--data_path", str(texture_root / "brick"), "--base_results_dir"]
    assert run_experiment.main([*neighbourhoods, str(tmp_path / "n"), "--neighbourhood", "1", "3"]) == 0
    comparison = pd.read_csv(tmp_path / "n" / "mvtec_comparison" / "comparison.csv")
    assert list(comparison.neighbourhood) == [1, 3]
    assert list(comparison.configuration) == [
        "mvtec_resnet18_resize-64_crop-56",
        "mvtec_resnet18_resize-64_crop-56_nbhd-3",
    ]
    assert comparison.roc_auc[0] != comparison.roc_auc[1] or comparison.pixel_roc_auc[0] != comparison.pixel_roc_auc[1]
