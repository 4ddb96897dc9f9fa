"""The math against independent float64 references: numpy.cov, scipy's mahalanobis, sklearn, a hand AUPRO."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from sklearn.metrics import roc_auc_score

from tests.helpers import row_bands, symmetric_matrices, synthetic_features
from tests.reference import blocks_from_dense, gaussian_blur, precision_factor_reference, smooth_upsample
from utils.config import ModelConfig
from utils.evaluation import metrics
from utils.padim import fast_paths, gaussian, triangular
from utils.padim.anomaly_map import MapOperator, image_scores
from utils.padim.backbones import build_extractor
from utils.padim.embedding import channel_index, chosen_channels, embedding_bands, split_channel_index
from utils.padim.gaussian import GaussianAccumulator, mahalanobis, precision_factor_
from utils.padim.grid import linear_weights, resample_centred, stride_ratio
from utils.padim.model import Padim, image_groups
from utils.padim.model_file import ModelFileError, stats_from_content
from utils.padim.triangular import TriangularBlocks, block_edges

# band_elements of two grid rows of resnet18's 16 x 16 grid at 64 px: rows x images x width x dims
TWO_GRID_ROWS = 2 * 6 * 16 * 100


@pytest.mark.parametrize(
    "batches, rows", [([1] * 150, 3), ([7] * 22, 1), ([40] * 4, 2), ([100, 50], 3), ([3, 40, 7, 64, 36], 2)]
)
def test_streaming_statistics_equal_numpy_cov(batches, rows):
    """150 images in groups of any sizes, later ones larger too."""
    x = synthetic_features(n=150)
    acc = GaussianAccumulator(dims=6, positions=12, device=torch.device("cpu"))
    assert all(not moment.any() for moment in acc.moments())  # zero sums: an accumulator without images adds nothing
    for start, stop in itertools.pairwise(itertools.accumulate(batches, initial=0)):
        acc.update(row_bands(x[start:stop], rows))
    mean, blocks = acc.finalize()
    assert acc.count == 150
    cov = symmetric_matrices(blocks)
    flat = x.astype(np.float64).reshape(150, 12, 6).transpose(0, 2, 1)
    for p in range(12):
        expected_cov = np.cov(flat[:, :, p], rowvar=False) + ModelConfig.epsilon * np.eye(6)
        np.testing.assert_allclose(mean[p].numpy(), flat[:, :, p].mean(0), rtol=1e-5)
        np.testing.assert_allclose(cov[p].numpy(), expected_cov, rtol=1e-4, atol=1e-5)


def test_wide_streaming_statistics_equal_numpy_cov():
    """300 dims in 2 blocks of 150 rows, groups of 32, 128 and 90 images."""
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(250, 1, 2, 300)) * np.geomspace(0.1, 10, 300) + 3.0).astype(np.float32)
    acc = GaussianAccumulator(dims=300, positions=2, device=torch.device("cpu"))
    for start, stop in [(0, 32), (32, 160), (160, 250)]:
        acc.update([(0, torch.from_numpy(x[start:stop]))])
    mean, blocks = acc.finalize()
    cov = symmetric_matrices(blocks, torch.float64).numpy()
    for p in range(2):
        samples = x[:, 0, p].astype(np.float64)
        expected = np.cov(samples, rowvar=False) + ModelConfig.epsilon * np.eye(300)
        np.testing.assert_allclose(mean[p].numpy(), samples.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cov[p], expected, rtol=0, atol=2e-5 * np.abs(expected).max())


@pytest.mark.parametrize(
    "sizes, together, expected",
    [
        ([32, 32, 32, 32, 32, 10], 64, [[0, 1], [2, 3], [4, 5]]),
        ([3, 2, 1, 4, 2], 4, [[0, 1], [2, 3], [4]]),
        ([100], 128, [[0]]),
    ],
)
def test_image_groups_gather_batches_until_enough_images(sizes, together, expected):

    assert list(image_groups(enumerate(sizes), together)) == expected


def test_single_image_covariance_is_epsilon_identity():
    acc = GaussianAccumulator(dims=6, positions=12, device=torch.device("cpu"))
    acc.update(row_bands(synthetic_features(n=1), 3))
    _, cov = acc.finalize()
    np.testing.assert_allclose(
        symmetric_matrices(cov).numpy(), np.broadcast_to(ModelConfig.epsilon * np.eye(6), (12, 6, 6)), atol=1e-7
    )


def test_batched_mahalanobis_equals_scipy_float64():
    train, test = synthetic_features(n=60, seed=1), synthetic_features(n=5, seed=2)
    acc = GaussianAccumulator(dims=6, positions=12, device=torch.device("cpu"))
    acc.update(row_bands(train, 3))
    mean, cov = acc.finalize()
    covariance64 = symmetric_matrices(cov, torch.float64).numpy()
    distances = mahalanobis(torch.from_numpy(test), mean, precision_factor_(cov)).numpy()
    flat_train = train.astype(np.float64).reshape(60, 12, 6).transpose(0, 2, 1)
    for b in range(5):
        for p in range(12):
            mu = flat_train[:, :, p].mean(0)
            s = np.cov(flat_train[:, :, p], rowvar=False) + ModelConfig.epsilon * np.eye(6)
            np.testing.assert_allclose(covariance64[p], s, rtol=1e-4, atol=1e-5)
            expected = scipy_mahalanobis(test[b, p // 4, p % 4].astype(np.float64), mu, np.linalg.inv(s))
            assert abs(distances[b, p // 4, p % 4] - expected) / expected < 1e-3


def test_block_edges_mirror_so_the_factor_fits_the_covariance_blocks():
    for dims in range(1, 700):
        edges = block_edges(dims)
        assert edges[0] == 0 and edges[-1] == dims and all(a < b for a, b in zip(edges, edges[1:]))
        assert [a + b for a, b in zip(edges, reversed(edges))] == [dims] * len(edges)
        assert TriangularBlocks.shapes(5, dims, lower=True)[::-1] == TriangularBlocks.shapes(5, dims, lower=False)
    assert block_edges(550) == [0, 138, 275, 412, 550]


@pytest.mark.parametrize("lower", [True, False])
def test_triangular_blocks_hold_one_triangle(lower):
    matrices = torch.randn(4, 7, 7, dtype=torch.float64)
    triangle = matrices.tril() if lower else matrices.triu()
    blocks = blocks_from_dense(triangle, lower)
    assert [tuple(block.shape) for block in blocks.blocks] == TriangularBlocks.shapes(4, 7, lower)
    torch.testing.assert_close(blocks.dense(), triangle, rtol=0, atol=0)
    torch.testing.assert_close(blocks[1:3].dense(), triangle[1:3], rtol=0, atol=0)


def test_upper_blocks_give_the_symmetric_matrices_lower_triangle():
    symmetric = torch.randn(3, 9, 9, dtype=torch.float64)
    symmetric = symmetric + symmetric.transpose(1, 2)
    blocks = blocks_from_dense(symmetric.triu(), lower=False)
    lower = blocks.lower_triangle_of_symmetric(torch.float64)
    torch.testing.assert_close(lower.tril(), symmetric.tril(), rtol=0, atol=0)


def test_cholesky_reads_only_the_lower_triangle():
    """precision_factor_ hands Cholesky matrices whose upper triangle was never written."""
    rng = np.random.default_rng(4)
    samples = rng.normal(size=(3, 50, 20))
    covariance = torch.from_numpy(samples.transpose(0, 2, 1) @ samples)
    with_garbage = covariance.tril() + torch.full_like(covariance, float("nan")).triu(1)
    lower, info = fast_paths.cholesky_ex(with_garbage)
    torch.testing.assert_close(lower, torch.linalg.cholesky(covariance), rtol=1e-12, atol=1e-12)
    assert not info.any()


def test_factor_in_three_blocks_whitens_like_float64():
    """401 dims (3 blocks): W and the distances against numpy's float64 Cholesky and solve."""
    rng = np.random.default_rng(3)
    samples = rng.normal(size=(4, 900, 401)) * np.geomspace(0.05, 20, 401)  # channels of very different scales
    centred = samples - samples.mean(axis=1, keepdims=True)
    covariance = centred.transpose(0, 2, 1) @ centred / 899 + ModelConfig.epsilon * np.eye(401)
    blocks = blocks_from_dense(torch.from_numpy(covariance).float(), lower=False)
    memory = {block.data_ptr() for block in blocks.blocks}
    factor = precision_factor_(blocks)
    assert len(factor.blocks) == 3 and {block.data_ptr() for block in factor.blocks} == memory  # no second copy
    expected = np.linalg.inv(np.linalg.cholesky(covariance))
    np.testing.assert_allclose(factor.dense().double().numpy(), expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    points = rng.normal(size=(3, 2, 2, 401)) * np.geomspace(0.05, 20, 401)  # (B, H, W, D), P = 4 positions
    mean = rng.normal(size=(4, 401))
    distances = mahalanobis(torch.from_numpy(points).float(), torch.from_numpy(mean).float(), factor).double().numpy()
    offsets = points.reshape(3, 4, 401) - mean
    reference = np.sqrt(
        np.einsum("bpd,bpd->bp", offsets, np.linalg.solve(covariance, offsets.transpose(1, 2, 0)).transpose(2, 0, 1))
    )
    np.testing.assert_allclose(distances.reshape(3, 4), reference, rtol=1e-4)


@pytest.mark.parametrize("positions, dims", [(4, 5), (3, 33), (5, 144), (20, 300), (2, 690)])
def test_precision_factor_equals_float64_inverse_cholesky(positions, dims, monkeypatch):
    """Every block split (2 to 5 blocks), positions in chunks of 3 (the last one shorter) on the worker threads."""
    monkeypatch.setattr(gaussian, "FACTOR_CHUNK_MATRICES", 3)
    rng = np.random.default_rng(dims)
    samples = rng.normal(size=(positions, dims + 40, dims)) * np.geomspace(0.1, 10, dims)
    covariance = samples.transpose(0, 2, 1) @ samples / (dims + 40) + ModelConfig.epsilon * np.eye(dims)
    single = torch.from_numpy(covariance).float()
    factor = precision_factor_(blocks_from_dense(single, lower=False))
    expected = np.linalg.inv(np.linalg.cholesky(covariance))
    np.testing.assert_allclose(factor.dense().double().numpy(), expected, rtol=0, atol=2e-5 * np.abs(expected).max())
    reference = precision_factor_reference(single)  # the plain torch definition
    torch.testing.assert_close(factor.dense(), reference, rtol=0, atol=2e-5 * reference.abs().max().item())


def test_factor_of_a_non_positive_definite_covariance_is_an_error():
    covariance = torch.eye(300).repeat(100, 1, 1)  # 3 chunks of at most 46 matrices, shared by the worker threads
    covariance[77, 2, 2] = -1.0
    with pytest.raises(ValueError, match="not positive definite"):
        precision_factor_(blocks_from_dense(covariance, lower=False))


def test_bands_change_nothing_in_fit_or_maps():
    """Band by band (2 grid rows at a time), batch by batch, gives the same statistics and maps as the whole
    grid at once over groups of batches."""

    extractor, _ = build_extractor("resnet18", "none", torch.device("cpu"))
    torch.manual_seed(0)
    train, test = torch.randn(3, 6, 3, 64, 64).unbind(0), torch.randn(5, 3, 64, 64)
    results = []
    for band_elements, together in (
        (None, 128),
        (TWO_GRID_ROWS, 1),
    ):  # all batches after the first in one group, or each alone
        model = Padim(
            extractor,
            channel_index(448, 100, 0),
            (64, 64),
            *[torch.device("cpu")] * 3,
            band_elements=band_elements,
            images_together=together,
        )
        stats = model.fit(iter(train))
        results.append((stats.mean, stats.factor.dense(), *model.anomaly_maps(test)))
    for whole, banded in zip(*results):  # summation order differs: float32 rounding, relative to each tensor's scale
        torch.testing.assert_close(banded, whole, rtol=1e-4, atol=1e-5 * whole.abs().max().item())
    with pytest.raises(ValueError, match="covered 4 of 12"):
        GaussianAccumulator(dims=6, positions=12, device=torch.device("cpu")).update(
            row_bands(synthetic_features(), 1)[:1]
        )


def test_fit_groups_of_any_size_give_the_same_statistics():
    """Padim.fit holds batches until `images_together` images: uneven batches, a later batch larger
    than the holder, or everything after the first batch in one group, all give the same Gaussian."""

    extractor, _ = build_extractor("resnet18", "none", torch.device("cpu"))
    torch.manual_seed(0)
    train = torch.randn(14, 3, 64, 64).split([2, 5, 3, 4])
    fitted = []
    for together in (1, 4, 100):
        model = Padim(
            extractor, channel_index(448, 100, 0), (64, 64), *[torch.device("cpu")] * 3, images_together=together
        )
        fitted.append(model.fit(iter(train)))
    for stats in fitted[1:]:
        assert stats.count == fitted[0].count == 14
        torch.testing.assert_close(stats.mean, fitted[0].mean, rtol=1e-5, atol=1e-5)
        reference = fitted[0].factor.dense()
        torch.testing.assert_close(stats.factor.dense(), reference, rtol=1e-3, atol=1e-4 * reference.abs().max().item())


def test_scoring_batches_in_groups_changes_no_map():
    """Padim scores groups of batches in one pass (at least `images_together` images); every batch
    gets the maps and scores it gets alone, in order, with its key, a last smaller group too."""

    extractor, _ = build_extractor("resnet18", "none", torch.device("cpu"))
    torch.manual_seed(0)
    train = torch.randn(3, 6, 3, 64, 64).unbind(0)
    test = torch.randn(12, 3, 64, 64).split([3, 2, 1, 4, 2])  # groups of 3+2, 1+4, then 2 alone
    model = Padim(
        extractor,
        channel_index(448, 100, 0),
        (64, 64),
        *[torch.device("cpu")] * 3,
        band_elements=TWO_GRID_ROWS,
        images_together=4,
    )
    model.fit(iter(train))
    grouped = list(model.stream_anomaly_maps((f"batch {k}", images) for k, images in enumerate(test)))
    assert [key for key, _, _ in grouped] == [f"batch {k}" for k in range(5)]
    for (_, maps, scores), images in zip(grouped, test):
        alone_maps, alone_scores = model.anomaly_maps(images)
        assert maps.shape == (len(images), 64, 64)
        torch.testing.assert_close(maps, alone_maps, rtol=1e-5, atol=1e-5 * alone_maps.abs().max().item())
        torch.testing.assert_close(scores, alone_scores, rtol=1e-5, atol=0)


def test_embedding_selects_channels_after_centred_resampling():
    """The embedding equals every map resampled onto the first grid, joined, then indexed by the
    channel subset: in bands of any height, for any layout of the maps, for a group of batches."""
    torch.manual_seed(0)
    maps = [torch.randn(2, 4, 8, 8), torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)]
    index = channel_index(12, 7, seed=5)
    last = [m.permute(0, 2, 3, 1) for m in maps]
    full = torch.cat([last[0], resample_centred(last[1], (8, 8), 2), resample_centred(last[2], (8, 8), 4)], dim=-1)
    channels_last = [m.contiguous(memory_format=torch.channels_last) for m in maps]
    every_channel, all_of_the_first_map = torch.arange(12), torch.tensor([0, 1, 2, 3, 5, 9])
    for inputs, chosen, rows in (
        (maps, index, None),
        (channels_last, index, None),
        (channels_last, index, 1),
        (maps, index, 3),
        (channels_last, every_channel, 2),
        (maps, all_of_the_first_map, 3),
        (maps, torch.tensor([0, 2]), 3),  # maps with no chosen channel
    ):
        kept = chosen_channels(inputs, split_channel_index(chosen, [4, 3, 5]))
        assert [level.shape[-1] for level in kept] == [
            int(((chosen >= lo) & (chosen < hi)).sum()) for lo, hi in ((0, 4), (4, 7), (7, 12))
        ]
        bands = list(embedding_bands([kept], None if rows is None else rows * 2 * 8 * len(chosen)))
        assert [top for top, _ in bands] == list(range(0, 8, rows or 8))
        torch.testing.assert_close(torch.cat([band for _, band in bands], dim=1), full[..., chosen])
    second = [torch.randn(3, *m.shape[1:]) for m in maps]  # two batches in one band: as if concatenated
    joined = [torch.cat(pair) for pair in zip(maps, second)]
    for rows in (None, 3):
        limit = None if rows is None else rows * 5 * 8 * len(index)
        local = split_channel_index(index, [4, 3, 5])
        group = [chosen_channels(maps, local), chosen_channels(second, local)]
        together = torch.cat([band for _, band in embedding_bands(group, limit)], dim=1)
        alone = torch.cat([band for _, band in embedding_bands([chosen_channels(joined, local)])], dim=1)
        torch.testing.assert_close(together, alone)
    assert torch.equal(index, channel_index(12, 7, seed=5))
    assert not torch.equal(index, channel_index(12, 7, seed=6))


