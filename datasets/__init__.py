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
- auto: one of these chosen from the flags and the folder (datasets.split.choose_layout).
IMAGE_EXTENSIONS, the files read as images, lives here so the torch-free data/ scripts share it.
"""

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})  # compared lower-cased
MOVES_TRAIN_SHARE = {"bowtie": True, "mvtec": False}
DATASET_LAYOUTS = ("auto", "bowtie", "csv", "folder", "mvtec")
BOWTIE_MARKER = "bowtie_prepared.json"  # data/process_data.py's mark on every class folder it writes
