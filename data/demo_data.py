"""A small MVTec-layout dataset from the texture photos scikit-image ships, with planted defects.

Used by `run_experiment.py --demo` and by the test fixtures: real textures (brick, grass,
gravel), random crops as good parts, and defect images with a scratch or a blob whose
masks are exact.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata
from skimage import draw

TEXTURES = ("brick", "grass", "gravel")
DEFECTS = ("scratch", "blob")


def _crop(texture: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop with a little brightness jitter: normal variation between good parts."""
    top = rng.integers(0, texture.shape[0] - size + 1)
    left = rng.integers(0, texture.shape[1] - size + 1)
    patch = texture[top : top + size, left : left + size].astype(np.float64)
    return np.clip(patch * rng.uniform(0.9, 1.1), 0, 255)


def _plant(image: np.ndarray, defect: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw a defect into a copy of `image`; returns (image, bool mask)."""
    size = image.shape[0]
    mask = np.zeros(image.shape, dtype=bool)
    if defect == "scratch":
        r0, c0, r1, c1 = rng.integers(size // 8, size - size // 8, 4)
        for offset in range(-max(1, size // 64), max(1, size // 64) + 1):
            rr, cc = draw.line(r0, np.clip(c0 + offset, 0, size - 1), r1, np.clip(c1 + offset, 0, size - 1))
            mask[rr, cc] = True
        value = 255.0 if image.mean() < 128 else 0.0
    else:
        centre = rng.integers(size // 4, 3 * size // 4, 2)
        radii = rng.integers(size // 12, size // 6, 2)
        rr, cc = draw.ellipse(centre[0], centre[1], radii[0], radii[1], shape=image.shape)
        mask[rr, cc] = True
        value = float(rng.choice([20.0, 235.0]))
    defective = image.copy()
    defective[mask] = 0.3 * defective[mask] + 0.7 * value
    return defective, mask


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(array).astype(np.uint8)).save(path)


def make_demo_dataset(
    root: Path,
    textures=TEXTURES,
    n_train: int = 60,
    n_test_good: int = 15,
    n_test_defect: int = 10,
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Write <root>/<texture>/{train/good,test/good,test/<defect>,ground_truth/<defect>}; returns root."""
    rng = np.random.default_rng(seed)
    for name in textures:
        texture = getattr(skdata, name)()
        class_dir = root / name
        for i in range(n_train):
            _save(_crop(texture, size, rng), class_dir / "train" / "good" / f"{i:03d}.png")
        for i in range(n_test_good):
            _save(_crop(texture, size, rng), class_dir / "test" / "good" / f"{i:03d}.png")
        for defect in DEFECTS:
            for i in range(n_test_defect):
                image, mask = _plant(_crop(texture, size, rng), defect, rng)
                _save(image, class_dir / "test" / defect / f"{i:03d}.png")
                _save(mask * 255.0, class_dir / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", type=Path, help="folder to create the dataset in")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    make_demo_dataset(args.output, seed=args.seed)
    print(f"demo dataset written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
