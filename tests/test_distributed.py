"""Several configurations in one run, and one run over several processes (torchrun, gloo, CPU):
the same tables and models as single-process runs of the same flags."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import experiment
import run_experiment
from tests.helpers import (
    REPORT_TRAIN_FLAGS,
    ROOT,
    TRAIN_FLAGS,
    Page,
    assert_links_resolve,
    assert_table_equals_csv,
    no_class_figures,
    row_bands,
    symmetric_matrices,
    synthetic_features,
)
from utils.evaluation.comparison import RANKING_RULE
from utils.padim.gaussian import GaussianAccumulator
from utils.padim.model_file import load_model, stats_from_content
from utils.runtime import distributed
from utils.runtime.distributed import World
from utils.runtime.output_files import OutputWriteError

COUNT_COLUMNS = ["class_name", "n_train", "n_holdout", "n_test", "n_skipped", "status"]
COUNT_COLUMNS += ["true_negatives", "false_positives", "false_negatives", "true_positives"]


def single_run(data: Path, results: Path, *flags: str) -> Path:
    assert (
        run_experiment.main([*TRAIN_FLAGS, "--data_path", str(data), "--base_results_dir", str(results), *flags]) == 0
    )
    return results / "r"


def torchrun(data: Path, results: Path, *flags: str, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command += [
        str(ROOT / "run_experiment.py"),
        *TRAIN_FLAGS,
        "--data_path",
        str(data),
        "--base_results_dir",
        str(results),
    ]
    return subprocess.run([*command, *flags], capture_output=True, text=True, timeout=600, cwd=ROOT)


def assert_same_results(folder: Path, reference: Path) -> None:
    """Counts and status identical; image scores within 1e-4 relative; AUROC within one swapped pair;
    every saved model's mean and precision factor within 1e-4 relative."""
    table, expected = (pd.read_csv(path / "master_results.csv") for path in (folder, reference))
    pd.testing.assert_frame_equal(table[COUNT_COLUMNS], expected[COUNT_COLUMNS])
    for name, row in expected.set_index("class_name").iterrows():
        pairs = row.true_negatives + row.false_positives
        pairs *= row.true_positives + row.false_negatives
        got = table.set_index("class_name").loc[name]
        assert abs(got.roc_auc - row.roc_auc) <= 1 / pairs + 1e-9
        assert abs(got.pixel_roc_auc - row.pixel_roc_auc) <= 1e-4
        scores, expected_scores = (pd.read_csv(path / name / "scores.csv") for path in (folder, reference))
        assert list(scores.path) == list(expected_scores.path)
        np.testing.assert_allclose(scores.score, expected_scores.score, rtol=1e-4)
        model, expected_model = (stats_from_content(load_model(path / name)) for path in (folder, reference))
        assert model.count == expected_model.count and model.grid == expected_model.grid
        torch.testing.assert_close(model.mean, expected_model.mean, rtol=1e-4, atol=1e-4)
        factor, expected_factor = model.factor.dense(), expected_model.factor.dense()
        scale = float(expected_factor.abs().max())
        torch.testing.assert_close(factor, expected_factor, rtol=1e-4, atol=1e-4 * scale)


@pytest.fixture(scope="module")
def reference(texture_root: Path, tmp_path_factory) -> Path:
    """Both texture classes, one process."""
    with no_class_figures():  # set up before conftest's function-scoped switch
        return single_run(texture_root, tmp_path_factory.mktemp("single"))


def test_recentred_sums_equal_sums_taken_around_the_new_shift():
    """Rank r's sums around its own shift, moved to the shared one, are the sums taken around that shift."""
    x = synthetic_features(n=30)
    around_own, around_shared = (GaussianAccumulator(dims=6, positions=12, device=torch.device("cpu")) for _ in "ab")
    around_own.update(row_bands(x, 3))  # shift: the mean of all 30
    around_shared.update(row_bands(x[:5], 3))  # shift: the mean of the first 5
    around_shared.update(row_bands(x[5:], 3))
    assert not torch.allclose(around_own.shift, around_shared.shift)
    around_own.recentre(around_shared.shift.clone())
    torch.testing.assert_close(around_own.sum, around_shared.sum, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        symmetric_matrices(around_own.outer), symmetric_matrices(around_shared.outer), rtol=1e-4, atol=1e-2
    )
    mean, covariance = around_own.finalize()
    reference = np.stack([np.cov(x[:, i, j].astype(np.float64), rowvar=False) for i in range(3) for j in range(4)])
    np.testing.assert_allclose(mean.numpy(), x.reshape(30, 12, 6).mean(0), rtol=1e-5)
    np.testing.assert_allclose(
        symmetric_matrices(covariance).numpy() - 0.01 * np.eye(6), reference, rtol=1e-4, atol=1e-4
    )


