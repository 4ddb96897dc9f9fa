"""Figures of one class's test results: curves, score distributions, confusion, mean maps, overlays.

Plotting reads a ClassEvaluation and draws it; it never scores images and takes every number
it prints (AUROC, AP, AUPRO, confusion counts) from `result.summary`. Image-level curve points
come from sklearn; the pixel ROC and PRO curves are `result.pixel_curves`, made once by
utils.evaluation.results.evaluate(). Figures are `matplotlib.figure.Figure` objects, never pyplot ones:
nothing is registered in pyplot's global figure list, so nothing is left open, and seaborn's
style is applied through an rc context that ends with `plot_class_results`.

Every heat map of a class (per-image figures and mean maps) shares one colour scale, from the
lowest to the highest value of all the class's maps, so colours compare across images.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from skimage.segmentation import find_boundaries
from sklearn.metrics import precision_recall_curve, roc_curve
from tqdm import tqdm

from utils.evaluation import metrics
from utils.evaluation.summary import CATEGORIES, ClassEvaluation, MapSummary, confusion_categories
from utils.reporting.images import HEAT_COLORMAP, OUTLINE_COLOUR, blend_overlay, heat_colour_map, write_png
from utils.reporting.text import with_interval

if TYPE_CHECKING:
    from datasets.images import Sample

log = logging.getLogger(__name__)

DPI = 100
CATEGORY_MEANING = MappingProxyType(
    {
        "TN": "good, called good",
        "FP": "good, called defect",
        "FN": "defect, called good",
        "TP": "defect, called defect",
    }
)
IMAGE_FIGURE_SIZE = (10.0, 3.6)
UNSAFE_FILENAME_CHARACTERS = re.compile(r'[\\/:*?"<>|\x00-\x1f]')


@dataclass(frozen=True)
class ColourScale:
    """The one heat-map colour range of a class, so the same colour means the same distance everywhere."""

    vmin: float
    vmax: float

    @property
    def label(self) -> str:
        return f"Mahalanobis distance, class scale [{self.vmin:.2f}, {self.vmax:.2f}]"


@dataclass(frozen=True)
class PixelDistribution:
    """Counts of map values on the evaluation's fine bins (metrics.ScoreBins), for one kind of pixel."""

    counts: np.ndarray
    bins: metrics.ScoreBins
    description: str
    colour: str

    @property
    def label(self) -> str:
        return f"{self.description}: {int(self.counts.sum()):,} pixels"

    def density(self, edges: np.ndarray) -> np.ndarray:
        """Density on the display bins `edges` (each fine bin counted at its centre)."""
        counts, _ = np.histogram(self.bins.centres(), bins=edges, weights=self.counts)
        total = counts.sum()
        return counts / (total * np.diff(edges)) if total else counts


def class_colour_scale(maps: np.ndarray) -> ColourScale:
    """Lowest to highest value of all maps: no pixel is clipped; a constant map set gets a unit range."""
    vmin, vmax = float(maps.min()), float(maps.max())
    return ColourScale(vmin, vmax if vmax > vmin else vmin + 1.0)


def summary_counts(summary: dict) -> np.ndarray:
    """The confusion counts the metrics reported, as [[TN, FP], [FN, TP]] (rows true, columns called)."""
    return np.array(
        [
            [summary["true_negatives"], summary["false_positives"]],
            [summary["false_negatives"], summary["true_positives"]],
        ],
        dtype=int,
    )


def visualization_name(sample: Sample) -> str:
    """`<defect>_<stem>.png` with path separators and characters Windows rejects replaced by `_`."""
    return UNSAFE_FILENAME_CHARACTERS.sub("_", f"{sample.defect}_{sample.path.stem}") + ".png"


def _unique_names(samples: list[Sample], indices: list[int]) -> list[str]:
    """File names for one category; a repeated name (same stem in test/good and train/good) gets `_<index>`."""
    names: list[str] = []
    for index in indices:
        name = visualization_name(samples[index])
        if name in names:
            name = f"{name[:-4]}_{index}.png"
        names.append(name)
    return names


