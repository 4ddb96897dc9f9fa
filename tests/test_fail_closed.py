"""Fail closed: a damaged model, a NaN, a failed write or a second run never reads as a good result."""

from __future__ import annotations

import csv
import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import predict
import prediction
import run_experiment
import trainer
from tests.helpers import CPU_RUN_INTO_R_FLAGS, PREDICT_FLAGS, ROOT, Trained
from utils.padim.model import Padim
from utils.padim.model_file import (
    MODEL_FORMAT_VERSION,
    ModelFileError,
    content_checksum,
    entry_types,
    load_model,
    save_model,
)
from utils.runtime import output_files

METRIC_COLUMNS = ["roc_auc", "precision", "recall", "f1_score", "pr_auc", "pixel_roc_auc", "pixel_aupro", "f1_max"]


def _record_spans(path: Path) -> dict[str, tuple[int, int]]:
    """Byte span of each zip record's data, by its name inside the archive (data.pkl, data/0, ...)."""
    spans = {}
    with zipfile.ZipFile(path) as archive, path.open("rb") as handle:
        for info in archive.infolist():
            handle.seek(info.header_offset + 26)
            name_length, extra_length = (int.from_bytes(handle.read(2), "little") for _ in range(2))
            start = info.header_offset + 30 + name_length + extra_length
            spans[info.filename.split("/", 1)[1]] = (start, start + info.compress_size)
    return spans


def _mutations(original: bytes, spans: dict[str, tuple[int, int]], seed: int = 0) -> list[tuple[str, bytes]]:
    """At least 100 damaged copies of a model file, each differing from it; kinds as a bad disk or copy makes them."""
    rng = np.random.default_rng(seed)
    tensors = [span for name, span in spans.items() if name.startswith("data/")]

    def flipped(low: int, high: int) -> bytes:
        data = bytearray(original)
        data[int(rng.integers(low, high))] ^= 1 << int(rng.integers(0, 8))
        return bytes(data)

    def zeroed() -> bytes:
        while True:
            start, length = int(rng.integers(0, len(original))), int(rng.integers(16, 4096))
            if any(original[start : start + length]):
                data = bytearray(original)
                data[start : start + length] = bytes(len(data[start : start + length]))
                return bytes(data)

    def swapped() -> bytes:
        first, second = (tensors[i] for i in rng.choice(len(tensors), 2, replace=False))
        i, j = int(rng.integers(first[0], first[1] - 64)), int(rng.integers(second[0], second[1] - 64))
        data = bytearray(original)
        data[i : i + 64], data[j : j + 64] = original[j : j + 64], original[i : i + 64]
        return bytes(data)

    cases = [("empty", b"")]
    cases += [("truncated", original[: int(rng.integers(0, len(original)))]) for _ in range(20)]
    cases += [("bit in tensor data", flipped(*tensors[int(rng.integers(len(tensors)))])) for _ in range(25)]
    cases += [("bit in metadata", flipped(*spans["data.pkl"])) for _ in range(25)]
    cases += [("zeroed block", zeroed()) for _ in range(15)]
    cases += [("swapped records", swapped()) for _ in range(10)]
    cases += [
        ("appended bytes", original + rng.integers(0, 256, int(rng.integers(1, 300)), dtype=np.uint8).tobytes())
        for _ in range(10)
    ]
    assert all(data != original for _, data in cases)
    return cases


