"""Image files: a folder's images, and the images a command line's arguments name (predict.py's --input,
update.py's --add). Torch-free, so that a wrong path is one line before the heavy libraries load."""

from __future__ import annotations

import glob
import logging
from pathlib import Path

from datasets import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)


class InputError(Exception):
    """Image arguments that name no image, or a path that does not exist: one line, exit 1."""


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted, any extension case; others are ignored."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def non_image_files(folder: Path) -> list[Path]:
    """Files in `folder` that list_images passes over: reported to the user, never read."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() not in IMAGE_EXTENSIONS)


def _expand(text: str, flag: str) -> list[Path]:
    """One image argument: a glob (image files it matches), a folder (its images) or a file (taken as given,
    to be read or reported unreadable); a path that does not exist is refused."""
    if any(char in text for char in "*?["):
        matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
        found = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if not found:
            log.warning("%s %s matches no image file", flag, text)
        return found
    path = Path(text)
    if path.is_dir():
        found = list_images(path)
        if not found:
            hint = (
                f" (sub-folders are not searched: use a quoted glob such as '{path}/*/*.png')"
                if any(p.is_dir() for p in path.iterdir())
                else ""
            )
            log.warning("%s %s: no image files in this folder%s", flag, text, hint)
        return found
    if not path.exists():
        raise InputError(f"{flag} {text}: no such file or folder")
    return [path]


def collect_images(arguments: list[str], flag: str) -> list[Path]:
    """Every image the arguments of `flag` name, in the order given, each file once: an image file, a folder
    (its images, not sub-folders) or a glob. InputError when a path does not exist or nothing is found."""
    seen, paths = set(), []
    for text in arguments:
        for path in _expand(text, flag):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(path)
    if not paths:
        raise InputError(f"no image found in {flag} " + " ".join(arguments))
    return paths
