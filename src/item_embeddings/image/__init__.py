"""The image step, split by role the way rom1504/img2dataset splits its download path.

=======================  =====================================================================
:mod:`.selection`        which rows, which URLs, the ``max_items`` cap
:mod:`.download`         concurrent aiohttp downloads: retries, redirects, opt-outs, robots.txt
:mod:`.download_config`  the downloader's settings, from the pipeline parameters
:mod:`.guard`            the SSRF guard: which URLs and addresses may be fetched
:mod:`.hosts`            per-host state: circuit breaker, request rate, slow-down on 429
:mod:`.robots`           robots.txt (RFC 9309) and X-Robots-Tag parsing
:mod:`.decoding`         image bytes to the encoder's uint8 input, failures as reasons
:mod:`.fetching`         download + decode off the caller's thread (a loop thread and a pool)
:mod:`.encoder`          the open_clip model: resolution, loading, batched encoding, device
:mod:`.shards`           durable shard files, resume after a preemption, assembly of the outputs
:mod:`.embed_loop`       items in flight, in input order: outcomes into shard rows, batches encoded
:mod:`.step`             the step: wires the above and writes ``img.npy`` and its companions
=======================  =====================================================================

Example::

    from item_embeddings.image import embed_items_images
    meta = embed_items_images("items.parquet", "out/images")
"""

from .decoding import (
                       DECODE_ERROR,
                       DECODE_MODES,
                       DECOMPRESSION_BOMB,
                       MAX_PIXELS,
                       ImageDecodeError,
                       ImageDecoder,
                       decode_image,
                       to_rgb,
)
from .encoder import (
                       ImageEncoder,
                       ResolvedImageModel,
                       load_image_encoder,
                       prefetch_pretrained,
                       resolve_image_model,
)
from .selection import usable_url
from .step import SHARDS_DIR, embed_items_images

__all__ = ["DECODE_ERROR", "DECODE_MODES", "DECOMPRESSION_BOMB", "MAX_PIXELS", "SHARDS_DIR",
           "ImageDecodeError", "ImageDecoder", "ImageEncoder", "ResolvedImageModel", "decode_image",
           "embed_items_images", "load_image_encoder", "prefetch_pretrained",
           "resolve_image_model", "to_rgb", "usable_url"]
