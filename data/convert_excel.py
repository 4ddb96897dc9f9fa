"""Convert BowTie inspection workbooks (XLSX) into the CSV files that process_data.py reads.

Every `<name>.xlsx` becomes `<name>.csv` with the header `img,pos,type,comments`. The
columns are taken by position (the first four under the title row), because real sheets
name them differently (`Position`, `Result`, `Comments`, ...).
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

import pandas as pd
from openpyxl.utils.exceptions import InvalidFileException

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script, this folder is on the path, the repository root is not
    sys.path.insert(0, str(ROOT))

from utils.cli import first_line  # noqa: E402
from utils.runtime.output_files import OutputWriteError, atomic_write  # noqa: E402

COLUMNS = ["img", "pos", "type", "comments"]
PROG = "convert_excel.py"


class SheetError(Exception):
    """A workbook that cannot be converted; the message says why, for a one-line report."""


def build_parser() -> argparse.ArgumentParser:
    """Describe the command line; every flag has help so `--help` is the reference."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert BowTie XLSX sheets (sheet 0: title row, header row, then rows) "
        "into CSV files with the header img,pos,type,comments.",
    )
    parser.add_argument("-i", "--input", required=True, type=Path, metavar="DIR", help="folder holding the .xlsx files")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="DIR",
        help="folder for the .csv files (created if missing; default: the input folder)",
    )
    parser.add_argument(
        "-s",
        "--sheets",
        nargs="+",
        metavar="NAME",
        help="convert only these workbooks, given as '116' or '116.xlsx' (default: every .xlsx in the input folder)",
    )
    parser.add_argument(
        "--remove",
        action="store_true",
        help="delete each .xlsx once its CSV has been written and read back successfully",
    )
    return parser


def select_workbooks(input_dir: Path, names: list[str] | None) -> tuple[list[Path], list[str]]:
    """Pick the workbooks to convert; a named one that is missing is reported, not fatal."""
    if names is None:
        found = sorted(
            path
            for path in input_dir.iterdir()
            if path.is_file() and path.suffix.lower() == ".xlsx" and not path.name.startswith("~$")
        )
        return found, []
    paths, errors = [], []
    for name in dict.fromkeys(names):
        file_name = name if name.lower().endswith(".xlsx") else f"{name}.xlsx"
        path = input_dir / file_name
        if path.is_file():
            paths.append(path)
        else:
            errors.append(f"{file_name}: no such workbook in {input_dir}")
    return paths, errors


def read_sheet(path: Path) -> pd.DataFrame:
    """Read sheet 0 and keep its first four columns under the title and header rows, by position."""
    try:
        raw = pd.read_excel(path, sheet_name=0, header=None, dtype=object, engine="openpyxl")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, InvalidFileException) as exc:
        raise SheetError(f"cannot read the workbook ({first_line(exc)})") from exc
    if raw.shape[1] < len(COLUMNS):
        raise SheetError(f"sheet 0 has {raw.shape[1]} column(s), need at least 4 ({', '.join(COLUMNS)})")
    table = raw.iloc[2:, : len(COLUMNS)].dropna(how="all")
    if table.empty:
        raise SheetError("sheet 0 has no data rows under the title and header rows")
    table.columns = COLUMNS
    return table.reset_index(drop=True)


def verify_csv(dest: Path, expected_rows: int) -> None:
    """Read the CSV back; --remove may only delete a workbook whose CSV is known to be good."""
    try:
        back = pd.read_csv(dest, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise SheetError(f"{dest} could not be read back ({first_line(exc)})") from exc
    if list(back.columns) != COLUMNS or len(back) != expected_rows:
        raise SheetError(
            f"{dest} read back with {len(back)} rows and columns "
            f"{list(back.columns)}, expected {expected_rows} rows of {COLUMNS}"
        )


def convert_workbook(path: Path, out_dir: Path, remove: bool) -> str:
    """Convert one workbook (and delete it if asked); returns the line to print."""
    table = read_sheet(path)
    dest = out_dir / f"{path.stem}.csv"
    atomic_write(dest, lambda tmp: table.to_csv(tmp, index=False))  # a crash never leaves a half CSV
    verify_csv(dest, len(table))
    message = f"{path.name} -> {dest} ({len(table)} rows)"
    if remove:
        path.unlink()
        message += f"; removed {path.name}"
    return message


def main(argv: list[str] | None = None) -> int:
    """Convert the selected workbooks; exit 1 if any of them failed, after trying all."""
    args = build_parser().parse_args(argv)
    input_dir = args.input
    out_dir = args.output if args.output is not None else input_dir
    if not input_dir.is_dir():
        print(f"{PROG}: error: input folder {input_dir} does not exist", file=sys.stderr)
        return 1
    if out_dir.exists() and not out_dir.is_dir():
        print(f"{PROG}: error: output {out_dir} is not a folder", file=sys.stderr)
        return 1
    paths, errors = select_workbooks(input_dir, args.sheets)
    if not paths and not errors:
        print(f"{PROG}: error: no .xlsx files in {input_dir}", file=sys.stderr)
        return 1
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in paths:
        try:
            print(convert_workbook(path, out_dir, args.remove))
        except (SheetError, OutputWriteError) as exc:
            errors.append(f"{path.name}: {exc}")
        except OSError as exc:
            errors.append(f"{path.name}: {first_line(exc)}")
    for error in errors:
        print(f"{PROG}: error: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
