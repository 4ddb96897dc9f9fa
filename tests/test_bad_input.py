"""Messy folders, odd images, bad flags, hostile model files, interrupts: clear errors, nothing lost."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import run_experiment
from datasets.images import Geometry, ImageDataset, ImageReadError, Sample, read_mask, read_rgb
from tests.helpers import ROOT, RUN_FLAGS
from utils.padim.model_file import ModelFileError, load_model, save_model


def _texture(size=(80, 60), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)


def _odd_files(folder: Path) -> dict[str, Path]:
    """One file per awkward case; values are the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(_texture())
    files = {}
    files["zero_byte"] = folder / "empty.png"
    files["zero_byte"].write_bytes(b"")
    buffer = folder / "full.jpg"
    rgb.save(buffer, quality=90)
    files["truncated"] = folder / "truncated.jpg"
    files["truncated"].write_bytes(buffer.read_bytes()[:300])
    buffer.unlink()
    files["text_as_png"] = folder / "notes.png"
    files["text_as_png"].write_text("not an image")
    files["rgba"] = folder / "rgba.png"
    rgb.convert("RGBA").save(files["rgba"])
    files["palette"] = folder / "palette.png"
    rgb.convert("P").save(files["palette"])
    files["grey16"] = folder / "grey16.png"
    Image.fromarray((np.arange(80 * 60).reshape(60, 80) * 13).astype(np.uint16)).save(files["grey16"])
    files["cmyk"] = folder / "cmyk.jpg"
    rgb.convert("CMYK").save(files["cmyk"])
    files["tiny"] = folder / "tiny.png"
    Image.fromarray(_texture((9, 7))).save(files["tiny"])
    files["exif"] = folder / "exif.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rgb.save(files["exif"], exif=exif)
    files["unicode"] = folder / "pièce défaut 1.PNG"
    rgb.save(files["unicode"], format="PNG")
    return files


@pytest.mark.parametrize("case", ["zero_byte", "truncated", "text_as_png"])
def test_unreadable_images_raise_a_read_error_naming_the_file(tmp_path, case):
    path = _odd_files(tmp_path)[case]
    with pytest.raises(ImageReadError, match=str(path.name)):
        read_rgb(path)


@pytest.mark.parametrize("case", ["rgba", "palette", "grey16", "cmyk", "tiny", "exif", "unicode"])
def test_odd_but_valid_images_become_rgb_model_inputs(tmp_path, case):
    path = _odd_files(tmp_path)[case]
    image = read_rgb(path)
    assert image.mode == "RGB"
    tensor, mask, *_ = ImageDataset([Sample(path, 0, "good")], Geometry(64, 56))[0]
    assert tensor.shape == (3, 56, 56) and torch.isfinite(tensor).all() and not mask.any()


def test_exif_rotation_is_applied(tmp_path):
    assert read_rgb(_odd_files(tmp_path)["exif"]).size == (60, 80)


def test_sixteen_bit_grey_keeps_its_range(tmp_path):
    array = np.asarray(read_rgb(_odd_files(tmp_path)["grey16"]))
    assert array.min() == 0 and array.max() >= 240


def test_masks_are_binarised_and_resized(tmp_path, caplog):
    soft = tmp_path / "soft.png"
    Image.fromarray(np.array([[0, 100, 128, 255]], dtype=np.uint8)).save(soft)
    assert (np.asarray(read_mask(soft, (4, 1))) == [[0, 0, 255, 255]]).all()
    zero_one = tmp_path / "zero_one.png"
    Image.fromarray(np.array([[0, 1, 1, 0]], dtype=np.uint8)).save(zero_one)
    assert (np.asarray(read_mask(zero_one, (4, 1))) == [[0, 255, 255, 0]]).all()
    resized = read_mask(soft, (8, 2))
    assert resized.size == (8, 2) and "resized" in caplog.text


def _class_copy(texture_root: Path, tmp_path: Path) -> Path:
    data = tmp_path / "brick"
    shutil.copytree(texture_root / "brick", data)
    return data


def _run(tmp_path, data, *extra):
    code = run_experiment.main(
        [
            *RUN_FLAGS,
            "--data_path",
            str(data),
            "--base_results_dir",
            str(tmp_path / "res"),
            "--results_subdir",
            "r",
            *extra,
        ]
    )
    return code, pd.read_csv(tmp_path / "res" / "r" / "master_results.csv")


def test_broken_and_odd_files_in_a_class_are_skipped_counted_and_the_run_completes(tmp_path, texture_root, caplog):
    data = _class_copy(texture_root, tmp_path)
    odd = _odd_files(data / "train" / "good")
    (data / "test" / "good" / "Thumbs.db").write_bytes(b"\0\0")
    shutil.copy(odd["truncated"], data / "test" / "scratch" / "broken.jpg")
    code, table = _run(tmp_path, data)
    assert code == 0 and table.status[0] == "ok"
    # 3 unreadable training images + 1 unreadable test image + 1 non-image file
    assert table.n_skipped[0] == 5
    assert "Thumbs.db: not an image file" in caplog.text and "truncated.jpg: cannot read image" in caplog.text
    assert table.n_test[0] == 14


