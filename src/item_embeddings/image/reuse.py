"""What the image step takes from a previous output set (``previous_uri``; docs/operations.md).

Each selected item's key is ``sha256(image encoder fingerprint, url)``. An item whose key is in
the previous ``img_items.parquet`` gets the previous vector, with no request
(``image_revalidate`` off) or after the host answered ``304 Not Modified`` to a conditional GET
with the recorded ``ETag`` / ``Last-Modified`` (``image_revalidate`` on; a ``200`` re-encodes).
An item whose key is in the previous ``img_failures.parquet`` is tried again by default
(``retry_failed_images``); otherwise its failure row is carried over.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..incremental import KeyIndex, PreviousGroup, PreviousSetError, fingerprint
from ..outputs import IMG_ARRAY, IMG_FAILURES, IMG_ITEMS
from .decoding import ALLOWED_FORMATS, EXACT, MAX_PIXELS
from .encoder import ImageEncoder

logger = logging.getLogger(__name__)


def encoder_fingerprint(encoder: ImageEncoder, decode: str) -> str:
    """What makes this encoder's vectors what they are, with the ``image_decode`` mode that
    feeds it: part of every image row's key.

    Random weights (``image_pretrained=none``) differ at every load: their fingerprint is never
    the same twice, so nothing is ever reused from such a run.
    """
    resolved = encoder.resolved
    weights = (resolved.weights_sha256 or resolved.pretrained
               or f"random-{uuid.uuid4().hex}")
    # Sets made before image_decode existed were decoded exactly and hold no mode: "exact"
    # keeps their fingerprint, so they stay reusable with image_decode=exact.
    mode = {} if decode == EXACT else {"decode": decode}
    return fingerprint({
        "kind": "image", "model": resolved.model_name, "weights": weights,
        "quick_gelu": resolved.quick_gelu, "preprocess": repr(encoder.pil_transform),
        "dtype": encoder.dtype, "max_pixels": MAX_PIXELS, "formats": ALLOWED_FORMATS, **mode})


@dataclass
class Carried:
    """What an item takes from the previous set (one of the two fields is set)."""

    vector_row: int = -1                # the previous img.npy row to reuse
    vector: np.ndarray | None = None    # its vector, read with the rest of the shard's
    failure: dict[str, Any] | None = None  # the previous failure row to carry over
    etag: str | None = None
    last_modified: str | None = None


class PreviousImages:
    """The previous image outputs, indexed by key (the index built once per opened set); the
    vectors of a shard's reused items are read together, only those rows."""

    def __init__(self, previous: PreviousGroup, encoder_fp: str, dim: int, *,
                 revalidate: bool, retry_failed: bool):
        self.uri = previous.uri
        self.revalidate = revalidate
        self._previous = previous
        shape = previous.shape(IMG_ARRAY)
        if shape[1:] != (dim,):
            raise PreviousSetError(f"previous image vectors at {previous.uri} are "
                                   f"{list(shape)}, expected [M, {dim}]")
        self._items, self._rows, self._etags, self._last_modified = previous.cached(
            "image-keys", lambda: _indexed_items(previous))
        self._failures = None if retry_failed else previous.cached(
            "image-failures", lambda: previous.table(IMG_FAILURES))
        self._failed = KeyIndex(self._failures.column("key")) if self._failures else None

    def carried(self, keys: pa.Array) -> list[Carried | None]:
        """Per key: what to take from the previous set, None to fetch as new. The vectors of
        the items that carry one are read now (one batch of ranged reads)."""
        hits = self._items.rows(keys)
        failed = self._failed.rows(keys) if self._failed else np.full(len(keys), -1)
        out: list[Carried | None] = []
        for hit, fail in zip(hits, failed):
            if hit >= 0:
                out.append(Carried(vector_row=int(self._rows[hit]), etag=self._etags[hit],
                                   last_modified=self._last_modified[hit]))
            elif fail >= 0:
                out.append(Carried(failure=self._failures.slice(int(fail), 1).to_pylist()[0]))
            else:
                out.append(None)
        reused = [c for c in out if c is not None and c.failure is None]
        rows = np.array([c.vector_row for c in reused], np.int64)
        for c, vector in zip(reused, self._previous.rows(IMG_ARRAY, rows)):
            c.vector = vector  # a copy of the bytes of the previous set
        return out


def _indexed_items(previous: PreviousGroup) -> tuple[KeyIndex, np.ndarray, list, list]:
    items = previous.table(IMG_ITEMS, ["key", "row", "etag", "last_modified"])
    return (KeyIndex(items.column("key")), items.column("row").to_numpy(),
            items.column("etag").to_pylist(), items.column("last_modified").to_pylist())


def previous_images(previous: PreviousGroup | None, encoder_fp: str, dim: int, *,
                    revalidate: bool, retry_failed: bool,
                    decode: str) -> PreviousImages | None:
    """The previous image outputs if they come from this very encoder and ``image_decode``
    mode, else None (logged)."""
    if previous is None:
        return None
    if previous.meta.get("encoder_fingerprint") != encoder_fp:
        before = previous.meta.get("image_decode", EXACT)  # older sets: exact decoding
        if before != decode:
            logger.warning("previous image outputs at %s were decoded with image_decode=%s, this "
                           "run uses image_decode=%s: every image is fetched and encoded again "
                           "(set image_decode=%s to reuse them)", previous.uri, before, decode,
                           before)
        else:
            logger.warning("previous image outputs at %s were made by another image encoder "
                           "(%s, %s): every image is fetched and encoded again", previous.uri,
                           previous.meta.get("encoder_name"), previous.meta.get("pretrained"))
        return None
    return PreviousImages(previous, encoder_fp, dim, revalidate=revalidate,
                          retry_failed=retry_failed)