def _note(ax, text: str) -> None:
    """An empty panel that says why it is empty, instead of a silently missing plot."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _image_roc_panel(ax, result: ClassEvaluation) -> None:
    labels, summary = result.labels, result.summary
    ax.set_title("image level")
    if summary.get("roc_auc") is None:
        _note(ax, "image ROC undefined:\nthe test set has only one kind of image")
        return
    fpr, tpr, _ = roc_curve(labels, result.scores)
    label = f"AUROC {summary['roc_auc']:.3f}"
    if summary.get("roc_auc_ci_low") is not None:
        label += f" (95% CI {summary['roc_auc_ci_low']:.3f}-{summary['roc_auc_ci_high']:.3f})"
    ax.plot(fpr, tpr, label=label)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    _operating_point(ax, summary.get("false_positive_rate"), summary.get("recall"), result.threshold)
    ax.set_xlabel("false positive rate (good images called defect)")
    ax.set_ylabel("true positive rate (defect images found)")
    ax.legend(loc="lower right", fontsize="small")


def _operating_point(ax, x: float | None, y: float | None, threshold: float) -> None:
    """The operating threshold's point on a curve, where both its coordinates are defined."""
    if x is not None and y is not None:
        ax.plot(x, y, "o", color="crimson", label=f"operating threshold {threshold:.3g}")


def _pixel_roc_panel(ax, curves: metrics.PixelCurves, auroc: float) -> None:
    ax.plot(curves.fpr, curves.tpr, label=f"pixel AUROC {auroc:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_title("pixel level (good images + defect images with a mask)")
    ax.set_xlabel("false positive rate (good pixels)")
    ax.set_ylabel("true positive rate (defect pixels)")
    ax.legend(loc="lower right", fontsize="small")


def roc_figure(result: ClassEvaluation) -> Figure:
    """Image ROC, and the pixel ROC (from result.pixel_curves) beside it when the class has one."""
    with_pixels = result.pixel_curves is not None
    figure = Figure(figsize=(5.0 * (1 + with_pixels), 4.6), dpi=DPI)
    axes = figure.subplots(1, 1 + with_pixels, squeeze=False)[0]
    _image_roc_panel(axes[0], result)
    if with_pixels:
        _pixel_roc_panel(axes[1], result.pixel_curves, result.summary["pixel_roc_auc"])
    figure.suptitle(f"{result.name}: ROC")
    figure.tight_layout()
    return figure


def pr_figure(result: ClassEvaluation) -> Figure:
    """Image-level precision-recall with AP, chance level and the operating point."""
    figure = Figure(figsize=(5.0, 4.6), dpi=DPI)
    ax = figure.subplots()
    summary = result.summary
    ax.set_title(f"{result.name}: precision-recall (image level)")
    if summary.get("pr_auc") is None:
        _note(ax, "precision-recall undefined:\nthe test set has only one kind of image")
        return figure
    precision, recall, _ = precision_recall_curve(result.labels, result.scores)
    ax.plot(recall, precision, drawstyle="steps-post", label=f"AP {summary['pr_auc']:.3f}")
    ax.axhline(result.labels.mean(), color="grey", linestyle=":", linewidth=1, label="chance (defect share)")
    _operating_point(ax, summary.get("recall"), summary.get("precision"), result.threshold)
    ax.set_xlabel("recall (defect images found)")
    ax.set_ylabel("precision (called defects that are defects)")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left", fontsize="small")
    figure.tight_layout()
    return figure


def pro_figure(name: str, curves: metrics.PixelCurves, aupro: float) -> Figure:
    """PRO curve with the part that AUPRO integrates (FPR up to the limit) shaded."""
    fpr, pro = curves.fpr, curves.pro
    limit = metrics.AUPRO_FPR_LIMIT
    figure = Figure(figsize=(5.0, 4.6), dpi=DPI)
    ax = figure.subplots()
    ax.plot(fpr, pro, label=f"PRO, AUPRO (FPR <= {limit}) {aupro:.3f}")
    inside = fpr <= limit
    ax.fill_between(fpr[inside], pro[inside], alpha=0.2)
    ax.axvline(limit, color="crimson", linestyle="--", linewidth=1, label=f"FPR limit {limit}")
    ax.set_xlabel("false positive rate (good pixels)")
    ax.set_ylabel("per-region overlap (mean over defect regions)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{name}: per-region overlap")
    ax.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    return figure


def _threshold_line(ax, threshold: float, labelled: bool) -> None:
    ax.axvline(threshold, color="crimson", linestyle="--", linewidth=1.2)
    if labelled:
        ax.text(
            threshold,
            1.0,
            f" threshold {threshold:.3g}",
            color="crimson",
            fontsize="small",
            transform=ax.get_xaxis_transform(),
            ha="left",
            va="bottom",
        )


def score_distribution_figure(result: ClassEvaluation) -> Figure:
    """Image scores of good vs defect (histogram) and per defect type (one dot per image, the type's
    recall at the threshold in its label), with the threshold."""
    kinds = np.where(result.labels == 1, "defect", "good")
    recalls = (
        {}
        if result.defect_types is None
        else {
            row.defect: f"{row.defect}\nn={row.n_images}, recall {row.recall:.2f}"
            for row in result.defect_types.itertuples()
        }
    )
    types = np.array([recalls.get(s.defect, s.defect) if s.label == 1 else "good" for s in result.samples])
    type_order = [t for t in ["good", *sorted(set(types) - {"good"})] if t in types]
    figure = Figure(figsize=(8.0, 3.2 + 0.35 * len(type_order)), dpi=DPI)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[1.2, 0.4 + 0.15 * len(type_order)])
    sns.histplot(
        x=result.scores,
        hue=kinds,
        hue_order=[k for k in ("good", "defect") if k in kinds],
        palette={"good": "tab:blue", "defect": "tab:orange"},
        element="step",
        ax=top,
    )
    top.set_ylabel("images")
    top.set_title(f"{result.name}: image scores (max of the anomaly map)", pad=14)
    sns.stripplot(
        x=result.scores,
        y=types,
        order=type_order,
        hue=types,
        hue_order=type_order,
        orient="h",
        size=3.5,
        jitter=0.25,
        legend=False,
        ax=bottom,
    )
    bottom.set_xlabel("image score (Mahalanobis distance)")
    _threshold_line(top, result.threshold, labelled=True)
    _threshold_line(bottom, result.threshold, labelled=False)
    figure.tight_layout()
    return figure