def _first_of_each_kind(cases: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    first: dict[str, bytes] = {}
    for kind, data in cases:
        first.setdefault(kind, data)
    return list(first.items())


@pytest.mark.parametrize("every_case", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["each_kind", "all"])
def test_damaged_model_files_are_refused_with_one_line(
    trained: Trained, texture_root: Path, tmp_path: Path, capsys, every_case
):
    """Fuzzed copies of a real model file: each one refused by predict.py with one `error:` line and exit 1
    (the fast tier tries the first copy of each kind of damage)."""
    source = trained.model_dir / "padim_model.pt"
    cases = _mutations(source.read_bytes(), _record_spans(source))
    assert len(cases) >= 100
    if not every_case:
        cases = _first_of_each_kind(cases)
    image = texture_root / "brick" / "test" / "good" / "000.png"
    damaged = tmp_path / "model" / "padim_model.pt"
    damaged.parent.mkdir()
    for number, (kind, data) in enumerate(cases):
        damaged.write_bytes(data)
        capsys.readouterr()
        code = predict.main(
            ["--model", str(damaged), "--input", str(image), "--output", str(tmp_path / f"out{number}"), *PREDICT_FLAGS]
        )
        err = capsys.readouterr().err.strip()
        assert code == 1, kind
        assert err.startswith(f"error: {damaged}: ") and "\n" not in err, (kind, err)
        assert not (tmp_path / f"out{number}").exists()


@pytest.mark.parametrize("flips_per_gap", [2, pytest.param(20, marks=pytest.mark.slow)])
def test_flips_in_zip_bookkeeping_are_refused_or_leave_the_model_identical(
    trained: Trained, tmp_path: Path, flips_per_gap
):
    """Some header bytes (timestamps, alignment padding, duplicated sizes) are read by nobody: a flip there
    may be accepted, but only when every tensor and value loads exactly as saved."""
    source = trained.model_dir / "padim_model.pt"
    original = source.read_bytes()
    expected = load_model(source)
    spans = sorted(_record_spans(source).values())
    gaps = [(end, start) for (_, end), (start, _) in zip([(0, 0)] + spans, spans + [(len(original), len(original))])]
    rng = np.random.default_rng(1)
    damaged, refused = tmp_path / "padim_model.pt", 0
    for low, high in gaps:
        for position in rng.choice(np.arange(low, high), min(flips_per_gap, high - low), replace=False):
            data = bytearray(original)
            data[position] ^= 1 << int(rng.integers(0, 8))
            damaged.write_bytes(bytes(data))
            try:
                loaded = load_model(damaged)
            except ModelFileError:
                refused += 1
                continue
            assert loaded["checksum"] == expected["checksum"] == content_checksum(loaded)
            assert all(torch.equal(a, b) for a, b in zip(loaded["precision_factor"], expected["precision_factor"]))
    assert refused > 0


ODD_ENTRIES = [(key, None) for key in entry_types(MODEL_FORMAT_VERSION) if key not in ("checksum", "resize_width")] + [
    ("layers", [1, 2, 3]),
    ("normalization_mean", ["a", "b", "c"]),
    ("normalization_std", [0.2]),
    ("grid", [0, -1]),
    ("grid", ["14", 14]),
    ("channel_index", torch.zeros(0)),
    ("channel_index", torch.full((100,), 10**6)),
    ("mean", torch.zeros(3)),
    ("precision_factor", [torch.zeros(2)]),
    ("precision_factor", ["x"]),
    ("resize", -5),
    ("cropsize", 10**6),
    ("resize_width", 0),
    ("resize_width", "512"),
    ("resize_width", 512),  # a height x width input with the model's centre crop
    ("threshold", -1.0),
    ("threshold", float("inf")),
    ("training_config", {"seed": "x"}),
    ("training_config", {"seed": 1024, "covariance": "shrunk"}),
    ("training_config", {"seed": 1024, "epsilon": -1.0}),
    ("sums_fourth", "x"),
    ("n_train", True),
]


FAST_ODD_ENTRIES = {"backbone=None", "grid=[0, -1]", "precision_factor=['x']", "threshold=inf", "n_train=True"}
FAST_ODD_ENTRIES |= {"training_config={'seed': 1024, 'covarian", "sums_fourth='x'"}
ODD_ENTRY_CASES = [
    pytest.param(key, value, id=name, marks=() if name in FAST_ODD_ENTRIES else pytest.mark.slow)
    for key, value, name in ((key, value, f"{key}={value!r}"[:40]) for key, value in ODD_ENTRIES)
]


@pytest.mark.parametrize("key, value", ODD_ENTRY_CASES)
def test_sealed_files_with_odd_entries_are_refused_with_one_line(
    trained: Trained, texture_root: Path, tmp_path: Path, capsys, key, value
):
    """Content that passes the checksum because it was sealed as it is (hand-made): still one line,
    never a traceback."""
    content = {
        k: v for k, v in torch.load(trained.model_dir / "padim_model.pt", weights_only=True).items() if k != "checksum"
    }
    model = tmp_path / "model" / "padim_model.pt"
    save_model(model, {**content, key: value})
    capsys.readouterr()
    code = predict.main(
        [
            "--model",
            str(model),
            "--input",
            str(texture_root / "brick" / "test" / "good" / "000.png"),
            "--output",
            str(tmp_path / "out"),
            *PREDICT_FLAGS,
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"error: {model}: ") and err.count("\n") == 1, err


def _mutated_images(folder: Path, seed: int = 0) -> list[Path]:
    """100 damaged PNG and JPEG files: flipped bytes, truncations, zeroed runs, appended junk."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    originals = {}
    for fmt, suffix in (("PNG", ".png"), ("JPEG", ".jpg")):
        Image.fromarray(pixels).save(folder / f"original{suffix}", format=fmt)
        originals[suffix] = (folder / f"original{suffix}").read_bytes()
        (folder / f"original{suffix}").unlink()
    paths = []
    for number in range(100):
        suffix = (".png", ".jpg")[number % 2]
        data = bytearray(originals[suffix])
        kind = number // 2 % 4
        if kind == 0:
            for position in rng.integers(0, len(data), int(rng.integers(1, 20))):
                data[position] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            data = data[: int(rng.integers(0, len(data)))]
        elif kind == 2:
            start, length = int(rng.integers(0, len(data))), int(rng.integers(4, 200))
            data[start : start + length] = bytes(len(data[start : start + length]))
        else:
            data += rng.integers(0, 256, int(rng.integers(1, 500)), dtype=np.uint8).tobytes()
        path = folder / f"{number:03d}{suffix}"
        path.write_bytes(bytes(data))
        paths.append(path)
    return paths


@pytest.mark.slow
def test_damaged_images_are_scored_or_skipped_never_a_crash(trained: Trained, tmp_path: Path, capsys):
    paths = _mutated_images(tmp_path / "images")
    out = tmp_path / "out"
    code = predict.main(
        ["--model", str(trained.model_dir), "--input", str(tmp_path / "images"), "--output", str(out), *PREDICT_FLAGS]
    )
    assert code == 0, capsys.readouterr().err
    rows = pd.read_csv(out / "predictions.csv", dtype=str, keep_default_na=False)
    assert sorted(rows.path) == sorted(map(str, paths))
    scored = rows[rows.score != ""]
    assert np.isfinite(scored.score.astype(float)).all() and (scored.error == "").all()
    skipped = rows[rows.score == ""]
    assert (skipped.error != "").all() and len(scored) > 0 and len(skipped) > 0
    assert f"{len(scored)} of 100 images scored" in capsys.readouterr().out


def _poisoned_stream(original):
    """Padim.stream_anomaly_maps with the first image's score NaN and an infinity in the second image's map."""

    def stream(self, batches):
        for number, (key, maps, scores) in enumerate(original(self, batches)):
            if number == 0:
                scores[0] = float("nan")
                maps[1, 3, 3] = float("inf")
            yield key, maps, scores

    return stream


def test_non_finite_scores_are_reported_anomalous_never_good(
    trained: Trained, texture_root: Path, tmp_path: Path, capsys, monkeypatch
):
    monkeypatch.setattr(Padim, "stream_anomaly_maps", _poisoned_stream(Padim.stream_anomaly_maps))
    out = tmp_path / "out"
    code = predict.main(
        [
            "--model",
            str(trained.model_dir),
            "--input",
            str(texture_root / "brick" / "test" / "good"),
            "--output",
            str(out),
            *PREDICT_FLAGS,
        ]
    )
    captured = capsys.readouterr()
    assert code == 1 and "error: 2 images got a non-finite score" in captured.err
    assert "4 of 6 images scored" in captured.out and "2 non-finite (reported anomalous)" in captured.out
    rows = pd.read_csv(out / "predictions.csv", dtype=str, keep_default_na=False)
    poisoned, clean = rows.iloc[:2], rows.iloc[2:]
    assert (poisoned.is_anomalous == "True").all() and (poisoned.error == prediction.NON_FINITE_ERROR).all()
    assert (poisoned.output_name == "").all() and len(list((out / "heatmaps").iterdir())) == 4
    assert (clean.error == "").all()
    for row in clean.itertuples():
        assert abs(float(row.score) - trained.scores[Path(row.path)]) < 1e-4


def _poison_scores_of(stage: str, monkeypatch) -> None:
    """Make the scores of one score_samples stage ("threshold" or "score") non-finite."""
    original = trainer.score_samples

    def poisoned(model, samples, geometry, fit, seed, description, maps=None):
        scored = original(model, samples, geometry, fit, seed, description, maps)
        if description == stage:
            scored.scores[-1] = float("inf") if stage == "threshold" else float("nan")
        return scored

    monkeypatch.setattr(trainer, "score_samples", poisoned)


def _poison_fit(monkeypatch) -> None:
    original = Padim.fit

    def poisoned(self, batches, peers=None, **options):
        stats = original(self, batches, peers, **options)
        stats.mean[0, 0] = float("nan")
        return stats

    monkeypatch.setattr(Padim, "fit", poisoned)


@pytest.mark.parametrize(
    "stage, reason",
    [
        ("score", "1 of 14 test images got a non-finite score"),
        pytest.param("threshold", "1 of 2 threshold images got a non-finite score", marks=pytest.mark.slow),
        pytest.param("fit", "the fitted mean or precision factor holds a non-finite number", marks=pytest.mark.slow),
    ],
)
def test_a_non_finite_number_fails_the_class_and_is_never_a_metric(
    texture_root: Path, tmp_path: Path, monkeypatch, stage, reason
):
    if stage == "fit":
        _poison_fit(monkeypatch)
    else:
        _poison_scores_of(stage, monkeypatch)
    results = tmp_path / "res"
    code = run_experiment.main(
        [
            *CPU_RUN_INTO_R_FLAGS,
            "--save_distribution",
            "--data_path",
            str(texture_root / "brick"),
            "--base_results_dir",
            str(results),
        ]
    )
    table = pd.read_csv(results / "r" / "master_results.csv")
    assert code == 1 and table.status[0].startswith(f"failed: {reason}")
    assert table[METRIC_COLUMNS].isna().all(axis=None)
    assert not (results / "r" / "brick" / "padim_model.pt").exists() or stage == "score"
    assert not (results / "r" / "brick" / "scores.csv").exists()


def _no_temporary_files(folder: Path) -> bool:
    return not [path for path in folder.rglob("*") if path.name.endswith(".tmp")]


def _limited_file_size(limit: int):
    """A child process whose files may not grow past `limit` bytes: writes beyond fail with EFBIG."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


@pytest.mark.slow
def test_a_file_size_limit_mid_run_is_one_line_and_leaves_no_half_file(texture_root: Path, tmp_path: Path):
    """The model file (6 MB) passes a 1 MB limit: the run stops with one line, no file half written."""
    results = tmp_path / "res"
    command = [
        sys.executable,
        str(ROOT / "run_experiment.py"),
        *CPU_RUN_INTO_R_FLAGS,
        "--save_distribution",
        "--data_path",
        str(texture_root),
        "--base_results_dir",
        str(results),
    ]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=_limited_file_size(2**20)
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith(("error", "Traceback"))]
    assert done.returncode == 1
    assert lines == [
        f"error: cannot write {results / 'r' / 'brick' / 'padim_model.pt'}: "
        "the write fell short (disk full or a file size limit?)"
    ]
    assert _no_temporary_files(results) and not (results / "r" / "brick" / "padim_model.pt").exists()


@pytest.mark.slow
def test_predict_under_a_file_size_limit_is_one_line(trained: Trained, texture_root: Path, tmp_path: Path):
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(ROOT / "predict.py"),
        "--model",
        str(trained.model_dir),
        "--input",
        str(texture_root / "brick" / "test" / "good"),
        "--output",
        str(out),
        *PREDICT_FLAGS,
    ]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=_limited_file_size(2000)
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert line.startswith(f"error: cannot write {out}") and line.endswith(": File too large")
    assert _no_temporary_files(out)
    # predictions.csv goes out a batch at a time, each row after its image's files: only whole rows, none of
    # an image whose files could not be written (here the first heat map is already too large)
    [header, *rows] = list(csv.reader((out / "predictions.csv").open(encoding="utf-8")))
    assert header[:2] == ["path", "score"] and rows == []


