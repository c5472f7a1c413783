"""Image step: download each item's image, decode it and embed it with open_clip (ViT-B/32).

Stages overlap (the split of rom1504/img2dataset): the main thread reads the selection and
encodes; an asyncio loop in a background thread downloads (:mod:`.download`); a thread pool
decodes and resizes. A window of at most ``4 * max(concurrency, batch size)`` items in flight
bounds memory whatever the number of items. Results are consumed in input order, so encoder
batches (and hence every float of the output) do not depend on download timing.

Work is cut into shards (:mod:`.image_shards`); a restarted attempt skips finished shards and
writes the same files as an uninterrupted run.

Example::

    from item_embeddings.image import load_image_encoder
    encoder = load_image_encoder("ViT-B-32", "openai")
    pixels = decode_image(jpeg_bytes, encoder.pil_transform)  # uint8 [224, 224, 3]
    vectors = encoder.encode(pixels[None])                     # float32 [1, 512]
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import io
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .download import (DEFAULT_USER_AGENT, NOT_AN_IMAGE, DownloadConfig, Downloader,
                       FetchResult)
from .image_shards import ShardStore, content_hash, fingerprint, shard_schema
from .items import ItemColumns, ItemsError, id_type, iter_batches, validate_items
from .outputs import IMG_ARRAY, IMG_FAILURES, IMG_ITEMS, IMG_META
from .progress import Progress
from .runtime import cache_dir, package_versions
from .storage import (atomic_path, gcs_client, is_gcs_uri, sha256_file, split_gcs_uri,
                      write_json_atomic, write_parquet_atomic)
from .tracking import ExperimentTracker, NullTracker, run_name, tracked_run

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

SHARDS_DIR = "img_shards"  # default checkpoint root, inside the step's output

DEFAULT_IMAGE_MODEL = "ViT-B-32"
DEFAULT_IMAGE_PRETRAINED = "openai"
MAX_PIXELS = 40_000_000  # larger images are refused before decoding (decompression bombs)
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO
READ_BATCH_ROWS = 4096

# Decoding failure reasons (download reasons are in download.FAILURE_REASONS; a body Pillow
# cannot identify is download.NOT_AN_IMAGE, as for a non-image content type).
DECODE_ERROR = "decode_error"
DECOMPRESSION_BOMB = "decompression_bomb"
INTERNAL_ERROR = "internal_error"  # an unforeseen exception for one item (logged with traceback)


# ----------------------------------------------------------------------------- selection

@dataclass
class Selection:
    """Counts of the selection pass over the items table."""

    total_rows: int = 0
    no_url_count: int = 0
    selected: int = 0
    capped_count: int = 0  # items with a URL left out by max_items


def usable_url(value: Any) -> str | None:
    """The URL if it is an http(s) URL (after trimming spaces), else None."""
    if not isinstance(value, str):
        return None
    url = value.strip()
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest:
        return None
    return url


def iter_selected(items_uri: str, columns: ItemColumns, max_items: int,
                  selection: Selection) -> Iterator[tuple[Any, str]]:
    """(id, url) of items with an http/https URL, in input order, at most ``max_items`` (0 = all).

    Counts rows without a usable URL (and those left out by the cap) in ``selection``.
    """
    for batch in iter_batches(items_uri, [columns.id, columns.image_url], READ_BATCH_ROWS):
        ids = batch.column(columns.id).to_pylist()
        urls = batch.column(columns.image_url).to_pylist()
        selection.total_rows += len(ids)
        for item_id, raw in zip(ids, urls):
            url = usable_url(raw)
            if url is None:
                selection.no_url_count += 1
            elif max_items and selection.selected >= max_items:
                selection.capped_count += 1
            else:
                selection.selected += 1
                yield item_id, url


# ----------------------------------------------------------------------------- decoding

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


def decode_image(body: bytes, pil_transform: Callable, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Image bytes -> the encoder's input as uint8 [H, W, 3] (open_clip's resize and crop applied).

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


def split_preprocess(preprocess) -> tuple[Callable, tuple[float, ...], tuple[float, ...]]:
    """Split open_clip's eval transform into its PIL part and the ToTensor + Normalize tail.

    The PIL part (resize, crop, RGB) runs in the decode pool and gives small uint8 arrays; the
    tail runs batched on the encoder's device, with the same float32 operations as ToTensor
    (``x / 255``) and Normalize (``(x - mean) / std``), so results equal the composed transform.
    """
    from torchvision.transforms import Compose, Normalize, ToTensor

    steps = list(getattr(preprocess, "transforms", []))
    cut = next((i for i, t in enumerate(steps) if isinstance(t, ToTensor)), None)
    tail = steps[cut + 1:] if cut is not None else []
    if cut is None or len(tail) != 1 or not isinstance(tail[0], Normalize):
        raise ValueError(f"unsupported open_clip preprocessing (expected PIL steps, ToTensor, "
                         f"Normalize): {preprocess}")
    return (Compose(steps[:cut]), tuple(float(m) for m in tail[0].mean),
            tuple(float(s) for s in tail[0].std))


# ----------------------------------------------------------------------------- encoder

@dataclass(frozen=True)
class ResolvedImageModel:
    """What open_clip is asked to build, and where the weights came from."""

    model_name: str                  # a registered open_clip config name
    pretrained: str | None           # a tag, a local checkpoint file, or None (random weights)
    weights_sha256: str | None       # for checkpoint files
    quick_gelu: bool


def _gcs_file(uri: str, kind: str) -> Path:
    """A local copy of one gs:// object, cached by URI."""
    bucket_name, blob_name = split_gcs_uri(uri)
    dest = (cache_dir() / kind / hashlib.sha256(uri.encode()).hexdigest()[:16]
            / os.path.basename(blob_name))
    if not dest.is_file():
        logger.info("downloading %s to %s", uri, dest)
        blob = gcs_client().bucket(bucket_name).blob(blob_name)
        if not blob.exists():
            raise FileNotFoundError(f"{kind} not found: {uri}")
        with atomic_path(dest) as tmp:
            blob.download_to_filename(str(tmp))
    return dest


