"""Incremental runs (issue #13): with ``previous_uri`` a step reuses the vectors of unchanged
items and writes exactly what a full run writes.

Core level: ``embed_items_text``, ``embed_items_images`` (a loopback host that counts requests
and answers conditional ones) and ``fuse_item_embeddings(fusion_mode='apply')``, on generated
catalogues. The text encoder is the exact ``torch`` backend: the keys and the reuse do not
depend on the backend, and it needs no ONNX build in the test cache (the ``onnx`` backend's
first build costs more than all these runs).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import TINY_CONFIG, catalogue, make_output_set, reseal, write_items, write_knn
from image_server import ImageServer, gradient
from item_embeddings import image as im
from item_embeddings.config import PipelineParams
from item_embeddings.fusion import fuse_item_embeddings
from item_embeddings.fusion.inputs import FusionInputError
from item_embeddings.fusion.model import load_fusion_model
from item_embeddings.image.download import DownloadConfig
from item_embeddings.incremental import PreviousSetError
from item_embeddings.outputs import (
    FUSED_ARRAY,
    FUSED_ITEMS,
    FUSION_CONFIG,
    FUSION_WEIGHTS,
    IMG_ARRAY,
    IMG_FAILURES,
    IMG_ITEMS,
    IMG_META,
    KNN_TEXT_SCORES,
    MANIFEST,
    TXT_ARRAY,
    TXT_ITEMS,
    TXT_META,
)
from item_embeddings.publish import publish_outputs
from item_embeddings.text import embed_items_text, load_text_encoder
from item_embeddings.tracking import LocalTracker

DOWNLOADS = DownloadConfig(timeout_s=5, retries=0, allow_private_hosts=True)
# Meta keys that differ between any two runs (timings, run ids, what a run was asked to reuse,
# the counts of what it reused) and so are compared separately, not between runs.
RUN_KEYS = {"run_id", "wall_time_sec", "files", "throughput_items_per_sec", "encode_time_sec",
            "encode_only_items_per_sec", "download_time_sec_total", "downloaded_bytes",
            "encoded_this_attempt", "checkpoint_location", "fingerprint", "previous_uri",
            "reused_count", "encoded_count", "revalidated_count", "failures_reused_count",
            "retried_items", "download_wall_s", "decode_cpu_s", "encode_wall_s"}

# How catalogue B is made from catalogue A (row numbers of A).
N = 48
DELETED = [2, 9, 22]
TITLE_CHANGED = [4, 15, 31]
URL_CHANGED = [7, 25]
URL_REMOVED = [13]
ADDED = [("N0000001", "Solar garden lamp with dusk sensor", "n1.jpg"),
         ("N0000002", "Cast-iron frying pan, 28 cm, pre-seasoned", None),
         ("N0000003", "Bamboo cutting board with juice groove", "n3.jpg")]


def jpeg(seed: int, size: int = 40) -> bytes:
    buf = io.BytesIO()
    gradient((size, size), seed=seed).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def image_params(tiny_model, **changes) -> PipelineParams:
    config, checkpoint, _ = tiny_model
    return PipelineParams(**{"image_model": str(config), "image_pretrained": str(checkpoint),
                             "image_batch_size": 4, "shard_size": 8, **changes})


def stable(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in RUN_KEYS}


def read_meta(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def table(out: Path, name: str) -> pa.Table:
    return pq.read_table(out / name)


def row_of_key(out: Path, items: str) -> dict[str, int]:
    """Key -> row of the step's array (the first row holding it)."""
    rows: dict[str, int] = {}
    t = table(out, items)
    row_col = t.column("row").to_pylist() if "row" in t.column_names else range(t.num_rows)
    for key, row in zip(t.column("key").to_pylist(), row_col):
        rows.setdefault(key, row)
    return rows


def hit_diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {p: n - before.get(p, 0) for p, n in after.items() if n != before.get(p, 0)}


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def text_encoder():
    return load_text_encoder(batch_size=16, backend="torch")


@pytest.fixture(scope="module")
def image_encoder(tiny_model):
    config, checkpoint, _ = tiny_model
    return im.load_image_encoder(str(config), str(checkpoint))


@pytest.fixture(scope="module")
def server():
    images = {f"p{i}.jpg": (jpeg(i), "image/jpeg") for i in range(N)}
    images.update({f"q{i}.jpg": (jpeg(100 + i), "image/jpeg") for i in URL_CHANGED})
    images.update({name: (jpeg(200 + k), "image/jpeg")
                   for k, (_, _, name) in enumerate(ADDED) if name})
    with ImageServer(images) as srv:
        yield srv


def catalogue_a(srv: ImageServer) -> dict[str, list]:
    cat = catalogue(N)
    cat["image_url"] = [srv.url(f"img/p{i}.jpg") if u else None
                        for i, u in enumerate(cat["image_url"])]
    return cat


def catalogue_b(srv: ImageServer) -> dict[str, list]:
    """A with rows deleted, titles and URLs changed, items added, and every row moved."""
    a = catalogue_a(srv)
    rows = []
    for i in range(N):
        if i in DELETED:
            continue
        row = {k: v[i] for k, v in a.items()}
        if i in TITLE_CHANGED:
            row["title"] = f"Renamed product {i}: a stainless steel kettle"
        if i in URL_CHANGED:
            row["image_url"] = srv.url(f"img/q{i}.jpg")
        if i in URL_REMOVED:
            row["image_url"] = None
        rows.append(row)
    rows.reverse()  # every unchanged item under another row than in A
    for k, (item_id, title, name) in enumerate(ADDED):
        rows.insert(k * 20, {"asin": item_id, "title": title, "description": [f"New item {k}."],
                             "image_url": srv.url(f"img/{name}") if name else None})
    return {k: [r[k] for r in rows] for k in a}