def test_mask_problems_have_defined_behaviour(tmp_path, texture_root, caplog):
    data = _class_copy(texture_root, tmp_path)
    gt = data / "ground_truth" / "scratch"
    (gt / "000_mask.png").unlink()  # missing: image-level only
    Image.new("L", (32, 32), 0).save(gt / "001_mask.png")  # empty and smaller: all-normal pixels, resized
    code, table = _run(tmp_path, data)
    assert code == 0 and table.status[0] == "ok" and table.n_test[0] == 14
    assert "1 defect images have no mask" in caplog.text and "resized (nearest)" in caplog.text
    assert 0 < table.pixel_aupro[0] <= 1


def test_single_training_image_still_scores(tmp_path, texture_root, caplog):
    data = _class_copy(texture_root, tmp_path)
    for image in sorted((data / "train" / "good").iterdir())[1:]:
        image.unlink()
    code, table = _run(tmp_path, data)
    assert code == 0 and table.status[0] == "ok" and table.n_train[0] == 1
    assert "threshold taken from the training images" in caplog.text
    assert 0 <= table.roc_auc[0] <= 1


@pytest.mark.parametrize("remove, reason", [("defects", "only good"), ("good", "only defect")])
def test_one_sided_test_set_leaves_auroc_empty_with_status_ok(tmp_path, texture_root, caplog, remove, reason):
    data = _class_copy(texture_root, tmp_path)
    folders = [d for d in (data / "test").iterdir() if (d.name == "good") == (remove == "good")]
    for folder in folders:
        shutil.rmtree(folder)
    code, table = _run(tmp_path, data)
    assert code == 0 and table.status[0] == "ok"
    assert np.isnan(table.roc_auc[0]) and np.isnan(table.roc_auc_ci_low[0]) and np.isnan(table.f1_max[0])
    # no defect pixels without defect images; defect images alone still have good pixels
    assert np.isnan(table.pixel_aupro[0]) == (remove == "defects")
    assert not np.isnan(table.recall[0] if remove == "good" else table.true_negatives[0])
    assert f"the test set has {reason} images" in caplog.text


