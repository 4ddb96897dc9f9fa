"""run_experiment.py end to end on small synthetic folders (random-init backbones, as tests may)."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

import experiment
import run_experiment
import trainer
from datasets.images import Geometry
from datasets.split import DataError, load_class
from tests.helpers import ROOT, RUN_FLAGS, SMALL_MODEL_FLAGS
from utils.evaluation.results import RESULT_COLUMNS
from utils.padim.backbones import (
    BACKBONES,
    TRUNKS,
    FeatureExtractor,
    WeightsError,
    build_extractor,
    load_backbone,
)
from utils.padim.model_file import MODEL_FILENAME, load_model


def run(tmp_path, *extra, data=None):
    argv = [
        *RUN_FLAGS,
        "--base_results_dir",
        str(tmp_path / "results"),
        "--results_subdir",
        "r",
        *extra,
    ]
    if data is not None:
        argv += ["--data_path", str(data)]
    code = run_experiment.main(argv)
    table = pd.read_csv(tmp_path / "results" / "r" / "master_results.csv")
    return code, table


def test_run_writes_one_row_per_class_with_every_metric(tmp_path, texture_root):
    code, table = run(tmp_path, data=texture_root)
    assert code == 0
    assert list(table.columns) == RESULT_COLUMNS
    assert list(table.class_name) == ["brick", "gravel"]
    assert (table.status == "ok").all()
    for column in [
        "roc_auc",
        "pixel_roc_auc",
        "pixel_aupro",
        "pr_auc",
        "f1_max",
        "roc_auc_ci_low",
        "optimal_threshold",
    ]:
        assert table[column].between(0, 1).all() or column == "optimal_threshold", column
    assert (table.roc_auc_ci_low <= table.roc_auc).all() and (table.roc_auc <= table.roc_auc_ci_high).all()
    counts = table[["true_negatives", "false_positives", "false_negatives", "true_positives"]].sum(axis=1)
    assert (counts == table.n_test).all() and (table.n_test == 14).all()
    # 24 train/good, 10% (2) held out for the threshold
    assert (table.n_train == 22).all()
    for row in table.itertuples():
        scores = pd.read_csv(tmp_path / "results" / "r" / row.class_name / "scores.csv")
        assert len(scores) == row.n_test and scores.label.sum() == row.true_positives + row.false_negatives
        assert scores.is_anomalous.sum() == row.true_positives + row.false_positives
        assert ((scores.score > row.optimal_threshold) == scores.is_anomalous).all()
        assert roc_auc_score(scores.label, scores.score) == pytest.approx(row.roc_auc, abs=1e-6)
    log_text = (tmp_path / "results" / "r" / "experiment_log.log").read_text()
    assert "threshold" in log_text and "configuration" in log_text


def test_random_init_detects_planted_defects(tmp_path, texture_root):
    """Even a random-init backbone separates bright planted defects on brick: the pipeline is wired right."""
    _, table = run(tmp_path, data=texture_root / "brick")
    assert table.roc_auc[0] > 0.7 and table.pixel_roc_auc[0] > 0.7


@pytest.mark.slow
def test_model_file_is_plain_and_reused_only_when_identical(tmp_path, texture_root, caplog, capsys):
    data = tmp_path / "brick"
    shutil.copytree(texture_root / "brick", data)
    run(tmp_path, "--save_distribution", data=data)
    model_path = tmp_path / "results" / "r" / "brick" / MODEL_FILENAME
    content = torch.load(model_path, weights_only=True)
    assert content["backbone"] == "resnet18" and content["n_train"] == 22
    assert content["channel_index"].numel() == 100 and [block.shape for block in content["precision_factor"]] == [
        (196, 50, 50),
        (196, 50, 100),
    ]
    assert content["threshold_provenance"]["source"].startswith("held-out")
    first_mtime = model_path.stat().st_mtime_ns

    caplog.clear()
    code, table = run(tmp_path, "--save_distribution", data=data)
    assert code == 0 and "matches this run" in caplog.text and model_path.stat().st_mtime_ns == first_mtime

    (data / "train" / "good" / "000.png").write_bytes((data / "train" / "good" / "001.png").read_bytes())
    caplog.clear()
    run(tmp_path, "--save_distribution", data=data)
    assert "differs in fingerprint" in caplog.text and model_path.stat().st_mtime_ns != first_mtime

    second_mtime = model_path.stat().st_mtime_ns
    capsys.readouterr()
    code = run_experiment.main(
        [
            *RUN_FLAGS,
            "--data_path",
            str(data),
            "--base_results_dir",
            str(tmp_path / "results"),
            "--results_subdir",
            "r",
            "--save_distribution",
            "--seed",
            "7",
        ]
    )
    assert code == 1 and "holds another experiment's results (it differs in seed 1024 -> 7)" in capsys.readouterr().err
    assert model_path.stat().st_mtime_ns == second_mtime

    (
        tmp_path / "results" / "r" / "experiment.json"
    ).unlink()  # a folder of an earlier version: the model file still guards
    caplog.clear()
    run(tmp_path, "--save_distribution", "--seed", "7", data=data)
    assert "differs in" in caplog.text and "training_config" in caplog.text
    assert load_model(model_path)["training_config"]["seed"] == 7


def test_train_on_one_class_test_on_another(tmp_path, texture_root):
    code, table = run(
        tmp_path, "--test_class_name", "gravel", "--test_class_path", str(texture_root), data=texture_root / "brick"
    )
    assert code == 0 and list(table.class_name) == ["train_brick_test_gravel"]
    assert (tmp_path / "results" / "r" / "train_brick_test_gravel").is_dir()
    # brick statistics on gravel images: everything looks anomalous
    assert table.false_positives[0] == 6


def test_a_failed_class_gets_a_row_and_the_others_still_run(tmp_path, texture_root):
    data = tmp_path / "classes"
    shutil.copytree(texture_root, data)
    for image in (data / "gravel" / "train" / "good").iterdir():
        image.unlink()
    code, table = run(tmp_path, data=data)
    assert code == 0
    row = table.set_index("class_name").loc["gravel"]
    assert row.status.startswith("failed: no training images") and np.isnan(row.roc_auc)
    assert table.set_index("class_name").loc["brick"].status == "ok"


def test_every_class_failing_exits_non_zero(tmp_path, texture_root):
    data = tmp_path / "only"
    shutil.copytree(texture_root / "brick", data)
    shutil.rmtree(data / "test")
    (data / "test").mkdir()
    code, table = run(tmp_path, data=data)
    assert code == 1 and table.status[0] == f"failed: no test images in {data / 'test'}"


def test_bowtie_split_is_seeded_and_disjoint(texture_root):
    brick = texture_root / "brick"
    split = load_class("bowtie", brick, holdout_ratio=0.1, seed=4, test_sample_ratio=0.25)
    again = load_class("bowtie", brick, holdout_ratio=0.1, seed=4, test_sample_ratio=0.25)
    fit = {s.path for s in split.fit}
    holdout = {s.path for s in split.holdout}
    test = {s.path for s in split.test}
    moved = {p for p in test if p.parent == brick / "train" / "good"}
    assert len(moved) == 6 and len(holdout) == 2 and len(fit) == 16
    assert not (fit & holdout) and not (fit & test) and not (holdout & test)
    assert fit == {s.path for s in again.fit} and moved == {p for p in (s.path for s in again.test) if p in moved}
    other = load_class("bowtie", brick, holdout_ratio=0.1, seed=5, test_sample_ratio=0.25)
    assert {s.path for s in other.fit} != fit


def test_missing_torchvision_weights_give_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(
        WeightsError,
        match=r"resnet18 ImageNet weights .* put it at .*resnet18-f37072fd.pth.*--weights PATH.*"
        r"--model_architecture efficientnet_lite0, whose weights ship with its package",
    ):
        load_backbone("resnet18", "imagenet")


def test_weights_from_a_state_dict_file(tmp_path):
    model, _ = load_backbone("resnet18", "none", seed=3)
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    loaded, weights_id = load_backbone("resnet18", str(path))
    assert weights_id.startswith("file:w.pt:")
    torch.testing.assert_close(loaded.state_dict()["conv1.weight"], model.state_dict()["conv1.weight"])
    with pytest.raises(WeightsError, match="do not fit efficientnet_lite0"):
        load_backbone("efficientnet_lite0", str(path))


def test_lite0_imagenet_weights_load_offline():
    extractor, weights_id = build_extractor("efficientnet_lite0", "imagenet", torch.device("cpu"))
    assert weights_id == "imagenet:efficientnet-lite0-57934424.pth"
    maps = extractor(torch.zeros(1, 3, 64, 64).contiguous(memory_format=torch.channels_last))
    assert [m.shape[1] for m in maps] == [24, 40, 80] and maps[0].shape[-1] == 16


def test_missing_data_path_is_one_clear_line(tmp_path, capsys):
    code = run_experiment.main(
        [*SMALL_MODEL_FLAGS, "--data_path", str(tmp_path / "nope"), "--base_results_dir", str(tmp_path)]
    )
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --data_path {tmp_path / 'nope'} is not a folder"]


def test_data_error_for_folder_without_classes(tmp_path):
    with pytest.raises(DataError, match="no class folder"):
        experiment.class_jobs(run_experiment.parse_args([*SMALL_MODEL_FLAGS, "--data_path", str(tmp_path)]))


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "efficientnet_lite0",
        pytest.param("wide_resnet50_2", marks=pytest.mark.slow),
        pytest.param("efficientnet_b5", marks=pytest.mark.slow),
    ],
)
def test_batchnorm_folding_keeps_every_hooked_map(name):
    model, _ = load_backbone(name, "none", seed=1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial statistics, as trained weights have
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    spec = BACKBONES[name]
    unfused = TRUNKS[spec.family](copy.deepcopy(model), spec.default_layers[-1]).eval()
    captured = {}
    for layer in spec.default_layers:
        unfused.get_submodule(layer).register_forward_hook(lambda m, i, out, layer=layer: captured.update({layer: out}))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        unfused(images)
    fused = FeatureExtractor(spec, model, spec.default_layers)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    for layer, got in zip(spec.default_layers, fused(images)):
        torch.testing.assert_close(got, captured[layer], rtol=1e-4, atol=1e-4)


def test_display_images_undo_the_model_input_normalisation():
    """The visualizations show the very pixels the model saw: the dataset's transform, undone, gives them back."""
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 24, 24, 3), dtype=np.uint8))
    transform = Geometry(resize=24, cropsize=24).image_transform()
    inputs = torch.stack([transform(image.permute(2, 0, 1)) for image in pixels])
    shown = np.stack([trainer.display_pixels(inputs, i) for i in range(3)])
    assert shown.dtype == np.uint8 and np.array_equal(shown, pixels.numpy())


def test_a_missing_data_path_is_reported_before_torch_loads(tmp_path):
    """The folder is checked right after the flags: no wait for the heavy imports to hear of a typo."""
    script = (
        "import sys, run_experiment\n"
        f"code = run_experiment.main(['--data_path', {str(tmp_path / 'nope')!r}])\n"
        "print(code, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.split() == ["1", "False"]
    assert done.stderr == f"error: --data_path {tmp_path / 'nope'} is not a folder\n"
