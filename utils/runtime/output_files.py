"""Writing results safely: whole files or none, the permissions a plain write gives, one run per folder.

Every file a run writes goes through atomic_write, so an interrupt, a full disk or a file
size limit leaves the previous file (or none), never half of one. A CSV that grows as a run
goes (predict.py's) takes whole batches of rows with append_csv_rows and is read back by
read_csv_rows. A run holds its results folder with folder_lock, so two runs can never
interleave their files there. file_sha256 is the one checksum of a file on disk (weights
files, exported graphs).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import hashlib
import io
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

LOCK_FILENAME = ".padim.lock"


class OutputWriteError(Exception):
    """A result file that could not be written (disk full, file too large, folder gone or read-only)."""


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)` then rename onto `path`: an interrupted or failed write never leaves a half file.

    The temporary file is created with mode 0o666 for the kernel to apply the umask, so results
    get the permissions a plain write gives (mkstemp's 0o600 would hide them from teammates).
    A failure to write (OSError, or torch.save's RuntimeError for the same causes) becomes
    OutputWriteError naming `path`, not the temporary file.
    """
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        try:
            write(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as err:
        raise OutputWriteError(f"cannot write {path}: {err.strerror or err}") from err
    except RuntimeError as err:  # torch.save's writer does not say why a write fell short
        raise OutputWriteError(f"cannot write {path}: the write fell short (disk full or a file size limit?)") from err


def write_csv(rows: Iterable[dict], path: Path, columns: Sequence[str]) -> None:
    """The whole CSV at once, atomically: an interrupted run leaves the previous file, never half of one."""

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def append_csv_rows(rows: Iterable[dict], path: Path, columns: Sequence[str]) -> None:
    """Append whole rows to a CSV (the header first when the file is new or empty) in one write, then fsync:
    an interrupt or a crash keeps every batch appended before it; a power loss or a full disk mid-write
    leaves at most a torn last line, which read_csv_rows leaves out."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, restval="")
    try:
        handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            if os.fstat(handle).st_size == 0:
                writer.writeheader()
            writer.writerows(rows)
            data = memoryview(text.getvalue().encode("utf-8"))
            while data:
                data = data[os.write(handle, data) :]
            os.fsync(handle)
        finally:
            os.close(handle)
    except OSError as err:
        raise OutputWriteError(f"cannot write {path}: {err.strerror or err}") from err


def read_csv_rows(path: Path, columns: Sequence[str]) -> list[dict] | None:
    """The whole rows of a CSV with exactly `columns` (a torn last line, one no newline ends, left out);
    None when the file is missing, unreadable, or not such a CSV."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError):
        return None
    reader = csv.DictReader(io.StringIO(text[: text.rfind("\n") + 1], newline=""))
    try:
        rows = list(reader)
    except csv.Error:
        return None
    whole = all(None not in row and None not in row.values() for row in rows)
    return rows if reader.fieldnames == list(columns) and whole else None


def prove_writable(folder: Path, what: str, error: type[Exception]) -> None:
    """Write a probe file where `folder` is or will be (its nearest existing ancestor), creating nothing:
    an unwritable output fails before any heavy work, and an early error leaves no empty folder behind."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise error(f"{what} {folder} is not writable ({err.strerror})") from err


@contextlib.contextmanager
def folder_lock(folder: Path, what: str, error: type[Exception]) -> Iterator[None]:
    """Hold `folder` for this process; another holder makes `error` naming it (pid, host, since when).

    An flock on `folder`/.padim.lock: the kernel drops it when its holder exits, however
    it exits (SIGKILL, power loss of a client), so a stale lock never blocks the next run.
    The file itself stays and only says who held it last.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILENAME
    with path.open("a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise error(
                f"{what} {folder} is in use by another run ({holder}); wait for it to finish or write elsewhere"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_output(path: Path) -> None:
    """Remove one output: a file, a link, or a folder with everything in it."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in blocks (weights files and graphs can be gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
