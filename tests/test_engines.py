"""utils.padim.engines: the backbone trunk in ONNX Runtime and OpenVINO gives eager torch's maps; runs and
predictions give torch's scores and decisions; the trunk cache survives damage and two builders at once;
an engine that cannot run falls back to torch in one warning line; bf16 is refused where it cannot run."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import predict
import run_experiment
from tests.helpers import CPU_RUN_FLAGS, PREDICT_FLAGS, ROOT, TRAIN_FLAGS
from utils import config
from utils.config import FitConfig
from utils.padim import engines
from utils.padim.backbones import build_extractor
from utils.padim.engines import EngineError, EngineExtractor, cached_trunk, engine_extractor, engine_threads
from utils.runtime.output_files import file_sha256

CPU = torch.device("cpu")
RUNTIMES = ["onnxruntime", "openvino"]
OFFLINE_WEIGHTS = {"efficientnet_lite0": "imagenet"}  # the others: random weights, which export and run alike


def _extractor(backbone: str):
    return build_extractor(backbone, OFFLINE_WEIGHTS.get(backbone, "none"), CPU)


def _relative_gaps(got: list[torch.Tensor], expected: list[torch.Tensor]) -> list[float]:
    return [float((g - e).abs().max() / e.abs().max()) for g, e in zip(got, expected)]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(
    "backbone",
    [
        pytest.param("efficientnet_lite0", marks=pytest.mark.slow),
        "resnet18",
        pytest.param("wide_resnet50_2", marks=pytest.mark.slow),
        pytest.param("efficientnet_b5", marks=pytest.mark.slow),
    ],
)
def test_every_backbone_gives_torchs_maps_on_each_engine(backbone: str, runtime: str):
    """Two input sizes, one of them height x width (--resize HxW); batches of 2 over 5 images (so a partial last
    batch of 1): every hooked map within 1e-4 relative of eager torch's."""
    extractor, weights_id = _extractor(backbone)
    for size in ((64, 64), (48, 96)):
        engine = engine_extractor(extractor, runtime, "fp32", CPU, size, weights_id, seed=0)
        assert isinstance(engine, EngineExtractor) and engine.engine == runtime
        assert (engine.channels, engine.dims, engine.layers) == (extractor.channels, extractor.dims, extractor.layers)
        images = torch.randn(5, 3, *size, generator=torch.Generator().manual_seed(size[1]))
        for batch in images.split(2):
            expected = extractor(batch.contiguous(memory_format=torch.channels_last))
            got = engine(batch)
            assert [m.shape for m in got] == [m.shape for m in expected]
            assert max(_relative_gaps(got, expected)) <= 1e-4


@pytest.mark.slow
def test_a_run_scores_and_decides_alike_on_every_engine(texture_root: Path, tmp_path):
    """The same class run on each engine: scores within 1e-4 relative of torch's, the same decisions; the
    engine is recorded in experiment.json and the log."""
    scores = {}
    for engine in ("torch", *RUNTIMES):
        flags = [*CPU_RUN_FLAGS, "--data_path", str(texture_root / "brick"), "--engine", engine]
        assert run_experiment.main([*flags, "--base_results_dir", str(tmp_path / engine), "--results_subdir", "r"]) == 0
        folder = tmp_path / engine / "r"
        assert json.loads((folder / "experiment.json").read_text())["engine"] == engine
        assert f"engine {engine} (fp32)" in (folder / "experiment_log.log").read_text()
        scores[engine] = pd.read_csv(folder / "brick" / "scores.csv")
    for engine in RUNTIMES:
        assert list(scores[engine].path) == list(scores["torch"].path)
        np.testing.assert_allclose(scores[engine].score, scores["torch"].score, rtol=1e-4, atol=0)
        assert list(scores[engine].is_anomalous) == list(scores["torch"].is_anomalous)


def test_a_model_fitted_on_one_engine_scores_alike_on_another(trained, texture_root: Path, tmp_path):
    """The session's model (fitted with the default engine) predicted on each engine: run_experiment's scores
    within 1e-4 relative, the same decisions; the engine is not part of the model."""
    inputs = ["--input", str(texture_root / "brick" / "test" / "*" / "*.png")]
    for engine in ("torch", *RUNTIMES):
        output = tmp_path / engine
        args = ["--model", str(trained.model_dir), *inputs, "--output", str(output), *PREDICT_FLAGS]
        assert predict.main([*args, "--engine", engine]) == 0
        rows = pd.read_csv(output / "predictions.csv")
        expected = [trained.scores[Path(path)] for path in rows.path]
        np.testing.assert_allclose(rows.score, expected, rtol=1e-4, atol=0)
        assert list(rows.is_anomalous) == [score > trained.threshold for score in expected]


