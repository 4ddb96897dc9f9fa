"""Which configuration did best on each class, and whether that is more than chance.

Every configuration of a run is scored on the same test images, each image AUROC with its
bootstrap 95% interval. Ranking by the bare AUROC crowns a winner even when the intervals all
overlap; the ranking here starts from the interval's lower end and says when no configuration
is clearly better. Non-overlapping intervals is a conservative reading (a paired comparison on
the same images could separate more), never a generous one.
"""

from __future__ import annotations

import pandas as pd

RANKING_RULE = (
    "Per class, the highest lower end of the image AUROC's 95% interval wins (then image AUROC, then pixel "
    "AUROC); it is clearly better only when that end lies above every other configuration's upper end."
)
BEST_COLUMNS = ["configuration", "roc_auc_ci_low", "roc_auc", "roc_auc_ci_high", "pixel_roc_auc", "pixel_aupro"]
NOT_CLEARLY_BETTER = "no configuration is clearly better"


def verdict(best: pd.Series, others: pd.DataFrame) -> str:
    """What the ranking of `best` over the class's `others` (the configurations that ran) is worth."""
    if others.empty:
        return "the only configuration that ran"
    if pd.isna(best["roc_auc_ci_low"]) or others["roc_auc_ci_high"].isna().any():
        return "no interval to compare: cannot tell"
    overlapping = int((others["roc_auc_ci_high"] >= best["roc_auc_ci_low"]).sum())
    if overlapping:
        return f"{NOT_CLEARLY_BETTER}: its 95% interval overlaps {overlapping} of {len(others)} other(s)"
    return f"clearly better: its 95% interval lies above the other {len(others)}"


def best_per_class(comparison: pd.DataFrame) -> pd.DataFrame:
    """Per class (in the comparison's order), the configuration RANKING_RULE puts first among those that ran,
    its image AUROC with both interval ends, its pixel metrics and its verdict."""
    ran = comparison[comparison["status"] == "ok"].dropna(subset=["roc_auc"])
    ranked = ran.sort_values(
        ["roc_auc_ci_low", "roc_auc", "pixel_roc_auc"], ascending=False, kind="stable", na_position="last"
    )
    rows = []
    for name in dict.fromkeys(comparison["class_name"]):
        candidates = ranked[ranked["class_name"] == name]
        if candidates.empty:
            continue
        best = candidates.iloc[0]
        rows.append({"class_name": name, **best[BEST_COLUMNS].to_dict(), "verdict": verdict(best, candidates.iloc[1:])})
    return pd.DataFrame(rows, columns=["class_name", *BEST_COLUMNS, "verdict"])
