"""`--dataset csv`: a CSV manifest that lists every image with its split and label.

Two forms are read: VisA's split files as they ship (`object,split,label,image,mask`) and the
minimal `image,split,label[,mask][,class][,defect]`. `split` is train or test, `label` normal (or
good) or anomaly, `class` (VisA: `object`) the class, `defect` a defect type (default: anomaly);
relative paths start at the manifest's folder (or --data_path). Every bad row is logged with its
line number and the manifest is refused before any work, so a typo never silently drops images.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from datasets.images import Sample
from datasets.split import ClassFiles, DataError

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image", "split", "label")
CLASS_COLUMNS = ("object", "class")
FORMS = "object,split,label,image,mask (VisA's) or image,split,label[,mask][,class][,defect]"
NORMAL_LABELS = frozenset({"normal", "good"})
ANOMALY_LABEL = "anomaly"
SPLITS = frozenset({"train", "test"})


def read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The manifest's column names (lower-cased) and its rows, each with its line number in the file."""
    if not path.is_file():
        raise DataError(f"--manifest {path} is not a file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [(name or "").strip().lower() for name in reader.fieldnames or []]
            reader.fieldnames = columns
            rows = [
                (reader.line_num, {key: (value or "").strip() for key, value in row.items() if key is not None})
                for row in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"manifest {path}: cannot read it as a CSV file ({err})") from err
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise DataError(
            f"manifest {path}: no {', '.join(missing)} column; its columns are {','.join(columns) or 'none'}, "
            f"expected {FORMS}"
        )
    if all(name in columns for name in CLASS_COLUMNS):
        raise DataError(f"manifest {path}: both an object and a class column; keep one")
    if not rows:
        raise DataError(f"manifest {path}: no rows")
    return columns, rows


def located(value: str, base: Path) -> Path:
    """A manifest's path as an absolute path: relative ones start at `base`."""
    return (base / value).resolve()


def row_sample(row: dict[str, str], base: Path) -> tuple[str, Sample]:
    """(split, sample) of one row; ValueError says what is wrong with it."""
    split, label = row["split"].lower(), row["label"].lower()
    if split not in SPLITS:
        raise ValueError(f"unknown split {row['split']!r} (train or test)")
    if label not in NORMAL_LABELS | {ANOMALY_LABEL}:
        raise ValueError(
            f"unknown label {row['label']!r} (normal, good or anomaly; a defect type goes in a defect column)"
        )
    if not row["image"]:
        raise ValueError("no image")
    image = located(row["image"], base)
    if not image.is_file():
        raise ValueError(f"image {row['image']} not found")
    anomalous = label == ANOMALY_LABEL
    if anomalous and split == "train":
        raise ValueError("an anomaly in the train split: the model is fitted on normal images only")
    mask = row.get("mask", "")
    if mask and not anomalous:
        raise ValueError(f"a mask ({mask}) for a normal image")
    if mask and not located(mask, base).is_file():
        raise ValueError(f"mask {mask} not found")
    defect = (row.get("defect") or ANOMALY_LABEL) if anomalous else "good"
    return split, Sample(image, int(anomalous), defect, located(mask, base) if mask else None)


def manifest_files(path: Path, base: Path | None = None, class_name: str | None = None) -> list[ClassFiles]:
    """Every class of the manifest (or only `class_name`) as ClassFiles; relative paths start at `base`
    (default: the manifest's folder). DataError, after logging every bad row, when any row is bad."""
    columns, rows = read_rows(path)
    base = base or path.parent
    class_column = next((name for name in CLASS_COLUMNS if name in columns), None)
    default_name = class_name or path.resolve().parent.name
    named = [(line, row.get(class_column, "") if class_column else default_name, row) for line, row in rows]
    if class_column and class_name:
        names = sorted({name for _, name, _ in named})
        named = [item for item in named if item[1] == class_name]
        if not named:
            raise DataError(f"manifest {path}: no class {class_name!r}; its classes are {', '.join(names)}")
    problems, seen, classes = [], {}, {}
    for line, name, row in named:
        try:
            if not name:
                raise ValueError(f"no {class_column}")
            split, sample = row_sample(row, base)
            first = seen.setdefault(sample.path, line)
            if first != line:
                raise ValueError(f"image {row['image']} is listed again (first on line {first})")
        except ValueError as err:
            problems.append(f"line {line}: {err}")
            continue
        classes.setdefault(name, {"train": [], "test": []})[split].append(sample)
    if problems:
        for problem in problems:
            log.error("manifest %s %s", path, problem)
        raise DataError(
            f"manifest {path}: {len(problems)} bad rows (each logged with its line number; the first: "
            f"{problems[0]}; relative paths start at {base}): fix or remove them"
        )
    return [
        class_listing(name, parts["train"], parts["test"], "mask" in columns, path) for name, parts in classes.items()
    ]


def class_listing(name: str, train: list[Sample], test: list[Sample], masks_listed: bool, path: Path) -> ClassFiles:
    """One class's rows as ClassFiles: training images by path (the seeded split depends on their order),
    test normals first, then the defect types by name, as the MVTec layout lists them."""
    train_paths = sorted(sample.path for sample in train)
    ordered = sorted(test, key=lambda sample: (sample.label, sample.defect if sample.label else "", str(sample.path)))
    has_ground_truth = masks_listed and any(sample.mask_path for sample in test)
    missing = [sample.path.name for sample in test if sample.label and sample.mask_path is None]
    if has_ground_truth and missing:
        log.warning("%s: %d defect images have no mask; they are left out of the pixel metrics", name, len(missing))
    root = Path(os.path.commonpath([p.parent for p in train_paths])) if train_paths else path.parent
    where = f"manifest {path} (class {name})"
    return ClassFiles(name, tuple(train_paths), tuple(ordered), has_ground_truth, False, root, where, where)
