"""Fusion step: join text and image vectors by id, train the fusion MLP, write 128-d codes.

The core is :func:`fuse_item_embeddings`; the KFP component calls it unchanged. The model and its
objective are in :mod:`item_embeddings.fusion_model` (see docs/fusion.md for the reasoning).

Memory: ``txt.npy`` and ``img.npy`` are memory-mapped; minibatches gather their rows from the maps
and the 896-wide concatenation is never built, not even once.

Example::

    meta = fuse_item_embeddings("out/text", "out/images", "out/fused")
    model = load_fusion_model("out/fused")
    codes = model.fuse(new_text_vectors, new_image_vectors, has_image)
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from .fusion_model import (NORM_WEIGHT, OBJECTIVE, TAU, WEIGHTS_FILE, FusionMLP, TrainingBatch,
                           init_from_pca, load_fusion_model, loss_and_gradients,
                           save_fusion_model, training_batch, unit_rows, usable_rows)
from .outputs import (FUSED_ARRAY, FUSED_ITEMS, FUSION_CONFIG, FUSION_EXCLUSIONS, IMG_ARRAY,
                      IMG_FAILURES, IMG_ITEMS, IMG_META, TXT_ARRAY, TXT_ITEMS, TXT_META)
from .progress import Progress
from .runtime import package_versions
from .storage import atomic_path, sha256_file, write_json_atomic, write_parquet_atomic
from .tracking import ExperimentTracker, NullTracker, run_name, tracked_run

__all__ = ["FusionInputError", "FusionInputs", "load_fusion_inputs", "fuse_item_embeddings",
           "load_fusion_model", "FUSED_ARRAY", "FUSED_ITEMS", "FUSION_CONFIG",
           "FUSION_EXCLUSIONS", "WEIGHTS_FILE"]

logger = logging.getLogger(__name__)


SCAN_ROWS = 8192        # rows per chunk when checking or fusing a whole memmap
PCA_SAMPLE = 16384      # rows sampled for the principal directions of the initialisation
MAX_EXAMPLES = 5
WARMUP_SHARE = 0.1      # share of all training steps with a linearly rising learning rate


class FusionInputError(ValueError):
    """The text / image step outputs cannot be fused; the message names the file and items."""


@dataclass
class FusionInputs:
    """The two steps' outputs, memory-mapped, joined by id (text order is the output order)."""

    text: np.ndarray                 # [N, text_dim] memmap
    image: np.ndarray                # [M, img_dim] memmap (M may be 0)
    ids: pa.Array                    # [N] text ids, output order
    image_row: np.ndarray            # [N] int64 row in ``image``, -1 = no (usable) image
    text_meta: dict[str, Any]
    image_meta: dict[str, Any]
    excluded_ids: list = field(default_factory=list)     # image excluded (non-finite / zero)
    image_failures: int | None = None                    # rows of img_failures.parquet

    @property
    def count(self) -> int:
        return int(self.text.shape[0])

    @property
    def items_with_images(self) -> int:
        return int((self.image_row >= 0).sum())


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FusionInputError(f"missing {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FusionInputError(f"{path} is not valid JSON: {exc}") from None


def _open_array(path: Path, meta: dict[str, Any], meta_name: str) -> np.ndarray:
    if not path.is_file():
        raise FusionInputError(f"missing {path}")
    try:
        array = np.load(path, mmap_mode="r")
    except ValueError as exc:  # numpy raises ValueError for a corrupt header
        raise FusionInputError(f"{path} is not a readable .npy file: {exc}") from None
    if array.ndim != 2 or array.dtype != np.float32:
        raise FusionInputError(f"{path} must be a 2-D float32 array, got shape "
                               f"{list(array.shape)} dtype {array.dtype}")
    dim = meta.get("embed_dim")
    if dim is not None and int(dim) != array.shape[1]:
        raise FusionInputError(f"dimension mismatch: {path} has {array.shape[1]} columns but "
                               f"{meta_name} says embed_dim={dim} (outputs of different runs?)")
    return array


def _read_ids(path: Path, columns: list[str]) -> pa.Table:
    if not path.is_file():
        raise FusionInputError(f"missing {path}")
    table = pq.read_table(path)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise FusionInputError(f"{path} has no column(s) {missing}; "
                               f"columns present: {table.column_names}")
    ids = table.column("id")
    if ids.null_count:
        rows = pc.indices_nonzero(pc.is_null(ids)).to_pylist()
        raise FusionInputError(f"{path}: {ids.null_count} null id(s) at rows {rows[:MAX_EXAMPLES]}")
    counts = pc.value_counts(ids)
    dups = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if len(dups):
        raise FusionInputError(f"{path}: {len(dups)} duplicated id(s), e.g. "
                               f"{dups[:MAX_EXAMPLES].to_pylist()}")
    return table


def _scan_usable(array: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """[len(rows)] bool, chunked so that a memmap is read once and never held whole."""
    n = array.shape[0] if rows is None else rows.shape[0]
    ok = np.empty(n, dtype=bool)
    for start in range(0, n, SCAN_ROWS):
        stop = min(start + SCAN_ROWS, n)
        chunk = array[start:stop] if rows is None else array[rows[start:stop]]
        ok[start:stop] = usable_rows(chunk)
    return ok


def load_fusion_inputs(text_dir: str | os.PathLike, image_dir: str | os.PathLike) -> FusionInputs:
    """Open and check both steps' outputs and join them by id.

    Raises:
        FusionInputError: a missing file, a dimension or count mismatch, null or duplicated ids,
            image ids that the text step does not know, an image row out of range, or a
            non-finite / zero text vector. Non-finite or zero *image* vectors are not an error:
            those items are fused as items without an image and listed in the exclusions.
    """
    text_dir, image_dir = Path(text_dir), Path(image_dir)
    text_meta = _read_json(text_dir / TXT_META)
    image_meta = _read_json(image_dir / IMG_META)
    text = _open_array(text_dir / TXT_ARRAY, text_meta, TXT_META)
    image = _open_array(image_dir / IMG_ARRAY, image_meta, IMG_META)
    txt_items = _read_ids(text_dir / TXT_ITEMS, ["id"])
    img_items = _read_ids(image_dir / IMG_ITEMS, ["id", "row"])
    n, m = text.shape[0], image.shape[0]
    if txt_items.num_rows != n or int(text_meta.get("count", n)) != n:
        raise FusionInputError(f"count mismatch: {text_dir / TXT_ARRAY} has {n} rows, "
                               f"{TXT_ITEMS} {txt_items.num_rows}, {TXT_META} count "
                               f"{text_meta.get('count')}")
    if n < 2:
        raise FusionInputError(f"{text_dir / TXT_ARRAY} has {n} item(s); fusion needs at least 2")
    if img_items.num_rows != m or int(image_meta.get("count", m)) != m:
        raise FusionInputError(f"count mismatch: {image_dir / IMG_ARRAY} has {m} rows, "
                               f"{IMG_ITEMS} {img_items.num_rows}, {IMG_META} count "
                               f"{image_meta.get('count')}")
    img_rows = img_items.column("row").combine_chunks()
    if len(pc.unique(img_rows)) != img_items.num_rows:
        raise FusionInputError(f"{image_dir / IMG_ITEMS} lists the same 'row' for several ids: "
                               "each image vector must belong to one item")

    ids = txt_items.column("id").combine_chunks()
    img_ids = img_items.column("id").combine_chunks()
    if len(img_ids) and not ids.type.equals(img_ids.type):
        raise FusionInputError(f"id types differ: {TXT_ITEMS} has {ids.type}, "
                               f"{IMG_ITEMS} has {img_ids.type}")
    pos = pc.index_in(img_ids, value_set=ids)
    if pos.null_count:
        unknown = img_ids.filter(pc.is_null(pos))
        raise FusionInputError(f"{len(unknown)} image id(s) in {image_dir / IMG_ITEMS} are not in "
                               f"the text step's ids (different items tables?), e.g. "
                               f"{unknown[:MAX_EXAMPLES].to_pylist()}")
    rows_col = img_items.column("row")
    if not pa.types.is_integer(rows_col.type) or rows_col.null_count:
        raise FusionInputError(f"{IMG_ITEMS} column 'row' must be non-null integers, "
                               f"got {rows_col.type} with {rows_col.null_count} null(s)")
    rows = rows_col.to_numpy().astype(np.int64)
    bad = np.flatnonzero((rows < 0) | (rows >= m))
    if bad.size:
        raise FusionInputError(f"{IMG_ITEMS}: {bad.size} row index(es) outside {IMG_ARRAY} "
                               f"[0, {m}), e.g. ids {img_ids.take(bad[:MAX_EXAMPLES]).to_pylist()}")

    text_ok = _scan_usable(text)
    if not text_ok.all():
        bad = np.flatnonzero(~text_ok)
        raise FusionInputError(f"{bad.size} text vector(s) in {text_dir / TXT_ARRAY} are "
                               f"non-finite or zero, e.g. ids "
                               f"{ids.take(bad[:MAX_EXAMPLES]).to_pylist()}")
    image_row = np.full(n, -1, dtype=np.int64)
    image_pos = pos.to_numpy().astype(np.int64)
    image_ok = _scan_usable(image, rows)
    image_row[image_pos[image_ok]] = rows[image_ok]
    excluded = img_ids.filter(pa.array(~image_ok)).to_pylist()
    if excluded:
        logger.warning("%d image vector(s) are non-finite or zero; fused as items without an "
                       "image (listed in %s), e.g. %s", len(excluded), FUSION_EXCLUSIONS,
                       excluded[:MAX_EXAMPLES])
    failures = None
    if (image_dir / IMG_FAILURES).is_file():
        failures = pq.read_metadata(image_dir / IMG_FAILURES).num_rows
    return FusionInputs(text=text, image=image, ids=ids, image_row=image_row, text_meta=text_meta,
                        image_meta=image_meta, excluded_ids=excluded, image_failures=failures)


def _gather(inputs: FusionInputs, idx: np.ndarray
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit text rows, unit image rows of the items that have one, and their batch positions."""
    rows = inputs.image_row[idx]
    pos = np.flatnonzero(rows >= 0)
    return unit_rows(inputs.text[idx]), unit_rows(inputs.image[rows[pos]]), torch.from_numpy(pos)


def _second_moment(inputs: FusionInputs, rng: np.random.Generator) -> np.ndarray:
    """E[x xᵀ] of the unit-row input x = [text, image or 0] on a sample of rows."""
    sample = np.sort(rng.choice(inputs.count, size=min(PCA_SAMPLE, inputs.count), replace=False))
    text, image, pos = _gather(inputs, sample)
    td, idim = inputs.text.shape[1], inputs.image.shape[1]
    x = torch.zeros(len(sample), td + idim)
    x[:, :td] = text
    x[pos, td:] = image
    return (x.T @ x / len(sample)).numpy()


def _batch_bounds(n: int, batch_size: int) -> list[int]:
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 2:  # a last batch of one item has no pair
        del bounds[-2]
    return bounds


def _batch_count(n: int, batch_size: int) -> int:
    return len(_batch_bounds(n, batch_size)) - 1


def lr_at(step: int, total_steps: int, lr: float) -> float:
    """Learning rate of ``step``: linear warm-up over the first WARMUP_SHARE, then cosine to 0.

    Adam's first updates move every weight by about ``lr`` whatever its gradient; warming up
    keeps them from scrambling the PCA start, and the decay lets the last epoch settle.
    """
    warmup = max(1, round(WARMUP_SHARE * total_steps))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """One epoch's shuffled batches; a last batch of one item joins the previous one."""
    perm = rng.permutation(n)
    bounds = _batch_bounds(n, batch_size)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        yield perm[start:stop]


# Below this many items one thread is used by default: on such small matrices thread hand-offs
# cost more than they save, and with a busy second core spinning OpenMP threads made a 120-item
# fusion take 19 s instead of 0.3 s.
SINGLE_THREAD_BELOW_ITEMS = 20_000
PREFETCH_BATCHES = 2    # batches prepared ahead of the trainer (bounds the memory they hold)
MAX_BATCH_SIZE = 8192   # B x B similarity matrices: 256 MiB each at this size


@contextlib.contextmanager
def _torch_threads(num_threads: int | None, count: int) -> Iterator[int]:
    """A fixed torch thread count for the step (results depend on it), restored afterwards.

    Every op used is deterministic on CPU for a fixed thread count (no atomics, no scatter
    races), so ``torch.use_deterministic_algorithms`` is not needed (it costs a 6 s import).
    """
    old_threads = torch.get_num_threads()
    if num_threads is None and count < SINGLE_THREAD_BELOW_ITEMS:
        num_threads = 1
    torch.set_num_threads(num_threads or old_threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)


@contextlib.contextmanager
def _target_thread(threads: int) -> Iterator[ThreadPoolExecutor | None]:
    """A second thread (one torch thread) for work off the trainer; None with one thread.

    The trainer keeps the other ``threads - 1`` torch threads meanwhile. On two cores this is
    faster than splitting every op over both threads: most ops here are too small to share well.
    """
    if threads < 2:
        yield None
        return
    trainer_threads = torch.get_num_threads()
    torch.set_num_threads(threads - 1)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="fusion-targets",
                                initializer=torch.set_num_threads, initargs=(1,)) as pool:
            yield pool
    finally:
        torch.set_num_threads(trainer_threads)


def _training_batches(inputs: FusionInputs, batches: Iterator[np.ndarray],
                      pool: ThreadPoolExecutor | None) -> Iterator[TrainingBatch]:
    """Gathered batches with their targets; with a pool, built ahead on its thread.

    The targets do not depend on the model, so the pool's thread gathers rows and computes them
    for the next batches while the trainer runs the current one.
    """
    def prepare(idx: np.ndarray) -> TrainingBatch:
        # The loss ignores the order of a batch: items with an image go first (training_batch's
        # layout), each part in row order so that the memmaps are read front to back.
        idx = np.sort(idx)
        has_image = inputs.image_row[idx] >= 0
        text, image, _ = _gather(inputs, np.concatenate([idx[has_image], idx[~has_image]]))
        return training_batch(text, image)

    if pool is None:
        yield from map(prepare, batches)
        return
    pending: collections.deque = collections.deque()
    for idx in batches:
        pending.append(pool.submit(prepare, idx))
        if len(pending) > PREFETCH_BATCHES:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class FusedAdam:
    """Adam, as ``torch.optim.Adam(params, fused=True)`` with default betas and eps.

    The same per-parameter state and the same fused kernel, called directly: constructing
    ``torch.optim.Adam`` imports ``torch._dynamo`` (about 2 s here) and its ``step`` adds about
    0.15 ms of Python per call (0.7 s over 500k items x 5 epochs). tests/test_fusion.py checks
    that both give byte-identical weights. As there, a parameter whose ``.grad`` is None is left
    alone and its step count does not advance.
    """

    def __init__(self, params: Iterator[torch.nn.Parameter],
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.betas, self.eps = betas, eps
        self.state: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def step(self, lr: float) -> None:
        """One update of every parameter that has a gradient, with learning rate ``lr``."""
        params, grads, avgs, avg_squares, steps = [], [], [], [], []
        for i, param in enumerate(self.params):
            if param.grad is None:
                continue
            if i not in self.state:  # float32 step count, as torch's fused Adam keeps it
                self.state[i] = (torch.zeros_like(param), torch.zeros_like(param),
                                 torch.zeros((), dtype=torch.float32))
            avg, avg_sq, count = self.state[i]
            params.append(param)
            grads.append(param.grad)
            avgs.append(avg)
            avg_squares.append(avg_sq)
            steps.append(count)
        if not params:
            return
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(params, grads, avgs, avg_squares, [], steps, lr=lr,
                           beta1=self.betas[0], beta2=self.betas[1], weight_decay=0.0,
                           eps=self.eps, amsgrad=False, maximize=False)


def _check_params(epochs: int, lr: float, batch_size: int, init: str) -> None:
    if epochs < 1 or batch_size < 2 or not lr > 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 2, lr > 0; got epochs={epochs}, "
                         f"batch_size={batch_size}, lr={lr}")
    if batch_size > MAX_BATCH_SIZE:
        raise ValueError(f"batch_size={batch_size} is above {MAX_BATCH_SIZE}: the objective holds "
                         f"several batch_size x batch_size float32 matrices per batch "
                         f"({4 * batch_size ** 2 / 2 ** 30:.1f} GiB each at this size)")
    if init not in ("pca", "random"):
        raise ValueError(f"init must be 'pca' or 'random', got {init!r}")


def train_fusion_model(inputs: FusionInputs, *, hidden_dim: int = 256, output_dim: int = 128,
                       epochs: int = 5, lr: float = 1e-3, batch_size: int = 512, seed: int = 0,
                       init: str = "pca") -> tuple[FusionMLP, list[dict[str, float]]]:
    """Train the MLP on every item for ``epochs`` full passes; returns it and per-epoch losses.

    Each batch is a random set of items, gathered from the memmaps in row order.
    """
    _check_params(epochs, lr, batch_size, init)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = FusionMLP(inputs.text.shape[1], inputs.image.shape[1], hidden_dim, output_dim)
    if init == "pca":
        init_from_pca(model, _second_moment(inputs, rng))
    optimizer = FusedAdam(model.parameters())
    total_steps = epochs * _batch_count(inputs.count, batch_size)
    step = 0
    history: list[dict[str, float]] = []
    model.train()
    threads = torch.get_num_threads()
    with _target_thread(threads) as pool, Progress(epochs * inputs.count, "fuse-train") as progress:
        # The trainer hands a product to the pool's thread only when both run one torch thread:
        # the result must not depend on which thread computed it (determinism).
        helper = pool if threads == 2 else None
        for epoch in range(epochs):
            sums = {"loss": 0.0, "sim_loss": 0.0, "norm_loss": 0.0}
            for batch in _training_batches(inputs, _batches(inputs.count, batch_size, rng), pool):
                parts = loss_and_gradients(model, batch, helper=helper)
                optimizer.step(lr_at(step, total_steps, lr))
                step += 1
                size = batch.text.shape[0]
                for key in sums:
                    sums[key] += parts[key] * size
                progress.update(size)
            history.append({k: v / inputs.count for k, v in sums.items()})
            logger.info("fusion epoch %d/%d: loss %.5f", epoch + 1, epochs, history[-1]["loss"])
    model.eval()
    return model, history


@torch.no_grad()
def _write_fused(model: FusionMLP, inputs: FusionInputs, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        fused = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                          shape=(inputs.count, model.output_dim))
        for start in range(0, inputs.count, SCAN_ROWS):
            stop = min(start + SCAN_ROWS, inputs.count)
            z, _ = model(*_gather(inputs, np.arange(start, stop)))
            fused[start:stop] = z.numpy()
        fused.flush()
        del fused


def fuse_item_embeddings(
    text_dir: str | os.PathLike,
    image_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    hidden_dim: int = 256,
    output_dim: int = 128,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 512,
    seed: int = 0,
    run_id: str = "",
    tracker: ExperimentTracker | None = None,
    num_threads: int | None = None,
    init: str = "pca",
) -> dict[str, Any]:
    """Fuse every item's text and image vectors into one ``output_dim`` code.

    Writes into ``output_dir``, each atomically: ``fused.npy`` [N, output_dim] float32
    (L2-normalised, the text step's item order), ``fused_items.parquet`` (``id``, ``has_image``),
    ``fusion_model.safetensors`` (reload with :func:`load_fusion_model`),
    ``fusion_exclusions.parquet`` (``id``, ``reason``: image vectors that could not be used) and
    ``fusion_config.json`` (written last). Logs an experiment run ``fuse-modal-<run id>``.

    Args:
        text_dir: The text step's output directory (txt.npy, txt_items.parquet, txt_meta.json).
        image_dir: The image step's output directory (img.npy, img_items.parquet, img_meta.json).
        output_dir: Directory for the outputs (created).
        hidden_dim: Hidden width of the MLP.
        output_dim: Dimension of the fused code.
        epochs: Full passes over all items.
        lr: Adam learning rate.
        batch_size: Items per minibatch.
        seed: Seed of the initialisation sample, the shuffling and the weights.
        run_id: Identifier of the pipeline run (a fresh one when empty).
        tracker: Experiment tracker; none logs nothing.
        num_threads: torch CPU threads (None: 1 below SINGLE_THREAD_BELOW_ITEMS items, else
            torch's current setting). Outputs are byte-identical for the same inputs, seed and
            thread count.
        init: 'pca' (start from the linear PCA projection) or 'random'.

    Returns:
        The metadata written to ``fusion_config.json``.

    Raises:
        FusionInputError: the inputs cannot be fused (raised before any training).
    """
    _check_params(epochs, lr, batch_size, init)
    started = time.perf_counter()
    inputs = load_fusion_inputs(text_dir, image_dir)
    load_time = time.perf_counter() - started
    run_id = run_id or uuid.uuid4().hex[:12]
    tracker = tracker or NullTracker()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    with tracked_run(tracker, run_name("fuse-modal", run_id)), \
            _torch_threads(num_threads, inputs.count) as threads:
        tracker.log_params({"output_dim": output_dim, "hidden_dim": hidden_dim, "epochs": epochs,
                            "lr": lr, "batch_size": batch_size, "seed": seed,
                            "objective": OBJECTIVE, "init": init})
        t0 = time.perf_counter()
        model, history = train_fusion_model(inputs, hidden_dim=hidden_dim, output_dim=output_dim,
                                            epochs=epochs, lr=lr, batch_size=batch_size,
                                            seed=seed, init=init)
        train_time = time.perf_counter() - t0
        t0 = time.perf_counter()
        _write_fused(model, inputs, out / FUSED_ARRAY)
        write_parquet_atomic(out / FUSED_ITEMS, pa.table(
            {"id": inputs.ids, "has_image": pa.array(inputs.image_row >= 0)}))
        write_parquet_atomic(out / FUSION_EXCLUSIONS, pa.table(
            {"id": pa.array(inputs.excluded_ids, type=inputs.ids.type),
             "reason": pa.array(["non-finite or zero image vector"] * len(inputs.excluded_ids),
                                type=pa.string())}))
        save_fusion_model(model, out / WEIGHTS_FILE, {"run_id": run_id, "seed": seed})
        write_time = time.perf_counter() - t0
        final = history[-1]
        meta = {
            "text_dim": model.text_dim,
            "img_dim": model.img_dim,
            "hidden_dim": hidden_dim,
            "output_dim": output_dim,
            "count": inputs.count,
            "items_with_images": inputs.items_with_images,
            "items_without_images": inputs.count - inputs.items_with_images,
            "image_vectors_excluded": len(inputs.excluded_ids),
            "image_failures": inputs.image_failures,
            "run_id": run_id,
            "text_run_id": inputs.text_meta.get("run_id"),
            "image_run_id": inputs.image_meta.get("run_id"),
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
            "init": init,
            "objective": OBJECTIVE,
            "objective_params": {"tau": TAU, "norm_weight": NORM_WEIGHT,
                                 "warmup_share": WARMUP_SHARE, "schedule": "warmup-cosine"},
            "final_loss": final["loss"],
            "final_sim_loss": final["sim_loss"],
            "final_norm_loss": final["norm_loss"],
            "loss_history": history,
            "normalized": True,
            "torch_threads": threads,
            "load_time_sec": load_time,
            "train_time_sec": train_time,
            "write_time_sec": write_time,
            "wall_time_sec": time.perf_counter() - started,
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": sha256_file(out / WEIGHTS_FILE),
            "text_dir": str(text_dir),
            "image_dir": str(image_dir),
            "versions": package_versions("torch", "numpy", "safetensors"),
        }
        write_json_atomic(out / FUSION_CONFIG, meta)
        tracker.log_metrics({"count": inputs.count, "items_with_images": inputs.items_with_images,
                             "final_loss": final["loss"], "train_time_sec": train_time})
        tracker.log_artifact("fused_embeddings", str(out))
    logger.info("fused %d items (%d with images) in %.1fs (training %.1fs) -> %s", inputs.count,
                inputs.items_with_images, meta["wall_time_sec"], train_time, out)
    return meta