def resolve_image_model(model_name: str, pretrained: str) -> ResolvedImageModel:
    """Resolve ``image_model`` / ``image_pretrained``.

    ``model_name`` is an open_clip model name, or a model config JSON file (local or gs://) that
    is registered under its file stem. ``pretrained`` is a pretrained tag of that model, a local
    checkpoint file, a gs:// checkpoint, or 'none'/'' for random weights (benchmarks).
    """
    import open_clip

    if model_name.endswith(".json"):
        path = _gcs_file(model_name, "image_model_configs") if is_gcs_uri(model_name) \
            else Path(model_name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"image_model config file not found: {model_name}")
        open_clip.add_model_config(str(path))
        model_name = path.stem
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; e.g. "
                         f"{', '.join(open_clip.list_models()[:8])}, ... or a config .json file")
    tag = (pretrained or "").strip()
    if tag.lower() in ("", "none"):
        logger.warning("image_pretrained=%r: %s has random weights", pretrained, model_name)
        return ResolvedImageModel(model_name, None, None, False)
    tag_cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if tag_cfg:
        return ResolvedImageModel(model_name, tag, None, bool(tag_cfg.get("quick_gelu", False)))
    path = _gcs_file(tag, "image_checkpoints") if is_gcs_uri(tag) else Path(tag).expanduser()
    if not path.is_file():
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name))
        raise ValueError(f"image_pretrained {pretrained!r} is neither a pretrained tag of "
                         f"{model_name} ({tags}) nor an existing checkpoint file")
    return ResolvedImageModel(model_name, str(path), sha256_file(path), False)