def run_all(items: Path, out: Path, text_encoder, image_encoder, tiny_model, *,
            previous: str = "", fusion: bool = True, tracker=None, run_id: str = "") -> None:
    """The three steps into one folder (a flat output set, as a run places its files)."""
    params = image_params(tiny_model, previous_uri=previous, text_batch_size=16,
                          fusion_epochs=2, fusion_mode="apply" if previous else "train")
    kwargs = dict(run_id=run_id or uuid.uuid4().hex[:8], tracker=tracker)
    embed_items_text(str(items), out, params, encoder=text_encoder, **kwargs)
    im.embed_items_images(str(items), out, params, encoder=image_encoder,
                          download_config=DOWNLOADS, **kwargs)
    if fusion:
        fuse_item_embeddings(out, out, out, params, num_threads=1, **kwargs)


@pytest.fixture(scope="module")
def sets(tmp_path_factory, server, text_encoder, image_encoder, tiny_model):
    """Set A (full run, fusion trained), then on catalogue B: an incremental run from A
    (fusion applied) and a full run (text and images); the requests each run made."""
    root = tmp_path_factory.mktemp("incremental")
    items_a = write_items(root / "a.parquet", catalogue_a(server))
    items_b = write_items(root / "b.parquet", catalogue_b(server))
    run_all(items_a, root / "A", text_encoder, image_encoder, tiny_model)
    before = server.snapshot_hits()
    run_all(items_b, root / "inc", text_encoder, image_encoder, tiny_model,
            previous=str(root / "A"), tracker=LocalTracker(root / "runs", "exp"), run_id="inc")
    inc_hits = hit_diff(server.snapshot_hits(), before)
    run_all(items_b, root / "full", text_encoder, image_encoder, tiny_model, fusion=False)
    return {"root": root, "A": root / "A", "inc": root / "inc", "full": root / "full",
            "items_b": items_b, "inc_hits": inc_hits, "b": catalogue_b(server)}


# ----------------------------------------------------------------------------- text

def test_text_incremental_run_is_a_full_run(sets):
    a, inc, full, b = sets["A"], sets["inc"], sets["full"], sets["b"]
    inc_items, full_items = table(inc, TXT_ITEMS), table(full, TXT_ITEMS)
    assert inc_items.equals(full_items)  # same ids, same keys, same order
    assert inc_items.column("id").to_pylist() == b["asin"]
    a_ids = set(table(a, TXT_ITEMS).column("id").to_pylist())
    deleted = {f"B{i:07d}" for i in DELETED}
    assert deleted <= a_ids and not deleted & set(b["asin"])

    vectors, fresh, previous = (np.load(d / TXT_ARRAY) for d in (inc, full, a))
    previous_row = row_of_key(a, TXT_ITEMS)
    keys = inc_items.column("key").to_pylist()
    reused = [i for i, k in enumerate(keys) if k in previous_row]
    encoded = [i for i, k in enumerate(keys) if k not in previous_row]
    changed_ids = {f"B{i:07d}" for i in TITLE_CHANGED} | {item_id for item_id, _, _ in ADDED}
    assert {b["asin"][i] for i in encoded} == changed_ids
    # Reused rows: the previous set's bytes (unchanged texts under moved rows included).
    for i in reused:
        assert vectors[i].tobytes() == previous[previous_row[keys[i]]].tobytes()
    moved = [i for i in reused if previous_row[keys[i]] != i]
    assert len(moved) > 30
    # Encoded rows (changed titles, added items): a fresh encoding, as the full run's.
    np.testing.assert_allclose(vectors, fresh, atol=1e-5)
    a_by_id = dict(zip(table(a, TXT_ITEMS).column("id").to_pylist(), previous))
    for i in TITLE_CHANGED:
        item_id = f"B{i:07d}"
        row = b["asin"].index(item_id)
        assert float(vectors[row] @ a_by_id[item_id]) < 0.99  # the new title, not the old one

    meta, full_meta = read_meta(inc, TXT_META), read_meta(full, TXT_META)
    assert (meta["reused_count"], meta["encoded_count"]) == (len(b["asin"]) - 6, 6)
    assert (full_meta["reused_count"], full_meta["encoded_count"]) == (0, len(b["asin"]))
    assert stable(meta) == stable(full_meta)
    assert meta["previous_uri"] == str(a)
    assert set(meta["files"]) == set(full_meta["files"]) == {TXT_ARRAY, TXT_ITEMS}


def test_another_text_encoder_means_a_full_recompute(sets, tmp_path, caplog):
    """A changed fingerprint (here max_seq_length) reuses nothing, and the log says why."""
    other = load_text_encoder(batch_size=16, backend="torch")
    other.model.max_seq_length = other.max_seq_length = 64
    params = PipelineParams(previous_uri=str(sets["A"]), text_batch_size=16)
    with caplog.at_level(logging.WARNING, logger="item_embeddings.text.step"):
        meta = embed_items_text(str(sets["items_b"]), tmp_path / "out", params, encoder=other)
    assert "made by another text encoder" in caplog.text and "nothing is reused" in caplog.text
    n = len(sets["b"]["asin"])
    assert (meta["reused_count"], meta["encoded_count"]) == (0, n)
    assert meta["encoder_fingerprint"] != read_meta(sets["A"], TXT_META)["encoder_fingerprint"]
    keys = set(table(tmp_path / "out", TXT_ITEMS).column("key").to_pylist())
    assert not keys & set(table(sets["A"], TXT_ITEMS).column("key").to_pylist())


# ----------------------------------------------------------------------------- images

