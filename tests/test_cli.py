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
        "Connection closed by peer [10.0.0.2]:5001; stopping; the classes finished so far are in master_results.csv"
    )
