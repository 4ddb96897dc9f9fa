"""The data layouts: the folder layout, the CSV manifest (VisA's header and the minimal form), `--dataset
auto`, and the same results whatever the layout the same images come in."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest

import experiment
import run_experiment
from data.demo_data import DEFECTS, make_demo_dataset
from datasets import BOWTIE_MARKER
from datasets.manifest import manifest_files
from datasets.split import DataError, folder_layout_files
from experiment import choose_layout
from tests.helpers import SMALL_MODEL_FLAGS
from utils.config import FolderLayout, RunConfig

RUN = [*SMALL_MODEL_FLAGS, "--no_report", "--device", "cpu", "--results_subdir", "r"]
TIMINGS = ["fit_seconds", "eval_seconds"]


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> Path:
    """One small texture class in the MVTec layout (train/good, test/good, test/<defect>, ground_truth)."""
    return make_demo_dataset(
        tmp_path_factory.mktemp("mvtec"), textures=("brick",), n_train=20, n_test_good=5, n_test_defect=4, size=64
    )


def write_manifest(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def folder_copy(brick: Path, root: Path) -> Path:
    """The MVTec class's images as a folder layout of other names: good/, good_test/, defects/<type>/, and
    masks/<type>/<stem>.png (no _mask suffix)."""
    shutil.copytree(brick / "train" / "good", root / "good")
    shutil.copytree(brick / "test" / "good", root / "good_test")
    for defect in DEFECTS:
        shutil.copytree(brick / "test" / defect, root / "defects" / defect)
        (root / "masks" / defect).mkdir(parents=True)
        for mask in (brick / "ground_truth" / defect).iterdir():
            shutil.copy(mask, root / "masks" / defect / mask.name.replace("_mask", ""))
    return root


def manifest_rows(brick: Path, base: Path) -> list[list[str]]:
    """image,split,label,mask,class,defect rows for the MVTec class: relative to `base`, but the test normals
    absolute, so both kinds of path are read; rows in an order of their own (the split must not depend on it)."""
    rows = []
    for path in sorted((brick / "train" / "good").iterdir(), reverse=True):
        rows.append([str(path.relative_to(base)), "train", "normal", "", "brick", ""])
    for path in sorted((brick / "test" / "good").iterdir()):
        rows.append([str(path), "test", "good", "", "brick", ""])
    for defect in reversed(DEFECTS):
        for path in sorted((brick / "test" / defect).iterdir()):
            mask = brick / "ground_truth" / defect / f"{path.stem}_mask.png"
            rows.append([str(path.relative_to(base)), "test", "anomaly", str(mask.relative_to(base)), "brick", defect])
    return rows


def run_results(flags: list[str], results: Path) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    code = run_experiment.main([*RUN, *flags, "--base_results_dir", str(results)])
    assert code == 0
    master = pd.read_csv(results / "r" / "master_results.csv").drop(columns=TIMINGS)
    scores = pd.read_csv(results / "r" / "brick" / "scores.csv")
    scores["path"] = [Path(path).name for path in scores.path]  # each layout has its own folders
    return master, scores, (results / "r" / "experiment.json").read_text()


@pytest.mark.slow
def test_the_same_images_give_the_same_results_in_every_layout(mvtec_root: Path, tmp_path: Path, capsys):
    brick = mvtec_root / "brick"
    folders = folder_copy(brick, tmp_path / "line")
    manifest = write_manifest(
        tmp_path / "lists" / "brick.csv",
        ["image", "split", "label", "mask", "class", "defect"],
        manifest_rows(brick, mvtec_root),
    )
    mvtec = run_results(["--data_path", str(brick)], tmp_path / "mvtec")
    assert "dataset: mvtec (found: class folders with train/ and test/" in capsys.readouterr().out
    folder_flags = ["--normal_dir", str(folders / "good"), "--normal_test_dir", str(folders / "good_test")]
    folder_flags += ["--abnormal_dir", *(str(folders / "defects" / d) for d in DEFECTS)]
    folder_flags += ["--mask_dir", str(folders / "masks"), "--class_name", "brick"]
    folder = run_results(folder_flags, tmp_path / "folder")
    assert "dataset: folder (--normal_dir given)" in capsys.readouterr().out
    listed = run_results(
        ["--dataset", "csv", "--manifest", str(manifest), "--data_path", str(mvtec_root)], tmp_path / "csv"
    )
    assert '"dataset": "csv"' in listed[2] and '"dataset": "folder"' in folder[2] and '"dataset": "mvtec"' in mvtec[2]
    assert mvtec[0].status[0] == "ok" and mvtec[0].n_test[0] == 5 + 4 * len(DEFECTS)
    assert mvtec[0].pixel_roc_auc.notna().all()  # the masks were read in every layout, not just counted
    for other in (folder, listed):
        pd.testing.assert_frame_equal(other[0], mvtec[0], check_exact=True)
        pd.testing.assert_frame_equal(other[1], mvtec[1], check_exact=True)


def test_folder_layout_lists_types_masks_and_moves_a_share_without_test_normals(
    mvtec_root: Path, tmp_path: Path, caplog
):
    folders = folder_copy(mvtec_root / "brick", tmp_path / "line")
    (folders / "masks" / "scratch" / "001.png").unlink()
    (folders / "masks" / "scratch" / "002.png").rename(folders / "masks" / "scratch" / "002_mask.png")
    layout = FolderLayout(folders / "good", (folders / "defects" / "scratch",), mask_dir=folders / "masks")
    with caplog.at_level(logging.WARNING):
        files = folder_layout_files(layout)
    assert files.name == "line" and files.moves_train_share and files.has_ground_truth
    masks = {sample.path.name: sample.mask_path for sample in files.test}
    assert masks["001.png"] is None and masks["002.png"].name == "002_mask.png" and masks["000.png"].name == "000.png"
    assert {sample.defect for sample in files.test} == {"scratch"} and len(files.train) == 20
    assert "1 defect images have no mask in" in caplog.text and "001.png" in caplog.text
    with pytest.raises(DataError, match="is not a folder"):
        folder_layout_files(FolderLayout(folders / "nope", (folders / "defects" / "scratch",)))


def test_visa_manifest_as_it_ships(mvtec_root: Path, tmp_path: Path):
    """VisA's split_csv/1cls.csv: object,split,label,image,mask with paths from the dataset's root, which
    lies above the CSV's folder (given by --data_path)."""
    brick = mvtec_root / "brick"
    rows = [
        ["brick", "train", "normal", str(p.relative_to(mvtec_root)), ""]
        for p in sorted((brick / "train" / "good").iterdir())
    ]
    rows += [
        ["brick", "test", "normal", str(p.relative_to(mvtec_root)), ""]
        for p in sorted((brick / "test" / "good").iterdir())
    ]
    for path in sorted((brick / "test" / "scratch").iterdir()):
        mask = brick / "ground_truth" / "scratch" / f"{path.stem}_mask.png"
        rows.append(["brick", "test", "anomaly", str(path.relative_to(mvtec_root)), str(mask.relative_to(mvtec_root))])
    manifest = write_manifest(
        mvtec_root / "split_csv" / "1cls.csv", ["object", "split", "label", "image", "mask"], rows
    )
    [files] = manifest_files(manifest, mvtec_root)
    assert files.name == "brick" and len(files.train) == 20 and files.has_ground_truth and not files.moves_train_share
    assert [sample.label for sample in files.test] == [0] * 5 + [1] * 4
    assert all(sample.mask_path.is_file() for sample in files.test if sample.label)
    assert {sample.defect for sample in files.test if sample.label} == {"anomaly"}
    with pytest.raises(DataError, match=r"29 bad rows .*the first: line 2: image brick/train/good/000.png not found"):
        manifest_files(manifest)  # from the CSV's own folder the paths do not resolve: every row is named


