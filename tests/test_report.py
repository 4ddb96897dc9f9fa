"""report.html and comparison.html: what the page says equals the files, every link resolves, users'
names stay text, and a real browser (headless Chromium) shows it without an error and sorts it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import unquote

import pandas as pd
import pytest
from PIL import Image

import run_experiment
from tests.helpers import REPORT_TRAIN_FLAGS, Page, assert_links_resolve, assert_table_equals_csv
from utils.evaluation.comparison import RANKING_RULE, best_per_class
from utils.evaluation.summary import CLOSEST_CALLS
from utils.reporting.plotting import DPI, IMAGE_FIGURE_SIZE
from utils.reporting.report import Thumbnails, class_section, setting_rows, write_comparison_report, write_report

HOSTILE_CLASS = "brick<script>window.injected=1"
HOSTILE_IMAGE = 'it\'s "bad"<img src=x onerror=window.injected=2>'
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
INSTALL = "apt-get install chromium (Debian) and pip install playwright"


@pytest.fixture(scope="module")
def hostile_run(texture_root: Path, tmp_path_factory) -> Path:
    """Two classes, one named like a script tag, with test images named like markup, and one class that
    fails (no training images): the run's results folder."""
    data = tmp_path_factory.mktemp("hostile") / "data"
    shutil.copytree(texture_root / "brick", data / HOSTILE_CLASS)
    shutil.copytree(texture_root / "gravel", data / "gravel")
    for image in (data / "gravel" / "train" / "good").iterdir():
        image.unlink()
    for k, image in enumerate(sorted((data / HOSTILE_CLASS / "test" / "good").iterdir())):
        image.rename(image.with_name(f"{HOSTILE_IMAGE}{k}.png"))
    results = tmp_path_factory.mktemp("hostile_results")
    flags = [
        *REPORT_TRAIN_FLAGS,
        "--max_visualizations",
        "2",
        "--data_path",
        str(data),
        "--base_results_dir",
        str(results),
    ]
    assert run_experiment.main(flags) == 0
    return results / "r"


@pytest.mark.figures
def test_report_shows_master_results_as_written_and_every_link_resolves(hostile_run: Path):
    page_path = hostile_run / "report.html"
    page = Page(page_path)
    assert_table_equals_csv(page, "master-results", hostile_run / "master_results.csv")
    assert_links_resolve(page, page_path)
    assert any(link.startswith("report_files/") for link in page.links), "no thumbnail on the page"
    assert any(link.endswith("scores.csv") for link in page.links) and "experiment_log.log" in page.links


@pytest.mark.figures
def test_names_from_users_folders_are_shown_as_text(hostile_run: Path):
    page = Page(hostile_run / "report.html")
    assert page.scripts == 1 and page.handlers == []  # the sorting script only; no injected tag or handler
    assert HOSTILE_CLASS in page.headings
    assert any(HOSTILE_IMAGE in text for text in page.texts)  # a caption of the highest-scored good images


@pytest.mark.figures
def test_failed_classes_are_marked(hostile_run: Path):
    text = (hostile_run / "report.html").read_text(encoding="utf-8")
    failed = [line for line in text.splitlines() if line.startswith('<tr class="failed">')]
    assert len(failed) == 1 and "<td>gravel</td>" in failed[0] and "failed: no training images" in failed[0]


def test_no_report_writes_no_page(tmp_path: Path, texture_root: Path):
    flags = [*REPORT_TRAIN_FLAGS, "--data_path", str(texture_root / "brick"), "--base_results_dir", str(tmp_path)]
    assert run_experiment.main([*flags, "--no_report"]) == 0
    assert not (tmp_path / "r" / "report.html").exists() and not (tmp_path / "r" / "report_files").exists()


