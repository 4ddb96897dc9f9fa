"""The variants' table: quality, fit time and model size of every configuration of comparison runs.

Reads the comparison.csv of each comparison folder given (run_experiment.py with several values of
--covariance, --projection, --neighbourhood, --image_score, --resize, ...) and the size of each
configuration's model file (runs with --save_distribution), and prints one markdown table.

    python benchmarks/variants.py results/mvtec_comparison [more comparison folders]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

SETTINGS = ["layers", "resize", "cropsize", "reduced_dim", "projection", "neighbourhood", "image_score", "covariance"]
SETTINGS += ["epsilon"]
MODEL_FILENAME = "padim_model.pt"  # utils.padim.model_file.MODEL_FILENAME, without importing torch


def model_megabytes(folder: Path, class_name: str) -> float | None:
    """The size of a configuration's model file for a class, None when it was not saved."""
    path = folder / class_name / MODEL_FILENAME
    return round(path.stat().st_size / 2**20, 1) if path.exists() else None


def variants_table(comparison: Path) -> pd.DataFrame:
    """One row per configuration x class of a comparison folder: settings, metrics, fit seconds, model MiB."""
    table = pd.read_csv(comparison / "comparison.csv")
    table["model_mib"] = [model_megabytes(comparison / row.configuration, row.class_name) for row in table.itertuples()]
    table["image_auroc"] = [
        f"{row.roc_auc:.3f} [{row.roc_auc_ci_low:.3f}, {row.roc_auc_ci_high:.3f}]" for row in table.itertuples()
    ]
    columns = [*SETTINGS, "n_train", "image_auroc", "pixel_roc_auc", "pixel_aupro", "fit_seconds", "model_mib"]
    return table[columns].round(3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("comparisons", type=Path, nargs="+", help="comparison folders (each holds comparison.csv)")
    args = parser.parse_args()
    table = pd.concat([variants_table(folder) for folder in args.comparisons], ignore_index=True)
    print("| " + " | ".join(table.columns) + " |")
    print("|" + "---|" * len(table.columns))
    for row in table.itertuples(index=False):
        print("| " + " | ".join("" if pd.isna(value) else str(value) for value in row) + " |")


if __name__ == "__main__":
    main()