def test_centred_resampling_puts_each_cell_on_its_centre():
    """Cell j of a stride-4 grid sits on fine index 4j; in between, values are linear; past the end, the border."""
    coarse = torch.tensor([[0.0, 4.0, 8.0, 20.0]]).expand(4, 4)[None, :, :, None]
    fine = resample_centred(coarse, (16, 16), 4)[0, :, :, 0]
    expected_row = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 14, 17, 20, 20, 20, 20], dtype=torch.float32)
    torch.testing.assert_close(fine[0], expected_row)
    torch.testing.assert_close(fine[:, 9], torch.full((16,), 11.0))
    down_the_rows = resample_centred(coarse.transpose(1, 2)[:, :3], (12, 16), 4)[0, :, :, 0]  # 3 x 4 cells
    torch.testing.assert_close(down_the_rows[:, 5], expected_row[:12].clamp(max=8.0))
    assert stride_ratio(224, 56) == 4 and stride_ratio(250, 63) == 4 and stride_ratio(56, 7) == 8


@pytest.mark.parametrize(
    "source, size, ratio",
    [
        ((14, 14), (56, 56), 4),
        ((28, 28), (56, 56), 2),
        ((31, 31), (63, 63), 2),
        ((16, 16), (63, 63), 4),
        ((3, 4), (12, 16), 4),
    ],
)
def test_centred_resampling_of_a_band_equals_both_axes_weights(source, size, ratio):
    """A band of output rows equals the separable weights of both axes in float64, and the same
    rows of the whole resampled grid."""
    maps = torch.randn(2, *source, 5)
    rows = slice(3, 9)
    band = resample_centred(maps, size, ratio, rows=rows)
    down = linear_weights(torch.arange(size[0], dtype=torch.float64) / ratio, source[0])[rows]
    across = linear_weights(torch.arange(size[1], dtype=torch.float64) / ratio, source[1])
    expected = torch.einsum("ih,bhwc,jw->bijc", down, maps.double(), across)
    torch.testing.assert_close(band.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(resample_centred(maps, size, ratio)[:, rows], band)


def test_anomaly_map_peak_stays_on_its_patch():
    distances = torch.zeros(1, 8, 8)
    distances[0, 2, 5] = 10.0
    maps = smooth_upsample(distances, (32, 32))
    assert maps.shape == (1, 32, 32)
    assert np.unravel_index(maps[0].argmax().item(), (32, 32)) == (8, 20)
    assert image_scores(maps, distances).item() == pytest.approx(maps.max().item())


def streamed_curves(masks: np.ndarray, maps: np.ndarray, batch: int | None = None) -> metrics.PixelCurves | None:
    """metrics.PixelHistogram's curves, the maps folded in `batch` images at a time (None: all at once)."""
    histogram = metrics.PixelHistogram(metrics.ScoreBins.around(float(np.median(maps)) or 1.0))
    step = batch or len(maps)
    for start in range(0, len(maps), step):
        histogram.add(maps[start : start + step], masks[start : start + step])
    return histogram.curves()


def exact_pixel_curves(masks: np.ndarray, maps: np.ndarray) -> metrics.PixelCurves:
    """The reference: exact ROC and PRO curves from one sort of all pixel scores, a point per distinct
    score; PRO = mean over the 8-connected ground-truth regions of the share above the threshold."""
    region_ids, regions = np.zeros(masks.shape, np.int64), 0
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
        region_ids[i] = np.where(labelled > 0, labelled + regions, 0)
        regions += count
    weight = 1.0 / (np.bincount(region_ids.reshape(-1), minlength=regions + 1) * regions)
    weight[0] = 0.0
    flat = maps.reshape(-1)
    order = np.argsort(flat, kind="stable")[::-1]
    last = np.r_[np.flatnonzero(np.diff(flat[order])), flat.size - 1]
    ids = region_ids.reshape(-1)[order]
    tpr = np.cumsum(ids > 0)[last] / (ids > 0).sum()
    fpr = np.cumsum(ids == 0)[last] / (ids == 0).sum()
    return metrics.PixelCurves(np.r_[0.0, fpr], np.r_[0.0, tpr], np.r_[0.0, np.cumsum(weight[ids])[last]])


def test_aupro_hand_computed_tiny_case():
    # One 1x4 image: pixels 0,1 are one defect region, 2,3 are good. Scores descending 0.9, 0.4, 0.6, 0.1.
    masks = np.array([[[True, True, False, False]]])
    maps = np.array([[[0.9, 0.4, 0.6, 0.1]]])
    curves = streamed_curves(masks, maps)
    fpr, pro = curves.fpr, curves.pro
    # thresholds 0.9, 0.6, 0.4, 0.1 -> (fpr, pro) = (0, .5), (.5, .5), (.5, 1), (1, 1)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1.0, 1.0])
    # area on [0, 0.3]: pro 0.5 for fpr in (0, 0.3] -> 0.15, normalised by 0.3 -> 0.5
    np.testing.assert_allclose(curves.tpr, [0, 0.5, 0.5, 1.0, 1.0])
    assert metrics.pixel_metrics(curves)[1] == pytest.approx(0.5)
    assert metrics.pixel_metrics(curves, fpr_limit=1.0) == pytest.approx((0.75, 0.5 * 0.5 + 0.5 * 1.0))


def test_aupro_averages_regions_not_pixels():
    # Two regions (3 pixels and 1 pixel); only the small one detected at the top threshold.
    masks = np.array([[[True, True, True, False, True, False, False, False]]])
    maps = np.array([[[0.1, 0.1, 0.1, 0.2, 0.9, 0.3, 0.05, 0.05]]])
    curves = streamed_curves(masks, maps)
    fpr, pro = curves.fpr, curves.pro
    assert pro[1] == pytest.approx(0.5) and fpr[1] == 0


def _defect_maps(seed: int, decimals: int | None) -> tuple[np.ndarray, np.ndarray]:
    """12 maps of 32 x 32: blob defects of several sizes in 8 of them (4 with no defect pixel), gamma
    noise; rounded to `decimals` for many ties."""
    rng = np.random.default_rng(seed)
    maps = rng.gamma(4.0, 1.0, (12, 32, 32))
    masks = np.zeros(maps.shape, bool)
    for i in range(4, 12):
        for _ in range(1 + i % 3):
            top, left, height, width = rng.integers(0, 26), rng.integers(0, 26), rng.integers(1, 7), rng.integers(1, 7)
            masks[i, top : top + height, left : left + width] = True
        maps[i][masks[i]] += rng.uniform(0.0, 4.0)
    return masks, maps if decimals is None else maps.round(decimals)


@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("batch", [None, 1, 5])
def test_streamed_pixel_metrics_equal_the_exact_ones(decimals, batch):
    """Pixel AUROC within 1e-4 of sklearn's and AUPRO within 1e-3 of the exact computation, for any
    batch split, with and without ties, with images that hold no defect pixel."""
    masks, maps = _defect_maps(0, decimals)
    auroc, aupro = metrics.pixel_metrics(streamed_curves(masks, maps, batch))
    assert auroc == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-4)
    assert aupro == pytest.approx(metrics.pixel_metrics(exact_pixel_curves(masks, maps))[1], abs=1e-3)