class ImageEncoder:
    """An open_clip image tower: uint8 [B, H, W, 3] -> float32 [B, dim], L2-normalised.

    fp16 autocast on CUDA, fp32 on CPU.
    """

    def __init__(self, model_name: str = DEFAULT_IMAGE_MODEL,
                 pretrained: str = DEFAULT_IMAGE_PRETRAINED, device: str | None = None):
        import open_clip
        import torch

        self.name = model_name
        self.pretrained = pretrained
        self.resolved = resolve_image_model(model_name, pretrained)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                self.resolved.model_name, pretrained=self.resolved.pretrained,
                force_quick_gelu=self.resolved.quick_gelu, device=self.device,
                cache_dir=str(cache_dir() / "open_clip"))  # the image bakes the weights there
        except (RuntimeError, OSError) as exc:
            if self.resolved.weights_sha256 is not None:  # a checkpoint file: nothing to add
                raise
            raise RuntimeError(
                f"cannot load open_clip weights {pretrained!r} for {model_name!r}: {exc}. "
                "They are downloaded on first use; offline, set image_pretrained to a local or "
                "gs:// checkpoint file (or 'none' for random weights in smoke runs).") from exc
        self.model = model.eval()
        self.pil_transform, mean, std = split_preprocess(preprocess)
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.dim = int(model.visual.output_dim)
        self.dtype = "float16-autocast" if self.device.startswith("cuda") else "float32"

    def encode(self, images: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            x = torch.from_numpy(images).to(self.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float().div(255)        # = ToTensor
            x = x.sub(self._mean).div(self._std)                # = Normalize
            with torch.autocast("cuda", dtype=torch.float16,
                                enabled=self.device.startswith("cuda")):
                features = self.model.encode_image(x)
            features = F.normalize(features.float(), dim=-1)
        return features.cpu().numpy().astype(np.float32, copy=False)


def load_image_encoder(model_name: str = DEFAULT_IMAGE_MODEL,
                       pretrained: str = DEFAULT_IMAGE_PRETRAINED,
                       device: str | None = None) -> ImageEncoder:
    return ImageEncoder(model_name, pretrained, device=device)


def prefetch_pretrained(model_name: str = DEFAULT_IMAGE_MODEL,
                        pretrained: str = DEFAULT_IMAGE_PRETRAINED) -> bool:
    """Put a pretrained tag's weights in the cache the encoder reads, downloading them if needed.

    Returns False when ``pretrained`` is not an open_clip tag (a file, 'none'): nothing to fetch.
    Raises when they cannot be had (offline and not cached).
    """
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        return False
    open_clip.pretrained.download_pretrained(cfg, cache_dir=str(cache_dir() / "open_clip"))
    return True


# ----------------------------------------------------------------------------- pipeline

@dataclass
class Outcome:
    """One item after download and decode: ``pixels`` on success, else a failure reason."""

    pixels: np.ndarray | None
    reason: str | None
    detail: str
    status: int | None
    attempts: int


class FetchDecodePipeline:
    """Downloads (asyncio loop in a background thread) and decodes (thread pool) URLs.

    :meth:`submit` returns a ``concurrent.futures.Future`` of an :class:`Outcome`; the caller
    keeps a bounded window of them. Use as a context manager.
    """

    def __init__(self, config: DownloadConfig, pil_transform: Callable,
                 decode_workers: int | None = None, max_pixels: int = MAX_PIXELS, resolver=None):
        self._config = config
        self._pil_transform = pil_transform
        self._max_pixels = max_pixels
        self._resolver = resolver
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=decode_workers or min(8, os.cpu_count() or 1),
            thread_name_prefix="decode")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="download-loop",
                                        daemon=True)
        self._downloader: Downloader | None = None
        self.download_time = 0.0
        self.downloaded_bytes = 0

    def __enter__(self) -> "FetchDecodePipeline":
        self._thread.start()
        try:
            self._downloader = asyncio.run_coroutine_threadsafe(self._open_downloader(),
                                                                self._loop).result()
        except BaseException:
            self._stop_threads()  # __exit__ does not run when __enter__ fails
            raise
        return self

    async def _open_downloader(self) -> Downloader:
        return await Downloader(self._config, resolver=self._resolver).__aenter__()

    def __exit__(self, *exc) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._downloader.__aexit__(None, None, None),
                                             self._loop).result(timeout=30)
        finally:
            self._stop_threads()

    def _stop_threads(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()
        self._decode_pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, url: str) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(self._process(url), self._loop)

    async def _process(self, url: str) -> Outcome:
        try:
            return await self._fetch_decode(url)
        except Exception as exc:  # noqa: BLE001 - an unforeseen error fails this item, not the run
            logger.exception("unexpected error for %s", url)
            return Outcome(None, INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", None, 0)

    async def _fetch_decode(self, url: str) -> Outcome:
        result: FetchResult = await self._downloader.fetch(url)
        self.download_time += result.elapsed_s
        if not result.ok:
            return Outcome(None, result.reason, result.detail, result.status, result.attempts)
        self.downloaded_bytes += len(result.body)
        try:
            pixels = await self._loop.run_in_executor(
                self._decode_pool, decode_image, result.body, self._pil_transform,
                self._max_pixels)
        except ImageDecodeError as exc:
            return Outcome(None, exc.reason, exc.detail, result.status, result.attempts)
        return Outcome(pixels, None, "", result.status, result.attempts)


@dataclass
class _ShardWork:
    """A shard being filled: its items and, in input order, their outcomes."""

    index: int
    content_sha256: str
    ids: list[Any]
    urls: list[str]
    reasons: list[str | None] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    statuses: list[int | None] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    vectors: list[np.ndarray | None] = field(default_factory=list)
    pending: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (position, pixels)


@dataclass
class _Stats:
    embedded_per_shard: dict[int, int] = field(default_factory=dict)
    encoded: int = 0
    encode_time: float = 0.0
    resumed_shards: int = 0
    computed_shards: int = 0


def _iter_shards(selected: Iterator[tuple[Any, str]], shard_size: int
                 ) -> Iterator[tuple[int, list[Any], list[str]]]:
    ids: list[Any] = []
    urls: list[str] = []
    index = 0
    for item_id, url in selected:
        ids.append(item_id)
        urls.append(url)
        if len(ids) == shard_size:
            yield index, ids, urls
            index, ids, urls = index + 1, [], []
    if ids:
        yield index, ids, urls


def _encode_pending(work: _ShardWork, encoder: ImageEncoder, stats: _Stats) -> None:
    if not work.pending:
        return
    t0 = time.perf_counter()
    vectors = encoder.encode(np.stack([pixels for _, pixels in work.pending]))
    stats.encode_time += time.perf_counter() - t0
    stats.encoded += len(work.pending)
    for (position, _), vector in zip(work.pending, vectors):
        work.vectors[position] = vector
    work.pending.clear()


def _shard_table(work: _ShardWork, id_type: pa.DataType, dim: int) -> pa.Table:
    flat = np.zeros((len(work.ids), dim), dtype=np.float32)
    valid = np.array([v is not None for v in work.vectors], dtype=bool)
    for i, vector in enumerate(work.vectors):
        if vector is not None:
            flat[i] = vector
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float32()), dim,
                                                  mask=pa.array(~valid))
    schema = shard_schema(id_type, dim)
    return pa.table([pa.array(work.ids, id_type), pa.array(work.urls, pa.string()),
                     pa.array(work.reasons, pa.string()), pa.array(work.details, pa.string()),
                     pa.array(work.statuses, pa.int32()), pa.array(work.attempts, pa.int32()),
                     embedding], schema=schema)


