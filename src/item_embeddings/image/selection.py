"""Which items the image step fetches: rows with an http(s) URL, in input order, up to the cap."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..items import ItemColumns, iter_batches

READ_BATCH_ROWS = 4096


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


def rows_to_select(quota: int | None, url_rows: int | None) -> int | None:
    """The rows the image step selects in a row range: its quota under ``max_items``, else
    every row with a usable URL (None: not counted).

    >>> rows_to_select(None, 7), rows_to_select(0, 7), rows_to_select(None, None)
    (7, 0, None)
    """
    return url_rows if quota is None else quota


def iter_selected(items_uri: str, columns: ItemColumns, cap: int | None,
                  selection: Selection, rows: tuple[int, int] | None = None
                  ) -> Iterator[tuple[Any, str]]:
    """(id, url) of items with an http/https URL, in input order, at most ``cap`` (None = all).

    ``rows`` limits the pass to a row range (a shard). Counts rows without a usable URL (and
    those left out by the cap) in ``selection``.
    """
    for batch in iter_batches(items_uri, [columns.id, columns.image_url], READ_BATCH_ROWS,
                              rows=rows):
        ids = batch.column(columns.id).to_pylist()
        urls = batch.column(columns.image_url).to_pylist()
        selection.total_rows += len(ids)
        for item_id, raw in zip(ids, urls):
            url = usable_url(raw)
            if url is None:
                selection.no_url_count += 1
            elif cap is not None and selection.selected >= cap:
                selection.capped_count += 1
            else:
                selection.selected += 1
                yield item_id, url