def test_pixel_histograms_of_any_batch_split_add_up_to_the_same():
    masks, maps = _defect_maps(1, None)
    bins = metrics.ScoreBins.around(4.0)
    whole, parts = metrics.PixelHistogram(bins), metrics.PixelHistogram(bins)
    whole.add(maps, masks)
    for rows in (slice(0, 3), slice(3, 4), slice(4, 12)):
        part = metrics.PixelHistogram(bins)
        part.add(maps[rows], masks[rows])
        parts += part
    for name in ("outside", "inside"):
        np.testing.assert_array_equal(getattr(parts, name), getattr(whole, name))
    np.testing.assert_allclose(parts.overlap, whole.overlap, rtol=1e-12)
    assert parts.regions == whole.regions == sum(ndimage.label(m, np.ones((3, 3)))[1] for m in masks)
    assert whole.inside.sum() == masks.sum() and whole.outside.sum() == (~masks).sum()


def test_undefined_metrics_are_none():
    labels, scores = np.zeros(5, int), np.arange(5.0)
    assert metrics.image_auroc(labels, scores) is None
    assert metrics.bootstrap_auroc_ci(labels, scores) is None
    assert metrics.f1_max(labels, scores) is None
    assert streamed_curves(np.zeros((1, 4, 4), bool), np.ones((1, 4, 4))) is None