def _run_shards(shards: Iterator[tuple[int, list[Any], list[str]]], store: ShardStore,
                pipeline: FetchDecodePipeline, encoder: ImageEncoder, *, batch_size: int,
                window: int, id_type: pa.DataType, progress: Progress, stats: _Stats) -> int:
    """Compute every unfinished shard; returns the number of shards."""
    in_flight: collections.deque = collections.deque()  # (work, position, future), input order
    work_iter = _pending_items(shards, store, progress, stats)

    def refill() -> None:
        while len(in_flight) < window:
            nxt = next(work_iter, None)
            if nxt is None:
                return
            work, position = nxt
            in_flight.append((work, position, pipeline.submit(work.urls[position])))

    refill()
    while in_flight:
        work, position, future = in_flight.popleft()
        outcome: Outcome = future.result()
        refill()
        work.reasons.append(outcome.reason)
        work.details.append(outcome.detail)
        work.statuses.append(outcome.status)
        work.attempts.append(outcome.attempts)
        work.vectors.append(None)
        if outcome.pixels is not None:
            work.pending.append((position, outcome.pixels))
            if len(work.pending) == batch_size:
                _encode_pending(work, encoder, stats)
        progress.update(1)
        if position == len(work.ids) - 1:  # last item of the shard: finish and store it
            _encode_pending(work, encoder, stats)
            store.save(work.index, work.content_sha256, _shard_table(work, id_type, encoder.dim))
            stats.embedded_per_shard[work.index] = sum(v is not None for v in work.vectors)
            stats.computed_shards += 1
    return stats.computed_shards + stats.resumed_shards


