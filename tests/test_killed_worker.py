"""A data loading worker killed under a run (the kernel's out-of-memory killer's usual victim): one line
saying what died, why and what to try, what was kept, exit 1; a rerun completes. The process tests
SIGKILL a real worker, found as a child process of the run."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from data.demo_data import make_demo_dataset
from tests.helpers import PREDICT_FLAGS, ROOT, TRAIN_FLAGS, Trained
from tests.test_distributed import free_port
from utils.cli import lost_worker, run_main

ADVICE = "most likely out of memory: try --num_workers 0 or a smaller --batch_size"
ONE_WORKER = ["--num_workers", "1", "--batch_size", "1"]  # one image per batch: the worker lives a while


def worker_error(pid: int) -> RuntimeError:
    """What torch raises when a worker is killed: the loader's error, chaining its SIGCHLD handler's."""
    try:
        try:
            raise RuntimeError(f"DataLoader worker (pid {pid}) is killed by signal: Killed. ")
        except RuntimeError as signalled:
            raise RuntimeError(f"DataLoader worker (pid(s) {pid}) exited unexpectedly") from signalled
    except RuntimeError as err:
        return err


def test_a_killed_worker_is_one_line_with_the_signal_the_advice_and_what_was_kept(caplog):
    def killed(_):
        raise worker_error(4242)

    assert run_main(killed, None, (), lambda: "finished classes are in t.csv") == 1
    expected = f"a data loading worker (pid 4242) was killed by signal Killed, {ADVICE}; finished classes are in t.csv"
    assert [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR] == [expected]
    assert lost_worker(RuntimeError("DataLoader worker (pid(s) 7, 8) exited unexpectedly")) == (
        f"a data loading worker (pid 7, 8) died, {ADVICE}"
    )


def test_other_runtime_errors_are_not_taken_for_a_killed_worker():
    def fails(_):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    assert lost_worker(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    with pytest.raises(RuntimeError, match="shapes"):
        run_main(fails, None, (), "kept")


def test_sigterm_is_an_interrupt_only_while_the_run_runs():
    """torchrun SIGTERMs the other ranks when one fails; arriving as the process exits, an interrupt would
    end in a traceback from an exit handler, so after the run SIGTERM is what it was before."""
    during = []
    assert run_main(lambda _: during.append(signal.getsignal(signal.SIGTERM)) or 0, None, (), "kept") == 0
    assert during == [signal.default_int_handler] and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """One class with enough training images that a one-image-per-batch loader's worker lives a while."""
    return make_demo_dataset(
        tmp_path_factory.mktemp("many"), textures=("brick",), n_train=80, n_test_good=6, n_test_defect=4, size=64
    )


def children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(kid) for kid in (task / "children").read_text().split()]
        except OSError:  # the thread ended
            pass
    return kids


def kill_first_worker(process: subprocess.Popen, started) -> int:
    """SIGKILL the first child process `process` has once `started()` is true; its pid."""
    deadline = time.monotonic() + 240
    while not started() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    while process.poll() is None and time.monotonic() < deadline:
        kids = children(process.pid)
        if kids:
            os.kill(kids[0], signal.SIGKILL)
            return kids[0]
        time.sleep(0.005)
    raise AssertionError(f"no worker process appeared; exit {process.poll()}: {process.communicate()[1][-2000:]}")


def read_stderr_until(process: subprocess.Popen, text: str) -> str:
    seen = ""
    while text not in seen and process.poll() is None:
        seen += process.stderr.read(1)
    return seen


def train_command(data: Path, results: Path) -> list[str]:
    command = [sys.executable, str(ROOT / "run_experiment.py"), *TRAIN_FLAGS, *ONE_WORKER]
    return [*command, "--data_path", str(data), "--base_results_dir", str(results)]


@pytest.fixture
def two_classes(many_images: Path, tmp_path) -> Path:
    """The class twice, under two names."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("brick", "brick_too"):
        (data / name).symlink_to(many_images / "brick")
    return data


@pytest.mark.slow
def test_a_killed_training_worker_ends_the_run_in_one_line_and_a_rerun_reuses_the_finished_class(
    two_classes: Path, tmp_path
):
    results = tmp_path / "res"
    command = train_command(two_classes, results)
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen = read_stderr_until(process, "score:")  # the first class's progress bars: fit, threshold, score
    seen += read_stderr_until(process, "fit:")  # the second class's
    pid = kill_first_worker(process, lambda: True)
    err = seen + process.communicate(timeout=240)[1]
    assert process.returncode == 1, err
    table = results / "r" / "master_results.csv"
    line = f"ERROR: a data loading worker (pid {pid}) was killed by signal Killed, {ADVICE}; "
    line += f"finished classes are in {table}; rerun to complete"
    assert line in err and "Traceback" not in err
    assert list(pd.read_csv(table).class_name) == ["brick"]
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert list(pd.read_csv(table).status) == ["ok", "ok"]
    log = (results / "r" / "experiment_log.log").read_text()
    assert f"cached model {results / 'r' / 'brick' / 'padim_model.pt'} matches this run" in log


@pytest.mark.slow
def test_a_killed_prediction_worker_ends_predict_in_one_line(trained: Trained, many_images: Path, tmp_path):
    command = [sys.executable, str(ROOT / "predict.py"), "--model", str(trained.model_dir), *PREDICT_FLAGS]
    command += [*ONE_WORKER, "--input", str(many_images / "brick" / "train" / "good"), "--output", str(tmp_path)]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen = read_stderr_until(process, "predict:")
    pid = kill_first_worker(process, lambda: True)
    err = seen + process.communicate(timeout=240)[1]
    assert process.returncode == 1, err
    line = f"ERROR: a data loading worker (pid {pid}) was killed by signal Killed, {ADVICE}; "
    kept = (f"{tmp_path / 'predictions.csv'} keeps ", "predictions.csv was not written")
    assert any(line + what in err for what in kept) and "Traceback" not in err, err
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert len(pd.read_csv(tmp_path / "predictions.csv")) == 80


@pytest.mark.slow
def test_under_torchrun_the_rank_whose_worker_died_says_so_and_the_other_stops_in_one_line(two_classes: Path, tmp_path):
    """Two ranks as torchrun starts them, each fitting its own class; rank 1's worker is killed."""
    port, processes = str(free_port()), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
        env.update({"LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        command = [*train_command(two_classes, tmp_path / "res"), "--dist_timeout_s", "60"]
        processes.append(subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT))
    log = tmp_path / "res" / "r" / "experiment_log.rank1.log"
    pid = kill_first_worker(processes[1], lambda: log.is_file() and "class " in log.read_text())
    errs = [process.communicate(timeout=240)[1] for process in processes]
    assert [process.returncode for process in processes] == [1, 1], errs
    line = f"[rank 1] ERROR: a data loading worker (pid {pid}) was killed by signal Killed, {ADVICE}"
    assert line in errs[1] and "another rank stopped answering" in errs[0] and "interrupted" not in errs[0]
    assert all("Traceback" not in err for err in errs), errs
