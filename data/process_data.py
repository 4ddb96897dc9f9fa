"""Sort BowTie product-line images into MVTec-style class folders, or combine sorted classes.

Sort mode reads the CSVs made by convert_excel.py and the image folders named in map.json
and writes `<out>/<line>/train/good` (type A) and `<out>/<line>/test/<defect>` (type R).
Combine mode merges several sorted classes into one class folder. Inputs are only read;
each class folder is built under a temporary name and renamed when complete, with a small marker
file (datasets.BOWTIE_MARKER) that lets `run_experiment.py --dataset auto` know it as BowTie.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from skimage import exposure, feature, filters, morphology, util
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script, this folder is on the path, the repository root is not
    sys.path.insert(0, str(ROOT))

from datasets import BOWTIE_MARKER, IMAGE_EXTENSIONS  # noqa: E402
from utils.cli import first_line, positive_float  # noqa: E402

PROG = "process_data.py"
DEFAULT_MAP = Path(__file__).resolve().with_name("map.json")
REQUIRED_COLUMNS = ("img", "type", "comments")
GOOD_TRAIN, GOOD_TEST = "train/good", "test/good"
CLASS_SPLITS = ("train", "test")
UNSAFE_DEFECT_NAMES = frozenset({"", ".", "..", "good"})


class UserError(Exception):
    """A problem with the command line or the input files, reported as one stderr line."""


class SkippedRow(Exception):
    """A CSV row that cannot be placed; it is counted and listed in the final report."""


class SkippedImage(Exception):
    """An image that cannot be decoded, or whose output name is taken; skipped, not fatal."""


@dataclass(frozen=True)
class Item:
    """One image to place: where it comes from, the class sub-folder and the output stem."""

    source: Path
    folder: str
    stem: str
    origin: str
    normalize: bool = False


@dataclass(frozen=True)
class Skip:
    """Why something was left out, and where it came from, for the final report."""

    origin: str
    where: str
    reason: str


@dataclass(frozen=True)
class Processing:
    """Pixel operations requested on the command line; with none active, files are byte copies."""

    grayscale: bool = False
    canny: bool = False
    canny_sigma: float = 1.0
    equalize_global: bool = False
    equalize_local: bool = False
    equalize_disk_size: int = 30
    reference: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def mode(self) -> str:
        """PIL mode to decode into: Canny works on one channel, so it implies grayscale."""
        return "L" if self.grayscale or self.canny else "RGB"

    def rewrites(self, item: Item) -> bool:
        """Whether this item must be decoded and re-encoded instead of copied byte for byte."""
        pixel_flags = self.grayscale or self.canny or self.equalize_global or self.equalize_local
        return pixel_flags or (item.normalize and self.reference is not None)

    def apply(self, pixels: np.ndarray, normalize: bool) -> np.ndarray:
        """Process decoded pixels in a fixed order: histogram matching, global equalization,
        local equalization, Canny (grey conversion already happened when decoding)."""
        if normalize and self.reference is not None:
            pixels = match_reference(pixels, self.reference)
        if self.equalize_global:
            pixels = per_channel(lambda c: util.img_as_ubyte(exposure.equalize_hist(c)), pixels)
        if self.equalize_local:
            footprint = morphology.disk(self.equalize_disk_size)
            pixels = per_channel(lambda c: filters.rank.equalize(c, footprint=footprint), pixels)
        if self.canny:
            edges = feature.canny(util.img_as_float(pixels), sigma=self.canny_sigma)
            pixels = util.img_as_ubyte(edges)
        return pixels


def per_channel(operation, pixels: np.ndarray) -> np.ndarray:
    """Apply a 2-D operation to a grey image, or to each channel of a colour image."""
    if pixels.ndim == 2:
        return operation(pixels)
    return np.stack([operation(pixels[..., c]) for c in range(pixels.shape[-1])], axis=-1)


def match_reference(pixels: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Histogram-match an image to the reference image, per channel for colour images."""
    channel_axis = -1 if pixels.ndim == 3 else None
    matched = exposure.match_histograms(pixels, reference, channel_axis=channel_axis)
    return np.clip(np.rint(matched), 0, 255).astype(np.uint8)