def test_one_test_image(tmp_path, texture_root):
    data = _class_copy(texture_root, tmp_path)
    shutil.rmtree(data / "test")
    (data / "test" / "good").mkdir(parents=True)
    shutil.copy(texture_root / "brick" / "test" / "good" / "000.png", data / "test" / "good")
    code, table = _run(tmp_path, data)
    assert code == 0 and table.n_test[0] == 1 and table.status[0] == "ok"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--resize", "0"], "must be >= 1"),
        (["--resize", "64", "--cropsize", "128"], "larger than --resize"),
        (["--augmentation_prob", "2"], "must be in [0, 1]"),
        (["--model_architecture", "vgg16"], "invalid choice"),
        (
            ["--layers", "layer5"],
            "--layers: unknown stage layer5 for resnet18; its stages are layer1 layer2 layer3 layer4",
        ),
        (["--layers", "layer2", "layer2"], "each stage once"),
        (["--test_sample_ratio", "1.5"], "must be in [0, 1)"),
        (["--batch_size", "0"], "must be >= 1"),
        (["--augmentations_enabled"], "needs --horizontal_flip"),
    ],
)
def test_nonsense_flags_exit_2_with_an_argparse_error(tmp_path, capsys, flags, message):
    base = ["--model_architecture", "resnet18", "--data_path", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        run_experiment.main([*base, *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_unwritable_results_folder_fails_before_any_work(tmp_path, texture_root, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = run_experiment.main([*RUN_FLAGS, "--data_path", str(texture_root), "--base_results_dir", str(blocker)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"error: results folder {blocker}") and "not writable" in err
    assert "fit" not in err


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_model_files_that_are_damaged_foreign_or_malicious_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    malicious = tmp_path / "evil.pt"
    with open(malicious, "wb") as handle:
        pickle.dump({"format": "padim-suite-model", "payload": _Exploit(marker)}, handle)
    torch_malicious = tmp_path / "evil_torch.pt"
    torch.save({"format": "padim-suite-model", "payload": _Exploit(marker)}, torch_malicious)
    old = tmp_path / "old.pt"
    torch.save({"format": "padim-suite-model", "format_version": 0}, old)
    foreign = tmp_path / "foreign.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, foreign)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(old.read_bytes()[:40])
    for path, message in [
        (malicious, "refused, not a model file"),
        (torch_malicious, "could run code"),
        (old, "format version 0"),
        (foreign, "not a PaDiM suite model"),
        (truncated, "truncated or damaged"),
        (tmp_path / "missing.pt", "no model file"),
    ]:
        with pytest.raises(ModelFileError, match=message):
            load_model(path)
    assert not marker.exists()


def _truncate(model_path: Path) -> None:
    model_path.write_bytes(model_path.read_bytes()[:1000])


def _drop_a_factor_block(model_path: Path) -> None:
    """Same identity, readable, sealed, but the statistics no longer fit: must not reach the Mahalanobis step."""
    content = load_model(model_path)
    content["precision_factor"] = content["precision_factor"][:-1]
    save_model(model_path, {key: value for key, value in content.items() if key != "checksum"})


def _flip_a_bit_of_the_mean(model_path: Path) -> None:
    content = load_model(model_path)
    content["mean"].view(torch.int32)[0, 0] ^= 1 << 20
    torch.save(content, model_path)


@pytest.mark.parametrize(
    "damage, reason",
    [
        pytest.param(_truncate, "truncated or damaged", marks=pytest.mark.slow),
        pytest.param(_drop_a_factor_block, "statistics shapes do not match", marks=pytest.mark.slow),
        (_flip_a_bit_of_the_mean, "damaged (checksum mismatch)"),
    ],
)
def test_a_damaged_cached_model_is_refitted_not_trusted(tmp_path, texture_root, caplog, damage, reason):
    data = _class_copy(texture_root, tmp_path)
    _run(tmp_path, data, "--save_distribution")
    model_path = tmp_path / "res" / "r" / "brick" / "padim_model.pt"
    damage(model_path)
    code, table = _run(tmp_path, data, "--save_distribution")
    assert code == 0 and "cached model not used, refitting" in caplog.text and reason in caplog.text
    assert load_model(model_path)["n_train"] == 22
    assert len(load_model(model_path)["precision_factor"]) == 2


def _cli(data: Path, results: Path, *extra) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "run_experiment.py"),
        *RUN_FLAGS,
        "--data_path",
        str(data),
        "--base_results_dir",
        str(results),
        "--results_subdir",
        "r",
        "--save_distribution",
        *extra,
    ]


@pytest.mark.slow
def test_sigterm_mid_run_leaves_nothing_half_written_and_a_rerun_completes(tmp_path, texture_root):
    data = tmp_path / "classes"
    shutil.copytree(texture_root, data)
    results = tmp_path / "res"
    process = subprocess.Popen(
        _cli(data, results), cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    seen = ""
    while "score" not in seen and process.poll() is None:
        seen += process.stderr.read(1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    table = results / "r" / "master_results.csv"
    kept = f"finished classes are in {table}" if table.is_file() else "no class finished"
    assert process.returncode == 130 and f"interrupted: {kept}" in err
    assert f"interrupted: {kept}" in (results / "r" / "experiment_log.log").read_text()
    leftovers = [p for p in results.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    for model_path in results.rglob("padim_model.pt"):
        load_model(model_path)
    rerun = subprocess.run(_cli(data, results), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    table = pd.read_csv(results / "r" / "master_results.csv")
    assert list(table.status) == ["ok", "ok"]


MEMORY_PROBE = """
import resource, sys, torch
from utils.padim.backbones import build_extractor
from utils.padim.embedding import channel_index
from utils.padim.model import Padim
count = int(sys.argv[1])
extractor, _ = build_extractor("resnet18", "none", torch.device("cpu"))
model = Padim(extractor, channel_index(448, 100, 0), (16, 16), *[torch.device("cpu")] * 3)
model.fit(torch.randn(250, 3, 16, 16) for _ in range(count // 250))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_fit_memory_stays_flat_from_500_to_5000_images(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(MEMORY_PROBE)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    peaks = [
        int(subprocess.check_output([sys.executable, str(probe), str(n)], env=env, text=True)) for n in (500, 5000)
    ]
    assert peaks[1] < peaks[0] * 1.05, peaks


def test_an_interrupt_says_what_was_kept(texture_root: Path, tmp_path: Path, monkeypatch, capsys):
    """Interrupted before any class finished, the note says so (there is no master_results.csv to point to);
    after one finished, it names the table that holds it."""
    import experiment

    real_run_job, calls = experiment.run_job, []

    def interrupted_at(job_number: int):
        def run_job(*args, **kwargs):
            calls.append(1)
            if len(calls) == job_number:
                raise KeyboardInterrupt
            return real_run_job(*args, **kwargs)

        return run_job

    flags = [*RUN_FLAGS, "--device", "cpu", "--data_path", str(texture_root), "--results_subdir", "r"]
    for job_number, kept in ((1, "no class finished; rerun to start again"), (2, "finished classes are in")):
        calls.clear()
        monkeypatch.setattr(experiment, "run_job", interrupted_at(job_number))
        results = tmp_path / f"res{job_number}"
        capsys.readouterr()
        assert run_experiment.main([*flags, "--base_results_dir", str(results)]) == 130
        err = capsys.readouterr().err
        assert f"interrupted: {kept}" in err
        if job_number == 2:
            assert f"{results / 'r' / 'master_results.csv'}; rerun to complete" in err
