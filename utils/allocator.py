"""Setting of torch's CPU allocator that the command-line tools make before torch is imported
(so this module imports no torch)."""
from __future__ import annotations

import os
import sys

HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages() -> bool:
    """Have torch's CPU allocator back blocks of 2 MB and more with transparent huge pages;
    True when torch is not imported yet, so the setting takes effect.

    Torch hands large blocks back to the system when they are freed, so every forward pass
    faults its activations in again, page by page: with 4 KB pages, 3,600 faults per image
    for EfficientNet-Lite0 (6.2 ms per image at batch 32 on 2 cores) and 12,000 for
    wide_resnet50_2 (53 ms); with 2 MB pages 130 and 420 (2.5 and 48 ms), at the same peak
    memory. Torch reads THP_MEM_ALLOC_ENABLE once, at its first allocation. A value the user
    set is kept (0 turns it off); kernels with transparent huge pages off ignore it.
    """
    os.environ.setdefault(HUGE_PAGES_VARIABLE, "1")
    return "torch" not in sys.modules