def load_image(path: Path, mode: str) -> np.ndarray:
    """Decode an image as a writable 8-bit grey or RGB array (rank filters need a writable one).

    Decoding failures become SkippedImage.
    """
    try:
        with Image.open(path) as image:
            return np.array(image.convert(mode))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise SkippedImage(f"cannot read image ({first_line(exc)})") from exc


def ratio(text: str) -> float:
    """argparse type for --split-ratio: a share in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return value


def positive_int(text: str) -> int:
    """argparse type for --equalize-disk-size: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Describe both modes; every flag has help so `--help` is the reference."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Sort BowTie images into <out>/<line>/train/good and test/<defect> "
        "(sort mode), or merge sorted classes into one (--combine).",
        epilog="Without pixel flags (--grayscale, --canny, --equalize-*, --normalize) images are "
        "byte copies; with any of them they are decoded, processed and written as PNG.",
    )
    parser.add_argument(
        "-i",
        "--input",
        required=True,
        type=Path,
        metavar="DIR",
        help="sort mode: folder with the CSVs and image folders; combine mode: folder with the sorted class folders",
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        metavar="DIR",
        help="output folder; must not be, or be inside, the input folder",
    )
    parser.add_argument(
        "-m",
        "--map",
        type=Path,
        metavar="MAP_JSON",
        help='sort mode: JSON {"<line>.csv": "<image folder>"}, paths relative '
        f"to the input folder (default: the input folder's own {DEFAULT_MAP.name}, else the "
        "one next to this script)",
    )
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="NAME",
        help="combine mode: sorted classes to merge, each an exact class name or an unambiguous prefix of one",
    )
    parser.add_argument(
        "--name",
        metavar="NAME",
        help="combine mode: name of the combined class (default: the resolved class names joined with '_')",
    )
    parser.add_argument("--grayscale", action="store_true", help="convert images to 8-bit grey")
    parser.add_argument(
        "--canny", action="store_true", help="replace images by their Canny edge map (0/255); implies --grayscale"
    )
    parser.add_argument(
        "--canny-sigma",
        type=positive_float,
        default=1.0,
        metavar="SIGMA",
        help="Gaussian sigma of the Canny detector (default: 1.0)",
    )
    parser.add_argument(
        "--equalize-global", action="store_true", help="global histogram equalization (each channel of a colour image)"
    )
    parser.add_argument(
        "--equalize-local",
        action="store_true",
        help="local (rank) histogram equalization over a disk (each channel of a colour image)",
    )
    parser.add_argument(
        "--equalize-disk-size",
        type=positive_int,
        default=30,
        metavar="RADIUS",
        help="disk radius in pixels for --equalize-local (default: 30)",
    )
    parser.add_argument(
        "--split-ratio",
        type=ratio,
        default=0.0,
        metavar="SHARE",
        help="sort mode: share of each line's good images moved to test/good, in [0, 1) (default: 0.0)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="sort mode: random seed of the --split-ratio choice (default: 0)",
    )
    parser.add_argument(
        "--normalize",
        action="store_true",
        help="combine mode: histogram-match every other source's images to the "
        "first train/good image of the reference class",
    )
    parser.add_argument(
        "--norm-reference",
        metavar="NAME",
        help="combine mode: reference class for --normalize, one of the combined NAMEs (default: the first one)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="allow a non-empty output folder: this run's class folders are "
        "deleted and rebuilt; nothing else there is touched",
    )
    return parser


