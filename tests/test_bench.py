"""Smoke test of benchmarks/bench.py on a tiny synthetic class: one consistent row, the CSV, the verdicts."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from benchmarks import bench, gaussian_steps, tf32_effect

pytestmark = pytest.mark.slow
SMALL_BENCH_FLAGS = ["--backbones", "efficientnet_lite0", "--resize", "64", "--cropsize", "56", "--num_workers", "0"]


def test_benchmark_row_is_consistent(texture_root, tmp_path, capsys):
    """Every column the README explains is there and adds up; the memory fits ran in fresh processes."""
    output = tmp_path / "bench.csv"
    code = bench.main(
        [
            "--data_path",
            str(texture_root / "brick"),
            *SMALL_BENCH_FLAGS,
            "--batch_size",
            "8",
            "--output",
            str(output),
        ]
    )
    assert code == 0
    table = pd.read_csv(output)
    assert len(table) == 1
    row = table.iloc[0]
    assert (row.backbone, row.class_name, row.weights) == ("efficientnet_lite0", "brick", "imagenet")
    assert (row.n_train, row.n_test) == (24, 14)
    forwards = {engine: row[f"forward_{engine}_s"] for engine in bench.FORWARD_ENGINES}
    assert row.forward_s == min(forwards.values()) and row.fastest_forward == min(forwards, key=forwards.get)
    assert row.engine == "openvino/fp32"  # auto: the fastest measured for efficientnet_lite0
    assert row.forward_s > 0 and row.fit_s > 0 and row.score_s > 0 and row.metrics_s > 0 and row.plots_s > 0
    # the CSV keeps 4 significant digits, hence the tolerance
    assert math.isclose(row.pipeline_s, row.fit_s + row.score_s, rel_tol=1e-2)
    assert math.isclose(row.ratio, row.pipeline_s / row.forward_s, rel_tol=1e-2)
    assert math.isclose(row.score_img_s, row.n_test / row.score_s, rel_tol=1e-2)
    assert row.mem_n_small == 12
    assert 0 < row.rss_base_mib <= row.rss_small_mib
    assert row.rss_base_mib <= row.rss_all_mib
    printed = capsys.readouterr().out
    assert "efficientnet_lite0" in printed and "pipeline / forward" in printed and "with 12" in printed


def test_fresh_process_does_not_inherit_our_peak():
    """ru_maxrss survives exec: a spawned child would report at least this process's peak, here +1 GiB."""
    ballast = bytearray(2**30)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page so it is resident
    child_peak = bench.in_fresh_process(bench.peak_rss_mib)
    assert child_peak < bench.peak_rss_mib() - 900
    del ballast


def test_quick_fills_in_only_what_was_not_given():
    """--quick is a subset by default, and an explicit flag still wins."""
    quick = bench.parse_args(["--quick"])
    assert (quick.max_train, quick.max_test, quick.backbones) == (64, 64, list(bench.QUICK_BACKBONES))
    chosen = bench.parse_args(["--quick", "--max_train", "10", "--backbones", "resnet18"])
    assert (chosen.max_train, chosen.max_test, chosen.backbones) == (10, 64, ["resnet18"])
    assert bench.parse_args([]).backbones == list(bench.DEFAULT_BACKBONES)


def test_subsets_keep_every_defect_type_and_the_holdout_share(texture_root):
    """--max_test spreads over the sorted test list; --max_train keeps fit and hold-out in proportion."""
    args = bench.parse_args(["--data_path", str(texture_root / "gravel"), "--max_train", "10", "--max_test", "4"])
    (split,) = bench.class_splits(args, bench.pipeline_config(args, "resnet18"))
    assert split.has_ground_truth
    assert len(split.fit) + len(split.holdout) == 10 and len(split.holdout) == 1
    assert len(split.test) == 4 and {s.label for s in split.test} == {0, 1}
    assert len({s.path for s in split.test}) == 4


