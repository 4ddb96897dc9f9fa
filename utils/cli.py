"""What the command-line tools share: a strict parser and its value types (a bad flag or value is
one line and exit 2, before any heavy library loads), and the way a run ends (a user error is
one `error:` line and exit 1; a data loading worker killed under the run, one line and exit 1;
Ctrl-C or SIGTERM is exit 130 after the atomic writes have cleaned up). Nothing here imports torch."""

from __future__ import annotations

import argparse
import difflib
import logging
import math
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

from utils.config import ENGINES, PRECISIONS, DeviceConfig

log = logging.getLogger(__name__)

Config = TypeVar("Config")


def add_allow_tf32(parser: argparse.ArgumentParser) -> None:
    """--allow_tf32, as run_experiment.py and predict.py both take it (utils.padim.backbones.float32_precision)."""
    parser.add_argument(
        "--allow_tf32",
        action="store_true",
        help="let CUDA convolve and multiply in TF32: faster on recent GPUs, but scores no longer match the CPU's",
    )


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """--engine and --precision, as run_experiment.py, predict.py and bench.py take them (utils.padim.engines)."""
    parser.add_argument(
        "--engine",
        default=DeviceConfig.engine,
        choices=ENGINES,
        help="runtime of the backbone on the CPU: auto is the fastest measured for the backbone (torch on a GPU); "
        "the maps equal torch's within 1e-4, else torch runs",
    )
    parser.add_argument(
        "--precision",
        default=DeviceConfig.precision,
        choices=PRECISIONS,
        help="bf16: the backbone in bfloat16 through OpenVINO, on CPUs with AVX512-BF16 or AMX (scores move)",
    )


class StrictParser(argparse.ArgumentParser):
    """argparse without abbreviations (`--crop 300` must not silently set `--cropsize`), whose
    errors are one line naming the closest flag instead of the whole usage."""

    def __init__(self, description: str | None):
        super().__init__(
            description=description, allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )

    def closest_flag(self, word: str) -> str | None:
        """The flag `word` most likely meant: one it starts, else the most similar one."""
        flags = [flag for flag in self._option_string_actions if flag.startswith("--")]
        started = [flag for flag in flags if flag.startswith(word)]
        if len(started) == 1:
            return started[0]
        close = difflib.get_close_matches(word, flags, n=1, cutoff=0.6)
        return close[0] if close else None

    def error(self, message: str) -> NoReturn:
        unknown = re.fullmatch(r"unrecognized arguments: (.*)", message)
        if unknown:
            words = unknown.group(1).split()
            notes = []
            for word in words:
                flag = word.split("=", 1)[0]
                if flag.startswith("-"):
                    meant = self.closest_flag(flag)
                    notes.append(f"{flag}" + (f" (did you mean {meant}?)" if meant else ""))
            if notes:
                message = f"unknown flag {', '.join(notes)}"
            elif len(words) > 1:  # most likely an unquoted glob the shell expanded: never list every path
                message = (
                    f"{len(words)} unexpected arguments ({words[0]} ...): a glob the shell expanded? "
                    "quote it ('folder/*.png') so that this program expands it"
                )
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def at_least(minimum: int) -> Callable[[str], int]:
    """An integer >= minimum."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    return parse


def resize_value(text: str) -> int | tuple[int, int]:
    """A --resize value: `S` (the short side; without a crop, S x S) -> S, or `HxW` (height x width, only
    without a crop) -> (H, W); every side >= 1."""
    height, _, width = text.lower().partition("x")
    try:
        sides = [int(height)] + ([int(width)] if width else [])
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be S or HxW (e.g. 256 or 256x512), got {text}") from None
    if min(sides) < 1:
        raise argparse.ArgumentTypeError(f"every side must be >= 1, got {text}")
    return (sides[0], sides[1]) if width else sides[0]


def unit_interval(low_inclusive: bool, high_inclusive: bool) -> Callable[[str], float]:
    """A float in [0, 1], (0, 1], [0, 1) or (0, 1) as chosen."""
    bounds = f"{'[' if low_inclusive else '('}0, 1{']' if high_inclusive else ')'}"

    def parse(text: str) -> float:
        value = float(text)
        low_ok = value >= 0 if low_inclusive else value > 0
        high_ok = value <= 1 if high_inclusive else value < 1
        if not (low_ok and high_ok):
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {text}")
        return value

    return parse


def positive_float(text: str) -> float:
    """A finite float > 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite float >= 0."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def first_line(err: BaseException) -> str:
    """An exception's message for a one-line report: its first line, whitespace runs squeezed
    (libraries go on with detail or advice on later lines); the exception's type if it says nothing."""
    lines = str(err).strip().splitlines()
    return " ".join(lines[0].split()) if lines else type(err).__name__