def check_mode_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse flags that belong to the other mode instead of silently ignoring them."""
    if args.combine:
        if args.map is not None:
            parser.error("-m/--map is for sort mode, not --combine")
        if args.split_ratio:
            parser.error("--split-ratio is for sort mode, not --combine")
    else:
        for flag, value in (
            ("--name", args.name),
            ("--normalize", args.normalize),
            ("--norm-reference", args.norm_reference),
        ):
            if value:
                parser.error(f"{flag} works with --combine only")
    if args.norm_reference and not args.normalize:
        parser.error("--norm-reference needs --normalize")


def existing_dir(path: Path, what: str) -> Path:
    """Resolve a folder that must exist, so later containment checks compare real paths."""
    if not path.is_dir():
        raise UserError(f"{what} folder {path} does not exist")
    return path.resolve()


def is_within(path: Path, folder: Path) -> bool:
    """True if path is folder or lies inside it (both already resolved)."""
    return path == folder or folder in path.parents


def check_output_location(out_dir: Path, input_dir: Path) -> None:
    """Writing into the input tree could mix outputs with inputs, so refuse it."""
    if is_within(out_dir, input_dir):
        raise UserError(
            f"output folder {out_dir} is the input folder or inside it; choose a folder outside {input_dir}"
        )


def reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """json hook: a key given twice in map.json is a mistake that json would hide."""
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"duplicate key(s) {', '.join(duplicates)}")
    return dict(pairs)


def load_map(path: Path) -> dict[str, str]:
    """Read map.json: a non-empty JSON object mapping '<line>.csv' to an image folder name."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read map file {path} ({exc.strerror})") from exc
    try:
        mapping = json.loads(text, object_pairs_hook=reject_duplicate_keys)
    except ValueError as exc:
        raise UserError(f"map file {path} is not valid JSON: {first_line(exc)}") from exc
    if not isinstance(mapping, dict) or not mapping:
        raise UserError(f'map file {path} must be a non-empty JSON object like {{"116.csv": "116_zoomed_in"}}')
    for key, value in mapping.items():
        if not key.lower().endswith(".csv") or not isinstance(value, str) or not value.strip():
            raise UserError(f"map file {path}: entry {key!r}: {value!r} must map a .csv name to an image folder name")
    stems = [Path(key).stem for key in mapping]
    if len(set(stems)) != len(stems):
        raise UserError(f"map file {path} names two CSVs with the same class name")
    return mapping


def resolve_sources(input_dir: Path, mapping: dict[str, str], map_path: Path) -> dict[str, tuple[Path, Path]]:
    """Check that every CSV and image folder named in the map exists before writing anything."""
    sources, missing = {}, []
    for csv_name, folder_name in mapping.items():
        csv_path, image_dir = input_dir / csv_name, input_dir / folder_name
        if not csv_path.is_file():
            missing.append(csv_name)
        if not image_dir.is_dir():
            missing.append(f"{folder_name}/")
        sources[Path(csv_name).stem] = (csv_path.resolve(), image_dir.resolve())
    if missing:
        unconverted = [name for name in missing if (input_dir / name).with_suffix(".xlsx").is_file()]
        hint = (
            "make the CSVs with convert_excel.py"
            if len(unconverted) == len(missing)
            else f"is {map_path} this folder's map? pass its own with -m MAP_JSON"
        )
        raise UserError(f"{input_dir} lacks {', '.join(missing)} named in {map_path} ({hint})")
    return sources


