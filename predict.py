"""Score new images with a saved PaDiM model: predictions.csv, heat maps and overlays at the original resolution.

Everything needed to score comes from the model file that `run_experiment.py --save_distribution`
writes (<results>/<class>/padim_model.pt): no training data and no training flags.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets import DEFAULT_MAX_IMAGE_PIXELS
from datasets.images import (
    Geometry,
    ImageDataset,
    ImageReadError,
    Sample,
    collect_images,
    image_loader,
    read_rgb,
    readable_batches,
)
from utils.cli import (
    StrictParser,
    add_allow_tf32,
    add_engine_flags,
    add_model_flags,
    at_least,
    log_to_console,
    positive_float,
    run_main,
)
from utils.padim.anomaly_map import Region, anomaly_regions, to_original_resolution
from utils.padim.backbones import (
    float32_precision,
    pick_device,
)
from utils.padim.loading import LOAD_ERRORS, LoadedModel, build, build_graph, read_model
from utils.padim.model_file import MODEL_FILENAME, update_history
from utils.padim.onnx_graph import GRAPH_SUFFIXES, OnnxModelError, read_description
from utils.reporting.images import blend_overlay, draw_regions, heat_colour_table, heat_colours, write_png
from utils.runtime.output_files import OutputWriteError, atomic_write, folder_lock, prove_writable, remove_output

log = logging.getLogger("padim.predict")

CSV_COLUMNS = ("path", "score", "threshold", "is_anomalous", "anomalous_area_px", "n_regions", "error", "output_name")
REGION_COLUMNS = ("path", "region_id", "x", "y", "width", "height", "area_px", "peak_score", "mean_score")
MIN_REGION_AREA = 25
HEAT_SCALE_TOP = 2.0
BAND_ROWS = 1024  # rows of an original-resolution output coloured at a time: no float copy of a whole large image
NON_FINITE_ERROR = "non-finite score or map (NaN or infinity): reported anomalous, the model or backbone is damaged"


class PredictError(Exception):
    """A user error (bad model, weights, inputs or output folder): one line on stderr, exit 1."""


def build_parser() -> argparse.ArgumentParser:
    """Every flag with its help; defaults shown by --help."""
    parser = StrictParser(__doc__)
    add_model_flags(
        parser,
        f"a class results folder (holding {MODEL_FILENAME}), the model file itself, or a graph "
        "written by export.py (.onnx: ONNX Runtime by default; .xml: OpenVINO)",
    )
    parser.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="IMAGE|FOLDER|GLOB",
        help="an image file, a folder (its images, not sub-folders) or a quoted glob "
        "('**' recurses); repeat the flag for more",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("./predictions"),
        help="folder for predictions.csv, heatmaps/, overlays/ and masks/",
    )
    parser.add_argument("--batch_size", type=at_least(1), default=32, help="images per forward pass")
    parser.add_argument("--num_workers", type=at_least(0), default=0, help="image decoding processes")
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where the backbone and the distances run (auto: CUDA when available)",
    )
    add_allow_tf32(parser)
    add_engine_flags(parser)
    parser.add_argument(
        "--threshold", type=positive_float, help="anomaly threshold, overriding the model's (held-out normal quantile)"
    )
    parser.add_argument(
        "--min_region_area",
        type=at_least(1),
        default=MIN_REGION_AREA,
        help="regions above the threshold smaller than this many pixels (at the original "
        "resolution) are specks: not in regions.csv, not boxed",
    )
    parser.add_argument(
        "--save_masks", action="store_true", help="also write masks/<stem>.png: 0/255 pixels above the threshold"
    )
    parser.add_argument(
        "--max_image_pixels",
        type=at_least(0),
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="larger images are refused as possible decompression bombs; raise it for your own large images "
        "(0: no limit)",
    )
    return parser


def output_names(paths: list[Path]) -> list[str]:
    """A distinct output file stem per image that says which image it is: its stem, or, for a stem that
    several images share (test/good/000.png, test/crack/000.png), its folder and stem (good_000,
    crack_000); _1, _2 ... only when even those repeat. Compared case-insensitively."""
    shared = Counter(path.stem.casefold() for path in paths)
    used, names = set(), []
    for path in paths:
        base = f"{path.parent.name}_{path.stem}" if shared[path.stem.casefold()] > 1 else path.stem
        name, count = base, 0
        while name.casefold() in used:
            count += 1
            name = f"{base}_{count}"
        used.add(name.casefold())
        names.append(name)
    return names


class WithOriginal(Dataset):
    """ImageDataset items plus the original pixels they were made from (decoded once), which the
    original-resolution outputs need (collated into Batch.originals); None for an image reduced on
    decoding (a large one), whose full pixels the writer decodes again, one image at a time, so a
    batch never holds large images in full."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            decoded, mask = self.dataset.decode(index)
        except ImageReadError as err:
            return None, str(err), index, None
        original = None if decoded.reduced else np.asarray(decoded.image)
        return (*self.dataset.to_item(decoded, mask, index), original)


