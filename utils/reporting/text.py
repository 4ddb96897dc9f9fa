"""Numbers as the tables, figures and pages print them."""

from __future__ import annotations


def with_interval(value: float, low: float | None = None, high: float | None = None) -> str:
    """'0.750 [0.47, 0.91]': a rate or AUROC to 3 decimals and its 95% interval to 2; the value alone
    when the interval lacks an end."""
    text = f"{value:.3f}"
    if low is None or high is None:
        return text
    return f"{text} [{low:.2f}, {high:.2f}]"
