"""Image bytes to the encoder's input: uint8 pixels with open_clip's resize and crop applied.

Runs in the fetching pool's threads. Every failure is an :class:`ImageDecodeError` whose
``reason`` is recorded for the item (never a crash of the step).

``image_decode`` (:data:`DECODE_MODES`) chooses how many pixels a JPEG is decoded to: ``exact``
decodes every pixel; ``fast`` (the default) lets libjpeg scale by 1/2, 1/4 or 1/8 in the DCT
domain (``Image.draft``) to the smallest size still at least the encoder's input size, then
resizes those pixels to exactly the size, and from exactly the area, that the encoder's resize
gives the whole image (:class:`Reduction`): the crop that follows sees the same geometry, and
only the resampling source differs. Most of the CPU of a 1000-px photo is spent decoding and
resizing pixels that the resize to 224 throws away (docs/images.md, *Fast decode*). Other formats
(PNG, WebP, GIF, ...) have no reduced decode in Pillow: both modes decode them in full.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..config import IMAGE_DECODE_MODES
from ..errors import ItemEmbeddingsError
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


class ImageDecodeError(ItemEmbeddingsError):
    """A body that cannot become an image; ``reason`` is the failure reason recorded."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def to_rgb(img) -> Image.Image:
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


@dataclass(frozen=True)
class Reduction:
    """How ``fast`` decodes a JPEG for an encoder whose first PIL step is a torchvision
    ``Resize`` (open_clip's): at the smallest DCT scale whose sides are at least
    ``draft_size``, then resized with the same filter to the size that ``Resize`` gives the
    whole image. The reduced image can end in a partial pixel (625 rows at 1/2 are 312.5): the
    resize reads exactly the area the whole image covers, so the aspect ratio, the resized size
    and hence the crop's offset are the exact decode's (the encoder's ``Resize`` then keeps the
    size: a copy)."""

    draft_size: tuple[int, int]      # the encoder's input (width, height)
    size: tuple[int, ...]            # Resize's size: (short side,) or (height, width)
    max_size: int | None
    resample: int                    # the PIL filter of Resize's interpolation

    @classmethod
    def of(cls, pil_transform: Callable, input_size: tuple[int, int]) -> Reduction | None:
        """The reduction that keeps ``pil_transform``'s geometry; None when its first step is
        not a torchvision ``Resize`` (``fast`` then decodes in full)."""
        from torchvision.transforms import Resize
        from torchvision.transforms import functional as F

        steps = getattr(pil_transform, "transforms", None) or [None]
        resize = steps[0]
        if not isinstance(resize, Resize) or not hasattr(F, "_compute_resized_output_size"):
            return None
        size = (resize.size,) if isinstance(resize.size, int) else tuple(resize.size)
        return cls(input_size, size, resize.max_size, F.pil_modes_mapping[resize.interpolation])

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) that the encoder's Resize gives a ``width`` x ``height`` image."""
        from torchvision.transforms import functional as F

        # torchvision's own computation, so that both decodes agree to the pixel
        new_h, new_w = F._compute_resized_output_size((height, width), list(self.size),
                                                      self.max_size)
        return new_w, new_h


def decode_image(body: bytes, pil_transform: Callable, max_pixels: int = MAX_PIXELS,
                 reduction: Reduction | None = None) -> np.ndarray:
    """Image bytes -> the encoder's input as uint8 [H, W, 3] (open_clip's resize and crop applied).

    ``reduction``: decode a JPEG at a reduced scale as :class:`Reduction` says (the ``fast``
    mode); None decodes every pixel. Other formats are always decoded in full.

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
            area = None  # of the reduced image, that the whole image covers
            if reduction is not None:
                drafted = img.draft(img.mode, reduction.draft_size)  # JPEG only, else None
                if drafted is not None and img.size != (width, height):
                    area = drafted[1]
            img.load()
            rgb = to_rgb(img)
            if area is not None:
                rgb = rgb.resize(reduction.resized_size(width, height), reduction.resample,
                                 box=area)
            out = pil_transform(rgb)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(DECOMPRESSION_BOMB, str(exc)) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(NOT_AN_IMAGE,
                               f"body is not a {'/'.join(ALLOWED_FORMATS)} image") from None
    except Exception as exc:
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

    reduction: Reduction | None = field(init=False)  # set for ``fast``

    def __post_init__(self) -> None:
        if self.mode not in DECODE_MODES:
            raise ValueError(f"image_decode must be one of {', '.join(DECODE_MODES)}, "
                             f"got {self.mode!r}")
        reduction = Reduction.of(self.pil_transform, self.input_size) if self.mode == FAST \
            else None
        object.__setattr__(self, "reduction", reduction)  # frozen: set once, here

    def __call__(self, body: bytes) -> np.ndarray:
        return decode_image(body, self.pil_transform, self.max_pixels, self.reduction)

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
