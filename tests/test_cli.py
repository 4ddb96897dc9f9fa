"""What the command-line tools set up before any work, checked in fresh interpreters."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")

FAULTS_OF_AN_ALLOCATION = """
import os, resource
import run_experiment  # sets torch's allocator up as the command-line tools do
import torch

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(2**24).fill_(1.0)  # 64 MB = 16,384 pages of 4 KB, freed at once like an activation
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(os.environ["THP_MEM_ALLOC_ENABLE"], min(faults() for _ in range(5)))
"""


def faults_of_an_allocation(user_setting: str | None) -> tuple[str, int]:
    env = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"}
    if user_setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = user_setting
    result = subprocess.run([sys.executable, "-c", FAULTS_OF_AN_ALLOCATION], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120, check=True)
    setting, faults = result.stdout.split()
    return setting, int(faults)


def test_torch_allocates_large_blocks_in_huge_pages_unless_the_user_says_otherwise():
    huge_setting, huge_faults = faults_of_an_allocation(None)
    kept_setting, small_page_faults = faults_of_an_allocation("0")
    assert (huge_setting, kept_setting) == ("1", "0")
    assert small_page_faults > 10_000
    thp_mode = re.search(r"\[(\w+)\]", THP_SETTING.read_text()) if THP_SETTING.exists() else None
    if thp_mode and thp_mode.group(1) in ("always", "madvise"):
        assert huge_faults * 10 < small_page_faults
