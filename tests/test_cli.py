"""utils.cli's first_line, the one-line reason every tool reports for a library's exception."""

from __future__ import annotations

import pytest

from utils.cli import first_line
from utils.runtime.distributed import lost_peer_message


@pytest.mark.parametrize(
    "err, line",
    [
        (ValueError("Expecting value: line 1 column 12 (char 11)"), "Expecting value: line 1 column 12 (char 11)"),
        (RuntimeError("Error(s) in loading state_dict:\n\tMissing key(s): fc.bias"), "Error(s) in loading state_dict:"),
        (OSError("\n  image file  is\ttruncated  \nmore"), "image file is truncated"),
        (KeyError("layers"), "'layers'"),
        (ValueError("   \n "), "ValueError"),
        (KeyboardInterrupt(), "KeyboardInterrupt"),
    ],
)
def test_first_line(err: BaseException, line: str) -> None:
    assert first_line(err) == line


def test_lost_peer_message_drops_the_gloo_prefix_and_keeps_the_first_sentence() -> None:
    err = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:5001. Retry.\nmore")
    assert lost_peer_message(1, err) == (
        "rank 1: another rank stopped answering (killed, out of memory or its machine lost?): "
        "Connection closed by peer [10.0.0.2]:5001; stopping"
    )


def test_an_unquoted_glob_is_one_short_line_that_says_to_quote_it(tmp_path, capsys) -> None:
    """The shell expands `--input dir/*.png` into every path: the error names the first and says to quote."""
    import predict

    paths = [str(tmp_path / f"{i:03d}.png") for i in range(50)]
    with pytest.raises(SystemExit) as stopped:
        predict.build_parser().parse_args(["--model", "m.pt", "--input", *paths])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1
    assert "49 unexpected arguments" in err and "quote it" in err and paths[2] not in err  # --input took the first


def test_help_speaks_to_users_and_the_export_folder_is_ignored() -> None:
    """run_experiment.py -h opens with what it does, not how the code is arranged; the README's export folder
    (deploy/) does not end up untracked in a clone."""
    import subprocess

    import run_experiment
    from tests.helpers import ROOT

    description = run_experiment.build_parser().description
    assert "This file" not in description and "experiment.py" not in description
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/model.onnx"], cwd=ROOT)
    assert ignored.returncode == 0
