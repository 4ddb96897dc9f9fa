"""Data layouts: reading images, listing a class's images in any layout, splitting them into fit /
hold-out / test.

DATASET_LAYOUTS names the layouts `--dataset` takes (torch-free, for the flags):
- mvtec and bowtie: class folders (train/good, test/good, test/<defect>, ground_truth/<defect>); they
  differ in one thing, MOVES_TRAIN_SHARE: BowTie (what data/process_data.py writes, leaving
  BOWTIE_MARKER in each class folder) moves a seeded, disjoint `test_sample_ratio` share of
  train/good to the test normals, so a product line with few set-aside good parts still has normals
  to test on; MVTec ships its own;
- folder: a folder of good images, one per defect type, optionally one of test normals (else a share
  of the good images moves, as BowTie's does) and one of masks (datasets.split.folder_layout_files);
- csv: a manifest listing every image with its split and label (datasets.manifest);
- auto: one of these chosen from the flags and the folder (experiment.choose_layout).
IMAGE_EXTENSIONS, the files read as images, lives here so the torch-free data/ scripts share it; the
folder layout's settings (FolderLayout) and the default pixel limit of one image live here so the
torch-free configuration (utils/config.py) shares them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})  # compared lower-cased
MOVES_TRAIN_SHARE = {"bowtie": True, "mvtec": False}
DATASET_LAYOUTS = ("auto", "bowtie", "csv", "folder", "mvtec")
BOWTIE_MARKER = "bowtie_prepared.json"  # data/process_data.py's mark on every class folder it writes
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS)


@dataclass(frozen=True)
class FolderLayout:
    """`--dataset folder`: good images to train on, one folder per defect type, and optionally the good
    images to test on (None: a seeded share of `normal_dir`) and the masks (by image stem); one class."""

    normal_dir: Path
    abnormal_dirs: tuple[Path, ...]
    normal_test_dir: Path | None = None
    mask_dir: Path | None = None
    class_name: str | None = None

    @property
    def name(self) -> str:
        """The class: `class_name`, else the name of the folder that holds the good images' folder."""
        return self.class_name or self.normal_dir.resolve().parent.name or "class"

    def settings(self) -> dict:
        def where(path: Path | None) -> str | None:
            return str(path.resolve()) if path else None

        return {
            "normal_dir": where(self.normal_dir),
            "abnormal_dirs": [where(path) for path in self.abnormal_dirs],
            "normal_test_dir": where(self.normal_test_dir),
            "mask_dir": where(self.mask_dir),
            "class_name": self.name,
        }