def test_image_incremental_run_requests_only_new_and_changed_urls(sets, server):
    a, inc, full, b = sets["A"], sets["inc"], sets["full"], sets["b"]
    new_paths = {f"/img/q{i}.jpg" for i in URL_CHANGED} | {f"/img/{name}"
                                                          for _, _, name in ADDED if name}
    assert sets["inc_hits"] == {p: 1 for p in new_paths}  # counted on the server

    # The same files as the full run: ids, URLs, keys, validators and order.
    assert table(inc, IMG_ITEMS).equals(table(full, IMG_ITEMS))
    assert table(inc, IMG_FAILURES).equals(table(full, IMG_FAILURES))
    keys = table(inc, IMG_ITEMS).column("key").to_pylist()
    previous_row = row_of_key(a, IMG_ITEMS)
    vectors, fresh, previous = (np.load(d / IMG_ARRAY) for d in (inc, full, a))
    for row, key in enumerate(keys):
        if key in previous_row:
            assert vectors[row].tobytes() == previous[previous_row[key]].tobytes()
    np.testing.assert_allclose(vectors, fresh, atol=1e-6)

    with_url = sum(u is not None for u in b["image_url"])
    meta, full_meta = read_meta(inc, IMG_META), read_meta(full, IMG_META)
    assert (meta["encoded_count"], meta["reused_count"], meta["revalidated_count"],
            meta["failures_reused_count"]) == (len(new_paths), with_url - len(new_paths), 0, 0)
    assert sum(k not in previous_row for k in keys) == len(new_paths)
    assert (full_meta["encoded_count"], full_meta["reused_count"]) == (with_url, 0)
    assert stable(meta) == stable(full_meta)


@pytest.fixture
def host():
    """A fresh host of 10 images: ``gone.jpg`` never exists, ``late.jpg`` fails its first
    request (an image the CDN did not have yet)."""
    images = {f"p{i}.jpg": (jpeg(i), "image/jpeg") for i in range(12)}
    images["late.jpg"] = (jpeg(50), "image/jpeg")
    with ImageServer(images, fail_first={"late.jpg"}) as srv:
        yield srv


def host_items(path: Path, srv: ImageServer, names: list[str], ids: list[str]) -> Path:
    return write_items(path, {"asin": ids, "title": ["t"] * len(ids),
                              "description": [["d"]] * len(ids),
                              "image_url": [srv.url(f"img/{n}") for n in names]})


A_NAMES = [f"p{i}.jpg" for i in range(8)] + ["gone.jpg", "late.jpg"]
A_IDS = [f"i{i}" for i in range(10)]


def run_images(items: Path, out: Path, encoder, tiny_model, **changes) -> dict:
    return im.embed_items_images(str(items), out, image_params(tiny_model, **changes),
                                 encoder=encoder, download_config=DOWNLOADS)


def test_failed_images_are_retried_and_unchanged_urls_make_no_request(host, image_encoder,
                                                                      tiny_model, tmp_path):
    items_a = host_items(tmp_path / "a.parquet", host, A_NAMES, A_IDS)
    run_images(items_a, tmp_path / "A", image_encoder, tiny_model)
    assert dict(host.hits) == {f"/img/{n}": 1 for n in A_NAMES}
    failures = table(tmp_path / "A", IMG_FAILURES).column("id").to_pylist()
    assert failures == ["i8", "i9"]  # gone.jpg and late.jpg (404)

    host.set_image("q3.jpg", jpeg(33))
    host.set_image("p10.jpg", jpeg(10))
    # B: i2 deleted, i3's URL changed, i10 added, rows reordered.
    names = {**dict(zip(A_IDS, A_NAMES)), "i3": "q3.jpg", "i10": "p10.jpg"}
    ids_b = ["i9", "i8", "i7", "i10", "i6", "i5", "i4", "i3", "i1", "i0"]
    items_b = host_items(tmp_path / "b.parquet", host, [names[i] for i in ids_b], ids_b)
    before = host.snapshot_hits()
    meta = run_images(items_b, tmp_path / "inc", image_encoder, tiny_model,
                      previous_uri=str(tmp_path / "A"))
    # new + changed + previously failed URLs, once each; nothing for the unchanged ones
    assert hit_diff(host.snapshot_hits(), before) == {
        "/img/q3.jpg": 1, "/img/p10.jpg": 1, "/img/gone.jpg": 1, "/img/late.jpg": 1}
    assert (meta["reused_count"], meta["encoded_count"], meta["failed_count"],
            meta["failures_reused_count"]) == (6, 3, 1, 0)
    assert table(tmp_path / "inc", IMG_FAILURES).column("id").to_pylist() == ["i8"]

    full = run_images(items_b, tmp_path / "full", image_encoder, tiny_model)
    assert table(tmp_path / "inc", IMG_ITEMS).equals(table(tmp_path / "full", IMG_ITEMS))
    assert table(tmp_path / "inc", IMG_FAILURES).equals(table(tmp_path / "full", IMG_FAILURES))
    np.testing.assert_allclose(np.load(tmp_path / "inc" / IMG_ARRAY),
                               np.load(tmp_path / "full" / IMG_ARRAY), atol=1e-6)
    assert stable(meta) == stable(full)


def test_failures_are_carried_over_without_a_request_when_retry_is_off(host, image_encoder,
                                                                       tiny_model, tmp_path):
    items = host_items(tmp_path / "a.parquet", host, A_NAMES, A_IDS)
    run_images(items, tmp_path / "A", image_encoder, tiny_model)
    before = host.snapshot_hits()
    meta = run_images(items, tmp_path / "inc", image_encoder, tiny_model,
                      previous_uri=str(tmp_path / "A"), retry_failed_images=False)
    assert hit_diff(host.snapshot_hits(), before) == {}  # not one request
    assert (meta["reused_count"], meta["failures_reused_count"], meta["encoded_count"],
            meta["failed_count"]) == (8, 2, 0, 2)
    for name in (IMG_ARRAY, IMG_ITEMS, IMG_FAILURES):  # the previous set's files, as they were
        assert (tmp_path / "inc" / name).read_bytes() == (tmp_path / "A" / name).read_bytes()