def test_operating_point_and_bootstrap_ci():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.8, 0.7, 0.9, 0.3])
    point = metrics.operating_point(labels, scores, threshold=0.5)
    assert (point.true_negatives, point.false_positives, point.false_negatives, point.true_positives) == (2, 1, 1, 2)
    assert point.precision == pytest.approx(2 / 3) and point.recall == pytest.approx(2 / 3)
    low, high = metrics.bootstrap_auroc_ci(labels, scores, resamples=300)
    auroc = metrics.image_auroc(labels, scores)
    assert low <= auroc <= high and 0 <= low < high <= 1


def test_pairwise_auroc_equals_sklearn_along_either_axis():
    """Ties (scores rounded to one decimal) count half, as in roc_auc_score."""
    rng = np.random.default_rng(3)
    negatives, positives = rng.normal(size=(4, 30)).round(1), (rng.normal(size=(4, 20)) + 0.8).round(1)
    labels = np.r_[np.zeros(30), np.ones(20)]
    expected = [roc_auc_score(labels, np.r_[n, p]) for n, p in zip(negatives, positives)]
    np.testing.assert_allclose(metrics.pairwise_auroc(negatives, positives), expected, rtol=1e-12)
    np.testing.assert_allclose(metrics.pairwise_auroc(negatives.T, positives.T, axis=0), expected, rtol=1e-12)


