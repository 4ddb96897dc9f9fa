"""Tests for the BowTie preparation scripts data/convert_excel.py and data/process_data.py.

Fixtures build small XLSX workbooks (title row, differently named header row, messy rows)
and numbered image folders in tmp_path. End-to-end tests run the scripts as a user would
(subprocess, sys.executable); unit tests import their functions.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from openpyxl import Workbook
from PIL import Image

from data import convert_excel, process_data
from datasets import BOWTIE_MARKER
from experiment import choose_layout
from utils.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
CONVERT = ROOT / "data" / "convert_excel.py"
PROCESS = ROOT / "data" / "process_data.py"

# (img, pos, type, comments) as a person types them into the sheet.
ROWS_116 = [
    (1, "L1", "A", None),
    (2.0, "L1", "a", None),  # number stored as float, lower-case type
    (" 3 ", "L2", " A ", None),  # padded cells
    (4, "L2", "R", "Scratch Deep"),
    (5, "L3", "r", None),  # reject without comment -> test/reject
    (6, "L3", "R", "Dent/Bent"),  # slash -> '-'
    (None, "L4", "A", None),  # empty img -> skipped
    (7, "L4", "A", None),  # 007 has no image -> skipped
    (8, "L5", "X", "?"),  # unknown type -> skipped
    (9, "L5", "A", None),  # image is 009.PNG
    (10, "L6", "R", " scratch  deep "),
]
IMAGES_116 = ["001.jpg", "002.jpg", "003.jpg", "004.jpg", "005.jpg", "006.jpg", "008.jpg", "009.PNG", "010.jpg"]
EXPECTED_116 = {
    "train/good": {"001.jpg", "002.jpg", "003.jpg", "009.png"},
    "test/good": set(),
    "test/scratch_deep": {"004.jpg", "010.jpg"},
    "test/reject": {"005.jpg"},
    "test/dent-bent": {"006.jpg"},
}
ROWS_27952G = [(n, "P", "A", None) for n in range(1, 7)] + [(7, "P", "R", "Crack")]
EXPECTED_27952G = {
    "train/good": {f"{n:03d}.jpg" for n in range(1, 7)},
    "test/good": set(),
    "test/crack": {"007.jpg"},
}
TEST_MAP = {"116.csv": "116_zoomed_in", "27952G.csv": "27952G_zoomed_in_more"}


def write_workbook(path: Path, header: list[str], rows: list[tuple]) -> None:
    """A workbook like the real ones: title row, header row, then data rows."""
    book = Workbook()
    sheet = book.active
    sheet.append([f"Inspection {path.stem}"])
    sheet.append(header)
    for row in rows:
        sheet.append(list(row))
    book.save(path)


def write_image(path: Path, seed: int) -> None:
    """A tiny distinct colour image with a bright square, so edges and histograms exist."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 90, size=(32, 32, 3), dtype=np.uint8)
    pixels[8:24, 8:24] = 200 + rng.integers(0, 40, size=3, dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def tree_hashes(root: Path) -> dict[str, str]:
    """Hash of every file under root, to prove a tree was left byte-identical."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def class_listing(class_dir: Path) -> dict[str, set[str]]:
    """File names in each <split>/<category> folder of a class."""
    return {f"{d.parent.name}/{d.name}": {f.name for f in d.iterdir()} for d in class_dir.glob("*/*") if d.is_dir()}


def run_script(script: Path, *args) -> subprocess.CompletedProcess:
    """Run a script as a user would, with this interpreter."""
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def raw_dir(tmp_path: Path) -> Path:
    """Raw BowTie data: two workbooks, their image folders and a two-line map.json."""
    raw = tmp_path / "raw"
    raw.mkdir()
    write_workbook(raw / "116.xlsx", ["Image", "Position", "Result", "Comments", "Inspector"], ROWS_116)
    write_workbook(raw / "27952G.xlsx", ["No.", "Pos", "Type", "Remark"], ROWS_27952G)
    folder = raw / "116_zoomed_in"
    folder.mkdir()
    for seed, name in enumerate(IMAGES_116):
        write_image(folder / name, seed)
    (folder / "notes.txt").write_text("not an image")
    folder = raw / "27952G_zoomed_in_more"
    folder.mkdir()
    for n in range(1, 8):
        write_image(folder / f"{n:03d}.jpg", 100 + n)
    (raw / "map.json").write_text(json.dumps(TEST_MAP))
    return raw


@pytest.fixture
def prepared_dir(raw_dir: Path) -> Path:
    """Raw data with the CSVs already converted, as process_data.py expects it."""
    assert convert_excel.main(["-i", str(raw_dir)]) == 0
    return raw_dir


def sort_args(raw: Path, out: Path, *extra: str) -> list[str]:
    """Command line of a sort-mode run on the fixture data."""
    return ["-i", str(raw), "-o", str(out), "-m", str(raw / "map.json"), *extra]


# ---------------------------------------------------------------- convert_excel.py


@pytest.mark.slow
def test_convert_writes_csv_by_position(raw_dir: Path) -> None:
    result = run_script(CONVERT, "-i", raw_dir)
    assert result.returncode == 0, result.stderr
    for name, rows in (("116", ROWS_116), ("27952G", ROWS_27952G)):
        csv_path = raw_dir / f"{name}.csv"
        assert csv_path.read_text().splitlines()[0] == "img,pos,type,comments"
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
        assert len(table) == len(rows)
        assert (raw_dir / f"{name}.xlsx").exists()
    table = pd.read_csv(raw_dir / "116.csv", dtype=str, keep_default_na=False)
    assert table.loc[5].tolist() == ["6", "L3", "R", "Dent/Bent"]
    assert table.loc[2, "img"] == " 3 "


@pytest.mark.slow
def test_convert_reports_bad_sheets_and_converts_the_rest(raw_dir: Path) -> None:
    write_workbook(raw_dir / "narrow.xlsx", ["Image", "Position", "Result"], [(1, "L", "A")])
    write_workbook(raw_dir / "empty.xlsx", ["img", "pos", "type", "comments"], [])
    result = run_script(CONVERT, "-i", raw_dir, "--remove")
    assert result.returncode != 0
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2
    assert any("narrow.xlsx" in line and "column" in line for line in errors)
    assert any("empty.xlsx" in line and "no data rows" in line for line in errors)
    assert "Traceback" not in result.stderr
    assert {p.name for p in raw_dir.glob("*.csv")} == {"116.csv", "27952G.csv"}
    assert {p.name for p in raw_dir.glob("*.xlsx")} == {"narrow.xlsx", "empty.xlsx"}


def test_convert_selected_sheets_into_other_folder(raw_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "csv"
    before = tree_hashes(raw_dir)
    assert convert_excel.main(["-i", str(raw_dir), "-o", str(out), "-s", "27952G.xlsx"]) == 0
    assert {p.name for p in out.iterdir()} == {"27952G.csv"}
    assert convert_excel.main(["-i", str(raw_dir), "-o", str(out), "-s", "116", "999"]) == 1
    assert {p.name for p in out.iterdir()} == {"116.csv", "27952G.csv"}
    assert tree_hashes(raw_dir) == before


def test_remove_keeps_workbook_when_read_back_fails(raw_dir: Path, monkeypatch) -> None:
    def fail(dest: Path, expected_rows: int) -> None:
        raise convert_excel.SheetError("simulated read-back failure")

    monkeypatch.setattr(convert_excel, "verify_csv", fail)
    assert convert_excel.main(["-i", str(raw_dir), "-s", "116", "--remove"]) == 1
    assert (raw_dir / "116.xlsx").exists()


def test_a_failed_csv_write_is_one_line_and_leaves_no_half_file(raw_dir: Path, monkeypatch, capsys) -> None:
    def full_disk(table: pd.DataFrame, path: Path, index: bool) -> None:
        Path(path).write_text("img,pos,ty")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)
    assert convert_excel.main(["-i", str(raw_dir), "-s", "116", "--remove"]) == 1
    error = capsys.readouterr().err
    assert error == f"convert_excel.py: error: 116.xlsx: cannot write {raw_dir / '116.csv'}: No space left on device\n"
    assert not [p for p in raw_dir.iterdir() if p.suffix in (".csv", ".tmp")]
    assert (raw_dir / "116.xlsx").exists()


def test_read_sheet_ignores_header_names_and_blank_rows(tmp_path: Path) -> None:
    path = tmp_path / "x.xlsx"
    write_workbook(
        path,
        ["Nr", "Where", "Verdict", "Notes", "Extra"],
        [(1, "a", "A", None, "z"), (None, None, None, None), (2, "b", "R", "hole", None)],
    )
    table = convert_excel.read_sheet(path)
    assert list(table.columns) == ["img", "pos", "type", "comments"]
    assert table["img"].tolist() == [1, 2]


# ---------------------------------------------------------------- map.json and helpers


def test_shipped_map_json() -> None:
    mapping = json.loads((ROOT / "data" / "map.json").read_text())
    lines = ["116", "117", "118", "119", "120", "121", "27952F", "27952G", "27952H", "27952J"]
    expected = {f"{line}.csv": f"{line}_zoomed_in" for line in lines}
    expected["27952G.csv"] = "27952G_zoomed_in_more"
    assert mapping == expected
    assert process_data.load_map(ROOT / "data" / "map.json") == expected


@pytest.mark.parametrize(
    "text, number",
    [
        ("7", 7),
        (" 7 ", 7),
        ("7.0", 7),
        ("007", 7),
        ("1000", 1000),
        ("7.5", None),
        ("abc", None),
        ("-1", None),
        ("nan", None),
    ],
)
def test_parse_img_number(text: str, number: int | None) -> None:
    assert process_data.parse_img_number(text) == number


@pytest.mark.parametrize(
    "comment, folder",
    [
        ("Scratch Deep", "scratch_deep"),
        (" Dent/Bent ", "dent-bent"),
        ("", "reject"),
        ("  ", "reject"),
        ("..", "reject"),
        ("Good", "reject"),
        ("a\\b", "a-b"),
    ],
)
def test_defect_folder(comment: str, folder: str) -> None:
    assert process_data.defect_folder(comment) == folder


@pytest.mark.parametrize("sigma", ["0", "-1", "inf", "nan"])
def test_canny_sigma_must_be_a_finite_positive_number(prepared_dir: Path, tmp_path: Path, sigma: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        process_data.main(sort_args(prepared_dir, tmp_path / "out", "--canny", "--canny-sigma", sigma))
    assert exit_info.value.code == 2


def test_the_scripts_do_not_load_torch() -> None:
    """They share the repository's torch-free helpers (utils.cli, datasets, utils.runtime.output_files)."""
    check = "import sys; from data import convert_excel, process_data; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], cwd=ROOT, timeout=120, check=False).returncode == 0


def test_held_out_is_seeded_and_keeps_one_for_training() -> None:
    stems = [f"{n:03d}" for n in range(10)]
    first = process_data.held_out(stems, 0.3, seed=5)
    assert len(first) == 3
    assert process_data.held_out(list(reversed(stems)), 0.3, seed=5) == first
    assert process_data.held_out(["001"], 0.9, seed=0) == set()


# ---------------------------------------------------------------- sort mode


@pytest.mark.slow
def test_sort_end_to_end(prepared_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sorted"
    before = tree_hashes(prepared_dir)
    result = run_script(PROCESS, *sort_args(prepared_dir, out))
    assert result.returncode == 0, result.stderr
    assert tree_hashes(prepared_dir) == before
    assert sorted(p.name for p in out.iterdir()) == ["116", "27952G"]
    assert class_listing(out / "116") == EXPECTED_116
    assert class_listing(out / "27952G") == EXPECTED_27952G
    source = prepared_dir / "116_zoomed_in" / "009.PNG"
    assert (out / "116" / "train" / "good" / "009.png").read_bytes() == source.read_bytes()
    report = result.stdout
    assert "skipped" in report
    for reason in ("empty img", "no image 007", "unknown type 'X'"):
        assert reason in report
    table_line = next(line for line in report.splitlines() if line.startswith("116 "))
    assert table_line.split()[1:] == ["4", "0", "0", "1", "1", "2", "3"]


def test_sort_reads_float_and_padded_img_cells(prepared_dir: Path, tmp_path: Path) -> None:
    (prepared_dir / "27952G.csv").write_text('img,pos,type,comments\n1.0,P,a,\n" 2 ",P, A ,\n3,P,R,\n')
    out = tmp_path / "sorted"
    assert process_data.main(sort_args(prepared_dir, out)) == 0
    assert class_listing(out / "27952G") == {
        "train/good": {"001.jpg", "002.jpg"},
        "test/good": set(),
        "test/reject": {"003.jpg"},
    }


def test_rerun_refused_then_overwrite_rebuilds(prepared_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sorted"
    assert process_data.main(sort_args(prepared_dir, out)) == 0
    stale = out / "116" / "test" / "old_defect" / "999.jpg"
    stale.parent.mkdir()
    stale.write_bytes(b"stale")
    unrelated = out / "keep_me.txt"
    unrelated.write_text("not output")
    capsys.readouterr()
    assert process_data.main(sort_args(prepared_dir, out)) == 1
    error = capsys.readouterr().err
    assert "not empty" in error and "--overwrite" in error
    assert stale.exists()
    assert process_data.main(sort_args(prepared_dir, out, "--overwrite")) == 0
    assert not stale.exists()
    assert unrelated.read_text() == "not output"
    assert class_listing(out / "116") == EXPECTED_116
    assert sorted(p.name for p in out.iterdir()) == ["116", "27952G", "keep_me.txt"]


def test_output_inside_input_refused(prepared_dir: Path, capsys) -> None:
    for out in (prepared_dir, prepared_dir / "sorted"):
        assert process_data.main(sort_args(prepared_dir, out, "--overwrite")) == 1
        assert "inside" in capsys.readouterr().err
    assert not (prepared_dir / "sorted").exists()


def test_split_is_reproducible(prepared_dir: Path, tmp_path: Path) -> None:
    listings = []
    for run in ("a", "b"):
        out = tmp_path / run
        args = sort_args(prepared_dir, out, "--split-ratio", "0.5", "--seed", "3")
        assert process_data.main(args) == 0
        listings.append({name: class_listing(out / name) for name in ("116", "27952G")})
    assert listings[0] == listings[1]
    line = listings[0]["27952G"]
    assert len(line["test/good"]) == 3 and len(line["train/good"]) == 3
    assert line["test/good"] | line["train/good"] == EXPECTED_27952G["train/good"]
    assert len(listings[0]["116"]["test/good"]) == 2


@pytest.mark.slow
def test_user_errors_are_one_line(prepared_dir: Path, tmp_path: Path, capsys) -> None:
    result = run_script(PROCESS, "-i", tmp_path / "nowhere", "-o", tmp_path / "o1")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    bad_map = tmp_path / "bad.json"
    bad_map.write_text('{"116.csv": ')
    missing_map = tmp_path / "missing.json"
    missing_map.write_text(json.dumps({"116.csv": "116_zoomed_in", "118.csv": "118_zoomed_in"}))
    cases = [
        (["-m", str(bad_map)], "not valid JSON"),
        (["-m", str(missing_map)], "118.csv"),
        (["-m", str(ROOT / "data" / "map.json")], "117.csv"),
    ]
    for extra, message in cases:
        args = ["-i", str(prepared_dir), "-o", str(tmp_path / "o2"), *extra]
        assert process_data.main(args) == 1
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and message in error
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# ---------------------------------------------------------------- preprocessing


@pytest.mark.slow
def test_grayscale_and_canny_write_edge_pngs(prepared_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "edges"
    result = run_script(PROCESS, *sort_args(prepared_dir, out, "--grayscale", "--canny", "--canny-sigma", "1.5"))
    assert result.returncode == 0, result.stderr
    files = sorted(f for f in (out / "116").rglob("*.*") if f.name != BOWTIE_MARKER)
    assert len(files) == 8 and all(f.suffix == ".png" for f in files)
    assert (out / "116" / BOWTIE_MARKER).is_file()
    for path in files:
        with Image.open(path) as image:
            assert image.mode == "L"
            pixels = np.asarray(image)
        assert set(np.unique(pixels)) == {0, 255}


def test_equalization_flags_and_unreadable_image(prepared_dir: Path, tmp_path: Path, capsys) -> None:
    (prepared_dir / "27952G_zoomed_in_more" / "002.jpg").write_bytes(b"not a jpeg")
    for run, flags in (
        ("local", ["--equalize-local", "--equalize-disk-size", "3"]),
        ("global", ["--grayscale", "--equalize-global"]),
    ):
        out = tmp_path / run
        assert process_data.main(sort_args(prepared_dir, out, *flags)) == 0
        report = capsys.readouterr().out.splitlines()
        assert any("002.jpg" in line and "cannot read image" in line for line in report)
        listing = class_listing(out / "27952G")
        assert listing["train/good"] == {f"{n:03d}.png" for n in (1, 3, 4, 5, 6)}
        with Image.open(out / "27952G" / "train" / "good" / "001.png") as image:
            assert image.mode == ("RGB" if run == "local" else "L")
            assert image.size == (32, 32)
            pixels = np.asarray(image)
        assert pixels.max() == 255


def test_processing_steps_on_arrays() -> None:
    rng = np.random.default_rng(0)
    colour = rng.integers(60, 120, size=(32, 32, 3), dtype=np.uint8)
    equalized = process_data.Processing(equalize_global=True).apply(colour, normalize=False)
    assert equalized.shape == colour.shape and equalized.max() == 255 and equalized.min() < 10
    local = process_data.Processing(equalize_local=True, equalize_disk_size=4).apply(colour, False)
    assert local.shape == colour.shape and local.dtype == np.uint8
    grey = colour[..., 0].copy()
    grey[8:24, 8:24] = 250
    edges = process_data.Processing(canny=True).apply(grey, normalize=False)
    assert set(np.unique(edges)) == {0, 255}
    reference = rng.integers(150, 250, size=(20, 20), dtype=np.uint8)
    matched = process_data.Processing(reference=reference).apply(grey, normalize=True)
    assert abs(float(matched.mean()) - float(reference.mean())) < 10


# ---------------------------------------------------------------- combine mode


def make_sorted_tree(root: Path, classes: list[str]) -> None:
    """A hand-made sorted tree: each class has 2 train/good, 1 test/good, 1 test/crack image."""
    for offset, name in enumerate(classes):
        for seed, rel in enumerate(
            ["train/good/001.jpg", "train/good/002.jpg", "test/good/003.jpg", "test/crack/004.jpg"]
        ):
            path = root / name / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            write_image(path, 10 * offset + seed)


@pytest.mark.slow
def test_combine_end_to_end(prepared_dir: Path, tmp_path: Path) -> None:
    sorted_dir = tmp_path / "sorted"
    assert process_data.main(sort_args(prepared_dir, sorted_dir, "--split-ratio", "0.25")) == 0
    before = tree_hashes(sorted_dir)
    out = tmp_path / "combined"
    result = run_script(PROCESS, "--combine", "11", "27952G", "-i", sorted_dir, "-o", out)
    assert result.returncode == 0, result.stderr
    assert tree_hashes(sorted_dir) == before
    assert [p.name for p in out.iterdir()] == ["116_27952G"]
    assert (out / "116_27952G" / BOWTIE_MARKER).is_file()
    listing = class_listing(out / "116_27952G")
    expected: dict[str, set[str]] = {}
    for source in ("116", "27952G"):
        for folder, names in class_listing(sorted_dir / source).items():
            expected.setdefault(folder, set()).update(f"{source}_{name}" for name in names)
    assert listing == expected
    assert {folder: len(names) for folder, names in listing.items()} == {
        "train/good": 7,
        "test/good": 3,
        "test/scratch_deep": 2,
        "test/reject": 1,
        "test/dent-bent": 1,
        "test/crack": 1,
    }


@pytest.mark.slow
def test_combine_name_errors(tmp_path: Path, capsys) -> None:
    sorted_dir = tmp_path / "sorted"
    make_sorted_tree(sorted_dir, ["116", "27952F", "27952G"])
    out = tmp_path / "out"
    result = run_script(PROCESS, "--combine", "2795", "116", "-i", sorted_dir, "-o", out)
    assert result.returncode == 1
    assert "ambiguous" in result.stderr and "27952F" in result.stderr and "27952G" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert process_data.main(["--combine", "999", "-i", str(sorted_dir), "-o", str(out)]) == 1
    assert "no class '999'" in capsys.readouterr().err
    assert process_data.main(["--combine", "116", "11", "-i", str(sorted_dir), "-o", str(out)]) == 1
    assert "named twice" in capsys.readouterr().err
    assert not out.exists()


def test_combine_named_and_normalized(tmp_path: Path) -> None:
    sorted_dir = tmp_path / "sorted"
    make_sorted_tree(sorted_dir, ["116", "27952F", "27952G"])
    out = tmp_path / "out"
    args = [
        "--combine",
        "27952F",
        "27952G",
        "-i",
        str(sorted_dir),
        "-o",
        str(out),
        "--name",
        "lines_F_G",
        "--normalize",
        "--norm-reference",
        "27952G",
    ]
    assert process_data.main(args) == 0
    listing = class_listing(out / "lines_F_G")
    assert listing["train/good"] == {"27952F_001.png", "27952F_002.png", "27952G_001.jpg", "27952G_002.jpg"}
    assert listing["test/crack"] == {"27952F_004.png", "27952G_004.jpg"}
    copied = out / "lines_F_G" / "train" / "good" / "27952G_001.jpg"
    original = sorted_dir / "27952G" / "train" / "good" / "001.jpg"
    assert copied.read_bytes() == original.read_bytes()


def test_sort_uses_the_input_folders_own_map_by_default(prepared_dir: Path, tmp_path: Path) -> None:
    """The shipped data/map.json names ten other lines: a raw folder's own map.json must win without -m."""
    out = tmp_path / "sorted"
    assert process_data.main(["-i", str(prepared_dir), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(name).stem for name in TEST_MAP)


def test_missing_sources_get_the_hint_that_fixes_them(raw_dir: Path, tmp_path: Path, capsys) -> None:
    """Workbooks not yet converted: run convert_excel.py; folders the map names but the input lacks: another map."""
    assert process_data.main(sort_args(raw_dir, tmp_path / "a")) == 1
    assert "(make the CSVs with convert_excel.py)" in capsys.readouterr().err
    assert convert_excel.main(["-i", str(raw_dir)]) == 0
    capsys.readouterr()
    assert (
        process_data.main(["-i", str(raw_dir), "-o", str(tmp_path / "b"), "-m", str(ROOT / "data" / "map.json")]) == 1
    )
    assert (
        f"(is {ROOT / 'data' / 'map.json'} this folder's map? pass its own with -m MAP_JSON)" in capsys.readouterr().err
    )


def test_sorted_class_folders_carry_the_marker_that_dataset_auto_reads_as_bowtie(prepared_dir: Path, tmp_path: Path):
    out = tmp_path / "sorted"
    assert process_data.main(sort_args(prepared_dir, out)) == 0
    for name in ("116", "27952G"):
        marker = json.loads((out / name / BOWTIE_MARKER).read_text())
        assert marker["layout"] == "bowtie" and marker["written_by"] == "data/process_data.py"
    assert choose_layout(RunConfig(out, ()))[0] == "bowtie"
    items, skips = process_data.plan_combine(out, ["116", "27952G"], set())
    assert skips == [] and all(item.source.name != BOWTIE_MARKER for item in items)  # combine passes it over