MISSES_SHOWN_SCRIPT = """
Array.from(document.querySelectorAll('h3')).filter(function (h3) { return /images$/.test(h3.textContent); })
  .map(function (h3) {
    var shown = h3.nextElementSibling;
    var link = function (img) { var a = img.closest('a'); return a ? a.getAttribute('href') : null; };
    var links = Array.from(shown.querySelectorAll('img')).map(link);
    return {section: h3.textContent, links: links, captions: shown.querySelectorAll('figure').length};
  })
"""
TABLE_LAYOUT_SCRIPT = """
(function () {
  var box = document.getElementById('master-results').parentElement;
  var cell = document.querySelector('#master-results tbody td');
  box.scrollLeft = box.scrollWidth;
  return {
    overflow: getComputedStyle(box).overflowX,
    scrolls: box.scrollWidth > box.clientWidth && box.scrollLeft > 0,
    page_fits: document.documentElement.scrollWidth <= window.innerWidth,
    position: getComputedStyle(cell).position,
    class_left: Math.round(cell.getBoundingClientRect().left),
    box_left: Math.round(box.getBoundingClientRect().left + box.clientLeft),
  };
})()
"""
CONFIGURATION_TEXT_SCRIPT = """
Array.from(document.querySelectorAll('h2')).find(function (h2) { return h2.textContent === 'Configuration'; })
  .nextElementSibling.textContent
"""


def assert_misses_are_figures_with_maps(sections: list[dict], folder: Path) -> None:
    """Every image of the highest-scored good and lowest-scored defect images links to the per-image figure the
    run wrote (input, anomaly map, overlay: the figure's size), in the class's visualizations folder."""
    good = [section for section in sections if section["section"] == "Highest-scored good images"]
    assert good and sum(len(section["links"]) for section in good) == CLOSEST_CALLS  # of 6 good test images
    for section in sections:
        assert len(section["links"]) == section["captions"], f"{section['section']}: a caption without its figure"
        for link in section["links"]:
            assert link is not None, f"{section['section']}: an image that links to no figure"
            figure = folder / unquote(link)
            assert figure.parent.parent.name == "visualizations" and figure.is_file(), link
            with Image.open(figure) as image:
                assert image.size == tuple(round(inches * DPI) for inches in IMAGE_FIGURE_SIZE), link


@pytest.mark.slow
@pytest.mark.figures
def test_in_a_real_browser_the_page_has_no_error_no_broken_image_and_sorts(hostile_run: Path, tmp_path: Path):
    """Headless Chromium opens the page from disk: no console error, every image decoded, the table sorted
    by roc_auc on a click (blanks last) and reversed on a second; every image of the misses is its per-image
    figure; the results table scrolls inside its box with the class column staying in view; the configuration
    block says no 'null'; a screenshot is taken."""
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser test: {INSTALL}")
        pytest.skip(f"needs Chromium: {INSTALL}")
    sync_api = pytest.importorskip("playwright.sync_api", reason=f"needs Playwright: {INSTALL}")
    errors: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto((hostile_run / "report.html").as_uri())
        page.evaluate("document.querySelectorAll('img').forEach(function (img) { img.loading = 'eager'; })")
        page.wait_for_function("Array.from(document.images).every(function (img) { return img.complete; })")
        broken = page.evaluate(
            "Array.from(document.images).filter(function (img) { return img.naturalWidth === 0; })"
            ".map(function (img) { return img.getAttribute('src'); })"
        )
        injected = page.evaluate("window.injected === undefined")
        header = page.locator("#master-results th button", has_text="roc_auc").first
        column = page.evaluate(
            "Array.from(document.querySelectorAll('#master-results th')).findIndex("
            "function (th) { return th.textContent.trim() === 'roc_auc'; })"
        )
        cells = f"#master-results tbody tr td:nth-child({column + 1})"
        header.click()
        ascending = page.locator(cells).all_inner_texts()
        header.click()
        descending = page.locator(cells).all_inner_texts()
        shown_misses = page.evaluate(MISSES_SHOWN_SCRIPT)
        table = page.evaluate(TABLE_LAYOUT_SCRIPT)
        configuration = page.evaluate(CONFIGURATION_TEXT_SCRIPT)
        screenshot = Path(os.environ.get("REPORT_SCREENSHOT", tmp_path / "report.png"))
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    assert errors == [] and broken == [] and injected
    numbers = [float(text) for text in ascending if text]
    assert numbers == sorted(numbers) and ascending[-1] == ""  # the failed class has no AUROC: last
    assert [float(text) for text in descending if text] == sorted(numbers, reverse=True)
    assert screenshot.stat().st_size > 10_000
    assert_misses_are_figures_with_maps(shown_misses, hostile_run)
    assert table["overflow"] in ("auto", "scroll") and table["scrolls"], "the results table does not scroll inside"
    assert table["page_fits"], "the page is wider than the window"
    assert table["position"] == "sticky" and table["class_left"] == table["box_left"], "the class column moved away"
    assert "model_architecture" in configuration and "null" not in configuration and "None" not in configuration