def test_bootstrap_ci_matches_a_loop_of_sklearn_aurocs():
    """The stratified percentile interval equals, up to resampling noise, one drawn the plain way:
    resample each class, roc_auc_score, percentiles."""
    rng = np.random.default_rng(4)
    labels = np.r_[np.zeros(80, int), np.ones(120, int)]
    scores = (rng.normal(size=200) + labels).round(1)
    negatives, positives = scores[labels == 0], scores[labels == 1]
    reference = np.percentile(
        [roc_auc_score(labels, np.r_[rng.choice(negatives, 80), rng.choice(positives, 120)]) for _ in range(3000)],
        [2.5, 97.5],
    )
    np.testing.assert_allclose(metrics.bootstrap_auroc_ci(labels, scores, resamples=3000), reference, atol=0.01)


@pytest.mark.parametrize("sigma", [4.0, 1.5, 0.0])
def test_separable_blur_equals_scipy_gaussian_filter(sigma):
    """Any sigma gets its own 4-sigma kernel; sigma 0 is no blur (it was NaN, and the radius was fixed)."""
    image = np.random.default_rng(0).random((40, 50))
    blurred = gaussian_blur(torch.from_numpy(image)[None, None], sigma)[0, 0].numpy()
    np.testing.assert_allclose(blurred, gaussian_filter(image, sigma=sigma, mode="mirror", truncate=4.0), atol=1e-10)


