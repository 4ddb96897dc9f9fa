"""predict.py keeps what it scored: rows go out batch by batch, an interrupted run (a real process sent SIGINT)
keeps whole rows, a rerun with the same model and settings scores only the rest; -h and a wrong --input answer
before torch loads; a warning logged under the progress bar gets its own line."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import predict
from tests.helpers import ROOT, Trained
from utils.runtime.output_files import append_csv_rows, read_csv_rows

ONE_BY_ONE = ["--device", "cpu", "--batch_size", "1", "--engine", "torch"]


def noise_images(folder: Path, count: int, size: int = 40) -> Path:
    """`count` small seeded noise PNGs in `folder`."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for number in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{number:04d}.png")
    return folder


def rows_by_path(path: Path) -> dict[str, dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def regions_of(path: Path, paths: set[str]) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if row["path"] in paths]


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def screen_lines(text: str) -> list[str]:
    """What a terminal shows of `text`: each line as its carriage returns leave it (a later part overwrites
    an earlier one from the line's start)."""
    lines = []
    for raw in text.split("\n"):
        shown = ""
        for part in raw.split("\r"):
            shown = part + shown[len(part) :]
        lines.append(shown)
    return lines


def test_appended_rows_read_back_whole_and_a_torn_line_is_left_out(tmp_path):
    path, columns = tmp_path / "rows.csv", ("a", "b")
    append_csv_rows([{"a": "1", "b": "x,y"}], path, columns)
    append_csv_rows([{"a": "2"}, {"a": "3", "b": 'say "hi"'}], path, columns)
    expected = [{"a": "1", "b": "x,y"}, {"a": "2", "b": ""}, {"a": "3", "b": 'say "hi"'}]
    assert read_csv_rows(path, columns) == expected
    assert path.read_text(encoding="utf-8").count("a,b") == 1  # one header
    with path.open("a", encoding="utf-8") as handle:
        handle.write("4,half a ro")  # a power loss mid-write
    assert read_csv_rows(path, columns) == expected
    assert read_csv_rows(path, ("a", "c")) is None
    assert read_csv_rows(tmp_path / "missing.csv", columns) is None