def _pending_items(shards, store: ShardStore, progress: Progress, stats: _Stats
                   ) -> Iterator[tuple[_ShardWork, int]]:
    """(shard, position) of every item of the shards not finished by an earlier attempt."""
    for index, ids, urls in shards:
        digest = content_hash(index, ids, urls)
        done = store.load(index, digest, len(ids))
        if done is not None:
            stats.embedded_per_shard[index] = done.column("reason").null_count
            stats.resumed_shards += 1
            progress.update(len(ids))
            logger.info("shard %d (%d items) already done; skipped", index, len(ids))
            continue
        work = _ShardWork(index, digest, ids, urls)
        for position in range(len(ids)):
            yield work, position


def _assemble(store: ShardStore, shards: Iterator[tuple[int, list[Any], list[str]]],
              embedded_per_shard: dict[int, int], out: Path, dim: int,
              id_type: pa.DataType) -> dict[str, Any]:
    """Stream the finished shards into img.npy, img_items.parquet and img_failures.parquet.

    One shard's embeddings are in memory at a time; ``embedded_per_shard`` (known from the run)
    sizes img.npy up front.
    """
    count = sum(embedded_per_shard.values())
    kept, failures = [], []
    retried = 0  # items that needed more than one download attempt
    with atomic_path(out / IMG_ARRAY) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, dim))
        row = 0
        for index, ids, urls in shards:
            table = store.load(index, content_hash(index, ids, urls), len(ids))
            if table is None:
                raise RuntimeError(f"shard {index} missing at {store.location} after it was made")
            ok = pc.is_null(table.column("reason"))
            embedded = table.filter(ok)
            n = embedded.num_rows
            if n != embedded_per_shard[index]:
                raise RuntimeError(f"shard {index} at {store.location} changed during the run")
            vectors = embedded.column("embedding").combine_chunks().flatten()
            array[row:row + n] = vectors.to_numpy(zero_copy_only=False).reshape(n, dim)
            kept.append(embedded.select(["id", "url"]).replace_schema_metadata(None))
            failures.append(table.filter(pc.invert(ok)).select(
                ["id", "url", "reason", "detail", "http_status", "attempts"]
            ).replace_schema_metadata(None))
            retried += int(pc.sum(pc.greater(table.column("attempts"), 1)).as_py() or 0)
            row += n
        array.flush()
        del array
    schema = shard_schema(id_type, dim)
    items = pa.concat_tables(kept) if kept else schema.empty_table().select(["id", "url"])
    failed = pa.concat_tables(failures) if failures else schema.empty_table().select(
        ["id", "url", "reason", "detail", "http_status", "attempts"])
    write_parquet_atomic(out / IMG_ITEMS, items.append_column(
        "row", pa.array(np.arange(count, dtype=np.int64))))
    write_parquet_atomic(out / IMG_FAILURES, failed)
    by_reason = collections.Counter(failed.column("reason").to_pylist())
    return {"count": count, "failed_count": failed.num_rows,
            "attempted_count": count + failed.num_rows,
            "failures_by_reason": dict(sorted(by_reason.items())),
            "retried_items": retried}


