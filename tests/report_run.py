"""Helpers of the QA report's tests (tests/test_report*.py): a run's step outputs written in
the format of docs/outputs.md, and the page read back as a reader's browser would see it."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from item_embeddings.modality import modality_mix
from item_embeddings.outputs import (
    FUSED_ARRAY,
    FUSED_ITEMS,
    IMG_ARRAY,
    IMG_FAILURES,
    IMG_ITEMS,
    IMG_META,
    KNN_FUSED,
    KNN_FUSED_SCORES,
    KNN_META,
    KNN_TEXT,
    KNN_TEXT_SCORES,
    TXT_ARRAY,
)

K = 8
RECALL = {"text": 0.9871, "fused": 0.9123}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------ a run's outputs


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_image_outputs(image_dir: Path, items: pa.Table, seed: int = 0) -> None:
    """The image step's files in the format of docs/outputs.md: items with a URL are embedded
    (a vector near their category's centre) or fail with a reason; img.npy rows are shuffled."""
    rng = np.random.default_rng(seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    ids = items.column("asin").to_pylist()
    urls = items.column("image_url").to_pylist()
    categories = [str(c) for c in items.column("main_category").to_pylist()]
    centres = dict(zip(sorted(set(categories)),
                       unit(rng.standard_normal((len(set(categories)), 512)))))
    attempted = [i for i, url in enumerate(urls) if url]
    failed = {attempted[0]: ("http_error", "Not Found", 404), attempted[1]: ("http_error", "", 500),
              attempted[2]: ("timeout", "no answer in 5 s", None),
              attempted[3]: ("decode_error", "<script>alert('detail')</script>", None)}
    good = [i for i in attempted if i not in failed]
    vectors = unit(np.stack([centres[categories[i]] for i in good])
                    + 0.05 * rng.standard_normal((len(good), 512)))
    rows = rng.permutation(len(good))
    img = np.empty_like(vectors)
    img[rows] = vectors
    np.save(image_dir / IMG_ARRAY, img)
    pq.write_table(pa.table({"id": [ids[i] for i in good], "url": [urls[i] for i in good],
                             "row": pa.array(rows, pa.int64())}), image_dir / IMG_ITEMS)
    pq.write_table(pa.table({
        "id": [ids[i] for i in failed], "url": [urls[i] for i in failed],
        "reason": [r for r, _, _ in failed.values()],
        "detail": [d for _, d, _ in failed.values()],
        "http_status": pa.array([s for _, _, s in failed.values()], pa.int32()),
        "attempts": pa.array([1] * len(failed), pa.int32())}), image_dir / IMG_FAILURES)
    reasons: dict[str, int] = {}
    for reason, _, _ in failed.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    (image_dir / IMG_META).write_text(json.dumps({
        "count": len(good), "failed_count": len(failed), "attempted_count": len(attempted),
        "no_url_count": len(ids) - len(attempted), "capped_count": 0, "total_rows": len(ids),
        "max_items": 150000, "embed_dim": 512, "failures_by_reason": dict(sorted(reasons.items())),
        "run_id": "tiny", "versions": {"item-embeddings": "0.1.0", "open-clip-torch": "3.3.0"},
        "image_decode": "fast", "encoded_this_attempt": 400, "throughput_items_per_sec": 200.0,
        "download_wall_s": 1.5, "decode_cpu_s": 1.2, "encode_wall_s": 1.9}))


def write_knn(knn_dir: Path, text_dir: Path, fused_dir: Path, k: int = K,
              skip: int = 0) -> dict[str, np.ndarray]:
    """Exact kNN graphs (brute force) in the kNN step's format; ``skip`` drops the best
    ``skip`` neighbours of every item (a deliberately wrong graph)."""
    knn_dir.mkdir(parents=True, exist_ok=True)
    graphs = {}
    for space, array, index_file, score_file in (
            ("text", text_dir / TXT_ARRAY, KNN_TEXT, KNN_TEXT_SCORES),
            ("fused", fused_dir / FUSED_ARRAY, KNN_FUSED, KNN_FUSED_SCORES)):
        x = unit(np.load(array))
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)
        order = np.argsort(-sims, axis=1, kind="stable")[:, skip:skip + k].astype(np.int32)
        np.save(knn_dir / index_file, order)
        np.save(knn_dir / score_file, np.take_along_axis(sims, order, 1).astype(np.float32))
        graphs[space] = order
    n = len(graphs["text"])
    spaces = {space: {"dim": int(np.load(path, mmap_mode="r").shape[1]), "method": "exact",
                      "index_params": {"metric": "ip"}, "build_time_sec": 0.01,
                      "query_time_sec": 0.02, "recall_at_k": RECALL[space],
                      "recall_queries": 1000}
              for space, path in (("text", text_dir / TXT_ARRAY),
                                  ("fused", fused_dir / FUSED_ARRAY))}
    has_image = pq.read_table(fused_dir / FUSED_ITEMS).column("has_image").to_numpy()
    (knn_dir / KNN_META).write_text(json.dumps({
        "k": k, "count": n, "spaces": spaces, "run_id": "tiny", "wall_time_sec": 0.5,
        "modality_mix": modality_mix(graphs, has_image),
        "versions": {"item-embeddings": "0.1.0", "numpy": np.__version__}}))
    return graphs


# ------------------------------------------------------------------------ reading the page


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    text: str = ""
    children: list[Element] = field(default_factory=list)

    def find_all(self, tag: str) -> list[Element]:
        found = [self] if self.tag == tag else []
        for child in self.children:
            found += child.find_all(tag)
        return found

    def by_class(self, cls: str) -> list[Element]:
        found = [self] if cls in self.attrs.get("class", "").split() else []
        for child in self.children:
            found += child.by_class(cls)
        return found

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)


VOID = {"meta", "img", "br", "link", "hr", "input"}


class Page(HTMLParser):
    """The page as a tree (the stdlib parser: what a browser would see as tags and text)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.root = Element("document", {})
        self.stack = [self.root]
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.tags.append((tag, element.attrs))
        self.stack[-1].children.append(element)
        if tag not in VOID:
            self.stack.append(element)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data):
        # Text after a child element: kept as a text-only child so order is preserved.
        self.stack[-1].children.append(Element("#text", {}, data))

    def section(self, key: str) -> Element:
        sections = [s for s in self.root.find_all("section") if s.attrs.get("id") == key]
        assert len(sections) == 1, key
        return sections[0]


def table_rows(table: Element) -> list[list[str]]:
    return [[cell.all_text().strip() for cell in row.children if cell.tag == "td"]
            for row in table.find_all("tr") if any(c.tag == "td" for c in row.children)]


def decode_png(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    png = base64.b64decode(src[len(prefix):], validate=True)
    assert png.startswith(PNG_MAGIC)
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        img.verify()
        assert img.format == "PNG"
    with Image.open(io.BytesIO(png)) as img:
        assert img.size[0] >= 300 and img.size[1] >= 100
    return png
