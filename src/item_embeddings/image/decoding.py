"""Image bytes to the encoder's input: uint8 pixels with open_clip's resize and crop applied.

Runs in the fetching pool's threads. Every failure is an :class:`ImageDecodeError` whose
``reason`` is recorded for the item (never a crash of the step).

``image_decode`` (:data:`DECODE_MODES`) chooses how many pixels a JPEG is decoded to: ``exact``
decodes every pixel; ``fast`` (the default) lets libjpeg scale by 1/2, 1/4 or 1/8 in the DCT
domain (``Image.draft``) to the smallest size still at least the encoder's input size, so the
resize that follows only ever shrinks, as it does from the full image. Most of the CPU of a
1000-px photo is spent decoding pixels the resize to 224 throws away (docs/images.md, *Fast
decode*). Other formats (PNG, WebP, GIF, ...) have no reduced decode in Pillow: both modes decode
them in full.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..config import IMAGE_DECODE_MODES
from .download import NOT_AN_IMAGE

if TYPE_CHECKING:
    from PIL import Image

MAX_PIXELS = 40_000_000  # larger images are refused before decoding (decompression bombs)
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO

# Decoding failure reasons (download reasons are in download.FAILURE_REASONS; a body Pillow
# cannot identify is download.NOT_AN_IMAGE, as for a non-image content type).
DECODE_ERROR = "decode_error"
DECOMPRESSION_BOMB = "decompression_bomb"

DECODE_MODES = IMAGE_DECODE_MODES  # the values of the image_decode pipeline parameter
FAST, EXACT = DECODE_MODES


class ImageDecodeError(Exception):
    """A body that cannot become an image; ``reason`` is the failure reason recorded."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def to_rgb(img) -> "Image.Image":
    """First frame, as 8-bit RGB; transparency is composited on white (product photo background)."""
    from PIL import Image

    if getattr(img, "is_animated", False):
        img.seek(0)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit greyscale: Pillow's convert("L") clips at 255; scale to the full 8-bit range.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if img.mode in ("P", "PA", "LA", "La", "RGBa") or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_image(body: bytes, pil_transform: Callable, max_pixels: int = MAX_PIXELS,
                 reduce_to: tuple[int, int] | None = None) -> np.ndarray:
    """Image bytes -> the encoder's input as uint8 [H, W, 3] (open_clip's resize and crop applied).

    ``reduce_to`` (width, height): decode a JPEG at the smallest of its 1/1, 1/2, 1/4 and 1/8
    scales whose width and height are both at least these (the ``fast`` mode); None decodes
    every pixel. Other formats are always decoded in full.

    Raises:
        ImageDecodeError: not an image, a truncated or corrupt file, or more than ``max_pixels``.
    """
    from PIL import Image, UnidentifiedImageError

    Image.init()  # registers every plugin, so that `formats` can name WEBP and TIFF
    try:
        with Image.open(io.BytesIO(body), formats=ALLOWED_FORMATS) as img:
            width, height = img.size
            if width * height > max_pixels:  # checked on the header, before any pixel is decoded
                raise ImageDecodeError(DECOMPRESSION_BOMB,
                                       f"{width}x{height} pixels > limit {max_pixels}")
            if reduce_to is not None:
                img.draft(img.mode, reduce_to)  # JPEG only; a no-op for the other formats
            img.load()
            rgb = to_rgb(img)
            out = pil_transform(rgb)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(DECOMPRESSION_BOMB, str(exc)) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(NOT_AN_IMAGE,
                               f"body is not a {'/'.join(ALLOWED_FORMATS)} image") from None
    except Exception as exc:  # noqa: BLE001 - any decoder error is this item's failure, not a crash
        raise ImageDecodeError(DECODE_ERROR, f"{type(exc).__name__}: {exc}") from None
    arr = np.array(out, dtype=np.uint8)  # a writable copy, independent of the PIL image
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageDecodeError(DECODE_ERROR, f"unexpected decoded shape {arr.shape}")
    return arr


@dataclass(frozen=True)
class ImageDecoder:
    """Bytes -> the encoder's uint8 input, the way ``image_decode`` asks (see the module doc).

    ``input_size`` is the encoder's (width, height); ``pil_transform`` its resize and crop.
    """

    pil_transform: Callable
    input_size: tuple[int, int]
    mode: str = FAST
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        if self.mode not in DECODE_MODES:
            raise ValueError(f"image_decode must be one of {', '.join(DECODE_MODES)}, "
                             f"got {self.mode!r}")

    def __call__(self, body: bytes) -> np.ndarray:
        return decode_image(body, self.pil_transform, self.max_pixels,
                            self.input_size if self.mode == FAST else None)

    def timed(self, body: bytes) -> tuple[np.ndarray | None, ImageDecodeError | None, float]:
        """(pixels, None) or (None, the failure), and the CPU seconds this thread spent on it.

        Per-thread CPU time (not wall time): with several decode threads on a busy machine it
        is the work done, not the time spent waiting for a core.
        """
        started = time.thread_time()
        try:
            pixels, error = self(body), None
        except ImageDecodeError as exc:
            pixels, error = None, exc
        return pixels, error, time.thread_time() - started