def embed_items_images(
    items_uri: str,
    output_dir: str | os.PathLike,
    *,
    columns: ItemColumns = ItemColumns(),
    image_model: str = DEFAULT_IMAGE_MODEL,
    image_pretrained: str = DEFAULT_IMAGE_PRETRAINED,
    batch_size: int = 32,
    max_items: int = 150000,
    download_concurrency: int = 64,
    download_timeout_s: float = 5.0,
    download_retries: int = 2,
    max_image_bytes: int = 10_000_000,
    allow_private_hosts: bool = False,
    shard_size: int = 10000,
    checkpoint_uri: str = "",
    user_agent: str = DEFAULT_USER_AGENT,
    run_id: str = "",
    tracker: ExperimentTracker | None = None,
    encoder: ImageEncoder | None = None,
    download_config: DownloadConfig | None = None,
    decode_workers: int | None = None,
    resolver=None,
) -> dict[str, Any]:
    """Download, decode and embed the image of every selected item; write the image step's outputs.

    Selects items with an http/https URL in input order (at most ``max_items``; 0 = all),
    processes them in shards of ``shard_size`` (each stored durably under ``checkpoint_uri``, by
    default ``<output_dir>/img_shards``; a rerun skips finished shards), then writes atomically:
    ``img.npy`` [M, dim] float32 L2-normalised, ``img_items.parquet`` (id, url, row),
    ``img_failures.parquet`` (id, url, reason, detail, http_status, attempts) and, last,
    ``img_meta.json``. Logs an experiment run ``embed-image-<run id>``.

    Args:
        items_uri: Parquet file or folder (local or gs://).
        output_dir: Directory for the outputs (created).
        columns: Names of the id and image URL columns.
        image_model: open_clip model name, or a model config .json (local or gs://).
        image_pretrained: Pretrained tag, checkpoint file (local or gs://), or 'none'.
        batch_size: Images per encoder batch.
        max_items: Cap on selected items (0 = no cap).
        download_concurrency: Downloads in flight at once.
        download_timeout_s: Total time per download attempt (redirects and body included).
        download_retries: Retries after a timeout, 5xx, 429 or connection error.
        max_image_bytes: Largest body accepted.
        allow_private_hosts: Turn the SSRF guard off (tests, private CDNs).
        shard_size: Items per durable shard.
        checkpoint_uri: Root for shards (local or gs://); empty = inside ``output_dir``.
        user_agent: User-Agent header of the downloads.
        run_id: Pipeline run id (a fresh one when empty).
        tracker: Experiment tracker; none logs nothing.
        encoder: An already-loaded encoder (tests, benchmarks).
        download_config: Full downloader settings; overrides the download_* arguments (tests).
        decode_workers: Decode threads (default min(8, CPUs)).
        resolver: DNS resolver for the downloader (tests; wrapped by the guard).

    Returns:
        The metadata written to ``img_meta.json``.

    Raises:
        ItemsError: the items table is unusable (raised before the model loads).
    """
    if batch_size < 1 or shard_size < 1 or max_items < 0:
        raise ValueError("batch_size and shard_size must be >= 1 and max_items >= 0")
    summary = validate_items(items_uri, columns, need_text=False, need_image_url=True)  # before any model loads
    run_id = run_id or uuid.uuid4().hex[:12]
    tracker = tracker or NullTracker()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = download_config or DownloadConfig(
        concurrency=download_concurrency, timeout_s=download_timeout_s,
        retries=download_retries, max_bytes=max_image_bytes, user_agent=user_agent,
        allow_private_hosts=allow_private_hosts)
    ids_type = id_type(summary.schema.field(columns.id).type)

    with tracked_run(tracker, run_name("embed-image", run_id)):
        tracker.log_params({"model_name": image_model, "pretrained": image_pretrained,
                            "max_items": max_items, "download_concurrency": config.concurrency,
                            "batch_size": batch_size, "items_uri": items_uri})
        if encoder is None:
            encoder = load_image_encoder(image_model, image_pretrained)
        settings = {
            "items_uri": items_uri, "id_column": columns.id, "url_column": columns.image_url,
            "max_items": max_items, "shard_size": shard_size, "image_model": image_model,
            "image_pretrained": image_pretrained, "resolved_model": encoder.resolved.model_name,
            "weights_sha256": encoder.resolved.weights_sha256, "embed_dim": encoder.dim,
            "device_dtype": encoder.dtype, "batch_size": batch_size,
            "max_image_bytes": config.max_bytes, "max_redirects": config.max_redirects,
            "allow_private_hosts": config.allow_private_hosts,
            "exempt_networks": list(config.exempt_networks), "max_pixels": MAX_PIXELS,
        }
        run_fingerprint = fingerprint(settings)
        store = ShardStore(checkpoint_uri or str(out / SHARDS_DIR), run_fingerprint, settings)
        store.write_manifest()

        counting = Selection()
        for _ in iter_selected(items_uri, columns, max_items, counting):
            pass  # a cheap first pass (two columns) gives the progress total
        window = 4 * max(config.concurrency, batch_size)
        stats = _Stats()
        started = time.perf_counter()
        with FetchDecodePipeline(config, encoder.pil_transform, decode_workers,
                                 resolver=resolver) as pipeline, \
                Progress(counting.selected, "embed-image") as progress:
            selection = Selection()
            n_shards = _run_shards(
                _iter_shards(iter_selected(items_uri, columns, max_items, selection), shard_size),
                store, pipeline, encoder, batch_size=batch_size, window=window, id_type=ids_type,
                progress=progress, stats=stats)
        if selection != counting:
            raise ItemsError(f"items table {items_uri} changed while it was read")
        process_time = time.perf_counter() - started
        totals = _assemble(store, _iter_shards(
            iter_selected(items_uri, columns, max_items, Selection()), shard_size),
            stats.embedded_per_shard, out, encoder.dim, ids_type)
        wall = time.perf_counter() - started

        meta = {
            "encoder_name": image_model,
            "pretrained": image_pretrained,
            "resolved_model": encoder.resolved.model_name,
            "weights_sha256": encoder.resolved.weights_sha256,
            "embed_dim": encoder.dim,
            **totals,
            "no_url_count": selection.no_url_count,
            "capped_count": selection.capped_count,
            "total_rows": selection.total_rows,
            "max_items": max_items,
            # Rates of this attempt (shards finished by an earlier attempt are not re-timed).
            "encoded_this_attempt": stats.encoded,
            "throughput_items_per_sec": stats.encoded / process_time if process_time > 0 else 0.0,
            "encode_only_items_per_sec":
                stats.encoded / stats.encode_time if stats.encode_time > 0 else 0.0,
            "encode_time_sec": stats.encode_time,
            "download_time_sec_total": pipeline.download_time,
            "downloaded_bytes": pipeline.downloaded_bytes,
            "wall_time_sec": wall,
            "run_id": run_id,
            "device": encoder.device,
            "dtype": encoder.dtype,
            "normalized": True,
            "batch_size": batch_size,
            "download_concurrency": config.concurrency,
            "download_timeout_s": config.timeout_s,
            "download_retries": config.retries,
            "max_image_bytes": config.max_bytes,
            "allow_private_hosts": config.allow_private_hosts,
            "shard_size": shard_size,
            "shards": n_shards,
            "resumed_shards": stats.resumed_shards,
            "checkpoint_location": store.location,
            "fingerprint": run_fingerprint,
            "items_uri": items_uri,
            "id_column": columns.id,
            "image_url_column": columns.image_url,
            "versions": package_versions("torch", "open-clip-torch", "pillow", "aiohttp", "numpy"),
        }
        write_json_atomic(out / IMG_META, meta)
        tracker.log_metrics({"count": meta["count"], "failed_count": meta["failed_count"],
                             "throughput_items_per_sec": meta["throughput_items_per_sec"],
                             "encode_time_sec": meta["encode_time_sec"]})
        tracker.log_artifact("image_embeddings", str(out))
    logger.info("embedded %d images (%d failed, %d without URL) in %.1fs -> %s", meta["count"],
                meta["failed_count"], meta["no_url_count"], wall, out)
    return meta
