"""One predict.py run: a saved model scores new images batch by batch; each batch's heat maps, overlays (and
masks) at the original resolution go out, then its rows of predictions.csv and regions.csv, so an interrupted
or crashed run keeps what it scored. A rerun into the same folder with the same model and settings skips the
images an earlier run scored (their rows and files stay); a different model, settings or set of images
starts over. At the end both CSVs are written once more, atomically, in the order of the inputs.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datasets.images import (
    Geometry,
    ImageDataset,
    ImageReadError,
    Sample,
    image_loader,
    read_rgb,
    readable_batches,
)
from utils.config import PredictConfig
from utils.padim.anomaly_map import Region, Thresholds, anomaly_regions, same_quantity, to_original_resolution
from utils.padim.backbones import float32_precision, pick_device
from utils.padim.loading import LoadedModel, build, build_graph, read_model
from utils.padim.model_file import update_history
from utils.padim.onnx_graph import GRAPH_SUFFIXES, read_description
from utils.reporting.images import blend_overlay, draw_regions, heat_colour_table, heat_colours, write_png
from utils.runtime.output_files import (
    append_csv_rows,
    atomic_write,
    folder_lock,
    prove_writable,
    read_csv_rows,
    remove_output,
    write_csv,
)

log = logging.getLogger("padim.predict")

CSV_COLUMNS = (
    "path",
    "score",
    "threshold",
    "map_threshold",
    "is_anomalous",
    "anomalous_area_px",
    "n_regions",
    "error",
    "output_name",
)
REGION_COLUMNS = ("path", "region_id", "x", "y", "width", "height", "area_px", "peak_score", "mean_score")
PREDICTIONS, REGIONS = "predictions.csv", "regions.csv"
SCORED_WITH = "predictions.json"  # beside predictions.csv: the model and settings its rows were scored with
PREDICTION_OUTPUTS = (PREDICTIONS, REGIONS, "heatmaps", "overlays", "masks", SCORED_WITH)
HEAT_SCALE_TOP = 2.0
BAND_ROWS = 1024  # rows of an original-resolution output coloured at a time: no float copy of a whole large image
NON_FINITE_ERROR = "non-finite score or map (NaN or infinity): reported anomalous, the model or backbone is damaged"


class PredictError(Exception):
    """A user error (bad model, weights or output folder): one line on stderr, exit 1."""


@dataclass
class Progress:
    """How far a run has come, for the line an interrupt prints: its images, those an earlier run had scored,
    and predictions.csv once rows go there (counted in the file: an interrupt may land between a write and
    anything that would count it)."""

    images: int
    earlier: int = 0
    csv_path: Path | None = None

    def interrupted(self) -> str:
        if self.csv_path is None:
            return f"{PREDICTIONS} was not written"
        scored = sum(bool(row["score"]) for row in read_csv_rows(self.csv_path, CSV_COLUMNS) or [])
        return (
            f"{self.csv_path} keeps {scored} of {self.images} images ({self.earlier} from an earlier run), with "
            "their heat maps and overlays; the same command again skips them and scores the rest"
        )


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


class WithOriginal:
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
    """Heat map, overlay (and mask) of one image at its original resolution, against the map threshold
    (utils.padim.anomaly_map.Thresholds.map: the map's units, whatever the image score).

    Called from a background thread: PNG encoding and the projection release the GIL, so the
    files of one batch are written while the backbone runs on the next.
    """

    out_dir: Path
    map_threshold: float
    geometry: Geometry
    save_masks: bool
    table: np.ndarray
    min_region_area: int
    max_pixels: int

    def __call__(
        self, amap: torch.Tensor, original: np.ndarray | None, name: str, path: Path
    ) -> tuple[int, list[Region]]:
        """Write the files of one image (`original` None: decoded from `path` here); returns its pixels above
        the map threshold and its regions. Colours are computed BAND_ROWS rows at a time into the outputs."""
        if original is None:
            original = np.asarray(read_rgb(path, self.max_pixels))
        height, width = original.shape[:2]
        full = to_original_resolution(amap, height, width, self.geometry).numpy()
        heat, overlay = np.empty_like(original), np.empty_like(original)
        for top in range(0, height, BAND_ROWS):
            band = slice(top, top + BAND_ROWS)
            heat[band] = heat_colours(full[band], HEAT_SCALE_TOP * self.map_threshold, self.table)
            overlay[band] = blend_overlay(original[band], heat[band])
        del original
        write_png(heat, self.out_dir / "heatmaps" / f"{name}.png")
        del heat
        regions = anomaly_regions(full, self.map_threshold, self.min_region_area)
        write_png(draw_regions(overlay, regions), self.out_dir / "overlays" / f"{name}.png")
        del overlay
        above = full > self.map_threshold
        if self.save_masks:
            write_png(above.astype(np.uint8) * 255, self.out_dir / "masks" / f"{name}.png")
        return int(above.sum()), regions


def _number(value: float) -> str:
    """10 significant digits: float32 scores survive the CSV round trip."""
    return format(value, ".10g")


def _finish(in_flight: list[tuple[int, Future]], rows: list[dict], names: list[str]) -> list[dict]:
    """Wait for a batch's files, record their areas in `rows` and return their regions' rows (a write error
    surfaces here)."""
    regions = []
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
    return regions


def score_images(
    model: LoadedModel,
    todo: list[int],
    rows: list[dict],
    names: list[str],
    thresholds: Thresholds,
    config: PredictConfig,
) -> list[dict]:
    """Score the images `todo` indexes (into `rows`, one per input image: its score and outputs, or why it
    could not be read) and return their regions' rows. The rows of each batch are appended to
    predictions.csv, and its regions to regions.csv, once the batch's files are written.

    The model scores batch by batch (build) and at most one batch's files are in flight, so
    memory stays bounded by two batches of images.
    """
    samples = [Sample(Path(rows[index]["path"]), 0, "") for index in todo]
    images = ImageDataset(samples, model.geometry, pixels=model.pixels, max_pixels=config.max_image_pixels)
    loader = image_loader(WithOriginal(images), config.batch_size, config.num_workers, model.scorer.device)
    write = OutputWriter(
        config.output,
        thresholds.map,
        model.geometry,
        config.save_masks,
        heat_colour_table(),
        config.min_region_area,
        config.max_image_pixels,
    )
    in_flight: list[tuple[int, Future]] = []
    done: list[int] = []  # rows complete but not yet appended
    regions: list[dict] = []

    def record_failure(position: int, reason: str) -> None:
        index = todo[position]
        rows[index]["error"] = reason.removeprefix(f"{rows[index]['path']}: ")
        done.append(index)

    def append_done() -> None:
        found = _finish(in_flight, rows, names)
        append_csv_rows(found, config.output / REGIONS, REGION_COLUMNS)
        append_csv_rows((rows[index] for index in done), config.output / PREDICTIONS, CSV_COLUMNS)
        regions.extend(found)
        done.clear()

    batches = readable_batches(loader, "predict", record_failure, leave=True)
    with ThreadPoolExecutor(max_workers=1) as writer:
        for batch, maps, scores in model.scorer.stream_anomaly_maps((batch, batch.images) for batch in batches):
            append_done()
            finite = (torch.isfinite(maps).flatten(1).all(1) & torch.isfinite(scores)).tolist()
            indices = [todo[position] for position in batch.indices]
            in_flight = [
                (index, writer.submit(write, amap, original, names[index], Path(rows[index]["path"])))
                for index, amap, original, ok in zip(indices, maps, batch.originals, finite)
                if ok
            ]
            for index, score, ok in zip(indices, scores.tolist(), finite):
                rows[index].update(score=_number(score), is_anomalous=str(score > thresholds.image or not ok))
                if not ok:
                    rows[index]["error"] = NON_FINITE_ERROR
            done.extend(indices)
        append_done()
    return regions


def earlier_rows(folder: Path, scored_with: dict, rows: list[dict], names: list[str]) -> tuple[list, list] | None:
    """The rows of predictions.csv and regions.csv an earlier run into `folder` scored with the same model and
    settings (`scored_with`), for images of this run under the names this run gives them, that can be kept:
    images it could not read are tried again. None when the earlier run cannot be gone on from."""
    try:
        recorded = json.loads((folder / SCORED_WITH).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    earlier = read_csv_rows(folder / PREDICTIONS, CSV_COLUMNS)
    earlier_regions = read_csv_rows(folder / REGIONS, REGION_COLUMNS)
    if recorded != scored_with or earlier is None or earlier_regions is None:
        return None
    name_of = {row["path"]: f"{name}.png" for row, name in zip(rows, names)}
    kept = [row for row in earlier if row["score"]]
    if any(row["path"] not in name_of for row in earlier) or any(
        row["output_name"] not in ("", name_of[row["path"]]) for row in kept
    ):
        return None
    kept_paths = {row["path"] for row in kept}
    return kept, [row for row in earlier_regions if row["path"] in kept_paths]


def clear_earlier_prediction(folder: Path) -> None:
    """A folder holds one prediction run: what an earlier run wrote there (those names only) is removed, and
    the log says which, so no earlier model's maps lie beside this run's predictions.csv."""
    earlier = [folder / name for name in PREDICTION_OUTPUTS if (folder / name).exists()]
    if earlier:
        log.warning("%s held an earlier prediction: removed its %s", folder, ", ".join(p.name for p in earlier))
    for path in earlier:
        remove_output(path)


def run(config: PredictConfig, progress: Progress) -> int:
    """Refuse a bad model or output folder before the heavy work, then score, write, and summarise on stdout.

    Exit 1 when no image could be read, or when any image got a non-finite score: those are
    reported anomalous, never good, and the user is told the model is not to be trusted.
    """
    exported = config.model.suffix in GRAPH_SUFFIXES
    if exported:
        description = read_description(config.model)
    else:
        content, model_path, weights = read_model(config.model, config.weights)
    prove_writable(config.output, "output folder", PredictError)
    devices = config.devices
    device = pick_device(devices.device, "--device cuda")
    if exported:
        model = build_graph(config.model, description, device, devices.engine, config.num_workers)
    else:
        model = build(
            content,
            model_path,
            weights,
            device,
            config.batch_size,
            devices.engine,
            devices.precision,
            config.num_workers,
        )
        for line in update_history(content):
            log.info("model %s", line)
    paths = list(config.images)
    names = output_names(paths)
    rows = [{"path": str(path)} for path in paths]
    csv_path = config.output / PREDICTIONS
    with folder_lock(config.output, "output folder", PredictError), float32_precision(devices.allow_tf32):
        thresholds = model.thresholds
        if config.threshold is not None:
            thresholds = thresholds.with_image_threshold(config.threshold, model.image_score)
            log.info(
                "threshold %.4f from --threshold (the model's is %.4f); map threshold %.4f (%s)",
                thresholds.image,
                model.thresholds.image,
                thresholds.map,
                "the same quantity with the map_max score, it moves too"
                if same_quantity(model.image_score)
                else f"the model's: its {model.image_score} score is in other units than the map",
            )
        log.info(
            "regions and masks: map pixels above %.4f; heat map colour scale: 0 .. %.4f (%g x map threshold)",
            thresholds.map,
            HEAT_SCALE_TOP * thresholds.map,
            HEAT_SCALE_TOP,
        )
        scored_with = json.loads(json.dumps({**model.identity, **config.settings(), "device_type": device.type}))
        earlier = earlier_rows(config.output, scored_with, rows, names)
        if earlier is None:
            clear_earlier_prediction(config.output)
            kept, regions = [], []
            atomic_write(
                config.output / SCORED_WITH,
                lambda tmp: tmp.write_text(json.dumps(scored_with, indent=2) + "\n", encoding="utf-8"),
            )
        else:
            kept, regions = earlier
            log.info(
                "%s: %d of %d images were scored by an earlier run with this model and settings: skipped "
                "(their rows, heat maps and overlays are kept)",
                config.output,
                len(kept),
                len(paths),
            )
        write_csv(kept, csv_path, CSV_COLUMNS)
        write_csv(regions, config.output / REGIONS, REGION_COLUMNS)
        progress.earlier, progress.csv_path = len(kept), csv_path
        position = {row["path"]: index for index, row in enumerate(rows)}
        for row in kept:
            rows[position[row["path"]]] = row
        todo = [index for index, row in enumerate(rows) if "score" not in row]
        for index in todo:
            rows[index].update(threshold=_number(thresholds.image), map_threshold=_number(thresholds.map))
        if todo:
            regions += score_images(model, todo, rows, names, thresholds, config)
        write_csv(sorted(regions, key=lambda region: position[region["path"]]), config.output / REGIONS, REGION_COLUMNS)
        write_csv(rows, csv_path, CSV_COLUMNS)
    scored = [row for row in rows if row.get("score")]
    non_finite = sum(row.get("error") == NON_FINITE_ERROR for row in scored)
    anomalous = sum(row["is_anomalous"] == "True" for row in scored)
    skipped = f" ({len(kept)} of them by an earlier run: skipped)" if kept else ""
    print(
        f"{len(scored) - non_finite} of {len(rows)} images scored{skipped}, {anomalous} anomalous (threshold "
        f"{thresholds.image:.4f}; regions above map threshold {thresholds.map:.4f}), {len(rows) - len(scored)} "
        f"unreadable, {non_finite} non-finite (reported anomalous)"
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