# torch's words for a DataLoader worker that died: the signal (from its SIGCHLD handler), or only that it
# exited (the error the loader raises next, chaining the first)
WORKER_DEATH = re.compile(
    r"DataLoader worker \(pid\(?s?\)? ([\d, ]+)\) (?:is killed by signal: ([^.]+)|exited unexpectedly)"
)


def lost_worker(err: BaseException) -> str | None:
    """One line on a data loading worker that died under the run (the kernel's out-of-memory killer takes
    the newest large process, often a worker), with what to try; None when `err` is something else.
    torch raises it as a RuntimeError, whose chain may hold the signal."""
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    matches = [match for match in (WORKER_DEATH.search(str(link)) for link in chain) if match]
    if not matches:
        return None
    signal_name = next((match.group(2) for match in matches if match.group(2)), None)
    how = f"was killed by signal {signal_name}" if signal_name else "died"
    return (
        f"a data loading worker (pid {matches[0].group(1)}) {how}, most likely out of memory: "
        "try --num_workers 0 or a smaller --batch_size"
    )


def run_main(
    run: Callable[[Config], int],
    config: Config,
    user_errors: tuple[type[Exception], ...],
    kept: str | Callable[[], str],
) -> int:
    """Call `run(config)`; user errors become one line on stderr, an interrupt or a killed data loading
    worker a line that ends with what was kept (`kept`, or what it returns when called then)."""

    def what_was_kept() -> str:
        return kept() if callable(kept) else kept

    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return run(config)
    except user_errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        log_ending(logging.WARNING, f"interrupted: {what_was_kept()}")
        return 130
    except RuntimeError as err:
        death = lost_worker(err)
        if death is None:
            raise
        log_ending(logging.ERROR, f"{death}; {what_was_kept()}")
        return 1
    finally:  # a SIGTERM once the run is over (torchrun stopping the other ranks) ends the process, never its exit
        signal.signal(signal.SIGTERM, previous)


def log_ending(level: int, message: str) -> None:
    """How the run ended, on the console and in the run's log, off the progress bar's line."""
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    log.log(level, message)


class ConsoleHandler(logging.StreamHandler):
    """Log lines on stderr through tqdm.write: a line logged while a progress bar is shown goes above the bar,
    never onto its line. tqdm is imported at the first line, not here: it reads TQDM_* from the environment
    when imported, and run_experiment.py sets TQDM_DISABLE on ranks above 0 after parsing."""

    def __init__(self):
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)


def log_to_console(level: int = logging.INFO) -> None:
    """`level` and above on stderr as 'LEVEL: message': the console of predict.py, export.py and update.py."""
    install_log_handler("padim-console", ConsoleHandler(), level, "%(levelname)s: %(message)s")


def add_model_flags(parser: argparse.ArgumentParser, model_help: str) -> None:
    """--model (required) and --weights, as predict.py, export.py and update.py take a saved model."""
    parser.add_argument("--model", type=Path, required=True, help=model_help)
    parser.add_argument(
        "--weights",
        type=Path,
        help="the backbone state dict the model was trained with (only for models trained with --weights PATH)",
    )


def remove_log_handler(name: str) -> None:
    """Take the root logger's handlers of that name off and close them (a run's log file, once the run ends)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == name]:
        root.removeHandler(old)
        old.close()


def install_log_handler(name: str, handler: logging.Handler, level: int, message_format: str) -> None:
    """Put `handler` on the root logger under `name`, replacing an earlier one of that name (a second
    run in one process, as in tests), and leaving handlers of other names (pytest's) alone."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    remove_log_handler(name)
    handler.set_name(name)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(message_format))
    root.addHandler(handler)