def confusion_figure(counts: np.ndarray, summary: dict, threshold: float, name: str) -> Figure:
    """The reported confusion counts at the operating threshold, labelled TN/FP/FN/TP."""
    figure = Figure(figsize=(4.6, 4.2), dpi=DPI)
    ax = figure.subplots()
    annotations = np.array(
        [[f"TN\n{counts[0, 0]}", f"FP\n{counts[0, 1]}"], [f"FN\n{counts[1, 0]}", f"TP\n{counts[1, 1]}"]]
    )
    sns.heatmap(
        counts,
        annot=annotations,
        fmt="",
        cmap="Blues",
        cbar=False,
        square=True,
        linewidths=1,
        xticklabels=["good", "defect"],
        yticklabels=["good", "defect"],
        annot_kws={"fontsize": 13},
        ax=ax,
    )
    ax.set_xlabel(f"called (score > {threshold:.3g} = defect)")
    ax.set_ylabel("true")
    rates = [
        f"{shown} {with_interval(summary[key], summary.get(f'{key}_ci_low'), summary.get(f'{key}_ci_high'))}"
        for key, shown in (
            ("precision", "precision"),
            ("recall", "recall"),
            ("false_positive_rate", "FPR"),
            ("f1_score", "F1"),
        )
        if summary.get(key) is not None
    ]
    ax.set_title(
        f"{name}: operating threshold, 95% Wilson intervals\n{', '.join(rates[:2])}\n{', '.join(rates[2:])}",
        fontsize="medium",
    )
    figure.tight_layout()
    return figure