def test_revalidation_304_keeps_the_vector_and_200_encodes_the_new_image(host, image_encoder,
                                                                         tiny_model, tmp_path):
    names, ids = A_NAMES[:6], A_IDS[:6]
    items = host_items(tmp_path / "a.parquet", host, names, ids)
    run_images(items, tmp_path / "A", image_encoder, tiny_model)
    a_items = table(tmp_path / "A", IMG_ITEMS)
    assert all(a_items.column("etag").to_pylist()) and all(a_items.column("last_modified"))
    host.set_image("p2.jpg", jpeg(77))  # same URL, new picture: new ETag and Last-Modified
    before = host.snapshot_hits()
    meta = run_images(items, tmp_path / "inc", image_encoder, tiny_model,
                      previous_uri=str(tmp_path / "A"), image_revalidate=True)
    assert hit_diff(host.snapshot_hits(), before) == {f"/img/{n}": 1 for n in names}
    assert host.conditional == {f"/img/{n}": 1 for n in names}  # all with the validators
    assert host.not_modified == {f"/img/{n}": 1 for n in names if n != "p2.jpg"}
    assert (meta["revalidated_count"], meta["encoded_count"], meta["reused_count"]) == (5, 1, 0)

    vectors, previous = np.load(tmp_path / "inc" / IMG_ARRAY), np.load(tmp_path / "A" / IMG_ARRAY)
    for row in (0, 1, 3, 4, 5):
        assert vectors[row].tobytes() == previous[row].tobytes()
    expected = image_encoder.encode(image_encoder.decoder("fast")(jpeg(77))[None])  # default
    np.testing.assert_allclose(vectors[2], expected[0], atol=1e-6)
    assert float(vectors[2] @ previous[2]) < 0.9999
    etags = table(tmp_path / "inc", IMG_ITEMS).column("etag").to_pylist()
    assert etags[2] != a_items.column("etag")[2].as_py()  # the new validators are recorded

    full = run_images(items, tmp_path / "full", image_encoder, tiny_model)
    assert table(tmp_path / "inc", IMG_ITEMS).equals(table(tmp_path / "full", IMG_ITEMS))
    assert stable(meta) == {**stable(full), "image_revalidate": True}


def test_an_unasked_for_304_is_a_failure_not_a_reuse(host, image_encoder, tiny_model, tmp_path):
    """A host answering 304 to a plain GET (no validators sent) fails that item; it must not
    pass for 'not modified' (there is nothing to keep) nor break the step."""
    items = write_items(tmp_path / "a.parquet", {
        "asin": ["i0", "i1"], "title": ["t", "t"], "description": [["d"], ["d"]],
        "image_url": [host.url("img/p0.jpg"), host.url("status/304")]})
    meta = run_images(items, tmp_path / "A", image_encoder, tiny_model)
    assert (meta["count"], meta["failed_count"]) == (1, 1)
    failure = table(tmp_path / "A", IMG_FAILURES).to_pylist()[0]
    assert (failure["id"], failure["reason"], failure["http_status"]) == ("i1", "http_error", 304)


def test_another_image_checkpoint_fetches_everything_again(host, image_encoder, tiny_model,
                                                           tmp_path, caplog):
    import open_clip
    import torch

    items = host_items(tmp_path / "a.parquet", host, A_NAMES[:8], A_IDS[:8])
    run_images(items, tmp_path / "A", image_encoder, tiny_model)
    config, _, _ = tiny_model
    torch.manual_seed(1)
    torch.save(open_clip.create_model("tiny-vit-test").state_dict(), tmp_path / "other.pt")
    other = im.load_image_encoder(str(config), str(tmp_path / "other.pt"))
    before = host.snapshot_hits()
    with caplog.at_level(logging.WARNING, logger="item_embeddings.image.reuse"):
        meta = run_images(items, tmp_path / "inc", other, tiny_model,
                          image_pretrained=str(tmp_path / "other.pt"),
                          previous_uri=str(tmp_path / "A"))
    assert "made by another image encoder" in caplog.text
    assert hit_diff(host.snapshot_hits(), before) == {f"/img/{n}": 1 for n in A_NAMES[:8]}
    assert (meta["reused_count"], meta["encoded_count"]) == (0, 8)
    assert not np.allclose(np.load(tmp_path / "inc" / IMG_ARRAY),
                           np.load(tmp_path / "A" / IMG_ARRAY), atol=1e-3)


def test_another_image_decode_fetches_everything_again_and_says_why(host, image_encoder,
                                                                   tiny_model, tmp_path, caplog):
    items = host_items(tmp_path / "a.parquet", host, A_NAMES[:8], A_IDS[:8])
    assert run_images(items, tmp_path / "A", image_encoder, tiny_model,
                      image_decode="exact")["image_decode"] == "exact"
    before = host.snapshot_hits()
    with caplog.at_level(logging.WARNING, logger="item_embeddings.image.reuse"):
        meta = run_images(items, tmp_path / "fast", image_encoder, tiny_model,  # the default
                          previous_uri=str(tmp_path / "A"))
    assert ("decoded with image_decode=exact, this run uses image_decode=fast: every image is "
            "fetched and encoded again (set image_decode=exact to reuse them)") in caplog.text
    assert hit_diff(host.snapshot_hits(), before) == {f"/img/{n}": 1 for n in A_NAMES[:8]}
    assert (meta["reused_count"], meta["encoded_count"]) == (0, 8)
    # The same mode as the previous set reuses every vector, without a request.
    before = host.snapshot_hits()
    meta = run_images(items, tmp_path / "exact", image_encoder, tiny_model, image_decode="exact",
                      previous_uri=str(tmp_path / "A"))
    assert hit_diff(host.snapshot_hits(), before) == {}
    assert (meta["reused_count"], meta["encoded_count"]) == (8, 0)


# ----------------------------------------------------------------------------- a damaged set

