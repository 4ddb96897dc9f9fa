"""What the command-line tools set up for a run, each checked in a fresh interpreter."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

REALLOCATION_FAULTS = """
import resource, torch
from utils.cli import keep_freed_memory

def faults_of_an_allocation():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(2**24).fill_(1.0)  # 64 MB, freed at once, like a batch's activation
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = [faults_of_an_allocation() for _ in range(12)]
was_set = keep_freed_memory()
kept = [faults_of_an_allocation() for _ in range(12)]
print(min(default), was_set, max(kept[-4:]))
"""


def test_kept_freed_memory_is_reused_without_page_faults():
    """A 64 MB block is 16,384 pages: glibc's default maps it afresh every time; kept, the heap
    settles after a few allocations (torch's aligned blocks fragment it at first) and reuses them."""
    result = subprocess.run([sys.executable, "-c", REALLOCATION_FAULTS], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=True)
    fewest_by_default, was_set, most_when_kept = result.stdout.split()
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        glibc = False
    assert was_set == str(glibc)  # other C libraries are left as they are
    if glibc:
        assert int(fewest_by_default) > 10_000
        assert int(most_when_kept) < 100