def mean_maps_figure(maps: MapSummary, name: str) -> Figure:
    """Mean anomaly map per category, laid out as the confusion matrix ([[TN, FP], [FN, TP]]).

    The four panels share one scale, the range of the mean maps: averaging pulls every mean
    far below the class's per-image peaks, and on the class scale they were near-uniform dark.
    """
    means = maps.mean_maps()
    values = np.stack(list(means.values())) if means else np.zeros(1)
    scale = class_colour_scale(values)
    figure = Figure(figsize=(7.4, 6.6), dpi=DPI)
    axes = figure.subplots(2, 2)
    figure.subplots_adjust(left=0.03, right=0.84, top=0.88, bottom=0.03, wspace=0.08, hspace=0.22)
    shown = None
    for ax, category in zip(axes.ravel(), CATEGORIES):
        ax.set_title(f"{category} ({CATEGORY_MEANING[category]})\nn={maps.map_counts[category]}", fontsize="medium")
        if category not in means:
            _note(ax, "no images in this category")
            ax.set_box_aspect(1.0)
            continue
        shown = ax.imshow(means[category], cmap=HEAT_COLORMAP, vmin=scale.vmin, vmax=scale.vmax)
        ax.axis("off")
    if shown is not None:
        label = f"mean Mahalanobis distance, shared scale [{scale.vmin:.2f}, {scale.vmax:.2f}]"
        figure.colorbar(shown, cax=figure.add_axes((0.87, 0.1, 0.025, 0.7)), label=label)
    figure.suptitle(f"{name}: mean anomaly map per outcome")
    return figure


def pixel_distributions(result: ClassEvaluation) -> tuple[PixelDistribution, PixelDistribution]:
    """Map values of good images, and of defect images: inside the masks when the class has any
    defect pixels in its masks, else all pixels of the defect images (said in the label)."""
    maps = result.maps
    good = maps.good_pixels.outside + maps.good_pixels.inside
    normal = PixelDistribution(good, maps.bins, "good images", "tab:blue")
    defects = metrics.PixelHistogram(maps.bins)
    for histogram in maps.defect_pixels.values():
        defects += histogram
    if result.has_ground_truth and defects.inside.any():
        return normal, PixelDistribution(defects.inside, maps.bins, "defect images, inside the masks", "tab:orange")
    defects += maps.unmasked_pixels
    every = defects.outside + defects.inside
    return normal, PixelDistribution(every, maps.bins, "defect images, all pixels", "tab:orange")


def pixel_distribution_figure(
    distributions: list[PixelDistribution], scale: ColourScale, result: ClassEvaluation, title: str
) -> Figure:
    """Density of map values on fixed bins over the class scale, so the three pixel figures line up, with the
    map threshold (the image threshold too where they are one quantity: map_max)."""
    figure = Figure(figsize=(8.0, 4.8), dpi=DPI)
    ax = figure.subplots()
    edges = np.linspace(scale.vmin, scale.vmax, 101)
    drawn = [distribution for distribution in distributions if distribution.counts.any()]
    for distribution in drawn:
        density = distribution.density(edges)
        ax.stairs(density, edges, fill=True, alpha=0.35, color=distribution.colour, label=distribution.label)
        ax.stairs(density, edges, color=distribution.colour)
    if not drawn:
        _note(ax, "no pixels of this kind in the test set")
    else:
        same = result.map_threshold == result.threshold
        ax.axvline(
            result.map_threshold,
            color="crimson",
            linestyle="--",
            linewidth=1.2,
            label=f"map threshold {result.map_threshold:.3g} "
            + ("= image threshold (an image is a defect when any pixel is above)" if same else "(regions)"),
        )
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
        ax.set_xlabel("pixel anomaly value (Mahalanobis distance)")
        ax.set_ylabel("density")
    ax.set_title(title)
    figure.tight_layout()
    return figure