def read_labels(path: Path) -> pd.DataFrame:
    """Read a converted CSV as text, so Excel's '7.0' or ' 7 ' are parsed by us, not guessed."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise UserError(f"cannot read {path}: {first_line(exc)}") from exc
    table.columns = [str(name).strip().lower() for name in table.columns]
    missing = [name for name in REQUIRED_COLUMNS if name not in table.columns]
    if missing:
        raise UserError(
            f"{path} lacks column(s) {', '.join(missing)}; expected the header "
            "img,pos,type,comments written by convert_excel.py"
        )
    return table


def parse_img_number(text: str) -> int | None:
    """Read an image number written as '7', ' 7 ', '7.0' or '007'; None if it is not one."""
    try:
        value = float(text.strip())
    except ValueError:
        return None
    if not value.is_integer() or value < 0:
        return None
    return int(value)


def defect_folder(comment: str) -> str:
    """Folder of a reject: comment lower-cased, whitespace runs -> '_', slashes -> '-'.

    An empty comment, or one that would be '.', '..' or 'good' (and so escape or join the
    normal images), gives 'reject'.
    """
    name = "_".join(comment.strip().lower().split()).replace("/", "-").replace("\\", "-")
    return "reject" if name in UNSAFE_DEFECT_NAMES else name


def index_images(folder: Path) -> dict[str, list[Path]]:
    """Map each image stem ('007') to its files, accepting any common extension in any case."""
    index: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            index.setdefault(path.stem, []).append(path)
    return index


def locate_row(img: str, kind: str, comment: str, images: dict[str, list[Path]]) -> tuple[str, Path, str]:
    """Turn one CSV row into (stem, image file, class sub-folder) or raise SkippedRow."""
    kind_key = kind.strip().casefold()
    if kind_key not in ("a", "r"):
        raise SkippedRow(f"unknown type {kind!r}")
    if not img.strip():
        raise SkippedRow("empty img")
    number = parse_img_number(img)
    if number is None:
        raise SkippedRow(f"img {img!r} is not a whole number")
    stem = f"{number:03d}"
    found = images.get(stem, [])
    if not found:
        raise SkippedRow(f"no image {stem}.<ext> in the image folder")
    if len(found) > 1:
        raise SkippedRow(f"several images for {stem}: {', '.join(p.name for p in found)}")
    folder = GOOD_TRAIN if kind_key == "a" else f"test/{defect_folder(comment)}"
    return stem, found[0], folder


def held_out(stems: list[str], split_ratio: float, seed: int) -> set[str]:
    """Choose the good images for test/good: round(ratio * n), at least one left for training.

    The stems are sorted first, so the same seed and the same images give the same choice.
    """
    ordered = sorted(stems)
    count = min(int(len(ordered) * split_ratio + 0.5), max(len(ordered) - 1, 0))
    picks = np.random.default_rng(seed).permutation(len(ordered))[:count]
    return {ordered[index] for index in picks}


def plan_line(
    name: str, labels: pd.DataFrame, images: dict[str, list[Path]], split_ratio: float, seed: int
) -> tuple[list[Item], list[Skip]]:
    """Decide where every row of one product line goes, before any file is written."""
    items, skips, seen = [], [], set()
    rows = labels[list(REQUIRED_COLUMNS)].itertuples(index=False, name=None)
    for number, (img, kind, comment) in enumerate(rows, start=1):
        try:
            stem, source, folder = locate_row(img, kind, comment, images)
            if stem in seen:
                raise SkippedRow(f"img {stem} is listed more than once")
        except SkippedRow as exc:
            skips.append(Skip(name, f"row {number} (img {img.strip()!r})", str(exc)))
            continue
        seen.add(stem)
        items.append(Item(source=source, folder=folder, stem=stem, origin=name))
    return hold_out_good(items, split_ratio, seed), skips


def hold_out_good(items: list[Item], split_ratio: float, seed: int) -> list[Item]:
    """Move the seeded share of train/good items to test/good."""
    chosen = held_out([item.stem for item in items if item.folder == GOOD_TRAIN], split_ratio, seed)
    return [
        dataclasses.replace(item, folder=GOOD_TEST) if item.folder == GOOD_TRAIN and item.stem in chosen else item
        for item in items
    ]


def list_classes(sorted_dir: Path) -> list[str]:
    """Class folders of a sorted tree: sub-folders holding train/ or test/."""
    return sorted(
        path.name
        for path in sorted_dir.iterdir()
        if path.is_dir() and any((path / split).is_dir() for split in CLASS_SPLITS)
    )


def resolve_class(name: str, classes: list[str], where: str) -> str:
    """Match a NAME exactly, else by one unambiguous prefix; name the candidates otherwise."""
    if name in classes:
        return name
    matches = [candidate for candidate in classes if candidate.startswith(name)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UserError(f"{name!r} is ambiguous in {where}: it matches {', '.join(matches)}")
    raise UserError(f"no class {name!r} in {where}; classes there: {', '.join(classes) or 'none'}")


def plan_combine(sorted_dir: Path, sources: list[str], normalized: set[str]) -> tuple[list[Item], list[Skip]]:
    """List every image under <source>/train|test/<category>/ with a '<source>_' prefix."""
    items, skips = [], []
    for source in sources:
        class_dir = sorted_dir / source
        for path in sorted(p for p in class_dir.rglob("*") if p.is_file()):
            relative = path.relative_to(class_dir)
            if relative == Path(BOWTIE_MARKER):
                continue
            if len(relative.parts) != 3 or relative.parts[0] not in CLASS_SPLITS:
                skips.append(Skip(source, str(relative), "not in train/<category>/ or test/<category>/"))
            elif path.suffix.lower() not in IMAGE_EXTENSIONS:
                skips.append(Skip(source, str(relative), "not an image file"))
            else:
                items.append(
                    Item(
                        source=path,
                        folder="/".join(relative.parts[:2]),
                        stem=f"{source}_{path.stem}",
                        origin=source,
                        normalize=source in normalized,
                    )
                )
    return items, skips


def load_reference(class_dir: Path, mode: str) -> np.ndarray:
    """The --normalize reference: the first train/good image of a class, by file name.

    One real image keeps a real histogram; a mean image would have a narrowed one.
    """
    candidates = sorted(
        p for p in (class_dir / GOOD_TRAIN).glob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not candidates:
        raise UserError(f"reference class {class_dir.name} has no train/good images for --normalize")
    try:
        return load_image(candidates[0], mode)
    except SkippedImage as exc:
        raise UserError(f"reference image {candidates[0]}: {exc}") from exc


def partial_dir(out_dir: Path, name: str) -> Path:
    """Temporary name a class folder is built under, renamed when complete."""
    return out_dir / f".{name}.partial"


def remove_old_output(path: Path, protected: list[Path]) -> None:
    """Delete an earlier run's class folder, never one that holds or is an input."""
    if not path.exists() and not path.is_symlink():
        return
    if any(is_within(inp, path) for inp in protected):
        raise UserError(f"refusing to delete {path}: it holds input files")
    if path.is_symlink() or not path.is_dir():
        raise UserError(f"{path} is in the way and is not a class folder; move it away")
    shutil.rmtree(path)


