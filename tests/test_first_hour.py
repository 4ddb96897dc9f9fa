"""What a new user trips over in the first hour: folders that mix runs, numbers on a handful of
images said nowhere, slow or silent flag typos, messages that name the wrong cause."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import predict
import run_experiment
from tests.helpers import CPU_RUN_FLAGS, ROOT
from utils.padim.model_file import MODEL_FILENAME
from utils.runtime.output_files import LOCK_FILENAME


def _main(*flags: str) -> int:
    return run_experiment.main([*CPU_RUN_FLAGS, *flags])


@pytest.mark.slow
def test_the_two_layouts_get_their_own_default_folders(texture_root: Path, tmp_path: Path):
    """--dataset bowtie and --dataset mvtec on one folder once wrote into one default folder."""
    results = tmp_path / "res"
    for layout in ("bowtie", "mvtec"):
        assert (
            _main("--dataset", layout, "--data_path", str(texture_root / "brick"), "--base_results_dir", str(results))
            == 0
        )
    assert sorted(p.name for p in results.iterdir()) == [
        "bowtie_resnet18_resize-64_crop-56",
        "mvtec_resnet18_resize-64_crop-56",
    ]
    tables = [pd.read_csv(folder / "master_results.csv") for folder in sorted(results.iterdir())]
    assert tables[0].n_test[0] != tables[1].n_test[0]  # bowtie moves a share of train/good to the test normals


@pytest.mark.slow
def test_another_experiment_into_a_used_folder_is_refused_and_changes_nothing(
    texture_root: Path, tmp_path: Path, capsys
):
    results = tmp_path / "res"
    flags = [
        "--data_path",
        str(texture_root / "brick"),
        "--base_results_dir",
        str(results),
        "--results_subdir",
        "shared",
    ]
    assert _main("--dataset", "mvtec", "--save_distribution", *flags) == 0
    before = {
        path: path.stat().st_mtime_ns
        for path in (results / "shared").rglob("*")
        if path.is_file() and path.name != LOCK_FILENAME
    }
    capsys.readouterr()
    assert _main("--dataset", "bowtie", "--save_distribution", *flags) == 1
    err = capsys.readouterr().err
    assert err == (
        f"error: results folder {results / 'shared'} holds another experiment's results (it differs in "
        "dataset 'mvtec' -> 'bowtie'; test_sample_ratio None -> 0.2): choose another --results_subdir, "
        "or remove that folder\n"
    )
    after = {
        path: path.stat().st_mtime_ns
        for path in (results / "shared").rglob("*")
        if path.is_file() and path.name != LOCK_FILENAME
    }
    assert [p for p in after if after[p] != before.get(p)] == [] and after == before


@pytest.mark.slow
@pytest.mark.figures
def test_a_rerun_leaves_no_file_of_the_earlier_run_in_a_class_folder(texture_root: Path, tmp_path: Path, caplog):
    """The earlier run's figures and its model (fitted on other images) would no longer match scores.csv."""
    data = tmp_path / "brick"
    shutil.copytree(texture_root / "brick", data)
    results = tmp_path / "res"
    flags = [
        "--dataset",
        "mvtec",
        "--data_path",
        str(data),
        "--base_results_dir",
        str(results),
        "--results_subdir",
        "r",
    ]
    assert _main(*flags, "--save_distribution", "--max_visualizations", "1") == 0
    class_dir = results / "r" / "brick"
    assert list((class_dir / "visualizations").rglob("*.png"))
    (data / "train" / "good" / "000.png").write_bytes((data / "train" / "good" / "001.png").read_bytes())
    caplog.clear()
    assert _main(*flags, "--max_visualizations", "0") == 0
    assert not (class_dir / "visualizations").exists() and not (class_dir / MODEL_FILENAME).exists()
    assert f"removed {class_dir / MODEL_FILENAME}: an earlier run's model that does not match" in caplog.text


@pytest.mark.slow
def test_a_rerun_without_saving_keeps_a_model_that_still_matches(texture_root: Path, tmp_path: Path):
    results = tmp_path / "res"
    flags = ["--dataset", "mvtec", "--data_path", str(texture_root / "brick"), "--base_results_dir", str(results)]
    assert _main(*flags, "--save_distribution") == 0
    [model_path] = results.rglob(MODEL_FILENAME)
    saved = model_path.stat().st_mtime_ns
    assert _main(*flags) == 0
    assert model_path.stat().st_mtime_ns == saved


@pytest.mark.parametrize("problem", ["no_class", "missing_weights"])
def test_an_early_error_leaves_no_folder_behind(tmp_path: Path, texture_root: Path, monkeypatch, capsys, problem):
    results = tmp_path / "res"
    if problem == "no_class":
        (tmp_path / "empty").mkdir()
        flags = ["--data_path", str(tmp_path / "empty")]
    else:
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
        monkeypatch.setattr(
            torch.hub, "load_state_dict_from_url", lambda *a, **k: (_ for _ in ()).throw(OSError("offline"))
        )
        flags = ["--data_path", str(texture_root / "brick"), "--weights", "imagenet"]
    capsys.readouterr()
    assert _main("--dataset", "mvtec", "--base_results_dir", str(results), *flags) == 1
    assert capsys.readouterr().err.startswith("error: ") and not results.exists()