def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01  # in the vectors / the footer: same size, other content
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _no_hashes(path: Path) -> None:
    meta = json.loads(path.read_text())
    del meta["files"]
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("group,name,damage,message", [
    ("text", TXT_ARRAY, _flip_byte,
     r"txt.npy: content does not match txt_meta.json \(same size, sha256 differs\)"),
    ("text", TXT_ITEMS, _truncate,
     r"txt_items.parquet: content does not match txt_meta.json \(size \d+, recorded"),
    ("text", TXT_META, Path.unlink, "lacks the text step's txt_meta.json: incomplete"),
    ("text", TXT_META, _no_hashes, "records no file hashes"),
    ("image", IMG_ARRAY, _flip_byte,
     r"img.npy: content does not match img_meta.json \(same size, sha256 differs\)"),
    ("image", IMG_META, Path.unlink, "lacks the image step's img_meta.json"),
    ("image", IMG_FAILURES, Path.unlink, "lacks the image step's img_failures.parquet"),
    ("image", IMG_ITEMS, _truncate,
     r"img_items.parquet: content does not match img_meta.json \(size \d+, recorded"),
])
def test_a_damaged_previous_set_is_an_error_and_nothing_is_written(
        sets, server, text_encoder, image_encoder, tiny_model, tmp_path, group, name, damage,
        message):
    previous = tmp_path / "previous"
    shutil.copytree(sets["A"], previous, ignore=shutil.ignore_patterns("img_shards"))
    damage(previous / name)
    params = image_params(tiny_model, previous_uri=str(previous), text_batch_size=16)
    before = server.snapshot_hits()
    with pytest.raises(PreviousSetError, match=message) as info:
        if group == "text":
            embed_items_text(str(sets["items_b"]), tmp_path / "out", params, encoder=text_encoder)
        else:
            im.embed_items_images(str(sets["items_b"]), tmp_path / "out", params,
                                  encoder=image_encoder, download_config=DOWNLOADS)
    assert str(previous) in str(info.value)
    assert not (tmp_path / "out").exists()  # not one file, not even the folder
    assert server.snapshot_hits() == before  # and not one request


def test_a_missing_previous_set_is_an_error(sets, text_encoder, tmp_path):
    params = PipelineParams(previous_uri=str(tmp_path / "nowhere"))
    with pytest.raises(PreviousSetError, match="previous output set not found: .*nowhere"):
        embed_items_text(str(sets["items_b"]), tmp_path / "out", params, encoder=text_encoder)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ rows moved, records rewritten

def _swap_text_rows(root: Path, pairs) -> None:
    """Swap rows of txt.npy and rewrite every recorded size and sha256 to match: the hashes
    alone then bless a set whose items carry each other's vectors."""
    vectors = np.load(root / TXT_ARRAY)
    for i, j in pairs:
        vectors[[i, j]] = vectors[[j, i]]
    np.save(root / TXT_ARRAY, vectors)
    reseal(root)


def test_two_swapped_text_rows_with_rewritten_records_are_refused_by_the_first_task(sets,
                                                                                     tmp_path):
    """The run's first task checks the groups against each other: the fused codes are the
    fusion model applied to the text and image rows (every row of a set this small: 48 <=
    SAMPLE_ROWS), so two swapped text rows cannot hide behind rewritten hashes."""
    from item_embeddings.incremental import verify_previous_set
    from item_embeddings.previous_checks import SAMPLE_ROWS

    previous = tmp_path / "previous"
    shutil.copytree(sets["A"], previous, ignore=shutil.ignore_patterns("img_shards"))
    assert verify_previous_set(str(previous)).root == str(previous)  # intact: accepted
    assert N <= SAMPLE_ROWS
    _swap_text_rows(previous, [(3, 30)])
    with pytest.raises(PreviousSetError, match=r"fused.npy does not match the fusion model "
                       r"applied to txt.npy and img.npy at 2 of 48 sampled rows \(e.g. rows "
                       r"\[3, 30\]"):
        verify_previous_set(str(previous))