def test_jobs_are_shared_largest_first_and_shares_cover_every_item_once():
    jobs = [experiment.Job(0, name, Path(name), None, images) for name, images in zip("abcde", [10, 50, 30, 20, 40])]
    shares = [[job.name for job in experiment.share_jobs(jobs, World(rank=rank, size=2))] for rank in range(2)]
    assert shares == [["b", "d", "a"], ["e", "c"]]  # 50 + 20 + 10 and 40 + 30 images
    items = list(range(11))
    parts = [World(rank=rank, size=3).part(items) for rank in range(3)]
    assert sum(parts, []) == items and [len(part) for part in parts] == [3, 4, 4]


def test_layer_choices_and_configurations_are_the_product_of_the_flags(tmp_path: Path, capsys):
    parse = run_experiment.parse_args
    base = ["--dataset", "bowtie", "--data_path", str(tmp_path), "--model_architecture", "efficientnet_lite0"]
    flags = [*base, "--layers", "2,3,4", "3,4,5", "--resize", "256", "320", "--cropsize", "0", "224"]
    config = parse([*flags, "--base_results_dir", str(tmp_path), "--results_subdir", "."])
    chosen = [(c.layers, c.resize, c.cropsize) for c in config.models]
    assert len(chosen) == 8 and chosen[0] == (("2", "3", "4"), 256, 0) and chosen[-1] == (("3", "4", "5"), 320, 224)
    assert [c.layers for c in parse([*base, "--layers", "4", "2", "3"]).models] == [("2", "3", "4")]
    assert len(parse([*base, "--layers", "2,3,4", "4,3,2", "--resize", "256", "256"]).models) == 1
    folders = {config.results_folder(c) for c in config.models}
    assert len(folders) == 8 and tmp_path / "bowtie_efficientnet_lite0_resize-320_crop-224_layers-3-4-5" in folders
    single = parse(base)
    assert single.results_folder(single.models[0]) == Path("results/bowtie_efficientnet_lite0_resize-256_crop-256")
    for flags, message in [
        (["--resize", "200", "300", "--cropsize", "256"], "--cropsize 256 is larger than --resize 200"),
        (["--model_architecture", "resnet18", "efficientnet_lite0", "--layers", "2,3"], "stage 2, 3 for resnet18"),
    ]:
        with pytest.raises(SystemExit):
            parse(["--data_path", str(tmp_path), *flags])
        assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.figures
def test_several_configurations_equal_their_single_runs_and_are_compared(
    texture_root: Path, reference: Path, tmp_path: Path, capsys
):
    """--resize 64 72: each configuration's folder equals the single run of its flags; comparison.csv holds
    every configuration x class with its settings, and stdout names the best configuration per class."""
    data = str(texture_root)
    assert (
        run_experiment.main(
            [
                *REPORT_TRAIN_FLAGS,
                "--data_path",
                data,
                "--base_results_dir",
                str(tmp_path / "multi"),
                "--resize",
                "64",
                "72",
            ]
        )
        == 0
    )
    parent = tmp_path / "multi" / "r"
    single_72 = single_run(texture_root, tmp_path / "single72", "--resize", "72")
    assert_same_results(parent / "mvtec_resnet18_resize-64_crop-56", reference)
    assert_same_results(parent / "mvtec_resnet18_resize-72_crop-56", single_72)
    comparison = pd.read_csv(parent / "comparison.csv")
    assert list(comparison.resize) == [64, 64, 72, 72] and list(comparison.class_name) == ["brick", "gravel"] * 2
    assert set(comparison.layers) == {"layer1,layer2,layer3"} and set(comparison.reduced_dim) == {100}
    expected = pd.concat(
        [pd.read_csv(parent / f"mvtec_resnet18_resize-{r}_crop-56" / "master_results.csv") for r in (64, 72)]
    )
    np.testing.assert_array_equal(comparison.roc_auc, expected.roc_auc)
    assert (parent / "comparison.png").stat().st_size > 10_000
    page = Page(parent / "comparison.html")
    assert_table_equals_csv(page, "comparison", parent / "comparison.csv")
    assert_links_resolve(page, parent / "comparison.html")
    assert {link.split("/")[0] for link in page.links if link.endswith("report.html")} == set(comparison.configuration)
    out = capsys.readouterr().out
    assert f"best configuration per class. {RANKING_RULE}" in out
    for name, rows in comparison.groupby("class_name"):
        best = rows.sort_values(["roc_auc_ci_low", "roc_auc", "pixel_roc_auc"], ascending=False).iloc[0]
        other = rows[rows.configuration != best.configuration].iloc[0]
        verdict = "interval lies above" if best.roc_auc_ci_low > other.roc_auc_ci_high else "is clearly better: its"
        line = next(line for line in out.splitlines() if line.split()[:2] == [name, best.configuration])
        assert verdict in line


