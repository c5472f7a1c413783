"""The image step: select items, fetch and decode their images, encode them, keep durable shards.

Stages overlap (the split of rom1504/img2dataset): the main thread reads the selection
(:mod:`.selection`) and encodes (:mod:`.encoder`); an asyncio loop in a background thread
downloads and a thread pool decodes (:mod:`.fetching`). A window of at most
``4 * max(concurrency, batch size)`` items in flight (:mod:`.embed_loop`) bounds memory whatever
the number of items. Results are consumed in input order, so encoder batches (and hence every
float of the output) do not depend on download timing.

Work is cut into shards (:mod:`.shards`); a restarted attempt skips finished shards and writes
the same files as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ..config import PipelineParams
from ..incremental import PreviousGroup
from ..items import ItemColumns, ItemsError, id_type, validate_items
from ..outputs import IMG_META
from ..progress import Progress
from ..step import StepKind
from ..tracking import ExperimentTracker
from ..worker import WorkerSetup
from .decoding import MAX_PIXELS
from .download_config import DownloadConfig
from .embed_loop import EmbedStats, run_shards
from .encoder import ImageEncoder, load_image_encoder
from .fetching import FetchDecodePool
from .reuse import PreviousImages, encoder_fingerprint, previous_images
from .selection import Selection, iter_selected, rows_to_select
from .shards import ShardStore, assemble, fingerprint, iter_shards

logger = logging.getLogger(__name__)

SHARDS_DIR = "img_shards"  # default checkpoint root, inside the step's output


IMAGE_STEP = StepKind(
    "embed-image", artifact="image_embeddings", meta_file=IMG_META,
    metric_keys=("count", "failed_count", "attempted_count", "no_url_count", "encoded_count",
                 "reused_count", "revalidated_count", "failures_reused_count",
                 "encode_time_sec", "throughput_items_per_sec", "download_wall_s",
                 "decode_cpu_s", "encode_wall_s", "fanout_shards", "shard_wall_time_max_sec"),
    logged_params={"model_name": "encoder_name", "pretrained": "pretrained",
                   "max_items": "max_items", "download_concurrency": "download_concurrency",
                   "batch_size": "batch_size", "items_uri": "items_uri",
                   "image_decode": "image_decode", "previous_uri": "previous_uri",
                   "image_revalidate": "image_revalidate",
                   "retry_failed_images": "retry_failed_images",
                   "download_rate_per_host": "download_rate_per_host",
                   "host_failure_limit": "host_failure_limit",
                   "respect_opt_out": "respect_opt_out",
                   "respect_robots_txt": "respect_robots_txt"},
    versions=("torch", "open-clip-torch", "pillow", "aiohttp", "numpy"))


def image_settings(params: PipelineParams, config: DownloadConfig, items_uri: str,
                   rows: tuple[int, int] | None = None, quota: int | None = None
                   ) -> dict[str, Any]:
    """What the image step is asked to do, by the names its meta file records them under."""
    return {
        "encoder_name": params.image_model, "pretrained": params.image_pretrained,
        "max_items": params.max_items, "batch_size": params.image_batch_size,
        "download_concurrency": config.concurrency, "download_timeout_s": config.timeout_s,
        "download_retries": config.retries, "max_image_bytes": config.max_bytes,
        "allow_private_hosts": config.allow_private_hosts,
        "download_rate_per_host": config.rate_per_host,
        "host_failure_limit": config.host_failure_limit,
        "respect_opt_out": config.respect_opt_out,
        "respect_robots_txt": config.respect_robots_txt, "user_agent": config.user_agent,
        "shard_size": params.shard_size,
        "items_uri": items_uri, "id_column": params.id_column,
        "image_url_column": params.image_url_column, "image_decode": params.image_decode,
        "rows": list(rows) if rows is not None else None,
        "image_quota": quota if rows is not None else None,
        "previous_uri": params.previous_uri, "image_revalidate": params.image_revalidate,
        "retry_failed_images": params.retry_failed_images,
    }


# The settings that decide a shard's content, under the names its fingerprint has always
# hashed (a new name would orphan every checkpoint): fingerprint name -> settings key.
_SHARD_SETTINGS = {
    "image_revalidate": "image_revalidate", "retry_failed_images": "retry_failed_images",
    "items_uri": "items_uri", "id_column": "id_column", "url_column": "image_url_column",
    "max_items": "max_items", "shard_size": "shard_size", "image_model": "encoder_name",
    "image_pretrained": "pretrained", "image_decode": "image_decode", "batch_size": "batch_size",
    "max_image_bytes": "max_image_bytes", "allow_private_hosts": "allow_private_hosts",
    "rows": "rows", "quota": "image_quota",
}


def _shard_store(settings: dict[str, Any], encoder: ImageEncoder, config: DownloadConfig,
                 reused_from: PreviousGroup | None, root: str) -> ShardStore:
    """The store of this configuration's shards: everything that decides a shard's content is
    in its fingerprint (the previous set reused from included), so a changed value never
    reuses a shard. Its settings are recorded."""
    decides = {name: settings[key] for name, key in _SHARD_SETTINGS.items()}
    decides.update({
        "previous": reused_from.meta.get("run_id") if reused_from else None,
        "resolved_model": encoder.resolved.model_name,
        "weights_sha256": encoder.resolved.weights_sha256, "embed_dim": encoder.dim,
        "device_dtype": encoder.dtype, "max_redirects": config.max_redirects,
        "exempt_networks": list(config.exempt_networks), "max_pixels": MAX_PIXELS,
        "respect_opt_out": config.respect_opt_out,
        "respect_robots_txt": config.respect_robots_txt,
    })
    store = ShardStore(root, fingerprint(decides), decides)
    store.write_settings()
    return store


@dataclass
class _Fetched:
    """What one pass of fetching and encoding did."""

    shards: int
    stats: EmbedStats
    selection: Selection
    seconds: float
    download_time: float
    downloaded_bytes: int
    download_wall_s: float
    decode_cpu_s: float


@dataclass(frozen=True)
class _Selected:
    """The items one call selects (a row range and its image quota, or ``max_items``), in
    shards, read again for each pass."""

    uri: str
    columns: ItemColumns
    cap: int | None
    rows: tuple[int, int] | None
    shard_size: int

    @classmethod
    def of(cls, items_uri: str, columns: ItemColumns, params: PipelineParams,
           rows: tuple[int, int] | None, quota: int | None) -> _Selected:
        """A row range takes its quota, the whole table ``max_items`` (0 = no cap)."""
        cap = quota if rows is not None else (params.max_items or None)
        return cls(items_uri, columns, cap, rows, params.shard_size)

    def shards(self, counts: Selection) -> Iterator[tuple[int, list[Any], list[str]]]:
        """(index, ids, URLs) of each shard; the selection counted in ``counts``."""
        return iter_shards(iter_selected(self.uri, self.columns, self.cap, counts, self.rows),
                           self.shard_size)


def _reusable(previous_group: PreviousGroup | None, encoder: ImageEncoder, keys_fp: str,
              params: PipelineParams) -> PreviousImages | None:
    """The previous set's images if that set comes from this very encoder (``keys_fp``)."""
    return previous_images(previous_group, keys_fp, encoder.dim,
                           revalidate=params.image_revalidate,
                           retry_failed=params.retry_failed_images, decode=params.image_decode)


