"""Image reading, model-input geometry and the torch Dataset shared by every data layout.

Every path to a tensor goes through here, so training, evaluation and predict.py see
identical pixels for the same file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from datasets import DEFAULT_MAX_IMAGE_PIXELS

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LARGE_IMAGE_PIXELS = 4096 * 4096  # larger images are reduced as they are decoded; smaller ones decode in full
REDUCING_GAP = 3  # a reduced image keeps at least this many pixels per model-input pixel on its short side
SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that turn the image a quarter
EVALUATION_FRAME_PIXELS = 2048 * 2048  # a larger image's pixel metrics are taken in a frame reduced to about this
REDUCIBLE_MODE = {"I;16": "I", "I;16B": "I", "I;16L": "I", "P": "RGBA", "1": "L"}  # for modes Image.reduce lacks
MAX_PIXELS_FLAG = "--max_image_pixels"

# PIL's decompression-bomb guard is one process-wide number; open_image applies the run's own limit
# (a parameter, so a flag can raise it per run) to every image and mask this package reads.
Image.MAX_IMAGE_PIXELS = None


class ImageReadError(Exception):
    """An image file that cannot be decoded; the caller skips it and counts it."""


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float grey images scaled to 8 bits (full range -> 0..255)."""
    array = np.asarray(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        scaled = array.astype(np.float64) / 257.0
    else:
        scaled = array.astype(np.float64) * (255.0 if array.max(initial=0) <= 1.0 else 1.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def open_image(path: Path, max_pixels: int) -> Image.Image:
    """The opened (not yet decoded) image; ImageReadError when it has more than `max_pixels` pixels
    (0: no limit), a guard against decompression bombs that names the flag which raises it."""
    image = Image.open(path)
    width, height = image.size
    if max_pixels and width * height > max_pixels:
        image.close()
        raise ImageReadError(
            f"{path}: {width}x{height} is {width * height} pixels, over the limit of {max_pixels} (a guard "
            f"against decompression bombs); for your own large images raise it with {MAX_PIXELS_FLAG} N (0: no limit)"
        )
    return image


def reduction(size: tuple[int, int], short_side: int | None) -> int:
    """The integer factor by which an image of `size` is reduced as it is decoded: 1 (decoded in full) up to
    LARGE_IMAGE_PIXELS, so results for such images never change; above, as much as keeps REDUCING_GAP times
    `short_side` (the model's resize) on the short side."""
    width, height = size
    if short_side is None or width * height <= LARGE_IMAGE_PIXELS:
        return 1
    return max(1, min(width, height) // (REDUCING_GAP * short_side))


@dataclass(frozen=True)
class Decoded:
    """A decoded RGB image, possibly reduced on decoding, and the (width, height) of the full image (after its
    EXIF orientation): the model-input geometry and the original-resolution outputs are computed from it."""

    image: Image.Image
    size: tuple[int, int]

    @property
    def reduced(self) -> bool:
        return self.image.size != self.size


def decode_rgb(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, short_side: int | None = None) -> Decoded:
    """Decode any common image file as 8-bit RGB, honouring EXIF orientation; a large one reduced to no
    less than REDUCING_GAP x `short_side` as it is decoded (JPEG: `draft` decodes at 1/2, 1/4 or 1/8 scale;
    other formats: `reduce` right after decoding), so one image's memory stays bounded.

    Grey, palette, RGBA, CMYK, 16-bit and float images are all converted, after the reduction; anything
    that cannot be fully decoded (zero bytes, truncated, not an image, over `max_pixels`) raises
    ImageReadError.
    """
    try:
        with open_image(path, max_pixels) as opened:
            width, height = opened.size
            factor = reduction(opened.size, short_side)
            if factor > 1 and opened.format == "JPEG":
                opened.draft(opened.mode, (width // factor, height // factor))
            opened.load()
            image = opened
            if factor > 1:
                if image.mode in REDUCIBLE_MODE:
                    image = image.convert(REDUCIBLE_MODE[image.mode])
                image = image.reduce(max(1, min(image.size) // (REDUCING_GAP * short_side)))
            orientation = opened.getexif().get(0x0112)
            image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageReadError(f"{path}: cannot read image ({err})") from err
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    size = (height, width) if orientation in SWAPPING_ORIENTATIONS else (width, height)
    return Decoded(image.convert("RGB"), size)


def read_rgb(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The whole image as 8-bit RGB (decode_rgb without a reduction)."""
    return decode_rgb(path, max_pixels).image


def read_mask(path: Path, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Ground-truth mask as a 0/255 'L' image of the given (width, height): the full image's, also when
    the image was reduced on decoding, so the mask reaches the model's mask size exactly as it always did.

    A pixel is a defect when it is >= 128, or > 0 in a mask whose maximum is 1 (0/1 masks).
    A mask of another size than its image is resized to it (nearest) with a warning.
    """
    try:
        with open_image(path, max_pixels) as opened:
            opened.load()
            mask = opened
            if mask.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                mask = _to_8bit(mask)
            array = np.asarray(mask.convert("L"))
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageReadError(f"{path}: cannot read mask ({err})") from err
    binary = array > 0 if array.max(initial=0) <= 1 else array >= 128
    mask = Image.fromarray((binary * 255).astype(np.uint8), mode="L")
    if mask.size != size:
        log.warning("mask %s is %sx%s but its image is %sx%s: resized (nearest)", path, *mask.size, *size)
        mask = mask.resize(size, Image.NEAREST)
    return mask


def evaluation_frame(width: int, height: int) -> tuple[int, int]:
    """(height, width) of the frame a width x height image's pixel metrics are taken in: the image's own, or,
    above EVALUATION_FRAME_PIXELS, reduced by the smallest integer factor that brings it there. It depends on
    the image alone, never on the model's geometry, so every configuration is scored on the same pixels."""
    factor = max(1, math.ceil(math.sqrt(width * height / EVALUATION_FRAME_PIXELS)))
    return max(1, height // factor), max(1, width // factor)


def frame_mask(mask: Image.Image | None, frame: tuple[int, int]) -> np.ndarray | None:
    """A 0/255 mask at its image's full size -> bool (height, width) of the evaluation frame: a reduced frame's
    pixel is a defect when at least half of the pixels it covers are (box average); None without a mask."""
    if mask is None:
        return None
    if mask.size != frame[::-1]:
        mask = mask.resize(frame[::-1], Image.BOX)
    return np.asarray(mask) >= 128


@dataclass(frozen=True)
class Geometry:
    """Model input geometry: short side resized to `resize`, centre crop `cropsize` (0 = no crop, square resize);
    with `resize_width` (only without a crop) the image is resized to resize x resize_width (height x width)."""

    resize: int
    cropsize: int
    resize_width: int | None = None

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        if self.cropsize:
            return self.cropsize, self.cropsize
        return self.resize, self.resize_width or self.resize

    @property
    def decode_side(self) -> int:
        """The side a reduced decode keeps REDUCING_GAP times on its short side: the resize, or the longer
        side of a height x width resize."""
        return max(self.resize, self.resize_width or 0)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of a width x height image after `spatial`'s resize: the short side to `resize` and
        the long one in proportion, rounded down as torchvision's Resize does; the input size without a crop."""
        if self.cropsize == 0:
            return self.input_size[::-1]
        long = int(self.resize * max(width, height) / min(width, height))
        return (self.resize, long) if width <= height else (long, self.resize)

    def crop_origin(self, width: int, height: int) -> tuple[int, int]:
        """(top, left) of the centre crop in the resized image, rounded as torchvision's CenterCrop does."""
        if self.cropsize == 0:
            return 0, 0
        new_width, new_height = self.resized_size(width, height)
        return int(round((new_height - self.cropsize) / 2.0)), int(round((new_width - self.cropsize) / 2.0))

    def kept_share(self, width: int, height: int) -> float:
        """Share of a width x height image's area that the centre crop keeps (1 without a crop), capped at
        the whole side when a side is shorter than the crop."""
        if self.cropsize == 0:
            return 1.0
        new_width, new_height = self.resized_size(width, height)
        return min(self.cropsize, new_width) * min(self.cropsize, new_height) / (new_width * new_height)

    def spatial(self, interpolation: v2.InterpolationMode, size: tuple[int, int] | None = None) -> v2.Compose:
        """Resize and centre crop. `size`, the (width, height) of the full image when the one given was reduced
        on decoding, makes the resize land on the very size the full image's would (resized_size)."""
        if self.cropsize == 0:
            return v2.Compose([v2.Resize(self.input_size, interpolation=interpolation, antialias=True)])
        target = self.resize if size is None else self.resized_size(*size)[::-1]
        return v2.Compose(
            [
                v2.Resize(target, interpolation=interpolation, antialias=True),
                v2.CenterCrop(self.cropsize),
            ]
        )

    def pixel_transform(self, size: tuple[int, int] | None = None) -> v2.Compose:
        """PIL image -> uint8 (3, H, W) model-input pixels: what an exported graph takes (as (H, W, 3))."""
        return v2.Compose([v2.ToImage(), self.spatial(v2.InterpolationMode.BILINEAR, size)])

    def image_transform(self, size: tuple[int, int] | None = None) -> v2.Compose:
        """PIL image -> the normalised float32 (3, H, W) model input, from the same pixels."""
        return v2.Compose(
            [
                self.pixel_transform(size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def mask_transform(self) -> v2.Compose:
        return v2.Compose([v2.ToImage(), self.spatial(v2.InterpolationMode.NEAREST)])


@dataclass(frozen=True)
class Sample:
    """One image of a split: its file, its label (0 good, 1 defect), defect type and mask file."""

    path: Path
    label: int
    defect: str
    mask_path: Path | None = None


def build_flips(horizontal: bool, vertical: bool, probability: float) -> list[v2.Transform]:
    """Independent random flips for training-time augmentation."""
    flips: list[v2.Transform] = []
    if horizontal:
        flips.append(v2.RandomHorizontalFlip(probability))
    if vertical:
        flips.append(v2.RandomVerticalFlip(probability))
    return flips


class ImageDataset(Dataset):
    """Samples -> (image tensor, mask tensor, index); an unreadable image yields None.

    The mask is an all-zero tensor for good images, and for defect images whose mask file is
    missing (those are flagged by `Sample.mask_path is None`). Images over `max_pixels` (0: no
    limit) are unreadable; large ones are reduced as they are decoded (decode_rgb).
    """

    def __init__(
        self,
        samples: list[Sample],
        geometry: Geometry,
        augment: list[v2.Transform] | None = None,
        pixels: bool = False,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        self.samples = samples
        self.geometry = geometry
        self.pixels = pixels  # uint8 (H, W, 3) model-input pixels, for an exported graph, instead of tensors
        self.max_pixels = max_pixels
        self.image_transform = self.transform()
        self.mask_transform = geometry.mask_transform()
        self.augment = v2.Compose(augment) if augment else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        try:
            decoded, mask = self.decode(index)
        except ImageReadError as err:
            return None, str(err), index
        return self.to_item(decoded, mask, index)

    def transform(self, size: tuple[int, int] | None = None) -> v2.Compose:
        """The image transform; `size` is the full image's for one reduced on decoding."""
        return self.geometry.pixel_transform(size) if self.pixels else self.geometry.image_transform(size)

    def decode(self, index: int) -> tuple[Decoded, Image.Image | None]:
        """The sample's RGB image (reduced when large) and binary mask at the full image's size (None without a
        mask file); raises ImageReadError."""
        sample = self.samples[index]
        decoded = decode_rgb(sample.path, self.max_pixels, self.geometry.decode_side)
        mask = read_mask(sample.mask_path, decoded.size, self.max_pixels) if sample.mask_path else None
        return decoded, mask

    def to_item(self, decoded: Decoded, mask: Image.Image | None, index: int):
        """Decoded pixels -> (model input tensor, bool mask tensor at the input size, index, the full image's
        (width, height), the bool mask in the image's evaluation frame or None without a mask file)."""
        transform = self.transform(decoded.size) if decoded.reduced else self.image_transform
        tensor = transform(decoded.image)
        if self.pixels:
            tensor = tensor.permute(1, 2, 0).contiguous()
        if self.augment is not None:
            tensor = self.augment(tensor)
        if mask is None:
            mask_tensor = torch.zeros(self.geometry.input_size, dtype=torch.bool)
        else:
            mask_tensor = self.mask_transform(mask)[0] > 0
        return tensor, mask_tensor, index, decoded.size, frame_mask(mask, evaluation_frame(*decoded.size))


@dataclass
class Batch:
    """A collated batch: images (B,3,H,W), masks (B,H,W) bool, dataset indices, the failures, each readable
    image's full (width, height) and its mask in its evaluation frame (None: no mask file), and (for datasets
    that keep them, predict.py's) the original pixels of the readable images in the same order."""

    images: torch.Tensor
    masks: torch.Tensor
    indices: list[int]
    failures: list[tuple[int, str]]
    sizes: list[tuple[int, int]]
    frame_masks: list[np.ndarray | None]
    originals: list[np.ndarray] | None = None

    def pin_memory(self) -> Batch:
        """The batch with its tensors in page-locked memory: the DataLoader calls this when it pins
        (the backbone on CUDA), so that copies to the GPU overlap the next batch's work."""
        return Batch(
            self.images.pin_memory(),
            self.masks.pin_memory(),
            self.indices,
            self.failures,
            self.sizes,
            self.frame_masks,
            self.originals,
        )


def collate_skipping_failures(items) -> Batch:
    """Stack the readable items; unreadable ones are reported, not fatal. Items of a dataset that keeps
    the original pixels carry them as a sixth element."""
    good = [item for item in items if item[0] is not None]
    failures = [(item[2], item[1]) for item in items if item[0] is None]
    originals = [item[5] for item in good] if good and len(good[0]) > 5 else None
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.bool), [], failures, [], [])
    return Batch(
        images=torch.stack([item[0] for item in good]),
        masks=torch.stack([item[1] for item in good]),
        indices=[item[2] for item in good],
        failures=failures,
        sizes=[item[3] for item in good],
        frame_masks=[item[4] for item in good],
        originals=originals,
    )


def image_loader(
    dataset: Dataset, batch_size: int, num_workers: int, device: torch.device, seed: int | None = None
) -> DataLoader:
    """The DataLoader of every pass over images (fit, hold-out, test, predict.py, benchmarks); batches are
    pinned only for a backbone on CUDA (pinning asks CUDA for its context); `seed` seeds the loader's
    generator, from which its worker processes' random state (augmentation's flips) is drawn."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_skipping_failures,
        generator=torch.Generator().manual_seed(seed) if seed is not None else None,
        pin_memory=device.type == "cuda",
    )


def readable_batches(
    loader: DataLoader, description: str, on_failure: Callable[[int, str], None], leave: bool = False
) -> Iterator[Batch]:
    """The loader's readable batches with a progress bar; each unreadable image is warned about once and
    handed to `on_failure` (its dataset index and the reason)."""
    with tqdm(total=len(loader.dataset), desc=description, unit="img", leave=leave) as bar:
        for batch in loader:
            for index, reason in batch.failures:
                log.warning("skipped %s", reason)
                on_failure(index, reason)
            bar.update(len(batch.indices) + len(batch.failures))
            if batch.indices:
                yield batch