@pytest.mark.parametrize(
    "arguments, status, answer",
    [
        (["-h"], 0, "usage: "),
        (["--model", "m.pt", "--input", "no/such.png"], 1, "error: --input no/such.png: no such file or folder"),
        (["--model", "m.pt", "--input", "no/*.png"], 1, "error: no image found in --input no/*.png"),
    ],
    ids=["help", "missing_file", "nothing_found"],
)
def test_help_and_a_wrong_input_answer_before_torch_loads(arguments, status, answer):
    code = (
        "import sys, predict\n"
        "try:\n    status = predict.main(sys.argv[1:])\nexcept SystemExit as stop:\n    status = stop.code\n"
        "print('torch loaded' if 'torch' in sys.modules else 'no torch', status)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *arguments], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.splitlines()[-1] == f"no torch {status}"
    assert answer in done.stdout + done.stderr


def test_a_warning_under_the_progress_bar_gets_its_own_line(trained: Trained, tmp_path, capsys):
    folder = noise_images(tmp_path / "images", 3)
    (folder / "0001.png").write_bytes(b"not an image")  # read in the second batch, while the bar is shown
    args = ["--model", str(trained.model_dir), "--input", str(folder), "--output", str(tmp_path / "out")]
    capsys.readouterr()
    assert predict.main([*args, *ONE_BY_ONE]) == 0
    lines = screen_lines(capsys.readouterr().err)
    warned = [line for line in lines if "WARNING: skipped" in line]
    assert len(warned) == 1 and "0001.png" in warned[0]
    assert any("predict:" in line and "img" in line for line in lines)  # the bar was shown
    assert not [line for line in lines if "WARNING" in line and ("predict:" in line or "img/s" in line)]


def test_a_rerun_skips_what_the_same_model_and_settings_scored(trained: Trained, tmp_path, capsys):
    """Same model and settings: nothing is scored again (the files stay untouched) and a torn last line is
    scored again; more images: only they are scored; other settings: start over."""
    folder = noise_images(tmp_path / "images", 5)
    output, reference = tmp_path / "out", tmp_path / "reference"
    model = ["--model", str(trained.model_dir), *ONE_BY_ONE]
    args = [*model, "--output", str(output)]
    first = [flag for number in range(3) for flag in ("--input", str(folder / f"{number:04d}.png"))]
    assert predict.main([*args, *first]) == 0
    scored = (output / "predictions.csv").read_text(encoding="utf-8")
    maps = mtimes(output / "heatmaps")
    capsys.readouterr()

    assert predict.main([*args, *first]) == 0
    assert "3 of 3 images scored (3 of them by an earlier run: skipped)" in capsys.readouterr().out
    assert (output / "predictions.csv").read_text(encoding="utf-8") == scored
    assert mtimes(output / "heatmaps") == maps

    lines = scored.splitlines(keepends=True)
    (output / "predictions.csv").write_text("".join(lines[:-1]) + lines[-1][:20], encoding="utf-8")  # torn
    assert predict.main([*args, *first]) == 0
    assert "(2 of them by an earlier run: skipped)" in capsys.readouterr().out
    assert (output / "predictions.csv").read_text(encoding="utf-8") == scored

    assert predict.main([*args, "--input", str(folder)]) == 0
    assert "5 of 5 images scored (3 of them by an earlier run: skipped)" in capsys.readouterr().out
    assert predict.main([*model, "--output", str(reference), "--input", str(folder)]) == 0
    for name in ("predictions.csv", "regions.csv"):
        assert (output / name).read_text(encoding="utf-8") == (reference / name).read_text(encoding="utf-8")
    capsys.readouterr()

    assert predict.main([*args, "--input", str(folder), "--min_region_area", "7"]) == 0
    out, err = capsys.readouterr()
    assert "5 of 5 images scored," in out and "held an earlier prediction: removed" in err


@pytest.mark.slow
def test_an_interrupted_run_keeps_whole_rows_and_a_rerun_scores_only_the_rest(trained: Trained, tmp_path, capsys):
    """A real predict.py process sent SIGINT once rows are written keeps whole rows equal to an uninterrupted
    run's; the rerun skips them (their heat maps untouched) and ends with the uninterrupted run's CSVs."""
    folder = noise_images(tmp_path / "images", 150)
    args = ["--model", str(trained.model_dir), "--input", str(folder), *ONE_BY_ONE]
    reference, output = tmp_path / "reference", tmp_path / "out"
    assert predict.main([*args, "--output", str(reference)]) == 0
    expected = rows_by_path(reference / "predictions.csv")

    process = subprocess.Popen(
        [sys.executable, str(ROOT / "predict.py"), *args, "--output", str(output)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background job (CI started with `&`) ignores SIGINT, and a child inherits that: Python
        # turns SIGINT into KeyboardInterrupt only when it starts with the default disposition
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    csv_path, deadline = output / "predictions.csv", time.monotonic() + 240
    while not (csv_path.is_file() and csv_path.read_text(encoding="utf-8").count("\n") >= 4):
        assert process.poll() is None, "predict.py ended before it could be interrupted"
        assert time.monotonic() < deadline, "predict.py wrote no rows in time"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    last_lines = err[-1500:]
    assert process.returncode == 130, last_lines

    kept = rows_by_path(csv_path)
    assert 3 <= len(kept) < len(expected)
    assert f"interrupted: {csv_path} keeps {len(kept)} of {len(expected)} images" in err, last_lines
    assert all(row == expected[path] for path, row in kept.items())
    assert regions_of(output / "regions.csv", set(kept)) == regions_of(reference / "regions.csv", set(kept))
    names = {row["output_name"] for row in kept.values()}
    kept_maps = {name: mtime for name, mtime in mtimes(output / "heatmaps").items() if name in names}
    assert len(kept_maps) == len(kept)

    capsys.readouterr()
    assert predict.main([*args, "--output", str(output)]) == 0
    assert f"({len(kept)} of them by an earlier run: skipped)" in capsys.readouterr().out
    for name in ("predictions.csv", "regions.csv"):
        assert (output / name).read_text(encoding="utf-8") == (reference / name).read_text(encoding="utf-8")
    assert {name: mtime for name, mtime in mtimes(output / "heatmaps").items() if name in kept_maps} == kept_maps
    assert sorted(p.name for p in (output / "heatmaps").iterdir()) == sorted(
        p.name for p in (reference / "heatmaps").iterdir()
    )