def _nothing_to_select(rows: tuple[int, int] | None, quota: int | None,
                       url_rows: int | None) -> bool:
    """Whether the plan gives this row range no image to select (its quota is used up, or it
    holds no URL): then nothing of the items or the previous set needs reading."""
    # _planned_empty derives the counts from url_rows: without it, read the rows as before
    return rows is not None and url_rows is not None and rows_to_select(quota, url_rows) == 0


def _planned_empty(out, rows: tuple[int, int], url_rows: int, dim: int,
                   ids_type: pa.DataType) -> dict[str, Any]:
    """A row range without images to select: the empty files and the counts a pass over it
    would give (its URL rows, as the plan counted them, are all beyond the cap), read from
    nothing."""
    counts = Selection(total_rows=rows[1] - rows[0], no_url_count=rows[1] - rows[0] - url_rows,
                       capped_count=url_rows)
    logger.info("rows [%d, %d): no image to select (%d rows without a URL, %d URL rows beyond "
                "the max_items cap): empty outputs written, nothing read", *rows,
                counts.no_url_count, url_rows)
    return {**assemble(None, iter(()), {}, out, dim, ids_type),
            **_run_meta(_Fetched(0, EmbedStats(), counts, 0.0, 0.0, 0, 0.0, 0.0), None)}


def _embed_shards(selected: _Selected, store: ShardStore, encoder: ImageEncoder,
                  config: DownloadConfig, params: PipelineParams, ids_type: pa.DataType,
                  previous: PreviousImages | None, keys_fp: str, decode_workers: int | None,
                  resolver) -> _Fetched:
    """Fetch, decode and encode every selected item into the store's shards (finished shards
    of an earlier attempt are skipped)."""
    counting = Selection()
    for _ in selected.shards(counting):
        pass  # a cheap first pass (two columns) gives the progress total
    stats, selection = EmbedStats(), Selection()
    started = time.perf_counter()
    with FetchDecodePool(config, encoder.decoder(params.image_decode), decode_workers,
                         resolver=resolver) as pool, \
            Progress(counting.selected, "embed-image") as progress:
        shards = run_shards(
            selected.shards(selection), store, pool, encoder, batch_size=params.image_batch_size,
            window=4 * max(config.concurrency, params.image_batch_size), id_type=ids_type,
            progress=progress, stats=stats, keys_fp=keys_fp, previous=previous)
    if selection != counting:
        raise ItemsError(f"items table {selected.uri} changed while it was read")
    return _Fetched(shards, stats, selection, time.perf_counter() - started,
                    pool.download_time, pool.downloaded_bytes, pool.download_wall_s,
                    pool.decode_cpu_s)


