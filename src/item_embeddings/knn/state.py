"""What a kNN graph keeps for the next run's incremental update (``knn_<space>_state.npz``).

An incremental update (:mod:`.incremental`) needs, per space, besides the graph itself: which
vectors the graph was built from (a 64-bit digest of each row's bytes: a row whose digest is the
same holds the very same vector), the next neighbours after the ``k`` listed ones (the
*reserve*: a deleted neighbour is replaced from it without a search), and on the IVF path the
coarse centroids, the list of every row and the ``nprobe`` it was searched with. The item ids
are in ``knn_items.parquet`` (with a digest of each item's content keys, for the drift
figures).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..incremental import PreviousSetError
from ..storage import atomic_path

DIGEST_CHUNK = 16384        # rows hashed at a time (a [16384, d] uint64 temporary)
_STATE_FORMAT = 1


@dataclass(frozen=True)
class IvfState:
    """What an incremental update needs of an IVF graph: its coarse centroids, the list every
    row was added to, and the nprobe the graph was searched with."""

    centroids: np.ndarray           # float32 [nlist, d], unit rows
    lists: np.ndarray               # int32 [N]
    nprobe: int


ASSIGN_ROWS = 65536         # rows assigned to their nearest centroid at a time


def nearest_lists(index, x: np.ndarray) -> np.ndarray:
    """int64 [N]: the inverted list (nearest centroid) of each row of ``x``, in row blocks."""
    out = np.empty(len(x), dtype=np.int64)
    for start in range(0, len(x), ASSIGN_ROWS):
        block = np.ascontiguousarray(x[start:start + ASSIGN_ROWS], dtype=np.float32)
        out[start:start + len(block)] = index.quantizer.search(block, 1)[1][:, 0]
    return out


def fill_ivf(index, x: np.ndarray, lists: np.ndarray) -> None:
    """Add every row of ``x`` (id = row) to its list ``lists[row]`` of the empty IVF-Flat
    ``index``, each list allocated once at its final size.

    faiss's own ``add`` appends a vector at a time to growing arrays, which end up to twice
    (on average about 1.4 times) the size of the vectors they hold: at 10M 384-d rows, about
    7 GB more than the 15.4 GB of vectors (docs/knn.md, *Memory*).
    """
    import faiss

    invlists = faiss.downcast_InvertedLists(index.invlists)
    order = np.argsort(lists, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(lists, minlength=index.nlist))])
    for lst in np.flatnonzero(np.diff(bounds)):
        rows = order[bounds[lst]:bounds[lst + 1]]
        codes = np.ascontiguousarray(x[rows], dtype=np.float32)
        invlists.resize(int(lst), len(rows))
        invlists.update_entries(int(lst), 0, len(rows), faiss.swig_ptr(rows),
                                faiss.swig_ptr(codes.view(np.uint8)))
    index.ntotal = len(x)


def ivf_state(index, lists: np.ndarray) -> IvfState:
    """What an update needs of a filled IVF index whose rows are in ``lists``."""
    centroids = index.quantizer.reconstruct_n(0, index.nlist).astype(np.float32)
    return IvfState(centroids=centroids, lists=lists.astype(np.int32), nprobe=int(index.nprobe))


def row_digests(vectors: np.ndarray) -> np.ndarray:
    """uint64 [N]: a digest of each float32 row's bytes (a memory map is read in chunks).

    The row's 64-bit words (32-bit words for an odd dimension) are multiplied by fixed odd
    64-bit constants and summed modulo 2^64: a change of any one word always changes the
    digest (an odd constant is invertible modulo 2^64), and a change of several words leaves
    it equal only by a coincidence of the constants, far below one in 2^32 (1.5 GB/s here;
    a cryptographic hash per row was 10x slower).
    """
    n, dim = vectors.shape
    wide = dim % 2 == 0
    rng = np.random.default_rng(0x6B6E6E)  # the same constants in every run
    mult = rng.integers(0, 2 ** 63, size=dim // 2 if wide else dim, dtype=np.uint64)
    mult = mult * np.uint64(2) + np.uint64(1)
    out = np.empty(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, n, DIGEST_CHUNK):
            chunk = np.ascontiguousarray(vectors[start:start + DIGEST_CHUNK], dtype=np.float32)
            words = chunk.view(np.uint64) if wide else chunk.view(np.uint32).astype(np.uint64)
            out[start:start + len(chunk)] = (words * mult).sum(axis=1, dtype=np.uint64)
    return out


@dataclass(frozen=True)
class SpaceState:
    """One space's graph state, aligned with the graph's rows."""

    digests: np.ndarray             # uint64 [N]
    reserve_neighbours: np.ndarray  # int32 [N, R]
    reserve_scores: np.ndarray      # float32 [N, R]
    ivf: IvfState | None            # None: the graph is exact

    def save(self, dest: Path) -> None:
        """Write the state atomically as one ``.npz``."""
        ivf = self.ivf
        with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, format=np.int64(_STATE_FORMAT), digests=self.digests,
                     reserve_neighbours=self.reserve_neighbours,
                     reserve_scores=self.reserve_scores,
                     centroids=ivf.centroids if ivf else np.zeros((0, 0), np.float32),
                     lists=ivf.lists if ivf else np.zeros(0, np.int32),
                     nprobe=np.int64(ivf.nprobe if ivf else 0))

    @classmethod
    def load(cls, path: Path) -> SpaceState:
        """Read a state that :meth:`save` wrote; :class:`PreviousSetError` when it is not one
        (a previous set of another version)."""
        with np.load(path, allow_pickle=False) as data:
            if "format" not in data.files or int(data["format"]) != _STATE_FORMAT:
                raise PreviousSetError(f"{path}: not a kNN state of format {_STATE_FORMAT} "
                                       "(made by another version): run once without "
                                       "previous_uri")
            centroids = data["centroids"]
            ivf = IvfState(centroids=centroids, lists=data["lists"],
                           nprobe=int(data["nprobe"])) if len(centroids) else None
            return cls(digests=data["digests"], reserve_neighbours=data["reserve_neighbours"],
                       reserve_scores=data["reserve_scores"], ivf=ivf)


def _key_prefix(keys) -> np.ndarray:
    """uint64 of the first 16 hex digits of each content key (0 for a null or shorter key)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keys = pc.utf8_slice_codeunits(keys.cast(pa.string()), 0, 16).fill_null("")
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    _, offset_buffer, data_buffer = keys.buffers()
    offsets = np.frombuffer(offset_buffer, dtype=np.int32)[keys.offset:][:len(keys) + 1]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer else np.zeros(0, np.uint8)
    full = np.diff(offsets) == 16
    chars = data[offsets[:-1][full, None] + np.arange(16)].astype(np.uint64)
    nibbles = np.where(chars >= ord("a"), chars - ord("a") + 10, chars - ord("0")) & np.uint64(15)
    out = np.zeros(len(keys), dtype=np.uint64)
    out[full] = (nibbles << (np.uint64(4) * np.arange(15, -1, -1, dtype=np.uint64))).sum(
        axis=1, dtype=np.uint64)
    return out


def content_digests(text_keys, image_keys) -> np.ndarray:
    """uint64 [N] per item: an odd digest of its content keys (text and image, as
    ``fused_items.parquet`` records them); 0 where the item has no text key (a set made
    before keys existed), which no comparison counts as unchanged."""
    text, image = _key_prefix(text_keys), _key_prefix(image_keys)
    with np.errstate(over="ignore"):
        digest = (text * np.uint64(0x9E3779B97F4A7C15) + image) | np.uint64(1)
    return np.where(text_keys.is_null().to_numpy(zero_copy_only=False), np.uint64(0), digest)
