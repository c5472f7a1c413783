"""How much memory the kNN step needs, and whether the machine it runs on has it.

The step builds its two graphs one after the other, so the larger space (the 384-d text vectors)
sets the peak. Its normalised copy of the vectors is a memory-mapped file (``unit_rows(...,
scratch=)``), the kernel's cache rather than the step's memory; what must fit is the step's
anonymous memory: on the IVF path the faiss index's own copy of the vectors (4 bytes per
dimension), the neighbour lists being built (``k`` + reserve ids and scores, and their
copies), the row digests and IVF lists, and the libraries loaded. Measured with
``bench/bench_knn_incremental.py`` (docs/benchmarks.md, *Incremental kNN update and memory*).
``estimate`` warns from its rates file's per-item peak (``knn.peak_bytes_per_item``, three
copies of a 384-d row: more than this model above ~1M items), so a machine it names passes this
check.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ItemEmbeddingsError

# Measured (docs/benchmarks.md): the libraries and fixed buffers, and per item beyond the
# index's vectors, per listed neighbour (k + reserve); the update keeps the previous lists and
# the new ones side by side, hence more per neighbour.
FIXED_BYTES = 1_000 * 2 ** 20
LIST_BYTES_PER_NEIGHBOUR = {"full": 24, "incremental": 40}
INDEX_BYTES_PER_ITEM = 8 + 16       # faiss's id per vector, the row digest, list and more
HEADROOM = 1.15                     # the estimate is a measured peak: leave 15% above it


class KnnMemoryError(ItemEmbeddingsError, RuntimeError):
    """The machine has less memory than the kNN step needs for these items."""


def step_peak_bytes(n: int, dims: tuple[int, ...], k: int, reserve: int, *, ivf: bool,
                    update: bool = False) -> int:
    """Expected peak anonymous memory of the kNN step for ``n`` items whose spaces have
    ``dims`` dimensions (the exact path holds no index)."""
    per_item = ((4 * max(dims) + INDEX_BYTES_PER_ITEM) if ivf else 0) \
        + LIST_BYTES_PER_NEIGHBOUR["incremental" if update else "full"] * (k + reserve)
    return int(FIXED_BYTES + n * per_item)


def machine_memory_bytes() -> int | None:
    """The memory this process may use: the smallest of the cgroup limit (v2 or v1) and the
    machine's total memory (None when none can be read)."""
    found = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 2 ** 60:   # "max" or a huge number: no limit
            found.append(int(value))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    return min(found) if found else None


def check_memory(n: int, dims: tuple[int, ...], k: int, reserve: int, *, ivf: bool,
                 update: bool = False, available: int | None = None) -> int:
    """Refuse, before any work, a machine too small for the step; returns the estimate
    (with ``update``, of an update or of the full build it may turn into, whichever is more).

    Raises:
        KnnMemoryError: the estimated peak (with ``HEADROOM``) exceeds ``available`` (default:
            :func:`machine_memory_bytes`), naming both and what to set.
    """
    need = max(step_peak_bytes(n, dims, k, reserve, ivf=ivf, update=mode)
               for mode in ({False, True} if update else {False}))
    available = machine_memory_bytes() if available is None else available
    if available is not None and need * HEADROOM > available:
        raise KnnMemoryError(
            f"the kNN graphs of {n:,} items ({max(dims)}-d, k={k}) need about "
            f"{need * HEADROOM / 1e9:.1f} GB of memory, and this machine has "
            f"{available / 1e9:.1f} GB: set knn_machine_type to a machine with more memory "
            "(`item-embeddings estimate` names one; docs/knn.md, Memory)")
    return need