@dataclass(frozen=True)
class OutputWriter:
    """Heat map, overlay (and mask) of one image at its original resolution.

    Called from a background thread: PNG encoding and the projection release the GIL, so the
    files of one batch are written while the backbone runs on the next.
    """

    out_dir: Path
    threshold: float
    geometry: Geometry
    save_masks: bool
    table: np.ndarray
    min_region_area: int
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __call__(
        self, amap: torch.Tensor, original: np.ndarray | None, name: str, path: Path
    ) -> tuple[int, list[Region]]:
        """Write the files of one image (`original` None: decoded from `path` here); returns its pixels above
        the threshold and its regions. Colours are computed BAND_ROWS rows at a time into the outputs."""
        if original is None:
            original = np.asarray(read_rgb(path, self.max_pixels))
        height, width = original.shape[:2]
        full = to_original_resolution(amap, height, width, self.geometry).numpy()
        heat, overlay = np.empty_like(original), np.empty_like(original)
        for top in range(0, height, BAND_ROWS):
            band = slice(top, top + BAND_ROWS)
            heat[band] = heat_colours(full[band], HEAT_SCALE_TOP * self.threshold, self.table)
            overlay[band] = blend_overlay(original[band], heat[band])
        del original
        write_png(heat, self.out_dir / "heatmaps" / f"{name}.png")
        del heat
        regions = anomaly_regions(full, self.threshold, self.min_region_area)
        write_png(draw_regions(overlay, regions), self.out_dir / "overlays" / f"{name}.png")
        del overlay
        above = full > self.threshold
        if self.save_masks:
            write_png(above.astype(np.uint8) * 255, self.out_dir / "masks" / f"{name}.png")
        return int(above.sum()), regions


def _number(value: float) -> str:
    """10 significant digits: float32 scores survive the CSV round trip."""
    return format(value, ".10g")


def _finish(in_flight: list[tuple[int, Future]], rows: list[dict], names: list[str], regions: list[dict]) -> None:
    """Wait for a batch's files and record their areas and regions (a write error surfaces here)."""
    for index, future in in_flight:
        area, found = future.result()
        rows[index].update(anomalous_area_px=str(area), n_regions=str(len(found)), output_name=f"{names[index]}.png")
        regions.extend(
            {
                "path": rows[index]["path"],
                "region_id": number,
                "x": region.x,
                "y": region.y,
                "width": region.width,
                "height": region.height,
                "area_px": region.area,
                "peak_score": _number(region.peak),
                "mean_score": _number(region.mean),
            }
            for number, region in enumerate(found, start=1)
        )


def score_images(
    model: LoadedModel, paths: list[Path], names: list[str], threshold: float, args: argparse.Namespace
) -> tuple[list[dict], list[dict]]:
    """One CSV row per path (score and outputs for readable images, the reason for the others), and
    one row per region above the threshold.

    The model scores batch by batch (build) and at most one batch's files are in flight, so
    memory stays bounded by two batches of images.
    """
    rows = [{"path": str(p), "threshold": _number(threshold)} for p in paths]
    samples = [Sample(p, 0, "") for p in paths]
    dataset = WithOriginal(ImageDataset(samples, model.geometry, pixels=model.pixels, max_pixels=args.max_image_pixels))
    loader = image_loader(dataset, args.batch_size, args.num_workers, model.scorer.device)
    write = OutputWriter(
        args.output,
        threshold,
        model.geometry,
        args.save_masks,
        heat_colour_table(),
        args.min_region_area,
        args.max_image_pixels,
    )
    in_flight: list[tuple[int, Future]] = []
    regions: list[dict] = []

    def record_failure(index: int, reason: str) -> None:
        rows[index]["error"] = reason.removeprefix(f"{paths[index]}: ")

    batches = readable_batches(loader, "predict", record_failure, leave=True)
    with ThreadPoolExecutor(max_workers=1) as writer:
        for batch, maps, scores in model.scorer.stream_anomaly_maps((batch, batch.images) for batch in batches):
            _finish(in_flight, rows, names, regions)
            finite = (torch.isfinite(maps).flatten(1).all(1) & torch.isfinite(scores)).tolist()
            in_flight = [
                (index, writer.submit(write, amap, original, names[index], paths[index]))
                for index, amap, original, ok in zip(batch.indices, maps, batch.originals, finite)
                if ok
            ]
            for index, score, ok in zip(batch.indices, scores.tolist(), finite):
                rows[index].update(score=_number(score), is_anomalous=str(score > threshold or not ok))
                if not ok:
                    rows[index]["error"] = NON_FINITE_ERROR
        _finish(in_flight, rows, names, regions)
    return rows, regions


