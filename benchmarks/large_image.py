"""Peak memory and time of decoding one large image (default 15000 x 10000 = 150 MP) to the model input.

Builds a synthetic image (a grey ramp of stripes, RGB or grey, as JPEG or PNG) in a temporary folder,
then decodes it in a fresh process per case: as the pipeline does (datasets.images.ImageDataset,
reduced as it is decoded) and, for reference, decoded in full and then resized (what the pipeline did
before). Each process reports its peak resident memory (VmHWM, which a new program starts afresh,
unlike getrusage's ru_maxrss) with torch imported and after the decode, so the difference is what one
image costs. A last row does the same for the way back: a model-input map projected onto the whole
image (utils.padim.anomaly_map.to_original_resolution, as predict.py writes full-size heat maps).

    python -m benchmarks.large_image [--width 15000 --height 10000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

FORMATS = (("RGB", "jpg"), ("L", "jpg"), ("RGB", "png"))


def make_image(path: Path, width: int, height: int, mode: str) -> None:
    """A ramp of vertical stripes: cheap to build and to encode at any size."""
    import numpy as np
    from PIL import Image

    row = (np.arange(width, dtype=np.int64) // 40 % 256).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(np.broadcast_to(row, (height, width))), "L")
    if mode == "RGB":
        image = image.convert("RGB")
    image.save(path, **({"quality": 90} if path.suffix == ".jpg" else {"compress_level": 1}))


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux: VmHWM of /proc/self/status)."""
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024


def measure(path: Path, how: str, resize: int, cropsize: int) -> dict:
    """Decode `path` to the model input (how: 'reduced', the pipeline's way, or 'full') in this process."""
    import time

    from datasets.images import Geometry, ImageDataset, Sample, decode_rgb

    geometry = Geometry(resize, cropsize)
    before = peak_rss_mib()
    start = time.perf_counter()
    if how == "reduced":
        tensor = ImageDataset([Sample(path, 0, "good")], geometry, max_pixels=0)[0][0]
    else:
        tensor = geometry.image_transform()(decode_rgb(path, 0).image)
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    return {
        "image": path.name,
        "decoding": how,
        "seconds": round(seconds, 2),
        "rss_before_mib": round(before),
        "peak_rss_mib": round(peak),
        "added_mib": round(peak - before),
        "input": list(tensor.shape),
    }


def measure_projection(width: int, height: int, resize: int, cropsize: int) -> dict:
    """Project a random model-input map onto a width x height image in this process (crop borders included)."""
    import time

    import torch

    from datasets.images import Geometry
    from utils.padim.anomaly_map import to_original_resolution

    geometry = Geometry(resize, cropsize)
    amap = torch.rand(geometry.input_size, generator=torch.Generator().manual_seed(0))
    before = peak_rss_mib()
    start = time.perf_counter()
    projected = to_original_resolution(amap, height, width, geometry, outside=float(amap.min()))
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    return {
        "image": f"map {width}x{height}",
        "decoding": "projected back",
        "seconds": round(seconds, 2),
        "rss_before_mib": round(before),
        "peak_rss_mib": round(peak),
        "added_mib": round(peak - before),
        "output_mib": round(projected.numel() * projected.element_size() / 2**20),
    }


def in_child(*arguments: str) -> str:
    command = [sys.executable, "-m", "benchmarks.large_image", *arguments]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=15000)
    parser.add_argument("--height", type=int, default=10000)
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--cropsize", type=int, default=224)
    parser.add_argument("--make", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "HOW"), help=argparse.SUPPRESS)
    parser.add_argument("--measure_projection", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make:
        make_image(Path(args.make[0]), args.width, args.height, args.make[1])
        return 0
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1], args.resize, args.cropsize)))
        return 0
    sizes = ["--width", str(args.width), "--height", str(args.height)]
    sizes += ["--resize", str(args.resize), "--cropsize", str(args.cropsize)]
    if args.measure_projection:
        print(json.dumps(measure_projection(args.width, args.height, args.resize, args.cropsize)))
        return 0
    with tempfile.TemporaryDirectory() as folder:
        for mode, suffix in FORMATS:
            path = Path(folder) / f"{mode.lower()}_{args.width}x{args.height}.{suffix}"
            in_child("--make", str(path), mode, *sizes)
            for how in ("reduced", "full"):
                print(in_child("--measure", str(path), how, *sizes).strip(), flush=True)
    print(in_child("--measure_projection", *sizes).strip(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