def test_a_manifest_with_bad_rows_is_refused_before_any_work_naming_each_line(mvtec_root: Path, tmp_path: Path, capsys):
    good = sorted((mvtec_root / "brick" / "train" / "good").iterdir())
    defect = mvtec_root / "brick" / "test" / "scratch" / "000.png"
    rows = [
        [str(good[0]), "train", "normal", ""],
        [str(good[1]), "train", "normal", str(defect)],  # 3: a mask for a normal image
        ["missing.png", "test", "normal", ""],  # 4: no such file
        [str(good[2]), "validation", "normal", ""],  # 5: unknown split
        [str(good[3]), "test", "defective", ""],  # 6: unknown label
        [str(defect), "train", "anomaly", ""],  # 7: an anomaly to train on
        [str(good[0]), "test", "normal", ""],  # 8: listed twice
    ]
    manifest = write_manifest(tmp_path / "bad.csv", ["image", "split", "label", "mask"], rows)
    results = tmp_path / "results"
    code = run_experiment.main([*RUN, "--manifest", str(manifest), "--base_results_dir", str(results)])
    assert code == 1
    err = capsys.readouterr().err
    for expected in (
        "line 3: a mask (",
        "line 4: image missing.png not found",
        "line 5: unknown split 'validation'",
        "line 6: unknown label 'defective'",
        "line 7: an anomaly in the train split",
        "line 8: image",
    ):
        assert expected in err
    assert err.strip().splitlines()[-1].startswith(f"error: manifest {manifest}: 6 bad rows")
    assert not results.exists()  # stopped before any work