def write_csv(rows: list[dict], path: Path, columns: tuple[str, ...]) -> None:
    """Atomic: an interrupted run leaves the previous file, never half of one."""

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


PREDICTION_OUTPUTS = ("predictions.csv", "regions.csv", "heatmaps", "overlays", "masks")


def clear_earlier_prediction(folder: Path) -> None:
    """A folder holds one prediction run: what an earlier run wrote there (those names only) is removed, and
    the log says which, so no earlier model's maps lie beside this run's predictions.csv."""
    earlier = [folder / name for name in PREDICTION_OUTPUTS if (folder / name).exists()]
    if earlier:
        log.warning("%s held an earlier prediction: removed its %s", folder, ", ".join(p.name for p in earlier))
    for path in earlier:
        remove_output(path)


def run(args: argparse.Namespace) -> int:
    """Refuse a bad model or input before the heavy work, then score, write, and summarise on stdout.

    Exit 1 when no image could be read, or when any image got a non-finite score: those are
    reported anomalous, never good, and the user is told the model is not to be trusted.
    """
    exported = args.model.suffix in GRAPH_SUFFIXES
    if exported:
        description = read_description(args.model)
    else:
        content, model_path, weights = read_model(args.model, args.weights)
    paths = collect_images(args.input, "--input")
    if not paths:
        raise PredictError("no image found in --input " + " ".join(args.input))
    prove_writable(args.output, "output folder", PredictError)
    device = pick_device(args.device, "--device cuda")
    if exported:
        model = build_graph(args.model, description, device, args.engine, args.num_workers)
    else:
        model = build(
            content, model_path, weights, device, args.batch_size, args.engine, args.precision, args.num_workers
        )
        for line in update_history(content):
            log.info("model %s", line)
    with folder_lock(args.output, "output folder", PredictError), float32_precision(args.allow_tf32):
        clear_earlier_prediction(args.output)
        threshold = args.threshold if args.threshold is not None else model.threshold
        if args.threshold is not None:
            log.info("threshold %.4f from --threshold (the model's is %.4f)", threshold, model.threshold)
        log.info("heat map colour scale: 0 .. %.4f (%g x threshold)", HEAT_SCALE_TOP * threshold, HEAT_SCALE_TOP)
        rows, regions = score_images(model, paths, output_names(paths), threshold, args)
        csv_path = args.output / "predictions.csv"
        write_csv(regions, args.output / "regions.csv", REGION_COLUMNS)
        write_csv(rows, csv_path, CSV_COLUMNS)
    scored = [row for row in rows if "score" in row]
    non_finite = sum(row.get("error") == NON_FINITE_ERROR for row in scored)
    anomalous = sum(row["is_anomalous"] == "True" for row in scored)
    print(
        f"{len(scored) - non_finite} of {len(rows)} images scored, {anomalous} anomalous (threshold {threshold:.4f}), "
        f"{len(rows) - len(scored)} unreadable, {non_finite} non-finite (reported anomalous)"
    )
    print(f"predictions: {csv_path}")
    if non_finite:
        print(
            f"error: {non_finite} images got a non-finite score: the model or backbone is damaged "
            "(they are reported anomalous in predictions.csv)",
            file=sys.stderr,
        )
        return 1
    if not scored:
        print("error: no image could be read (reasons in predictions.csv)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_to_console()
    return run_main(
        run,
        args,
        (PredictError, *LOAD_ERRORS, OnnxModelError, OutputWriteError),
        "predictions.csv was not written",
    )


if __name__ == "__main__":
    sys.exit(main())
