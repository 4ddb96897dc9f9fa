"""Data layouts: reading images, splitting a class folder into fit / hold-out / test.

DATASET_LAYOUTS names the layouts `--dataset` takes, each a module here with `load_class`.
"""

DATASET_LAYOUTS = ("bowtie", "mvtec")