@pytest.mark.slow
@pytest.mark.parametrize("distribute", ["jobs", "images"])
def test_two_processes_equal_one(distribute: str, texture_root: Path, reference: Path, tmp_path: Path):
    done = torchrun(texture_root, tmp_path, "--distribute", distribute)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_results(tmp_path / "r", reference)
    logs = sorted(path.name for path in (tmp_path / "r").glob("experiment_log*"))
    assert logs == ["experiment_log.rank0.log", "experiment_log.rank1.log"]
    assert "score:" not in "".join(line for line in done.stderr.splitlines() if line.startswith("[rank 1]"))


@pytest.mark.slow
def test_two_processes_sharing_images_equal_one_with_a_shrunk_covariance(texture_root: Path, tmp_path: Path):
    """Ledoit-Wolf's shrinkage reads the fourth moments: ranks must merge them, re-centred, as they merge the rest."""
    flags = ("--covariance", "ledoit_wolf")
    with no_class_figures():
        reference = single_run(texture_root, tmp_path / "single", *flags)
    done = torchrun(texture_root, tmp_path / "ranks", "--distribute", "images", *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_results(tmp_path / "ranks" / "r", reference)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_a_killed_rank_stops_the_others_with_one_line(texture_root: Path, tmp_path: Path):
    """Two ranks started as torchrun would; rank 1 is killed once it works on a class: rank 0 ends non-zero
    with one line saying so, well within --dist_timeout_s, and the results folder is free for a rerun."""
    port = str(free_port())
    processes = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
        env.update({"LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        command = [sys.executable, str(ROOT / "run_experiment.py"), *TRAIN_FLAGS, "--data_path", str(texture_root)]
        command += ["--base_results_dir", str(tmp_path), "--dist_timeout_s", "60"]
        processes.append(subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT))
    log = tmp_path / "r" / "experiment_log.rank1.log"
    deadline = time.monotonic() + 120
    while not (log.is_file() and "class " in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    processes[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = processes[0].communicate(timeout=120)
    processes[1].wait()
    assert processes[0].returncode != 0 and time.monotonic() - killed < 30
    [line] = [line for line in err.splitlines() if "another rank stopped answering" in line]
    table = tmp_path / "r" / "master_results.csv"  # what the line says was kept is what is on disk
    kept = f"finished classes are in {table}; rerun to complete" if table.is_file() else "no class finished"
    assert kept in line, line
    assert single_run(texture_root, tmp_path)  # nothing left holding the folder


def test_a_row_rank_0_cannot_record_stops_it_instead_of_leaving_it_waiting(monkeypatch):
    """The heartbeat hands another rank's row to rank 0's `deliver`; when that fails (say, master_results.csv
    cannot be written), rank 0 stops with that reason instead of waiting for ever on a dead heartbeat."""
    waiting = threading.Event()

    def beat(heard, news, group):  # a two-rank all-gather, once rank 0 waits: rank 1 posted a row and is done
        waiting.wait(10)
        heard[:] = [news, (0, True, [("brick", {"status": "ok"})])]

    def deliver(item):
        raise OutputWriteError("cannot write master_results.csv: No space left on device")

    monkeypatch.setattr(distributed.dist, "new_group", lambda **options: None)
    monkeypatch.setattr(distributed.dist, "all_gather_object", beat)
    watch = distributed.PeerWatch(0, 2, timedelta(seconds=5), deliver)
    outcome = []

    def finish():
        try:
            watch.finish()
        except distributed.PeerLost as err:
            outcome.append(str(err))

    finisher = threading.Thread(target=finish, daemon=True)
    finisher.start()
    while not watch.waiting:
        time.sleep(0.01)
    waiting.set()
    finisher.join(10)
    assert not finisher.is_alive(), "rank 0 was left waiting"
    reason = "cannot write master_results.csv: No space left on device"
    assert outcome == [f"rank 0 could not record another rank's result: {reason}; stopping"]