@pytest.mark.parametrize(
    ("header", "message"),
    [(["path", "split", "label"], "no image column"), (["image", "split", "label", "object", "class"], "both")],
)
def test_a_manifest_without_its_columns_says_which_forms_are_read(tmp_path: Path, header, message):
    manifest = write_manifest(tmp_path / "m.csv", header, [["a.png", "train", "normal", "x", "y"][: len(header)]])
    with pytest.raises(DataError, match=message):
        manifest_files(manifest)


def test_auto_finds_mvtec_bowtie_or_names_the_layouts(mvtec_root: Path, tmp_path: Path):
    def chosen(path: Path) -> str:
        return choose_layout(RunConfig(path, ()))[0]

    assert chosen(mvtec_root) == "mvtec" and chosen(mvtec_root / "brick") == "mvtec"
    bowtie = tmp_path / "prepared"
    shutil.copytree(mvtec_root / "brick", bowtie / "line_a")
    shutil.copytree(mvtec_root / "brick", bowtie / "line_b")
    (bowtie / "line_a" / BOWTIE_MARKER).write_text("{}")
    with pytest.raises(DataError, match="1 of 2 class folders .* choose --dataset bowtie or --dataset mvtec"):
        chosen(bowtie)
    (bowtie / "line_b" / BOWTIE_MARKER).write_text("{}")
    assert chosen(bowtie) == "bowtie" and chosen(bowtie / "line_a") == "bowtie"
    flat = tmp_path / "flat"
    flat.mkdir()
    with pytest.raises(
        DataError, match=r"no layout found: use --dataset mvtec .*--dataset folder --normal_dir .*--manifest"
    ):
        chosen(flat)
    assert choose_layout(RunConfig(mvtec_root, (), manifest=tmp_path / "m.csv"))[0] == "csv"


def test_auto_runs_a_bowtie_folder_as_bowtie(mvtec_root: Path, tmp_path: Path, capsys):
    prepared = tmp_path / "prepared" / "line"
    shutil.copytree(mvtec_root / "brick", prepared)
    (prepared / BOWTIE_MARKER).write_text("{}")
    config = run_experiment.parse_args([*RUN, "--data_path", str(prepared)])
    config, reason = experiment.with_layout(config)
    assert config.fit.layout == "bowtie" and BOWTIE_MARKER in reason
    assert config.results_folder(config.models[0]).name == "r"
    assert config.identity(config.models[0])["test_sample_ratio"] == 0.2  # the BowTie share is recorded


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--dataset", "mvtec", "--normal_dir", "g", "--abnormal_dir", "d"],
            "--normal_dir --abnormal_dir: only with --dataset folder",
        ),
        (["--dataset", "csv"], "--dataset csv needs --manifest FILE"),
        (["--dataset", "folder", "--normal_dir", "g"], "the folder layout needs --normal_dir DIR and --abnormal_dir"),
        (["--manifest", "m.csv", "--normal_dir", "g"], "exclude each other"),
        (["--data_path", ".", "--class_name", "x"], "--class_name: only with the folder layout or --manifest"),
        (["--data_path", ".", "--max_image_pixels", "-1"], "--max_image_pixels"),
    ],
)
def test_layout_flags_that_cannot_go_together_fail_before_torch_loads(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_experiment.parse_args(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