def test_a_rerun_on_another_engine_is_the_same_experiment(texture_root: Path, tmp_path):
    """Changing --engine neither refuses the results folder nor refits a saved model."""
    flags = [*TRAIN_FLAGS, "--data_path", str(texture_root / "brick"), "--base_results_dir", str(tmp_path)]
    assert run_experiment.main([*flags, "--engine", "torch"]) == 0
    model = tmp_path / "r" / "brick" / "padim_model.pt"
    fitted = file_sha256(model)
    assert run_experiment.main([*flags, "--engine", "onnxruntime"]) == 0
    assert file_sha256(model) == fitted
    assert json.loads((tmp_path / "r" / "experiment.json").read_text())["engine"] == "onnxruntime"


def test_a_damaged_or_stale_cache_entry_is_exported_again(caplog):
    extractor, weights_id = _extractor("resnet18")
    graph = cached_trunk(extractor, weights_id, 0, (64, 64))
    record = json.loads((graph.parent / "entry.json").read_text())
    assert record["sha256"] == file_sha256(graph) and record["identity"]["input_size"] == [64, 64]
    assert cached_trunk(extractor, weights_id, 0, (64, 64)) == graph  # a sound entry is reused
    with graph.open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\0" * 16)
    with caplog.at_level(logging.WARNING, logger=engines.__name__):
        assert cached_trunk(extractor, weights_id, 0, (64, 64)) == graph
    assert "damaged or stale" in caplog.text and file_sha256(graph) == record["sha256"]
    (graph.parent / "entry.json").write_text(json.dumps({**record, "identity": {"backbone": "other"}}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=engines.__name__):
        cached_trunk(extractor, weights_id, 0, (64, 64))
    assert "damaged or stale" in caplog.text
    assert json.loads((graph.parent / "entry.json").read_text()) == record


def test_the_cache_key_follows_weights_seed_stages_and_size():
    extractor, weights_id = _extractor("resnet18")
    key = engines.trunk_key(extractor, weights_id, 0, (64, 64))[0]
    assert engines.trunk_key(extractor, weights_id, 1, (64, 64))[0] != key  # random weights of another seed
    assert engines.trunk_key(extractor, weights_id, 0, (64, 96))[0] != key
    assert engines.trunk_key(extractor, "file:w.pt:0123", 0, (64, 64))[0] != key
    shallower, _ = build_extractor("resnet18", "none", CPU, layers=["layer1", "layer2"])
    assert engines.trunk_key(shallower, weights_id, 0, (64, 64))[0] != key


BUILD_TRUNK = """
import sys
from utils.padim.backbones import build_extractor
from utils.padim.engines import cached_trunk
import torch
extractor, weights_id = build_extractor("resnet18", "none", torch.device("cpu"))
print(cached_trunk(extractor, weights_id, 0, (72, 72)))
"""


def test_a_cached_trunk_is_found_without_importing_onnx(tmp_path):
    """Importing onnx costs most of a second of every run's start; only exporting a trunk needs it."""
    env = {**os.environ, "PADIM_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    reports_onnx = BUILD_TRUNK + "print('onnx' in sys.modules)\n"
    runs = [subprocess.run([sys.executable, "-c", reports_onnx], env=env, capture_output=True, text=True) for _ in "ab"]
    assert [run.returncode for run in runs] == [0, 0], runs[-1].stderr
    (built, imported_to_build), (found, imported_to_find) = (run.stdout.split() for run in runs)
    assert found == built and imported_to_build == "True"
    assert imported_to_find == "False"


@pytest.mark.slow
def test_two_processes_building_one_entry_at_once_leave_one_sound_entry(tmp_path):
    env = {**os.environ, "PADIM_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    builders = [
        subprocess.Popen([sys.executable, "-c", BUILD_TRUNK], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    paths = [builder.communicate(timeout=300)[0].strip() for builder in builders]
    assert [builder.returncode for builder in builders] == [0, 0]
    assert paths[0] == paths[1]
    entries = list((tmp_path / "trunks").iterdir())
    assert [entry.name for entry in entries] == [Path(paths[0]).parent.name]  # no half-built folder left
    record = json.loads((entries[0] / "entry.json").read_text())
    assert record["sha256"] == file_sha256(Path(paths[0]))


def _falls_back(caplog, extractor, weights_id, runtime: str, reason: str) -> None:
    with caplog.at_level(logging.WARNING, logger=engines.__name__):
        chosen = engine_extractor(extractor, runtime, "fp32", CPU, (64, 64), weights_id, seed=0)
    assert chosen is extractor
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and reason in warnings[0].getMessage() and "runs in torch" in warnings[0].getMessage()


def test_an_engine_not_installed_falls_back_to_torch_in_one_line(caplog, monkeypatch):
    extractor, weights_id = _extractor("resnet18")
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    _falls_back(caplog, extractor, weights_id, "openvino", "openvino is not installed")


def test_an_export_that_fails_falls_back_to_torch_in_one_line(caplog, monkeypatch, tmp_path):
    extractor, weights_id = _extractor("resnet18")
    monkeypatch.setenv("PADIM_CACHE_DIR", str(tmp_path))

    def fail(*args):
        raise RuntimeError("exporter broke\nsecond line")

    monkeypatch.setattr(engines, "_export_trunk", fail)
    _falls_back(caplog, extractor, weights_id, "onnxruntime", "failed to build the resnet18 trunk (exporter broke)")


def test_an_engine_that_disagrees_with_torch_is_not_used(caplog, monkeypatch):
    extractor, weights_id = _extractor("resnet18")
    monkeypatch.setattr(engines, "PARITY_TOLERANCE", 0.0)  # ONNX Runtime's maps differ from torch's in the 7th digit
    _falls_back(caplog, extractor, weights_id, "onnxruntime", "differ from torch's")


def test_bf16_is_refused_where_it_cannot_run(monkeypatch, tmp_path, texture_root: Path, capsys):
    extractor, weights_id = _extractor("resnet18")
    for runtime in ("torch", "onnxruntime"):
        with pytest.raises(EngineError, match="--engine openvino|no bfloat16 setting"):
            engine_extractor(extractor, runtime, "bf16", CPU, (64, 64), weights_id, seed=0)
    monkeypatch.setattr(engines, "bf16_supported", lambda: False)
    with pytest.raises(EngineError, match="no native bfloat16"):
        engine_extractor(extractor, "openvino", "bf16", CPU, (64, 64), weights_id, seed=0)
    flags = [*CPU_RUN_FLAGS, "--data_path", str(texture_root / "brick"), "--base_results_dir", str(tmp_path)]
    capsys.readouterr()
    assert run_experiment.main([*flags, "--precision", "bf16"]) != 0
    err = capsys.readouterr().err
    assert "no native bfloat16" in err and "Traceback" not in err


def test_bf16_runs_through_openvino_where_the_cpu_has_it():
    """Where the CPU multiplies bfloat16 the maps move, but stay near torch's; elsewhere it is refused."""
    extractor, weights_id = _extractor("efficientnet_lite0")
    if not engines.bf16_supported():
        with pytest.raises(EngineError, match="no native bfloat16"):
            engine_extractor(extractor, "openvino", "bf16", CPU, (64, 64), weights_id, seed=0)
        return
    engine = engine_extractor(extractor, "openvino", "bf16", CPU, (64, 64), weights_id, seed=0)
    assert (engine.engine, engine.precision) == ("openvino", "bf16")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    gaps = _relative_gaps(engine(images), extractor(images.contiguous(memory_format=torch.channels_last)))
    assert 1e-5 < max(gaps) < 0.1


def test_engines_use_their_share_of_the_allowed_cores(monkeypatch):
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert engine_threads(0) == 8 and engine_threads(2) == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: two ranks on this machine
    assert engine_threads(1) == 3
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: {0, 1})
    assert engine_threads(4) == 1  # never below one thread


def test_loader_workers_by_default_only_where_cores_are_to_spare(monkeypatch):
    """On up to 3 cores the backbone gets them all (workers there cost more than they give), then one worker
    per 4 cores, at most 2; an explicit --num_workers wins."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cores, workers in ((1, 0), (2, 0), (3, 0), (4, 1), (8, 2), (64, 2)):
        monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid, cores=cores: set(range(cores)))
        assert config.default_workers() == workers and FitConfig().num_workers == workers
        flags = ["--data_path", "x"]
        assert run_experiment.parse_args(flags).fit.num_workers == workers
        assert run_experiment.parse_args([*flags, "--num_workers", "3"]).fit.num_workers == 3


def test_auto_is_the_measured_engine_on_a_cpu_and_torch_on_a_gpu(caplog):
    cuda = torch.device("cuda")
    assert engines.chosen_engine("auto", "resnet18", CPU) == engines.AUTO_ENGINE["resnet18"]
    assert engines.chosen_engine("auto", "resnet18", cuda) == "torch"
    with caplog.at_level(logging.WARNING, logger=engines.__name__):
        assert engines.chosen_engine("openvino", "resnet18", cuda) == "torch"
    assert "runs on the CPU only" in caplog.text