def _encoder_meta(encoder: ImageEncoder, keys_fp: str) -> dict[str, Any]:
    """What the meta file records of the encoder that ran."""
    return {"resolved_model": encoder.resolved.model_name,
            "weights_sha256": encoder.resolved.weights_sha256, "embed_dim": encoder.dim,
            "device": encoder.device, "dtype": encoder.dtype, "normalized": True,
            # incremental runs: keys are sha256(encoder_fingerprint, url) in img_items.parquet
            "encoder_fingerprint": keys_fp}


def _run_meta(fetched: _Fetched, store: ShardStore | None) -> dict[str, Any]:
    """What the meta file records of this attempt: selection counts, shards and rates
    (shards finished by an earlier attempt are not re-timed); no store: nothing to keep."""
    stats, selection = fetched.stats, fetched.selection
    return {
        "no_url_count": selection.no_url_count, "capped_count": selection.capped_count,
        "total_rows": selection.total_rows, "encoded_this_attempt": stats.encoded,
        "throughput_items_per_sec":
            stats.encoded / fetched.seconds if fetched.seconds > 0 else 0.0,
        "encode_only_items_per_sec":
            stats.encoded / stats.encode_time if stats.encode_time > 0 else 0.0,
        "encode_time_sec": stats.encode_time,
        "download_time_sec_total": fetched.download_time,
        # Where this attempt's time went: the stages overlap, so these do not add up to the
        # wall time; the largest against it shows the bound (docs/images.md).
        "download_wall_s": round(fetched.download_wall_s, 3),
        "decode_cpu_s": round(fetched.decode_cpu_s, 3),
        "encode_wall_s": round(stats.encode_time, 3),
        "downloaded_bytes": fetched.downloaded_bytes,
        "shards": fetched.shards, "resumed_shards": stats.resumed_shards,
        "checkpoint_location": store.location if store else None,
        "fingerprint": store.fingerprint if store else None,
    }


def embed_items_images(
    items_uri: str,
    output_dir: str | os.PathLike,
    params: PipelineParams = PipelineParams(),
    *,
    run_id: str = "",
    tracker: ExperimentTracker | None = None,
    artifact_uri: str = "",
    rows: tuple[int, int] | None = None,
    quota: int | None = None,
    url_rows: int | None = None,
    device: str | None = None,
    encoder: ImageEncoder | None = None,
    download_config: DownloadConfig | None = None,
    decode_workers: int | None = None,
    resolver=None,
    setup: WorkerSetup | None = None,
) -> dict[str, Any]:
    """Download, decode and embed the image of every selected item; write the image step's outputs.

    Selects items with an http/https URL in input order (at most ``max_items``; 0 = all),
    processes them in shards of ``shard_size`` (each stored durably under ``checkpoint_uri``, by
    default ``<output_dir>/img_shards``; a rerun skips finished shards), then writes atomically:
    ``img.npy`` [M, dim] float32 L2-normalised, ``img_items.parquet`` (id, url, key, etag,
    last_modified, row), ``img_failures.parquet`` (id, url, reason, detail, http_status,
    attempts, key) and, last, ``img_meta.json``. Logs the experiment run ``embed-image-<run id>``.

    Args:
        items_uri: Parquet file or folder (local or gs://).
        output_dir: Directory for the outputs (created).
        params: Pipeline parameters; this step reads the id and image URL column names, the
            ``image_*`` and ``download_*`` parameters, ``max_items``, ``max_image_bytes``,
            ``allow_private_hosts``, ``shard_size``, ``checkpoint_uri``, and for incremental
            runs ``previous_uri``, ``image_revalidate`` and ``retry_failed_images`` (see
            :mod:`.reuse`).
        run_id: Pipeline run id (a fresh one when empty).
        tracker: Experiment tracker; none logs nothing.
        artifact_uri: The output's durable URI for the experiment run; default ``output_dir``.
        rows: Only these rows ``[start, stop)`` of the table (one shard of a fan-out,
            :mod:`item_embeddings.fanout`); default all.
        quota: With ``rows``: how many of the range's URL rows to select (the range's share of
            the catalogue-wide ``max_items``; None = no cap). Without ``rows``, ``max_items``
            applies.
        url_rows: With ``rows``: how many of the range's rows have a usable URL, as the plan
            counted them; when the range then has no image to select (a quota of 0, or no
            URL), its empty outputs are written without reading the items or the previous set.
        device: Where the encoder runs ('cuda', 'cpu'); default CUDA when available.
        encoder: An already-loaded encoder (tests, benchmarks).
        download_config: Full downloader settings instead of the parameters' (tests).
        decode_workers: Decode threads (default min(8, CPUs)).
        resolver: DNS resolver for the downloader (tests; wrapped by the guard).
        setup: What a fan-out worker made for an earlier shard and keeps for the next (the
            encoder, the opened previous set, the validated table); default: made for this call.

    Returns:
        The metadata written to ``img_meta.json``.

    Raises:
        ItemsError: the items table is unusable (raised before the model loads).
        PreviousSetError: ``previous_uri`` is set but that set is missing or damaged.
    """
    with contextlib.ExitStack() as stack:
        setup = setup or stack.enter_context(WorkerSetup())
        meta = _embed_images(items_uri, output_dir, params, setup, run_id=run_id,
                             tracker=tracker, artifact_uri=artifact_uri, rows=rows, quota=quota,
                             url_rows=url_rows, device=device, encoder=encoder,
                             download_config=download_config, decode_workers=decode_workers,
                             resolver=resolver)
    if meta["unavailable_hosts"]:
        logger.warning("image host(s) not answering, their remaining images skipped by the "
                       "circuit breaker (reason host_unavailable; retried by the next run): %s",
                       ", ".join(f"{host} ({n} images)" for host, n in
                                 list(meta["unavailable_hosts"].items())[:5]))
    logger.info("embedded %d images (%d failed, %d without URL) in %.1fs -> %s", meta["count"],
                meta["failed_count"], meta["no_url_count"], meta["wall_time_sec"], output_dir)
    return meta


