"""Data layouts: reading images, splitting a class folder into fit / hold-out / test.

DATASET_LAYOUTS names the layouts `--dataset` takes (torch-free, for the flags); they share the
MVTec AD folders and differ in one thing, MOVES_TRAIN_SHARE: BowTie (what data/process_data.py
writes) moves a seeded, disjoint `test_sample_ratio` share of train/good to the test normals, so
a product line with few set-aside good parts still has normals to test on; MVTec ships its own.
datasets.split.load_class applies it. IMAGE_EXTENSIONS, the files read as images, lives here so the
torch-free data/ scripts share it.
"""

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})  # compared lower-cased
MOVES_TRAIN_SHARE = {"bowtie": True, "mvtec": False}
DATASET_LAYOUTS = tuple(sorted(MOVES_TRAIN_SHARE))