def test_missing_folder_is_one_line_and_an_exit_code(tmp_path, capsys):
    assert bench.main(["--data_path", str(tmp_path / "nowhere"), "--skip_memory"]) == 1
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags",
    [["--cropsize", "300"], ["--max_train", "0"], ["--backbones", "vgg"], ["--num_workers", "-1"], ["--repeat", "0"]],
)
def test_bad_flags_are_refused(flags):
    with pytest.raises(SystemExit):
        bench.parse_args(flags)


def test_repeat_reports_the_median_of_each(texture_root, tmp_path, monkeypatch):
    """The row takes each engine's median forward pass, the fastest of them as the lower bound, and the pipeline run
    with the median total, with that run's columns."""
    forwards = {
        "torch": iter([3.0, 2.0, 4.0]),
        "onnxruntime": iter([1.5, 2.5, 2.0]),
        "openvino": iter([2.2, 2.4, 2.3]),
    }
    pipelines = iter(
        [
            {"fit_s": 4.0, "score_s": 1.0, "metrics_s": 0.1, "plots_s": 0.2},
            {"fit_s": 2.0, "score_s": 5.0, "metrics_s": 0.3, "plots_s": 0.4},
            {"fit_s": 2.5, "score_s": 1.5, "metrics_s": 0.5, "plots_s": 0.6},
        ]
    )
    monkeypatch.setattr(bench, "forward_only", lambda model, *args: next(forwards[model.extractor.engine]))
    monkeypatch.setattr(bench, "timed_pipeline", lambda *args: next(pipelines))
    output = tmp_path / "bench.csv"
    assert (
        bench.main(
            [
                "--data_path",
                str(texture_root / "brick"),
                *SMALL_BENCH_FLAGS,
                "--skip_memory",
                "--repeat",
                "3",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    row = pd.read_csv(output).iloc[0]
    assert (row.forward_torch_s, row.forward_onnxruntime_s, row.forward_openvino_s) == (3.0, 2.0, 2.3)
    assert (row.forward_s, row.fastest_forward) == (2.0, "onnxruntime")
    assert (row.fit_s, row.score_s, row.pipeline_s, row.metrics_s) == (4.0, 1.0, 5.0, 0.1)
    assert math.isclose(row.ratio, 5.0 / 2.0, rel_tol=1e-3)


def test_gaussian_steps_prints_the_median_of_its_runs(capsys):
    """benchmarks/gaussian_steps.py on a tiny shape (odd dims: 3 blocks; several staged additions)."""
    assert (
        gaussian_steps.main(
            [
                "--dims",
                "7",
                "--grid",
                "5",
                "--batch_size",
                "30",
                "--fit_batches",
                "5",
                "--score_batches",
                "2",
                "--repeat",
                "3",
            ]
        )
        == 0
    )
    header, columns, values = capsys.readouterr().out.strip().splitlines()
    assert "7 dims, empirical covariance, 5x5 grid, batch 30, 5 fit / 2 scoring batches, median of 3" in header
    runs = [float(value) for value in header.split("each run: ")[1].rstrip(" s)").split(", ")]
    row = dict(zip(columns.split(), map(float, values.split())))
    assert list(row) == ["fit_s", "factor_s", "mahalanobis_s", "total_s"] and len(runs) == 3
    assert all(value >= 0 for value in row.values()) and row["total_s"] == pytest.approx(sorted(runs)[1], abs=1e-3)
    assert row["total_s"] > 0


def test_tf32_effect_compares_scores_and_calls_at_the_image_threshold(texture_root, capsys):
    """tf32_effect.py fits twice and compares the calls at each fit's image threshold (it compared a float
    with the thresholds pair once the map threshold came, and stopped with a TypeError)."""
    assert tf32_effect.main(["--data_path", str(texture_root / "brick"), "--cropsize", "0"]) == 0
    printed = capsys.readouterr().out
    assert "14 test images" in printed and "calls change" in printed
    assert math.isfinite(float(printed.split("threshold change ")[1].split(";")[0]))
