"""What an estimate is asked about (:class:`Choices`: the catalogue and the pipeline
parameters), and what ``item-embeddings estimate`` reads from the user to build it: counts
written as ``500k`` or ``10M``, and the rows, image URLs and largest host's share of an items
table."""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .config import ConfigError, PipelineParams

# The pipeline parameters the estimate depends on (the CLI's shortcut options).
ESTIMATE_PARAMS = ("shards", "max_parallel_shards", "text_machine_type", "text_accelerator",
                   "text_strategy", "text_backend", "image_machine_type", "image_strategy",
                   "max_items", "image_decode", "download_concurrency", "fusion_machine_type",
                   "fusion_epochs", "fusion_mode",
                   "knn_machine_type", "knn_k", "knn_exact_max_items", "publish_uri",
                   "persistent_resource_id")
# Without a catalogue to measure (--items-file), the share of the image URLs on the largest
# host: a catalogue served from its own CDN, one host, is the common case.
DEFAULT_LARGEST_HOST_SHARE = 1.0


@dataclass(frozen=True)
class Choices:
    """What the estimate is for: the catalogue and the run's pipeline parameters.

    Args:
        items: Rows of the items table.
        image_items: Rows with an http(s) image URL, before the ``max_items`` cap.
        params: The run's pipeline parameters (validated when built).
        changed_fraction: Share of the items whose text or image changed since the previous
            set (an incremental run from ``previous_uri``); 1 = a full run.
        largest_host_share: Share of the image URLs on their most frequent host (measured by
            :func:`count_items`); None = :data:`DEFAULT_LARGEST_HOST_SHARE`.
    """

    items: int
    image_items: int
    params: PipelineParams = field(default_factory=PipelineParams)
    changed_fraction: float = 1.0
    largest_host_share: float | None = None

    @property
    def host_share(self) -> float:
        """The largest host's share of the image URLs the estimate uses."""
        return (DEFAULT_LARGEST_HOST_SHARE if self.largest_host_share is None
                else self.largest_host_share)

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first unusable choice."""
        checks = (
            (self.items >= 1, f"items must be >= 1, got {self.items}"),
            (0 <= self.image_items <= self.items,
             f"image items must be between 0 and items ({self.items}), got {self.image_items}"),
            (0 < self.changed_fraction <= 1,
             f"changed fraction must be in (0, 1], got {self.changed_fraction}"),
            (0 < self.host_share <= 1,
             f"largest host share must be in (0, 1], got {self.host_share}"),
            (not self.incremental or bool(self.params.previous_uri),
             "an incremental run (changed fraction < 1) reuses the set at previous_uri: set "
             "previous_uri"),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def incremental(self) -> bool:
        return self.changed_fraction < 1

    @property
    def selected_images(self) -> int:
        """Image items after the ``max_items`` cap (0 = no cap)."""
        cap = self.params.max_items
        return min(self.image_items, cap) if cap else self.image_items

    def to_dict(self) -> dict[str, Any]:
        """The catalogue and the parameters the estimate depends on, as JSON-able data."""
        return {"items": self.items, "image_items": self.image_items,
                "selected_images": self.selected_images,
                "changed_fraction": self.changed_fraction,
                "largest_host_share": self.host_share,
                "params": {name: getattr(self.params, name) for name in ESTIMATE_PARAMS}}

    def describe(self) -> str:
        """One line: the catalogue and the parameters the estimate depends on."""
        p = self.params
        run = (f"incremental run, {self.changed_fraction:.1%} of the items changed"
               if self.incremental else "full run")
        return (f"{self.items:,} items, {self.image_items:,} with an image URL, "
                f"{self.selected_images:,} image items after max_items={p.max_items:,}, "
                f"{self.host_share:.0%} of the URLs on the largest host; {run}; "
                f"shards={p.shards}, max_parallel_shards={p.max_parallel_shards}, "
                f"text_backend={p.text_backend}, text_strategy={p.text_strategy}, "
                f"image_strategy={p.image_strategy}, image_decode={p.image_decode}, "
                f"download_concurrency={p.download_concurrency}, fusion_mode={p.fusion_mode}, "
                f"fusion_epochs={p.fusion_epochs}, knn_k={p.knn_k}, "
                f"publish={'on' if p.publish_uri else 'off (publish_uri empty)'}, machines="
                + (f"persistent resource {p.persistent_resource_id}"
                   if p.persistent_resource_id else "started per task"))


def parse_count(text: str) -> int:
    """``"500000"``, ``"500_000"``, ``"500k"`` or ``"10M"`` -> an int (ConfigError otherwise)."""
    match = re.fullmatch(r"\s*(\d[\d_]*(?:\.\d+)?)\s*([kKmM]?)\s*", text)
    if not match:
        raise ConfigError(f"expected a count such as 500000, 500k or 10M, got {text!r}")
    scale = {"": 1, "k": 1_000, "m": 1_000_000}[match.group(2).lower()]
    value = float(match.group(1).replace("_", "")) * scale
    if not value.is_integer():
        raise ConfigError(f"expected a whole number of items, got {text!r}")
    return int(value)


class ItemCounts(NamedTuple):
    """What :func:`count_items` counts in an items table."""

    items: int
    image_items: int                   # rows with an http(s) image URL
    largest_host_share: float | None   # share of those URLs on their most frequent host


def count_items(uri: str, image_url_column: str = PipelineParams().image_url_column
                ) -> ItemCounts:
    """Rows, rows with an http(s) image URL, and the largest host's share of those URLs (the
    host as the downloader counts it, ``image/hosts.py``) of an items table (file or folder)."""
    from .image.hosts import host_of
    from .image.selection import READ_BATCH_ROWS, usable_url
    from .items import ItemsError, iter_batches, open_items

    names = open_items(uri).schema.names
    if image_url_column not in names:
        raise ItemsError(f"items table {uri} has no column {image_url_column!r} (columns: "
                         f"{', '.join(names)}); name the image URL column with "
                         "--image-url-column")
    rows = with_url = 0
    hosts: collections.Counter = collections.Counter()
    for batch in iter_batches(uri, [image_url_column], READ_BATCH_ROWS):
        rows += batch.num_rows
        urls = [url for v in batch.column(0).to_pylist() if (url := usable_url(v)) is not None]
        with_url += len(urls)
        hosts.update(host_of(url) for url in urls)
    largest = max(hosts.values()) / with_url if with_url else None
    return ItemCounts(rows, with_url, largest)
