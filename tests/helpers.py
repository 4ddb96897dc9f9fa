"""What several test files share: the repository root, the flags of a small run, the HTML page reader
and its assertions, synthetic embeddings, and the switch that keeps trainer from drawing class figures."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch

import trainer
from utils.padim.triangular import TriangularBlocks

ROOT = Path(__file__).resolve().parents[1]

SMALL_MODEL_FLAGS = [  # a small random-init backbone on small inputs: every CLI test runs in seconds
    "--model_architecture",
    "resnet18",
    "--weights",
    "none",
    "--resize",
    "64",
    "--cropsize",
    "56",
    "--batch_size",
    "8",
    "--num_workers",
    "0",
    "--max_visualizations",
    "0",
]
RUN_FLAGS = ["--dataset", "mvtec", *SMALL_MODEL_FLAGS, "--no_report"]  # one small run, no report page
CPU_RUN_FLAGS = [*RUN_FLAGS, "--device", "cpu"]
CPU_RUN_INTO_R_FLAGS = [*CPU_RUN_FLAGS, "--results_subdir", "r"]  # results in <base_results_dir>/r
TRAIN_FLAGS = [*CPU_RUN_INTO_R_FLAGS, "--save_distribution"]  # ... with the model file
REPORT_TRAIN_FLAGS = [flag for flag in TRAIN_FLAGS if flag != "--no_report"]  # for tests that read the pages
PREDICT_FLAGS = ["--device", "cpu", "--batch_size", "8"]


@dataclass(frozen=True)
class Trained:
    model_dir: Path
    scores: dict[Path, float]
    threshold: float


@contextmanager
def no_class_figures() -> Iterator[None]:
    """trainer writes no class figure while inside: most of a small run's time, read by few tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "plot_class_results", lambda result, out_dir: None)
        yield


def synthetic_features(n=40, d=6, h=3, w=4, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d))
    x = rng.normal(size=(n, h, w, d)) @ mixing + 5.0  # correlated channels, far from zero
    return x.astype(np.float32)  # (N, H, W, D): the embedding layout


def symmetric_matrices(upper_blocks: TriangularBlocks, dtype=None) -> torch.Tensor:
    """The symmetric matrices whose upper half the blocks hold."""
    half = upper_blocks.dense(dtype)
    return half.triu() + half.triu(1).transpose(1, 2)


def row_bands(x: np.ndarray, rows: int) -> list[tuple[int, torch.Tensor]]:
    """A (N, H, W, D) array as bands of `rows` grid rows, the way the pipeline hands batches over."""
    return [(top, torch.from_numpy(x[:, top : top + rows])) for top in range(0, x.shape[1], rows)]


class Page(HTMLParser):
    """The parts of a page the tests read: tables by id (header and cell texts), links, images, scripts,
    event-handler attributes, the text of every h2, and every piece of text."""

    def __init__(self, path: Path):
        super().__init__()
        self.tables: dict[str, dict] = {}
        self.links: list[str] = []
        self.scripts = 0
        self.handlers: list[str] = []
        self.headings: list[str] = []
        self.texts: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._heading: list[str] | None = None
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.handlers += [name for name in attributes if name.startswith("on")]
        if tag == "script":
            self.scripts += 1
        if tag in ("a", "img"):
            self.links.append(attributes.get("href") or attributes.get("src") or "")
        if tag == "table":
            self._table = attributes.get("id")
            self.tables[self._table] = {"header": [], "rows": []}
        if tag == "tr" and self._table:
            self._row = []
        if tag in ("td", "th") and self._row is not None:
            self._cell = []
        if tag == "h2":
            self._heading = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        if tag == "tr" and self._row is not None:
            table = self.tables[self._table]
            if table["header"]:
                table["rows"].append(self._row)
            else:
                table["header"] = self._row
            self._row = None
        if tag == "table":
            self._table = None
        if tag == "h2" and self._heading is not None:
            self.headings.append("".join(self._heading).strip())
            self._heading = None

    def handle_data(self, data):
        self.texts.append(data)
        for part in (self._cell, self._heading):
            if part is not None:
                part.append(data)


def assert_table_equals_csv(page: Page, table_id: str, csv_path: Path) -> None:
    with csv_path.open(newline="", encoding="utf-8") as handle:
        header, *rows = list(csv.reader(handle))
    shown = page.tables[table_id]
    assert shown["header"] == header
    assert shown["rows"] == rows


def assert_links_resolve(page: Page, page_path: Path) -> None:
    local = [link for link in page.links if not link.startswith("#")]
    assert local, "the page links to nothing"
    for link in local:
        assert "://" not in link, f"{link}: the page must open offline"
        assert (page_path.parent / unquote(link)).is_file(), f"{link} does not resolve"


def class_with(train_images: list[Path], source: Path, folder: Path) -> Path:
    """A class folder whose train/good holds `train_images`, with `source`'s test images and masks."""
    shutil.copytree(source / "test", folder / "test")
    shutil.copytree(source / "ground_truth", folder / "ground_truth")
    (folder / "train" / "good").mkdir(parents=True)
    for path in train_images:
        shutil.copy(path, folder / "train" / "good" / path.name)
    return folder