@pytest.mark.parametrize(
    "grid, size",
    [
        ((8, 8), (32, 32)),
        ((56, 56), (224, 224)),
        ((63, 63), (250, 250)),
        ((6, 9), (36, 36)),
        ((4, 4), (8, 8)),
        ((8, 16), (32, 64)),  # a height x width input (--resize HxW)
        ((16, 8), (64, 32)),
        ((5, 9), (20, 36)),
    ],
)
def test_map_operator_equals_the_direct_definition(grid, size):
    distances = torch.rand(3, *grid) * 10
    operator = MapOperator.build(grid, size, torch.device("cpu"))
    torch.testing.assert_close(operator(distances), smooth_upsample(distances, size), rtol=1e-5, atol=1e-5)


def _factor_content(factor: TriangularBlocks, mean: torch.Tensor, grid: tuple[int, int]) -> dict:
    return {
        "mean": mean,
        "precision_factor": factor.blocks,
        "grid": list(grid),
        "n_train": 9,
        "channel_index": list(range(mean.shape[1])),
        "training_config": {},
    }


def test_a_factor_stored_with_another_block_split_reads_and_scores_the_same(monkeypatch):
    """Model files written with an older BLOCK_WIDTH hold other row blocks; Mahalanobis works on any split,
    so they load and give the same distances. Splits that do not cover the triangle are refused."""
    dims, grid = 11, (2, 3)
    x = torch.from_numpy(synthetic_features(n=30, d=dims, h=grid[0], w=grid[1]))
    acc = GaussianAccumulator(dims=dims, positions=6, device=torch.device("cpu"))
    acc.update(row_bands(x.numpy(), 1))
    mean, covariance = acc.finalize()
    covariance_copy = TriangularBlocks([block.clone() for block in covariance.blocks], lower=False)
    dense_factor = precision_factor_(covariance).dense()
    distances = {}
    for width in (3, 2):  # 5 and 7 blocks of 11 columns
        monkeypatch.setattr(triangular, "BLOCK_WIDTH", width)
        stored = blocks_from_dense(dense_factor, lower=True)
        monkeypatch.setattr(triangular, "BLOCK_WIDTH", 100)  # the reader's own split: 3 blocks
        stats = stats_from_content(_factor_content(stored, mean, grid))
        assert [block.shape[1] for block in stats.factor.blocks] == [block.shape[1] for block in stored.blocks]
        assert len(stored.blocks) != len(block_edges(dims)) - 1
        distances[width] = mahalanobis(x[:4], mean, stats.factor)
    reference = [
        [
            scipy_mahalanobis(
                x[i, r, c].double().numpy(),
                mean[r * grid[1] + c].double().numpy(),
                np.linalg.inv(symmetric_matrices(covariance_copy, torch.float64)[r * grid[1] + c].numpy()),
            )
            for r in range(grid[0])
            for c in range(grid[1])
        ]
        for i in range(4)
    ]
    torch.testing.assert_close(
        distances[3].flatten(1).double(), torch.tensor(reference, dtype=torch.float64), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(distances[3], distances[2], rtol=1e-6, atol=1e-6)
    stored = blocks_from_dense(dense_factor, lower=True)
    for broken in (
        [stored.blocks[0], stored.blocks[0]],  # rows of the second block too few
        stored.blocks[:-1],  # columns missing
        [block[:, :0] for block in stored.blocks],
    ):  # empty blocks
        with pytest.raises(ModelFileError, match="statistics shapes do not match"):
            stats_from_content({**_factor_content(stored, mean, grid), "precision_factor": broken})


@pytest.mark.parametrize("spoil", ["mean_nan", "factor_inf"])
def test_statistics_with_a_non_finite_number_are_refused(spoil):
    """A NaN in the mean or an infinity in the factor would score every image NaN: never loaded."""
    dims, grid = 9, (2, 2)
    x = torch.from_numpy(synthetic_features(n=25, d=dims, h=grid[0], w=grid[1]))
    acc = GaussianAccumulator(dims=dims, positions=4, device=torch.device("cpu"))
    acc.update(row_bands(x.numpy(), 1))
    mean, covariance = acc.finalize()
    factor = precision_factor_(covariance)
    assert stats_from_content(_factor_content(factor, mean, grid)).is_finite()
    if spoil == "mean_nan":
        mean[3, 2] = float("nan")
    else:
        factor.blocks[-1][1, 0, 0] = float("inf")
    with pytest.raises(ModelFileError, match="non-finite"):
        stats_from_content(_factor_content(factor, mean, grid))