def test_swapped_text_rows_are_encoded_again_and_the_log_says_why(sets, text_encoder, tmp_path,
                                                                   caplog):
    """A text step handed such a set (no first task: hashes only) encodes a seeded sample of
    the rows it would reuse again; they are not what the encoder makes of their texts, so it
    falls back to encoding every row, says so, and its vectors are the full run's."""
    previous = tmp_path / "previous"
    shutil.copytree(sets["A"], previous, ignore=shutil.ignore_patterns("img_shards"))
    _swap_text_rows(previous, [(i, N - 1 - i) for i in range(N // 2)])  # every row moved
    params = PipelineParams(previous_uri=str(previous), text_batch_size=16)
    with caplog.at_level(logging.WARNING, logger="item_embeddings.text.step"):
        meta = embed_items_text(str(sets["items_b"]), tmp_path / "out", params,
                                encoder=text_encoder)
    assert "not what this encoder makes of their texts" in caplog.text
    assert "every row is encoded again" in caplog.text
    assert meta["reused_count"] == 0 and meta["encoded_count"] == len(sets["b"]["asin"])
    np.testing.assert_allclose(np.load(tmp_path / "out" / TXT_ARRAY),
                               np.load(sets["full"] / TXT_ARRAY), atol=1e-5)


def test_a_worker_checks_a_bounded_sample_of_reused_rows_whatever_its_shards(sets, text_encoder,
                                                                             tmp_path):
    """The re-encoding check is about the set, not the shard: a worker running many shards
    encodes REUSE_CHECK_ROWS reused rows again in all, not that many per shard."""
    from item_embeddings.fanout import plan_shards, worker_shards
    from item_embeddings.text.step import REUSE_CHECK_ROWS
    from item_embeddings.worker import WorkerSetup

    encoded: list[int] = []
    real = text_encoder.encode

    def counting(texts, *args, **kwargs):
        encoded.append(len(texts))
        return real(texts, *args, **kwargs)

    params = PipelineParams(previous_uri=str(sets["A"]), text_batch_size=16, shards=8,
                            max_parallel_shards=1)
    (worker,) = plan_shards(str(sets["items_b"]), params).workers
    text_encoder.encode = counting
    try:
        with WorkerSetup() as setup:
            metas = [embed_items_text(str(sets["items_b"]), tmp_path / s.dirname, params,
                                      rows=s.rows, encoder=text_encoder, setup=setup)
                     for s in worker_shards(worker)]
    finally:
        text_encoder.encode = real
    assert len(metas) == 8 and sum(m["reused_count"] for m in metas) > 2 * REUSE_CHECK_ROWS
    assert sum(encoded) == sum(m["encoded_count"] for m in metas) + REUSE_CHECK_ROWS


def test_a_manifest_in_a_run_folder_never_overrides_the_meta_files(sets, text_encoder,
                                                                    tmp_path):
    """A manifest.json dropped into a run's folder that records a replaced txt.npy as it now
    is: the text step's meta still records the original, and the set is refused."""
    from item_embeddings.publish import build_manifest

    previous = tmp_path / "previous"
    shutil.copytree(sets["A"], previous, ignore=shutil.ignore_patterns("img_shards"))
    _flip_byte(previous / TXT_ARRAY)
    files = {f.name: f for f in previous.iterdir() if f.is_file()}
    (previous / MANIFEST).write_text(json.dumps(build_manifest(
        files, publish_uri=str(previous), run_id="forged")))
    with pytest.raises(PreviousSetError, match=r"txt.npy: content does not match "
                                               r"txt_meta.json"):
        embed_items_text(str(sets["items_b"]), tmp_path / "out",
                         PipelineParams(previous_uri=str(previous)), encoder=text_encoder)
    assert not (tmp_path / "out").exists()


def test_knn_scores_must_be_the_cosines_of_the_rows_they_link(tmp_path):
    """A set whose graph lists real rows with scores that are not their cosines (records
    rewritten) is refused before anything is reused."""
    from item_embeddings.incremental import verify_previous_set

    root = write_knn(make_output_set(tmp_path / "set"))
    for fusion_file in [*root.glob("fused*"), *root.glob("fusion*")]:
        fusion_file.unlink()  # the helper's fusion weights are not a model: text, image, kNN
    assert verify_previous_set(str(root)).root == str(root)
    scores = np.load(root / KNN_TEXT_SCORES)
    scores[5] = scores[5][::-1].copy()  # still real numbers in [-1, 1], no longer the cosines
    np.save(root / KNN_TEXT_SCORES, scores)
    reseal(root)
    with pytest.raises(PreviousSetError, match=r"knn_text.npy does not match txt.npy .*row 5 "
                                               r"lists row \d+ with score"):
        verify_previous_set(str(root))


def test_a_verified_set_survives_kfp_numbers(tmp_path, sets):
    """What the first task verified travels as a task output, where KFP turns numbers into
    floats: a file's version (an mtime in nanoseconds, a generation) must come back exact, or
    every worker would take the set for changed."""
    from item_embeddings.incremental import VerifiedSet, open_previous, verify_previous_set

    verified = verify_previous_set(str(sets["A"]))
    floated = json.loads(json.dumps(verified.as_dict()),
                         parse_int=float)  # what a loop item gives back
    back = VerifiedSet.from_dict(floated)
    assert back == verified
    with open_previous(str(sets["A"]), "text", verified=back) as previous:
        assert previous.shape(TXT_ARRAY)[0] == N


# ----------------------------------------------------------------------------- published on gs://

def test_previous_set_published_on_gcs(sets, server, gcs, text_encoder, image_encoder,
                                       tiny_model, tmp_path):
    """The nightly layout: set A published to a gs:// prefix, the next run reads it from there;
    the outputs are those of the run that read A from its local folder, byte for byte."""
    bucket = f"incr-{uuid.uuid4().hex[:8]}"
    gcs.create_bucket(bucket)
    prefix = f"gs://{bucket}/embeddings"
    published = publish_outputs([sets["A"]], prefix, run_id="A")
    before = server.snapshot_hits()
    run_all(sets["items_b"], tmp_path / "out", text_encoder, image_encoder, tiny_model,
            previous=prefix)
    assert hit_diff(server.snapshot_hits(), before) == sets["inc_hits"]
    for name in (TXT_ARRAY, TXT_ITEMS, IMG_ARRAY, IMG_ITEMS, IMG_FAILURES, FUSED_ARRAY,
                 FUSED_ITEMS, FUSION_WEIGHTS):
        assert (tmp_path / "out" / name).read_bytes() == (sets["inc"] / name).read_bytes(), name
    assert read_meta(tmp_path / "out", TXT_META)["previous_uri"] == prefix

    # A published file replaced underneath the manifest: refused, nothing written.
    blob = gcs.bucket(bucket).blob(f"embeddings/{published['set']}{TXT_ARRAY}")
    data = bytearray(blob.download_as_bytes())
    data[-1] ^= 0x01
    blob.upload_from_string(bytes(data))
    with pytest.raises(PreviousSetError, match="txt.npy: content does not match manifest.json"):
        embed_items_text(str(sets["items_b"]), tmp_path / "again",
                         PipelineParams(previous_uri=prefix), encoder=text_encoder)
    assert not (tmp_path / "again").exists()


def test_a_run_reads_the_set_its_first_task_pinned(sets, tmp_path):
    """previous_uri = a publish prefix: the first task (Fingerprint inputs) resolves the
    pointer once and names that set in its fingerprint; a text worker that starts after another
    run published a newer set still reads the pinned one (its reuse is set A's, not the newer
    set's), so every step of a run reads one consistent set."""
    from kfp import dsl

    from item_embeddings.components.embed_text import embed_text
    from item_embeddings.components.fingerprint_inputs import fingerprint_inputs
    from item_embeddings.incremental import pinned_previous

    prefix = tmp_path / "published"
    a = publish_outputs([sets["A"]], str(prefix), run_id="A")
    items = dsl.Dataset(name="items", uri=str(sets["items_b"]))
    plan = fingerprint_inputs(items=items, previous_uri=str(prefix))
    fingerprint = plan.fingerprint
    assert pinned_previous(fingerprint) == str(prefix / a["set"]).rstrip("/")
    # what it verified travels with every worker: the set it pinned, each file's version
    (worker,) = plan.workers
    assert worker["inputs_fingerprint"] == fingerprint
    assert worker["previous"] == plan.previous_set
    assert plan.previous_set["root"] == pinned_previous(fingerprint)
    assert TXT_ARRAY in plan.previous_set["files"]
    publish_outputs([sets["inc"]], str(prefix), run_id="inc")  # another run, meanwhile
    assert fingerprint_inputs(items=items, previous_uri=str(prefix)).fingerprint != fingerprint
    task = tmp_path / "root" / "item-embeddings-pin" / "embed-text"
    shards = dsl.Dataset(name="text_shards", uri=str(task / "text_shards"), metadata={})
    embed_text(items=items, text_shards=shards, previous_uri=str(prefix), text_backend="torch",
               worker=worker, text_batch_size=16, tracking_backend="none")
    meta = read_meta(task / "text_shards" / "shard-00000", TXT_META)
    assert meta["previous_uri"] == pinned_previous(fingerprint)
    inc = read_meta(sets["inc"], TXT_META)  # what reading set A gives (the newer set: all)
    assert (meta["reused_count"], meta["encoded_count"]) == (inc["reused_count"],
                                                            inc["encoded_count"])
    assert meta["encoded_count"] > 0



def _read_log(monkeypatch) -> list[tuple[tuple[int, int] | None, str]]:
    """(rows of the shard being embedded, what was read) for every read an image worker makes
    of the items' row ranges and of the previous set (opened, its arrays and tables)."""
    from item_embeddings import image as image_pkg
    from item_embeddings import worker
    from item_embeddings.image import selection
    from item_embeddings.incremental import PreviousGroup

    reads: list[tuple[tuple[int, int] | None, str]] = []
    shard: list[tuple[int, int] | None] = [None]

    def logged(what, real):
        def call(*args, **kwargs):
            reads.append((shard[0], what))
            return real(*args, **kwargs)
        return call

    real_embed = image_pkg.embed_items_images

    def embed(*args, **kwargs):
        shard[0] = kwargs["rows"]
        return real_embed(*args, **kwargs)

    monkeypatch.setattr(image_pkg, "embed_items_images", embed)
    monkeypatch.setattr(selection, "iter_batches", logged("item rows", selection.iter_batches))
    monkeypatch.setattr(worker, "open_previous", logged("previous opened", worker.open_previous))
    for method in ("rows", "table", "shape"):
        monkeypatch.setattr(PreviousGroup, method,
                            logged(f"previous {method}", getattr(PreviousGroup, method)))
    return reads


def test_an_image_worker_reads_nothing_for_its_shards_without_images(sets, tiny_model, tmp_path,
                                                                     monkeypatch, caplog):
    """With the cap, every selected image sits in the first shard: the one image worker (the
    component, as the pipeline hands it the plan's loop item) reads the items' rows and the
    previous set for that shard only, logs each other shard as having nothing to select, and
    writes the files and counts that reading those shards gives, merged alike."""
    from kfp import dsl

    from item_embeddings.components.embed_images import embed_images
    from item_embeddings.fanout import ShardPlan, merge_image_shards, plan_shards, worker_shards

    config, checkpoint, _ = tiny_model
    items = str(sets["items_b"])
    params = image_params(tiny_model, previous_uri=str(sets["A"]), max_items=4, shards=6,
                          max_parallel_shards=3, download_retries=0, download_timeout_s=5.0,
                          allow_private_hosts=True)
    plan = plan_shards(items, params)
    (worker,) = plan.image_workers  # one T4 for the four images
    shards = list(worker_shards(worker))
    assert [s.image_rows for s in shards] == [4, 0, 0, 0, 0, 0]
    assert [s.url_rows for s in shards][1:] == [sum(u is not None for u in sets["b"]["image_url"]
                                                    [s.start:s.stop]) for s in shards[1:]]

    def run_worker(loop_item, name):
        out = tmp_path / name / "ds"
        embed_images(items=dsl.Dataset(name="items", uri=items),
                     image_shards=dsl.Dataset(name="image_shards", uri=str(out)),
                     worker=loop_item, image_model=str(config),
                     image_pretrained=str(checkpoint), image_batch_size=params.image_batch_size,
                     shard_size=params.shard_size, max_items=params.max_items,
                     previous_uri=params.previous_uri, download_retries=0,
                     download_timeout_s=5.0, allow_private_hosts=True, tracking_backend="none")
        return out

    reads = _read_log(monkeypatch)
    with caplog.at_level(logging.INFO, logger="item_embeddings.image.step"):
        out = run_worker(worker, "worker")
    first = shards[0].rows
    assert {what for _, what in reads} >= {"item rows", "previous opened", "previous rows"}
    assert {rows for rows, _ in reads} == {first}  # nothing read for shards 1 to 5
    for s in shards[1:]:
        assert (f"rows [{s.start}, {s.stop}): no image to select ({s.stop - s.start - s.url_rows} "
                f"rows without a URL, {s.url_rows} URL rows beyond the max_items cap): empty "
                "outputs written, nothing read") in caplog.text
    # a worker given only shards without images (a catalogue without any) reads none of their
    # rows and opens nothing of the previous set; it validates the table once, as every worker
    reads.clear()
    alone = run_worker({"worker": 0, "shards": [s.as_dict() for s in shards[1:3]]}, "alone")
    assert reads == [] and len(list(alone.glob("shard-*"))) == 2

    reference = tmp_path / "reference"  # each shard read and selected, as before the plan counted
    for s in shards:
        im.embed_items_images(items, reference / s.dirname, params, rows=s.rows,
                              quota=s.image_quota)
    for s in shards:
        made, ref = out / s.dirname, reference / s.dirname
        assert stable(read_meta(made, IMG_META)) == stable(read_meta(ref, IMG_META)), s
        for name in (IMG_ITEMS, IMG_FAILURES):
            assert table(made, name).equals(table(ref, name), check_metadata=True), (s, name)
        if s.image_rows == 0:
            assert (made / IMG_ARRAY).read_bytes() == (ref / IMG_ARRAY).read_bytes()
            assert read_meta(made, IMG_META)["checkpoint_location"] is None  # nothing kept
        np.testing.assert_allclose(np.load(made / IMG_ARRAY), np.load(ref / IMG_ARRAY),
                                   atol=1e-6)
    merged = [merge_image_shards([d], ShardPlan.from_workers([worker]), tmp_path / f"m-{d.name}",
                                 params) for d in (out, reference)]
    assert ({k: v for k, v in stable(merged[0]).items() if k != "shard_wall_time_max_sec"}
            == {k: v for k, v in stable(merged[1]).items() if k != "shard_wall_time_max_sec"})
    assert merged[0]["capped_count"] == sum(s.url_rows for s in shards) - 4
    assert merged[0]["count"] + merged[0]["failed_count"] == 4


# ----------------------------------------------------------------------------- fusion apply

def test_fusion_apply_keeps_unchanged_codes_and_the_weights(sets):
    a, inc = sets["A"], sets["inc"]
    assert (inc / FUSION_WEIGHTS).read_bytes() == (a / FUSION_WEIGHTS).read_bytes()
    a_ids = table(a, FUSED_ITEMS).column("id").to_pylist()
    a_fused = dict(zip(a_ids, np.load(a / FUSED_ARRAY)))
    fused, items = np.load(inc / FUSED_ARRAY), table(inc, FUSED_ITEMS)
    ids = items.column("id").to_pylist()
    assert ids == table(inc, TXT_ITEMS).column("id").to_pylist()

    changed = ({f"B{i:07d}" for i in TITLE_CHANGED + URL_CHANGED + URL_REMOVED}
               | {item_id for item_id, _, _ in ADDED})
    unchanged = [i for i, item_id in enumerate(ids) if item_id not in changed]
    for i in unchanged:  # byte for byte the codes of set A
        assert fused[i].tobytes() == a_fused[ids[i]].tobytes()

    # The others: what set A's model gives for their (new) vectors.
    todo = np.array([i for i, item_id in enumerate(ids) if item_id in changed])
    text = np.load(inc / TXT_ARRAY)[todo]
    image_rows = dict(zip(table(inc, IMG_ITEMS).column("id").to_pylist(),
                          table(inc, IMG_ITEMS).column("row").to_pylist()))
    img = np.load(inc / IMG_ARRAY)
    has = np.array([ids[i] in image_rows for i in todo])
    image = np.stack([img[image_rows[ids[i]]] if ids[i] in image_rows
                      else np.zeros(img.shape[1], np.float32) for i in todo])
    expected = load_fusion_model(a / FUSION_WEIGHTS).fuse(text, image, has)
    np.testing.assert_allclose(fused[todo], expected, atol=1e-6)
    assert has.sum() == 6  # rows 4 and 31 (new titles), 7 and 25 (new URLs), N1 and N3 (added)

    meta = read_meta(inc, FUSION_CONFIG)
    assert (meta["reused_count"], meta["computed_count"]) == (len(unchanged), len(changed))
    assert meta["fusion_mode"] == "apply" and meta["applied_from"] == str(a)
    assert meta["weights_sha256"] == read_meta(a, FUSION_CONFIG)["weights_sha256"]


def test_experiment_runs_carry_the_counts(sets):
    runs = sets["root"] / "runs" / "exp"
    text = json.loads((runs / "embed-text-inc.json").read_text())
    image = json.loads((runs / "embed-image-inc.json").read_text())
    fusion = json.loads((runs / "fuse-modal-inc.json").read_text())
    for record, meta_dir, meta_name, keys in [
            (text, sets["inc"], TXT_META, ("reused_count", "encoded_count")),
            (image, sets["inc"], IMG_META, ("reused_count", "encoded_count",
                                            "revalidated_count", "failures_reused_count")),
            (fusion, sets["inc"], FUSION_CONFIG, ("reused_count",))]:
        meta = read_meta(meta_dir, meta_name)
        assert record["status"] == "COMPLETE"
        assert record["params"]["previous_uri"] == str(sets["A"])
        assert {k: record["metrics"][k] for k in keys} == {k: float(meta[k]) for k in keys}
    assert text["metrics"]["encoded_count"] == 6.0


@pytest.fixture(scope="module")
def other_image_dirs(sets, tmp_path_factory, tiny_model):
    """Catalogue B's image outputs from another checkpoint of the same model (same dims) and
    from a model with 16-d vectors."""
    import open_clip
    import torch

    root = tmp_path_factory.mktemp("other-encoders")
    config, _, _ = tiny_model
    torch.manual_seed(2)
    torch.save(open_clip.create_model("tiny-vit-test").state_dict(), root / "other.pt")
    small = root / "tiny-vit-16.json"
    small.write_text(json.dumps({**TINY_CONFIG, "embed_dim": 16}))
    open_clip.add_model_config(str(small))
    torch.manual_seed(3)
    torch.save(open_clip.create_model("tiny-vit-16").state_dict(), root / "small.pt")
    dirs = {}
    for name, model, weights in [("checkpoint", config, root / "other.pt"),
                                 ("dims", small, root / "small.pt")]:
        encoder = im.load_image_encoder(str(model), str(weights))
        im.embed_items_images(str(sets["items_b"]), root / name,
                              PipelineParams(image_model=str(model), image_pretrained=str(weights)),
                              encoder=encoder, download_config=DOWNLOADS)
        dirs[name] = root / name
    return dirs


@pytest.mark.parametrize("case,message", [
    ("checkpoint", "trained on image vectors of another image encoder"),
    ("dims", "text/image vectors of 384/32 dimensions, these inputs have 384/16"),
])
def test_fusion_apply_refuses_vectors_of_other_encoders(sets, other_image_dirs, tmp_path, case,
                                                         message):
    params = PipelineParams(fusion_mode="apply", previous_uri=str(sets["A"]))
    with pytest.raises(FusionInputError, match=message):
        fuse_item_embeddings(sets["inc"], other_image_dirs[case], tmp_path / "out", params)
    assert list((tmp_path / "out").iterdir()) == []  # raised before anything was written