def prepare_output(out_dir: Path, class_names: list[str], overwrite: bool, protected: list[Path]) -> None:
    """Refuse a non-empty output folder unless --overwrite, which removes this run's classes."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output {out_dir} is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise UserError(f"output folder {out_dir} is not empty; pass --overwrite to rebuild its class folders")
        for name in class_names:
            remove_old_output(out_dir / name, protected)
            remove_old_output(partial_dir(out_dir, name), protected)
    out_dir.mkdir(parents=True, exist_ok=True)


def write_item(item: Item, dest_dir: Path, processing: Processing) -> None:
    """Byte-copy the image, or decode, process and save it as PNG when processing applies."""
    if not processing.rewrites(item):
        dest = dest_dir / f"{item.stem}{item.source.suffix.lower()}"
        if dest.exists():
            raise SkippedImage(f"another image already became {dest.name}")
        shutil.copy2(item.source, dest)
        return
    dest = dest_dir / f"{item.stem}.png"
    if dest.exists():
        raise SkippedImage(f"another image already became {dest.name}")
    pixels = processing.apply(load_image(item.source, processing.mode), item.normalize)
    Image.fromarray(pixels).save(dest)


def write_marker(class_dir: Path, mode: str) -> None:
    """The mark of a BowTie-prepared class folder: run_experiment.py --dataset auto reads it as BowTie."""
    text = json.dumps({"layout": "bowtie", "written_by": "data/process_data.py", "mode": mode}, indent=2)
    (class_dir / BOWTIE_MARKER).write_text(text + "\n", encoding="utf-8")


def build_class(
    out_dir: Path, name: str, items: list[Item], processing: Processing, mode: str
) -> tuple[Counter, list[Skip]]:
    """Write one class folder (and its BowTie marker) under a temporary name, then rename it into place."""
    staging = partial_dir(out_dir, name)
    counts, skips = Counter(), []
    try:
        for folder in (GOOD_TRAIN, GOOD_TEST):
            (staging / folder).mkdir(parents=True)
        for item in tqdm(items, desc=name, unit="img", disable=None):
            dest_dir = staging / item.folder
            dest_dir.mkdir(parents=True, exist_ok=True)
            try:
                write_item(item, dest_dir, processing)
            except SkippedImage as exc:
                skips.append(Skip(item.origin, item.source.name, str(exc)))
                continue
            counts[item.origin, item.folder] += 1
        write_marker(staging, mode)
        os.replace(staging, out_dir / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return counts, skips


def summary_table(rows: list[str], counts: Counter, skips: list[Skip], total_label: str) -> pd.DataFrame:
    """Per-class counts: train/good, test/good, each test/<defect>, skipped (+ a total row)."""
    defects = sorted({folder for _, folder in counts} - {GOOD_TRAIN, GOOD_TEST})
    table = pd.DataFrame(0, index=pd.Index(rows, name="class"), columns=[GOOD_TRAIN, GOOD_TEST, *defects, "skipped"])
    for (row, folder), count in counts.items():
        table.loc[row, folder] = count
    for skip in skips:
        table.loc[skip.origin, "skipped"] += 1
    if len(rows) > 1:
        table.loc[total_label] = table.sum()
    return table


def print_report(table: pd.DataFrame, skips: list[Skip], out_dir: Path) -> None:
    """Print the per-class table, then every skipped row or file and why, on stdout."""
    print(f"Output: {out_dir}")
    print(table.to_string())
    if skips:
        print(f"\nSkipped ({len(skips)}):")
        print(
            pd.DataFrame([dataclasses.asdict(s) for s in skips])
            .rename(columns={"origin": "class"})
            .to_string(index=False)
        )


def processing_from_args(args: argparse.Namespace) -> Processing:
    """Collect the pixel flags into one immutable object."""
    return Processing(
        grayscale=args.grayscale,
        canny=args.canny,
        canny_sigma=args.canny_sigma,
        equalize_global=args.equalize_global,
        equalize_local=args.equalize_local,
        equalize_disk_size=args.equalize_disk_size,
    )


def run_sort(args: argparse.Namespace) -> None:
    """Sort mode: check every input, plan all lines, then write one class folder per line."""
    input_dir = existing_dir(args.input, "input")
    out_dir = args.output.resolve()
    own_map = args.input / DEFAULT_MAP.name
    map_path = args.map if args.map is not None else own_map if own_map.is_file() else DEFAULT_MAP
    check_output_location(out_dir, input_dir)
    sources = resolve_sources(input_dir, load_map(map_path), map_path)
    plans = {
        name: plan_line(name, read_labels(csv_path), index_images(image_dir), args.split_ratio, args.seed)
        for name, (csv_path, image_dir) in sources.items()
    }
    protected = [input_dir, *(path for pair in sources.values() for path in pair)]
    prepare_output(out_dir, list(plans), args.overwrite, protected)
    processing = processing_from_args(args)
    counts, skips = Counter(), []
    for name, (items, plan_skips) in plans.items():
        written, failed = build_class(out_dir, name, items, processing, "sort")
        counts.update(written)
        skips += plan_skips + failed
    print_report(summary_table(list(plans), counts, skips, "total"), skips, args.output)


def run_combine(args: argparse.Namespace) -> None:
    """Combine mode: merge sorted classes into <out>/<name>, files prefixed '<source>_'."""
    sorted_dir = existing_dir(args.input, "sorted input")
    out_dir = args.output.resolve()
    check_output_location(out_dir, sorted_dir)
    classes = list_classes(sorted_dir)
    sources = [resolve_class(name, classes, str(sorted_dir)) for name in args.combine]
    if len(set(sources)) != len(sources):
        raise UserError(f"a class is named twice: {' '.join(args.combine)} -> {' '.join(sources)}")
    target = args.name or "_".join(sources)
    if Path(target).name != target or target in (".", ".."):
        raise UserError(f"--name {target!r} must be a plain folder name")
    processing, normalized = processing_from_args(args), set()
    if args.normalize:
        reference_name = resolve_class(args.norm_reference or sources[0], sources, "the combined classes")
        reference = load_reference(sorted_dir / reference_name, processing.mode)
        processing = dataclasses.replace(processing, reference=reference)
        normalized = set(sources) - {reference_name}
    items, skips = plan_combine(sorted_dir, sources, normalized)
    prepare_output(out_dir, [target], args.overwrite, [sorted_dir])
    counts, failed = build_class(out_dir, target, items, processing, "combine")
    skips += failed
    print_report(summary_table(sources, counts, skips, target), skips, args.output / target)


def main(argv: list[str] | None = None) -> int:
    """Run sort or combine mode; user errors become one stderr line and exit status 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_mode_flags(parser, args)
    try:
        if args.combine:
            run_combine(args)
        else:
            run_sort(args)
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: error: {first_line(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