def _embed_images(items_uri: str, output_dir: str | os.PathLike, params: PipelineParams,
                  setup: WorkerSetup, *, run_id: str, tracker: ExperimentTracker | None,
                  artifact_uri: str, rows: tuple[int, int] | None, quota: int | None,
                  url_rows: int | None, device: str | None, encoder: ImageEncoder | None,
                  download_config: DownloadConfig | None, decode_workers: int | None,
                  resolver) -> dict[str, Any]:
    """:func:`embed_items_images` with the worker's ``setup``."""
    columns = ItemColumns.from_params(params)
    summary = setup.once(("validated-urls", items_uri, columns), lambda: validate_items(
        items_uri, columns, need_text=False, need_image_url=True))
    ids_type = id_type(summary.schema.field(columns.id).type)
    summary.row_range(rows)  # a shard outside the table is refused before any model loads
    config = download_config or DownloadConfig.from_params(params)
    settings = image_settings(params, config, items_uri, rows, quota)
    selected = _Selected.of(items_uri, columns, params, rows, quota)
    empty = _nothing_to_select(rows, quota, url_rows)
    previous_group = (setup.previous(params.previous_uri, "image")
                      if params.previous_uri and not empty else None)
    with IMAGE_STEP.run(output_dir, settings, run_id=run_id, tracker=tracker,
                        artifact_uri=artifact_uri) as run:
        encoder = encoder or setup.once(
            ("image-encoder", params.image_model, params.image_pretrained, device),
            lambda: load_image_encoder(params.image_model, params.image_pretrained, device))
        # part of every image row's key (and of the meta file, which the merge checks equal)
        keys_fp = setup.once(("image-fingerprint", encoder, params.image_decode),
                             lambda: encoder_fingerprint(encoder, params.image_decode))
        if empty:
            return run.finish_step({**settings, **_encoder_meta(encoder, keys_fp),
                                    **_planned_empty(run.out, rows, url_rows, encoder.dim,
                                                     ids_type)})
        previous = setup.once(("image-reuse", previous_group, keys_fp),
                              lambda: _reusable(previous_group, encoder, keys_fp, params))
        store = _shard_store(settings, encoder, config, previous_group if previous else None,
                             params.checkpoint_uri or str(run.out / SHARDS_DIR))
        fetched = _embed_shards(selected, store, encoder, config, params, ids_type, previous,
                                keys_fp, decode_workers, resolver)
        totals = assemble(store, selected.shards(Selection()), fetched.stats.embedded_per_shard,
                          run.out, encoder.dim, ids_type)
        return run.finish_step({**settings, **_encoder_meta(encoder, keys_fp), **totals,
                                **_run_meta(fetched, store)})
