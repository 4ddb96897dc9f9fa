"""One page per run: report.html beside master_results.csv, and comparison.html beside comparison.csv.

Built from the files the run wrote (master_results.csv, each class's figures, scores.csv and
visualizations/), so a page can be made again from a results folder alone. Thumbnails go to
report_files/ and every link is relative, so the folder can be zipped and opened anywhere,
offline; the page reads without JavaScript (a small script only sorts the tables). Class,
file and folder names come from users' folders: Jinja2 escapes every one of them.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from urllib.parse import quote

import jinja2
import pandas as pd
from PIL import Image

from datasets.images import Sample
from utils.evaluation.comparison import RANKING_RULE
from utils.evaluation.summary import CLOSEST_CALLS, outcome
from utils.reporting.plotting import CATEGORY_MEANING, visualization_name
from utils.reporting.text import with_interval
from utils.runtime.output_files import atomic_write

REPORT_FILENAME = "report.html"
COMPARISON_REPORT_FILENAME = "comparison.html"
THUMBNAILS = "report_files"
THUMBNAIL_SIZE = (360, 270)  # pixels, at most: thumbnails keep a 15-class page light
CLASS_FIGURES = (  # (file, caption) of each class folder's figures, in page order
    ("roc_curve.png", "ROC"),
    ("pr_curve.png", "precision-recall"),
    ("pro_curve.png", "per-region overlap"),
    ("score_distribution.png", "score distribution"),
    ("confusion_matrix.png", "confusion matrix"),
    ("mean_anomaly_maps.png", "mean anomaly maps"),
)
HEADLINE = (  # (label, column, interval columns or None)
    ("image AUROC", "roc_auc", ("roc_auc_ci_low", "roc_auc_ci_high")),
    ("PR AUC", "pr_auc", None),
    ("pixel AUROC", "pixel_roc_auc", None),
    ("AUPRO", "pixel_aupro", None),
    ("F1 max", "f1_max", None),
    ("recall", "recall", ("recall_ci_low", "recall_ci_high")),
    ("false positive rate", "false_positive_rate", ("false_positive_rate_ci_low", "false_positive_rate_ci_high")),
    ("precision", "precision", ("precision_ci_low", "precision_ci_high")),
    ("threshold", "optimal_threshold", None),
    ("map threshold (regions)", "map_threshold", None),
)
CONFUSION_COLUMNS = ("true_negatives", "false_positives", "false_negatives", "true_positives")
UNSET_MEANING = {  # experiment.json settings whose null means something; any other null does not apply, left out
    "reduced_dim": "the backbone's default",
    "augmentations": "none",
}
VERSIONED = ("torch", "torchvision", "numpy", "scikit-learn", "pandas", "jinja2")
TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


@dataclass(frozen=True)
class Picture:
    """A thumbnail (href relative to the page) linking to its full figure (None: nothing to link to)."""

    thumbnail: str
    full: str | None
    caption: str


@dataclass
class ClassSection:
    name: str
    anchor: str
    status: str
    headline: list[tuple[str, str]] = field(default_factory=list)
    counts: dict[str, str] = field(default_factory=dict)
    figures: list[Picture] = field(default_factory=list)
    good_misses: list[Picture] = field(default_factory=list)
    defect_misses: list[Picture] = field(default_factory=list)
    files: list[tuple[str, str]] = field(default_factory=list)


def href(path: Path, page_folder: Path) -> str:
    """`path` relative to the page's folder, percent-encoded for a URL (names may hold '#', '?' or spaces)."""
    return quote(path.relative_to(page_folder).as_posix())


def read_table(path: Path) -> pd.DataFrame:
    """A CSV exactly as written: every cell the string in the file (the page shows what the file holds)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _number(text: str) -> float | None:
    """A table cell's number; None for an empty (or non-numeric) cell."""
    try:
        return float(text)
    except ValueError:
        return None


def thumbnail(source: Path) -> bytes | None:
    """A small JPEG of the image at `source`; None when it cannot be read."""
    try:
        with Image.open(source) as image:
            image.thumbnail(THUMBNAIL_SIZE)
            small = image.convert("RGB")
    except (OSError, ValueError):
        return None
    encoded = io.BytesIO()
    small.save(encoded, format="JPEG", quality=85)
    return encoded.getvalue()


class Thumbnails:
    """The page's thumbnails in report_files/, each named by its content's hash (no user name reaches a file
    name here): the page is written after its thumbnails and the old ones are removed after the page, so
    an interrupted write leaves the old page or the new one, each with all its images."""

    def __init__(self, page_folder: Path):
        self.page_folder = page_folder
        self.folder = page_folder / THUMBNAILS
        self.kept: set[Path] = set()

    def picture(self, source: Path, caption: str) -> Picture | None:
        data = thumbnail(source)
        if data is None:
            return None
        target = self.folder / f"{hashlib.sha256(data).hexdigest()[:16]}.jpg"
        if not target.is_file():
            atomic_write(target, lambda tmp: tmp.write_bytes(data))
        self.kept.add(target)
        return Picture(href(target, self.page_folder), href(source, self.page_folder), caption)

    def remove_unused(self) -> None:
        """Delete the thumbnails of earlier pages that the page just written does not show."""
        for old in set(self.folder.glob("*.jpg")) - self.kept:
            old.unlink()