class ImageFigure:
    """One per-image figure (input + outline, heat map, overlay + outline) redrawn for every image.

    Axes, colour bar and threshold line are drawn once and kept as the figure's background; each image
    restores it and draws only what changes (the three panels, each a single nearest-neighbour RGB image
    with the overlay and outline blended in numpy, and the titles), as matplotlib's blitting does.
    """

    def __init__(self, size: tuple[int, int], scale: ColourScale, map_threshold: float):
        self.figure = Figure(figsize=IMAGE_FIGURE_SIZE, dpi=DPI)
        self.figure.subplots_adjust(left=0.01, right=0.88, top=0.82, bottom=0.02, wspace=0.05)
        axes = self.figure.subplots(1, 3)
        self.colour_map = heat_colour_map()
        self.norm = Normalize(scale.vmin, scale.vmax)
        blank = np.zeros((*size, 3), np.uint8)
        self.input_panel = axes[0].imshow(blank, interpolation="nearest")
        self.heat_panel = axes[1].imshow(
            np.zeros(size, np.float32), cmap=self.colour_map, norm=self.norm, interpolation="nearest"
        )
        self.overlay_panel = axes[2].imshow(blank, interpolation="nearest")
        self.panel_titles = [ax.set_title("", y=1.0) for ax in axes]  # a fixed place: no layout pass per image
        for ax in axes:
            ax.axis("off")
        colour_bar = self.figure.colorbar(self.heat_panel, cax=self.figure.add_axes((0.9, 0.08, 0.015, 0.68)))
        colour_bar.set_label(f"{scale.label}\ngreen line: map threshold {map_threshold:.3g}", fontsize="small")
        colour_bar.ax.axhline(map_threshold, color="lime", linewidth=2)
        self.title = self.figure.suptitle("")
        self.changing = [self.input_panel, self.heat_panel, self.overlay_panel, *self.panel_titles, self.title]
        for artist in self.changing:
            artist.set_animated(True)
        self.canvas = FigureCanvasAgg(self.figure)
        self.canvas.draw()
        self.background = self.canvas.copy_from_bbox(self.figure.bbox)

    def draw(self, image: np.ndarray, heat: np.ndarray, mask: np.ndarray | None, title: str) -> np.ndarray:
        """The figure of one image as (H, W, 3) uint8 pixels; `mask` None = no ground truth file for it."""
        coloured = self.colour_map(self.norm(heat), bytes=True)[..., :3]
        overlay = blend_overlay(image, coloured)
        shown = image
        if mask is not None and mask.any():
            outline = find_boundaries(mask, mode="outer")
            shown = image.copy()
            shown[outline] = overlay[outline] = OUTLINE_COLOUR
        self.input_panel.set_data(shown)
        self.heat_panel.set_data(heat)
        self.overlay_panel.set_data(overlay)
        truth = "" if mask is None else (" + ground truth (cyan)" if mask.any() else " (mask empty at model input)")
        for panel, text in zip(self.panel_titles, (f"input{truth}", "anomaly map", f"overlay{truth}")):
            panel.set_text(text)
        self.title.set_text(title)
        self.canvas.restore_region(self.background)
        for artist in self.changing:
            self.figure.draw_artist(artist)
        return np.asarray(self.canvas.buffer_rgba())[..., :3].copy()


def _image_title(result: ClassEvaluation, index: int, category: str) -> str:
    sample, score = result.samples[index], float(result.scores[index])
    relation = ">" if score > result.threshold else "<="
    return (
        f"{category} ({CATEGORY_MEANING[category]}): {sample.defect}/{sample.path.name}\n"
        f"score {score:.3f} {relation} threshold {result.threshold:.3f}"
    )


def _clear_stale_visualizations(folder: Path) -> None:
    """Remove per-image PNGs of an earlier run in this folder: with another threshold they would sit
    in the wrong category."""
    for category in CATEGORIES:
        for old in (folder / category).glob("*.png"):
            old.unlink()


def write_visualizations(result: ClassEvaluation, scale: ColourScale, folder: Path) -> None:
    """visualizations/<category>/<defect>_<stem>.png for the images the evaluation kept to show
    (MapSummary: up to --max_visualizations per category, the furthest from the threshold, and the closest
    calls report.html shows)."""
    _clear_stale_visualizations(folder)
    jobs = []
    for category in CATEGORIES:
        shown = result.maps.figure_images(category)
        names = _unique_names(result.samples, [image.index for image in shown])
        jobs += [(category, image, name) for image, name in zip(shown, names)]
    if not jobs:
        return
    for category in {category for category, _, _ in jobs}:
        (folder / category).mkdir(parents=True, exist_ok=True)
    drawer = ImageFigure(jobs[0][1].map.shape, scale, result.map_threshold)
    for category, image, name in tqdm(jobs, desc=f"{result.name} figures", unit="fig", leave=False):
        pixels = drawer.draw(image.image, image.map, image.mask, _image_title(result, image.index, category))
        write_png(pixels, folder / category / name)