@pytest.mark.figures
def test_a_new_page_removes_only_the_thumbnails_it_no_longer_shows(hostile_run: Path, tmp_path: Path):
    """Thumbnails are named by content: rewriting the page after a figure changed keeps every link resolving
    and leaves no stale thumbnail behind (the run's folder is copied, the fixture's stays as it was)."""
    folder = tmp_path / "copy"
    shutil.copytree(hostile_run, folder)
    before = set((folder / "report_files").iterdir())
    roc = folder / HOSTILE_CLASS / "roc_curve.png"
    Image.open(roc).rotate(90, expand=True).save(roc)
    write_report(folder, "again")
    page = Page(folder / "report.html")
    assert_links_resolve(page, folder / "report.html")
    shown = {folder / unquote(link) for link in page.links if link.startswith("report_files/")}
    after = set((folder / "report_files").iterdir())
    assert after == shown and len(after - before) == 1 and len(before - after) == 1


def test_class_headline_and_misses_read_from_the_class_files(tmp_path: Path):
    """Headline values to 3 decimals with their 95% intervals to 2, as in the summary table (the value alone
    when an end is missing, '-' for an empty cell); each miss is filed under the run's own call
    (is_anomalous), where its per-image figure was written; one without a figure is a caption, not the bare image."""
    class_dir = tmp_path / "c"
    (class_dir / "visualizations" / "FP").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(class_dir / "visualizations" / "FP" / "good_001.png")
    (class_dir / "scores.csv").write_text(
        "path,defect,label,score,is_anomalous\n"
        "/data/c/test/good/001.png,good,0,5.5,True\n"
        "/data/c/test/good/002.png,good,0,1.25,False\n"
        "/data/c/test/crack/003.png,crack,1,0.5,False\n",
        encoding="utf-8",
    )
    row = {"class_name": "c", "status": "ok", "roc_auc": "0.912345", "roc_auc_ci_low": "0.8", "roc_auc_ci_high": "0.99"}
    row |= {"recall": "0.5", "recall_ci_high": "0.7", "pr_auc": ""}
    section = class_section(row, 0, tmp_path, Thumbnails(tmp_path))
    headline = dict(section.headline)
    assert headline["image AUROC"] == "0.912 [0.80, 0.99]"
    assert headline["recall"] == "0.500" and headline["PR AUC"] == "-" and headline["AUPRO"] == "-"
    assert [picture.caption for picture in section.good_misses] == [
        "good/001.png: score 5.5000, FP (good, called defect)",
        "good/002.png: score 1.2500, TN (good, called good); no figure drawn",
    ]
    assert section.good_misses[0].full == "c/visualizations/FP/good_001.png"
    assert section.good_misses[1].thumbnail == "" and section.good_misses[1].full is None  # never the bare image
    assert [picture.caption for picture in section.defect_misses] == [
        "crack/003.png: score 0.5000, FN (defect, called good); no figure drawn"
    ]