def _misses(scores: pd.DataFrame, class_dir: Path, thumbs: Thumbnails, label: int) -> list[Picture]:
    """The CLOSEST_CALLS good images (label 0) with the highest scores, or defect images (label 1) with the
    lowest (MapSummary's rule, so the run drew their figures): each shown as its per-image figure, with its
    map; only a caption where there is none (--max_visualizations 0), never the bare image."""
    chosen = scores[scores["label"] == label].sort_values("score", ascending=label == 1, kind="stable")
    misses = []
    for row in chosen.head(CLOSEST_CALLS).itertuples():
        name = outcome(label, row.is_anomalous)  # the run's own call, as its figures were filed
        sample = Sample(Path(row.path), label, row.defect)
        caption = f"{row.defect}/{sample.path.name}: score {row.score:.4f}, {name} ({CATEGORY_MEANING[name]})"
        figure = class_dir / "visualizations" / name / visualization_name(sample)
        picture = thumbs.picture(figure, caption) if figure.is_file() else None
        misses.append(picture or Picture("", None, f"{caption}; no figure drawn"))
    return misses


def class_section(row: dict, index: int, folder: Path, thumbs: Thumbnails) -> ClassSection:
    """What the page shows of one class: headline numbers, figures, worst misses and its files."""
    name = row["class_name"]
    section = ClassSection(name, f"class-{index}", row["status"])
    class_dir = folder / name
    for label, column, interval in HEADLINE:
        value = _number(row.get(column, ""))
        ends = [_number(row.get(end, "")) for end in interval or ()]
        section.headline.append((label, "-" if value is None else with_interval(value, *ends)))
    section.counts = {key: row.get(column, "") for key, column in zip(("TN", "FP", "FN", "TP"), CONFUSION_COLUMNS)}
    for file_name, caption in CLASS_FIGURES:
        if (class_dir / file_name).is_file() and (picture := thumbs.picture(class_dir / file_name, caption)):
            section.figures.append(picture)
    scores_path = class_dir / "scores.csv"
    if scores_path.is_file():
        scores = pd.read_csv(scores_path, dtype={"path": str, "defect": str}, keep_default_na=False)
        section.good_misses = _misses(scores, class_dir, thumbs, 0)
        section.defect_misses = _misses(scores, class_dir, thumbs, 1)
    for file_name in ("scores.csv", "defect_types.csv"):
        if (class_dir / file_name).is_file():
            section.files.append((file_name, href(class_dir / file_name, folder)))
    return section


def setting_rows(settings: dict, prefix: str = "") -> list[tuple[str, str]]:
    """experiment.json as the configuration block: a nested setting as `outer.inner`; a null named when it
    means something (UNSET_MEANING), else left out, as a setting that does not apply to this run."""
    rows = []
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += setting_rows(value, f"{name}.")
        elif value is None:
            rows += [(name, UNSET_MEANING[name])] if name in UNSET_MEANING else []
        else:
            rows.append((name, value if isinstance(value, str) else json.dumps(value)))
    return rows


def versions() -> list[tuple[str, str]]:
    """Python, the platform and the libraries whose versions change the numbers."""
    found = [("python", platform.python_version()), ("platform", platform.platform())]
    for package in VERSIONED:
        try:
            found.append((package, metadata.version(package)))
        except metadata.PackageNotFoundError:
            found.append((package, "not installed"))
    return found


def _cell(value) -> str:
    """A computed table's value as the CSV tables show it: floats to 6 significant digits, blank when missing."""
    if pd.isna(value):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _sortable(table: pd.DataFrame) -> dict:
    return {"columns": list(table.columns), "rows": table.to_dict("records")}


def _render(template: str, path: Path, **context) -> None:
    page = TEMPLATES.get_template(template).render(
        generated=datetime.now().astimezone().isoformat(timespec="seconds"),
        command=shlex.join(sys.argv),
        versions=versions(),
        **context,
    )
    atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))


def write_report(folder: Path, title: str) -> Path:
    """report.html of one configuration's results folder (master_results.csv, class folders, the log)."""
    table = read_table(folder / "master_results.csv")
    settings_path = folder / "experiment.json"
    settings = json.loads(settings_path.read_text(encoding="utf-8")) if settings_path.is_file() else {}
    thumbs = Thumbnails(folder)
    sections = [class_section(row, k, folder, thumbs) for k, row in enumerate(table.to_dict("records"))]
    logs = sorted(folder.glob("experiment_log*.log"))
    _render(
        "report.html",
        folder / REPORT_FILENAME,
        title=title,
        settings=setting_rows(settings),
        results=_sortable(table),
        sections=sections,
        links=[(path.name, href(path, folder)) for path in [folder / "master_results.csv", *logs]],
    )
    thumbs.remove_unused()
    return folder / REPORT_FILENAME


def write_comparison_report(parent: Path, comparison_csv: Path, figure: Path, best: pd.DataFrame) -> Path:
    """comparison.html beside comparison.csv: the table, the figure, the best configuration per class (with
    the ranking rule and whether it is clearly better) and a link to each configuration's report.html."""
    table = read_table(comparison_csv)
    configurations = list(dict.fromkeys(table["configuration"]))
    thumbs = Thumbnails(parent)
    _render(
        "comparison.html",
        parent / COMPARISON_REPORT_FILENAME,
        title=parent.name,
        results=_sortable(table),
        rule=RANKING_RULE,
        best=_sortable(best.map(_cell)),
        figure=thumbs.picture(figure, "image and pixel AUROC per configuration") if figure.is_file() else None,
        reports=[
            (name, href(parent / name / REPORT_FILENAME, parent))
            for name in configurations
            if (parent / name / REPORT_FILENAME).is_file()
        ],
        links=[(comparison_csv.name, href(comparison_csv, parent))],
    )
    thumbs.remove_unused()
    return parent / COMPARISON_REPORT_FILENAME