def test_split_counts_n_holdout_and_small_sample_warnings(texture_root: Path, tmp_path: Path, caplog):
    results = tmp_path / "res"
    assert (
        _main(
            "--dataset",
            "bowtie",
            "--data_path",
            str(texture_root / "brick"),
            "--base_results_dir",
            str(results),
            "--results_subdir",
            "r",
        )
        == 0
    )
    table = pd.read_csv(results / "r" / "master_results.csv")
    assert table.n_holdout[0] == 2 and table.n_train[0] == 17
    assert (
        "brick: good training images: 17 fit, 2 held out for the threshold, 5 moved to the test normals "
        "(--test_sample_ratio); test: 11 good, 8 defect"
    ) in caplog.text
    assert "the threshold rests on 2 held-out good images" in caplog.text
    assert "17 images fitted for 100 dimensions" in caplog.text and "lower --reduced_dim" in caplog.text
    assert "n_holdout" in (results / "r" / "experiment_log.log").read_text()


def test_enough_images_give_no_small_sample_warning(texture_root: Path, tmp_path: Path, caplog):
    assert (
        _main(
            "--dataset",
            "mvtec",
            "--data_path",
            str(texture_root / "brick"),
            "--base_results_dir",
            str(tmp_path),
            "--reduced_dim",
            "8",
            "--holdout_ratio",
            "0",
        )
        == 0
    )
    assert "dimensions" not in caplog.text and "rests on" not in caplog.text


CHECK_FLAGS_WITHOUT_TORCH = """
import sys
import run_experiment
try:
    run_experiment.main(sys.argv[1:])
except SystemExit as exit_:
    print(exit_.code, "torch" in sys.modules)
"""


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--crop", "300"], "unknown flag --crop (did you mean --cropsize?)"),
        pytest.param(
            ["--resize", "64", "--cropsize", "128"], "--cropsize 128 is larger than --resize 64", marks=pytest.mark.slow
        ),
        pytest.param(["--model_architecture", "resnet19"], "invalid choice: 'resnet19'", marks=pytest.mark.slow),
        pytest.param(
            ["--save_distributoin"],
            "unknown flag --save_distributoin (did you mean --save_distribution?)",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_flags_are_checked_in_one_line_before_torch_loads(tmp_path: Path, flags, message):
    probe = tmp_path / "probe.py"
    probe.write_text(CHECK_FLAGS_WITHOUT_TORCH)
    done = subprocess.run(
        [sys.executable, str(probe), "--data_path", str(tmp_path), *flags],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.split() == ["2", "False"]
    assert done.stderr == f"run_experiment.py: error: {message}; see run_experiment.py --help\n" or (
        message in done.stderr and done.stderr.count("\n") == 1
    )


def test_abbreviations_are_not_taken_for_flags(tmp_path: Path):
    with pytest.raises(SystemExit) as exit_info:
        run_experiment.parse_args(["--data_path", str(tmp_path), "--crop", "300"])
    assert exit_info.value.code == 2


def test_predict_pointed_at_scores_csv_says_what_the_file_is(trained, texture_root: Path, tmp_path: Path, capsys):
    scores = trained.model_dir / "scores.csv"
    assert (
        predict.main(
            [
                "--model",
                str(scores),
                "--input",
                str(texture_root / "brick" / "test" / "good"),
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 1
    )
    assert capsys.readouterr().err == (
        f"error: {scores}: a text file (a CSV or a log?), not a model file; pass a class "
        "results folder or its padim_model.pt\n"
    )


def test_the_summary_shows_a_dash_where_the_csv_is_empty(texture_root: Path, tmp_path: Path, capsys):
    """Only good test images: AUROC is undefined, an empty cell in the CSV, and `-` (not NaN) in the summary."""
    data = tmp_path / "brick"
    shutil.copytree(texture_root / "brick", data)
    for folder in (data / "test").iterdir():
        if folder.name != "good":
            shutil.rmtree(folder)
    capsys.readouterr()
    assert _main("--dataset", "mvtec", "--data_path", str(data), "--base_results_dir", str(tmp_path / "res")) == 0
    out = capsys.readouterr().out
    assert "NaN" not in out and out.splitlines()[1].split()[:2] == ["brick", "-"]


def test_the_summary_counts_stay_whole_numbers_beside_a_failed_class(texture_root: Path, tmp_path: Path, capsys):
    """A failed class leaves its counts empty: the others' n_holdout still prints as 2, not 2.000."""
    data = tmp_path / "data"
    shutil.copytree(texture_root, data)
    for image in (data / "gravel" / "train" / "good").iterdir():
        image.unlink()
    capsys.readouterr()
    assert _main("--dataset", "mvtec", "--data_path", str(data), "--base_results_dir", str(tmp_path / "res")) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:3]}
    assert re.search(r" 2 +0 +ok$", rows["brick"]) and re.search(r" - +- +failed: no training images", rows["gravel"])