@pytest.mark.slow
def test_a_full_disk_in_the_second_class_keeps_the_first_class_intact(
    texture_root: Path, tmp_path: Path, monkeypatch, capsys
):
    """The disk fills while gravel's scores.csv is written: brick's row and files stay, nothing half written."""
    real_write = output_files.atomic_write

    def filling_disk(path: Path, write) -> None:
        def half_then_full(tmp: Path) -> None:
            tmp.write_bytes(b"path,defect,label,sco")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        real_write(path, half_then_full if path.parent.name == "gravel" else write)

    monkeypatch.setattr(trainer, "atomic_write", filling_disk)
    results = tmp_path / "res"
    capsys.readouterr()
    code = run_experiment.main(
        [*CPU_RUN_INTO_R_FLAGS, "--data_path", str(texture_root), "--base_results_dir", str(results)]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert f"error: cannot write {results / 'r' / 'gravel' / 'scores.csv'}: No space left on device\n" in err
    assert "Traceback" not in err
    table = pd.read_csv(results / "r" / "master_results.csv")
    assert list(table.class_name) == ["brick"] and list(table.status) == ["ok"]
    assert (results / "r" / "brick" / "scores.csv").is_file() and not (results / "r" / "gravel" / "scores.csv").exists()
    assert _no_temporary_files(results)


HOLD_LOCK = """
import sys, time
from pathlib import Path
from utils.runtime.output_files import folder_lock
with folder_lock(Path(sys.argv[1]), "folder", RuntimeError):
    print("held", flush=True)
    time.sleep(120)
"""


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds `folder` until killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline() == "held\n"
    return holder


@pytest.mark.slow
def test_a_second_run_into_a_busy_results_folder_stops_naming_the_first(texture_root: Path, tmp_path: Path, capsys):
    """A real run holds its folder: a second one stops at once, the first finishes with consistent files."""
    results, data = tmp_path / "res", texture_root / "brick"
    command = [
        sys.executable,
        str(ROOT / "run_experiment.py"),
        *CPU_RUN_INTO_R_FLAGS,
        "--data_path",
        str(data),
        "--base_results_dir",
        str(results),
    ]
    first = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen = ""
    while "fit" not in seen and first.poll() is None:
        seen += first.stderr.read(1)
    capsys.readouterr()
    code = run_experiment.main([*CPU_RUN_INTO_R_FLAGS, "--data_path", str(data), "--base_results_dir", str(results)])
    err = capsys.readouterr().err
    first.communicate(timeout=300)
    assert code == 1 and err.startswith(
        f"error: results folder {results / 'r'} is in use by another run (pid {first.pid} "
    )
    assert first.returncode == 0
    table = pd.read_csv(results / "r" / "master_results.csv")
    assert list(table.class_name) == ["brick"] and list(table.status) == ["ok"]


def test_predict_into_a_busy_output_folder_stops_and_a_killed_holder_does_not_block(
    trained: Trained, texture_root: Path, tmp_path: Path, capsys
):
    out = tmp_path / "out"
    arguments = [
        "--model",
        str(trained.model_dir),
        "--input",
        str(texture_root / "brick" / "test" / "good"),
        "--output",
        str(out),
        *PREDICT_FLAGS,
    ]
    holder = _hold_lock(out)
    capsys.readouterr()
    assert predict.main(arguments) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"error: output folder {out} is in use by another run (pid {holder.pid} ")
    assert not [line for line in err if line.startswith(("error", "Traceback"))][:-1]
    assert not (out / "predictions.csv").exists()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert predict.main(arguments) == 0
    assert len(pd.read_csv(out / "predictions.csv")) == 6


def test_a_killed_run_does_not_block_the_results_folder(texture_root: Path, tmp_path: Path):
    results = tmp_path / "res"
    holder = _hold_lock(results / "r")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (
        run_experiment.main(
            [*CPU_RUN_INTO_R_FLAGS, "--data_path", str(texture_root / "brick"), "--base_results_dir", str(results)]
        )
        == 0
    )


def test_results_get_the_permissions_of_a_plain_write(trained: Trained):
    """Written through temporary files, yet readable by the group and others as open() would make them."""
    umask = os.umask(0)
    os.umask(umask)
    for name in ("padim_model.pt", "scores.csv"):
        assert (trained.model_dir / name).stat().st_mode & 0o777 == 0o666 & ~umask
    assert (trained.model_dir.parent / "master_results.csv").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_fresh_copy_of_a_model_file_still_loads(trained: Trained, tmp_path: Path):
    """The checksum is of the content, not of where the file lies: a copied or moved model loads."""
    copy = tmp_path / "elsewhere" / "padim_model.pt"
    copy.parent.mkdir()
    shutil.copy(trained.model_dir / "padim_model.pt", copy)
    assert load_model(copy)["checksum"] == load_model(trained.model_dir)["checksum"]