def comparison_rows() -> pd.DataFrame:
    """Four classes of two or three configurations: overlapping intervals where the highest AUROC has the
    lowest lower end (a), one configuration clearly above the others (b), one that ran beside one that failed
    (c), none that ran (d)."""
    columns = ["configuration", "class_name", "status", "roc_auc", "roc_auc_ci_low", "roc_auc_ci_high"]
    rows = [
        ("x", "a", "ok", 0.90, 0.84, 0.95),
        ("y", "a", "ok", 0.93, 0.80, 0.99),
        ("z", "a", "ok", 0.70, 0.60, 0.79),
        ("x", "b", "ok", 0.99, 0.97, 1.00),
        ("y", "b", "ok", 0.80, 0.70, 0.90),
        ("z", "b", "ok", 0.85, 0.75, 0.96),
        ("x", "c", "failed: no training images", None, None, None),
        ("y", "c", "ok", 0.75, 0.60, 0.88),
        ("x", "d", "failed: no test images", None, None, None),
    ]
    table = pd.DataFrame(rows, columns=columns)
    return table.assign(pixel_roc_auc=0.9, pixel_aupro=0.7)


def test_the_best_configuration_is_ranked_by_its_interval_and_says_when_intervals_overlap():
    """Class a: y has the highest AUROC but x the highest lower end (0.84 > 0.80): x is ranked first, and as
    its interval overlaps y's, no configuration is clearly better; class b: x lies above every other; class c:
    the only one that ran; class d: no row."""
    best = best_per_class(comparison_rows())
    assert list(best.class_name) == ["a", "b", "c"] and list(best.configuration) == ["x", "x", "y"]
    assert list(best.roc_auc_ci_low) == [0.84, 0.97, 0.60] and list(best.roc_auc) == [0.90, 0.99, 0.75]
    assert list(best.verdict) == [
        "no configuration is clearly better: its 95% interval overlaps 1 of 2 other(s)",
        "clearly better: its 95% interval lies above the other 2",
        "the only configuration that ran",
    ]
    missing = comparison_rows().assign(roc_auc_ci_low=None, roc_auc_ci_high=None)
    assert best_per_class(missing).verdict[0] == "no interval to compare: cannot tell"


@pytest.mark.figures
def test_comparison_page_states_the_rule_and_whether_the_best_is_clearly_better(tmp_path: Path):
    comparison = comparison_rows()
    comparison.loc[comparison.class_name == "c", "pixel_aupro"] = None  # no masks: blank, as in the CSV
    comparison.to_csv(tmp_path / "comparison.csv", index=False)
    page_path = write_comparison_report(
        tmp_path, tmp_path / "comparison.csv", tmp_path / "comparison.png", best_per_class(comparison)
    )
    page = Page(page_path)
    header, rows = page.tables["best"]["header"], page.tables["best"]["rows"]
    verdicts = {row[0]: row[header.index("verdict")] for row in rows}
    assert verdicts["a"].startswith("no configuration is clearly better") and verdicts["b"].startswith("clearly")
    assert [row[header.index("roc_auc_ci_low")] for row in rows] == ["0.84", "0.97", "0.6"]
    assert [row[header.index("pixel_aupro")] for row in rows] == ["0.7", "0.7", ""]
    assert RANKING_RULE in page.texts


def test_configuration_block_names_or_leaves_out_unset_settings():
    """A null that means something is named, any other null (a setting that does not apply) left out, also
    inside a nested setting; nothing says 'null'."""
    settings = {
        "dataset": "folder",
        "test_class_name": None,
        "folder": {"normal_dir": "/n", "mask_dir": None},
        "layers": ["layer2", "layer3"],
        "reduced_dim": None,
        "augmentations": None,
        "resize": 64,
    }
    assert setting_rows(settings) == [
        ("dataset", "folder"),
        ("folder.normal_dir", "/n"),
        ("layers", '["layer2", "layer3"]'),
        ("reduced_dim", "the backbone's default"),
        ("augmentations", "none"),
        ("resize", "64"),
    ]