def _warn_on_count_mismatch(name: str, counts: np.ndarray, categories: dict[str, np.ndarray]) -> None:
    """The confusion matrix shows the reported counts; the mean maps and folders use the categories.
    They agree unless the summary came from another threshold, which must not pass silently."""
    sizes = np.array([categories[c].size for c in CATEGORIES]).reshape(2, 2)
    if not np.array_equal(sizes, counts):
        log.warning(
            "%s: summary confusion counts %s differ from the threshold's categories %s",
            name,
            counts.tolist(),
            sizes.tolist(),
        )


def _write_curves(result: ClassEvaluation, out_dir: Path) -> None:
    """roc_curve.png and pr_curve.png always; the pixel ROC panel and pro_curve.png only when
    evaluate() made pixel curves (masks with defect and good pixels), so no masks = no pro_curve.png."""
    write_png(roc_figure(result), out_dir / "roc_curve.png")
    write_png(pr_figure(result), out_dir / "pr_curve.png")
    if result.pixel_curves is not None:
        write_png(
            pro_figure(result.name, result.pixel_curves, result.summary["pixel_aupro"]), out_dir / "pro_curve.png"
        )


def _style() -> dict:
    """Seaborn's whitegrid look as rc parameters, applied only while this module draws."""
    return {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.8)}


def plot_class_results(result: ClassEvaluation, out_dir: Path) -> None:
    """Write every figure of one class into `out_dir` (file list in the README's plots section)."""
    out_dir = Path(out_dir)
    categories = confusion_categories(result.labels, result.scores, result.threshold)
    counts = summary_counts(result.summary)
    _warn_on_count_mismatch(result.name, counts, categories)
    scale = class_colour_scale(np.array([result.maps.low, result.maps.high]))
    with matplotlib.rc_context(_style()):
        _write_curves(result, out_dir)
        write_png(score_distribution_figure(result), out_dir / "score_distribution.png")
        write_png(
            confusion_figure(counts, result.summary, result.threshold, result.name), out_dir / "confusion_matrix.png"
        )
        write_png(mean_maps_figure(result.maps, result.name), out_dir / "mean_anomaly_maps.png")
        normal, abnormal = pixel_distributions(result)
        for suffix, samples, title in (
            ("normal", [normal], "pixel anomaly values of good images"),
            ("abnormal", [abnormal], "pixel anomaly values of defect images"),
            ("comparative", [normal, abnormal], "pixel anomaly values, good vs defect"),
        ):
            figure = pixel_distribution_figure(samples, scale, result, f"{result.name}: {title}")
            write_png(figure, out_dir / f"patch_score_distribution_{suffix}.png")
        write_visualizations(result, scale, out_dir / "visualizations")
    log.info("%s: plots written to %s", result.name, out_dir)


def comparison_figure(comparison: pd.DataFrame) -> Figure:
    """Per class, every configuration's image AUROC (with its bootstrap 95% interval) and pixel AUROC
    side by side: configurations down the rows, so long names stay readable."""
    classes = list(dict.fromkeys(comparison["class_name"]))
    configurations = list(dict.fromkeys(comparison["configuration"]))
    rows = np.arange(len(configurations))
    figure = Figure(figsize=(8.0, 1.0 + len(classes) * (0.6 + 0.35 * len(configurations))), dpi=DPI)
    axes = figure.subplots(len(classes), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, classes):
        table = comparison[comparison["class_name"] == name].set_index("configuration").reindex(configurations)
        image, low, high = (table[key].to_numpy(float) for key in ("roc_auc", "roc_auc_ci_low", "roc_auc_ci_high"))
        interval = np.stack([image - low, high - image])
        ax.errorbar(image, rows - 0.12, xerr=interval, fmt="o", capsize=3, label="image AUROC (95% CI)")
        ax.plot(table["pixel_roc_auc"].to_numpy(float), rows + 0.12, "s", label="pixel AUROC")
        ax.set_yticks(rows, configurations)
        ax.set_ylim(len(configurations) - 0.5, -0.5)
        ax.set_title(name)
        ax.grid(axis="x", alpha=0.3)
    axes[0].legend(loc="lower left", fontsize="small")
    axes[-1].set_xlabel("AUROC")
    figure.tight_layout()
    return figure


def save_comparison_figure(comparison: pd.DataFrame, path: Path) -> None:
    with matplotlib.rc_context(_style()):
        write_png(comparison_figure(comparison), path)
