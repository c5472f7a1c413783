"""The previous output set as a run with ``previous_uri`` meets it (incremental.py), on generated
sets (no model): the keys its rows carry, the refusals a user reads, the log lines, what the
first task hands the steps (the verified set, the inputs fingerprint that pins a published set)
and the rows a step reads. tests/test_incremental.py runs the steps themselves on it."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import make_output_set, write_knn
from item_embeddings.incremental import (
    KeyIndex,
    PreviousSetError,
    VerifiedSet,
    check_previous_set,
    content_keys,
    fingerprint,
    inputs_fingerprint,
    open_previous,
    pinned_previous,
    previous_fingerprint,
    verify_previous_set,
)
from item_embeddings.outputs import (
    FUSED_ARRAY,
    FUSED_ITEMS,
    FUSION_CONFIG,
    FUSION_EXCLUSIONS,
    FUSION_WEIGHTS,
    IMG_ARRAY,
    IMG_FAILURES,
    IMG_ITEMS,
    IMG_META,
    KNN_FUSED,
    KNN_FUSED_SCORES,
    KNN_ITEMS,
    KNN_META,
    KNN_TEXT,
    KNN_TEXT_SCORES,
    MANIFEST,
    TXT_ARRAY,
    TXT_ITEMS,
    TXT_META,
)
from item_embeddings.publish import publish_outputs

TEXT = [TXT_ARRAY, TXT_ITEMS, TXT_META]
IMAGE = [IMG_ARRAY, IMG_ITEMS, IMG_FAILURES, IMG_META]
GRAPHS = [KNN_TEXT, KNN_TEXT_SCORES, KNN_FUSED, KNN_FUSED_SCORES]


@pytest.fixture
def previous(tmp_path) -> Path:
    """A run's folder with text, image and kNN outputs (the fusion files left out: their
    generated weights are no fusion model)."""
    root = write_knn(make_output_set(tmp_path / "prev", with_report=False), k=3)
    for name in (FUSED_ARRAY, FUSED_ITEMS, FUSION_CONFIG, FUSION_EXCLUSIONS, FUSION_WEIGHTS):
        (root / name).unlink()
    return root


def _verified_names(verified: VerifiedSet) -> list[str]:
    return sorted(verified.files)


# ----------------------------------------------------------------------------- keys

def test_keys_are_the_first_128_bits_of_the_encoders_fingerprint_and_the_content():
    fp = fingerprint({"model": "m", "backend": "torch", "dim": 384})
    assert fp == fingerprint({"dim": 384, "backend": "torch", "model": "m"})  # key order
    assert fp == hashlib.sha256(b'{"backend": "torch", "dim": 384, "model": "m"}').hexdigest()
    assert fingerprint({"path": Path("/m")}) == fingerprint({"path": "/m"})
    keys = content_keys(fp, ["a red kettle", "ü"])
    assert keys.type == pa.string() and keys.to_pylist() == [
        hashlib.sha256(f"{fp}\x1f{c}".encode()).hexdigest()[:32] for c in ("a red kettle", "ü")]
    # the separator keeps (fingerprint, content) pairs apart
    assert content_keys("ab", ["c"]) != content_keys("a", ["bc"])
    assert content_keys(fp, []).type == pa.string()  # the key column of an empty shard


def test_key_index_finds_the_first_previous_row_of_each_key():
    index = KeyIndex(pa.chunked_array([["k0", "k1"], ["k1", "k3"]]))
    assert index.rows(pa.array(["k3", "k9", "k1", "k0"])).tolist() == [3, -1, 1, 0]
    assert index.rows(pa.array(["k3"])).dtype == np.int64
    assert KeyIndex(pa.array(["x"])).rows(pa.array(["x", "y"])).tolist() == [0, -1]


# ----------------------------------------------------------------------------- refusals

def test_a_folder_without_a_complete_set_is_refused_in_one_line(previous, tmp_path):
    check_previous_set("")  # a full run: nothing to check
    check_previous_set(str(previous))
    (previous / IMG_FAILURES).unlink()
    (previous / TXT_META).unlink()
    with pytest.raises(PreviousSetError) as exc:
        check_previous_set(str(previous))
    assert str(exc.value) == (f"previous output set {previous} lacks txt_meta.json, "
                              "img_failures.parquet: not a complete output set (previous_uri)")
    check_previous_set(str(previous), groups=())
    with pytest.raises(PreviousSetError, match=r"lacks txt_meta\.json: not a complete"):
        check_previous_set(str(previous), groups=("text",))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PreviousSetError) as exc:
        check_previous_set(str(empty), groups=())
    assert str(exc.value) == (f"previous output set {empty} is empty or not found "
                              "(previous_uri must be an earlier run's output folder or publish "
                              "prefix)")
    # the first task's fingerprint refuses it the same way (before any step reads it)
    for uri in (empty, previous):
        with pytest.raises(PreviousSetError, match=r"is empty or not found|lacks txt_meta\.json"):
            inputs_fingerprint("items", str(uri))


def test_a_file_or_a_missing_folder_is_refused_by_every_entry(tmp_path):
    file = tmp_path / "set.parquet"
    file.write_text("x")
    for call in (check_previous_set, verify_previous_set, previous_fingerprint,
                 lambda uri: inputs_fingerprint("items", uri)):
        with pytest.raises(PreviousSetError) as exc:
            call(str(file))
        assert str(exc.value) == (f"previous output set {file} is a file (previous_uri must be "
                                  "an earlier run's output folder or publish prefix; empty = "
                                  "full run)")
        with pytest.raises(PreviousSetError) as exc:
            call(str(tmp_path / "nowhere"))
        assert str(exc.value) == (f"previous output set not found: {tmp_path / 'nowhere'} "
                                  "(previous_uri must be an earlier run's output folder or "
                                  "publish prefix; empty = full run)")


def test_a_publish_prefix_names_its_set_in_the_refusals(previous, tmp_path):
    prefix = tmp_path / "pub"
    manifest = publish_outputs([previous], str(prefix), run_id="r1")
    root = str(Path(prefix, manifest["set"]))
    (Path(root) / IMG_META).unlink()
    with pytest.raises(PreviousSetError) as exc:
        check_previous_set(str(prefix))
    assert str(exc.value) == (f"previous output set {prefix} (the set {root} its pointer "
                              "names) lacks img_meta.json: not a complete output set "
                              "(previous_uri)")
    with pytest.raises(PreviousSetError) as exc:
        with open_previous(str(prefix), "image"):
            pass
    assert str(exc.value) == (f"previous output set {prefix} (set {root}) lacks the image "
                              "step's img_meta.json: incomplete (a killed run?); nothing is "
                              "reused")
    (prefix / MANIFEST).write_text(json.dumps({"set": "../elsewhere", "files": {}}))
    with pytest.raises(PreviousSetError) as exc:
        check_previous_set(str(prefix))
    assert str(exc.value).startswith(f"previous_uri: {prefix}/manifest.json: 'set' "
                                     "'../elsewhere' is not a folder under sets/")


def test_damaged_records_are_refused_naming_each_problem(previous):
    meta = json.loads((previous / TXT_META).read_text())
    arr = np.load(previous / TXT_ARRAY)
    np.save(previous / TXT_ARRAY, arr[::-1])  # same size, other content
    (previous / IMG_ITEMS).write_bytes((previous / IMG_ITEMS).read_bytes() + b"\0")
    with pytest.raises(PreviousSetError) as exc:
        verify_previous_set(str(previous))
    img_size = json.loads((previous / IMG_META).read_text())["files"][IMG_ITEMS]["size"]
    assert str(exc.value) == (
        f"previous output set {previous}: txt.npy: content does not match txt_meta.json (same "
        f"size, sha256 differs): changed after it was written, or from another run; "
        f"img_items.parquet: content does not match img_meta.json (size {img_size + 1}, "
        f"recorded {img_size}): changed after it was written, or from another run; nothing is "
        f"reused")
    del meta["files"]
    (previous / TXT_META).write_text(json.dumps(meta))
    with pytest.raises(PreviousSetError) as exc:
        with open_previous(str(previous), "text"):
            pass
    assert str(exc.value) == (f"previous output set {previous}: its txt_meta.json records no "
                              "file hashes (made by an older version?): it cannot be verified; "
                              "run once without previous_uri")
    (previous / TXT_META).write_text("{")
    with pytest.raises(PreviousSetError) as exc:
        with open_previous(str(previous), "text"):
            pass
    assert str(exc.value).startswith(f"previous output set {previous}: txt_meta.json is not "
                                     "valid JSON: Expecting property name")
    (previous / TXT_META).write_text("[]")
    with pytest.raises(PreviousSetError, match="its txt_meta.json records no file hashes"):
        with open_previous(str(previous), "text"):
            pass


def test_a_meta_file_must_record_every_file_of_its_step(previous, tmp_path):
    meta = json.loads((previous / IMG_META).read_text())
    del meta["files"][IMG_FAILURES]
    (previous / IMG_META).write_text(json.dumps(meta))
    with pytest.raises(PreviousSetError) as exc:
        verify_previous_set(str(previous))
    assert str(exc.value) == (f"previous output set {previous}: img_meta.json records no size "
                              "and sha256 of img_failures.parquet: it cannot be verified; "
                              "nothing is reused")
    # published, the manifest records it: the meta file must all the same
    prefix = tmp_path / "pub"
    manifest = publish_outputs([previous], str(prefix), run_id="r1")
    with pytest.raises(PreviousSetError) as exc:
        with open_previous(str(prefix), "image"):
            pass
    assert str(exc.value) == (f"previous output set {prefix} (set "
                              f"{Path(prefix, manifest['set'])}): img_meta.json records no "
                              "size and sha256 of img_failures.parquet: it cannot be verified; "
                              "nothing is reused")


def test_a_manifest_must_agree_with_the_meta_files(previous, tmp_path):
    """A published set's manifest is checked too; it never stands in for a meta file."""
    prefix = tmp_path / "pub"
    manifest = publish_outputs([previous], str(prefix), run_id="r1")
    root = Path(prefix, manifest["set"])
    with open_previous(str(prefix), "text") as group:
        assert group.uri == str(root)
    records = json.loads((prefix / MANIFEST).read_text())
    records["files"][TXT_ITEMS]["sha256"] = "0" * 64
    (prefix / MANIFEST).write_text(json.dumps(records))
    with pytest.raises(PreviousSetError) as exc:
        with open_previous(str(prefix), "text"):
            pass
    assert str(exc.value) == (f"previous output set {prefix} (set {root}): txt_items.parquet: "
                              "content does not match manifest.json (same size, sha256 "
                              "differs): changed after it was written, or from another run; "
                              "nothing is reused")
    with open_previous(str(prefix), "image") as group:  # the manifest's other records hold
        assert group.meta["count"] == 21
    # a manifest that does not list a file leaves its record to the meta file
    del records["files"][IMG_FAILURES]
    (prefix / MANIFEST).write_text(json.dumps(records))
    with open_previous(str(prefix), "image") as group:
        assert group.meta["count"] == 21


def test_a_step_handed_the_verified_prefix_does_not_hash_it_again(previous, tmp_path, caplog):
    """However previous_uri is spelled (a trailing slash or not), the steps know the prefix the
    first task verified: nothing is resolved or hashed again."""
    prefix = tmp_path / "pubX"
    publish_outputs([previous], str(prefix), run_id="r1")
    verified = verify_previous_set(f"{prefix}/")
    caplog.set_level(logging.INFO, logger="item_embeddings.incremental")
    caplog.clear()  # publishing and verifying log; only what opening the set logs counts here
    for uri in (str(prefix), f"{prefix}/"):
        with open_previous(uri, "text", verified=verified) as group:
            assert group.verified is verified
    assert not caplog.records


# ----------------------------------------------------------------------------- what a step reads

def test_a_group_is_read_by_rows_and_columns(previous, caplog):
    with open_previous("", "text") as group:
        assert group is None
    caplog.set_level(logging.INFO, logger="item_embeddings.incremental")
    with open_previous(str(previous), "text") as group:
        assert group.meta == json.loads((previous / TXT_META).read_text())
        assert group.uri == str(previous) and group.path(TXT_ARRAY) == f"{previous}/{TXT_ARRAY}"
        arr = np.load(previous / TXT_ARRAY)
        np.testing.assert_array_equal(group.rows(TXT_ARRAY, np.array([5, 1])), arr[[5, 1]])
        assert group.shape(TXT_ARRAY) == (40, 384)
        assert group.table(TXT_ITEMS, ["id"]).equals(pq.read_table(previous / TXT_ITEMS))
        assert group.dir == previous
        np.testing.assert_array_equal(group.array(TXT_ARRAY), arr)
        made = []
        assert group.cached("k", lambda: made.append(1) or "v") == "v"
        assert group.cached("k", lambda: made.append(2) or "w") == "v" and made == [1]
    assert [r.getMessage() for r in caplog.records] == [
        f"previous outputs at {previous} verified (text: 3 files)"]


def test_a_group_the_set_lacks_is_none_when_optional(previous, caplog):
    """A set made before the kNN step kept its state: the kNN group is optional (and said so
    in the log), required it is an error."""
    caplog.set_level(logging.INFO, logger="item_embeddings.incremental")
    with open_previous(str(previous), "knn", optional=True) as group:
        assert group is None
    assert caplog.records[-1].getMessage() == (
        f"previous output set {previous} has no complete knn outputs (missing "
        "knn_items.parquet, knn_text_state.npz, knn_fused_state.npz)")
    with pytest.raises(PreviousSetError, match=f"previous output set {previous} lacks the knn "
                                               f"step's {KNN_ITEMS}, knn_text_state.npz, "
                                               "knn_fused_state.npz: incomplete"):
        with open_previous(str(previous), "knn"):
            pass
    with open_previous(str(previous), "image", optional=True) as group:
        assert group is not None and group.meta["count"] == 21


def test_the_first_task_verifies_the_set_once_for_every_step(previous, caplog):
    assert verify_previous_set("") is None
    previous = previous.rename(previous.with_name("setX"))  # (any folder name)
    caplog.set_level(logging.INFO, logger="item_embeddings.incremental")
    verified = verify_previous_set(str(previous))
    assert _verified_names(verified) == sorted(TEXT + IMAGE + GRAPHS + [KNN_META])
    assert verified.uri == str(previous) and verified.root == str(previous)
    entry = verified.files[TXT_ARRAY]
    assert entry["size"] == (previous / TXT_ARRAY).stat().st_size
    assert entry["sha256"] == hashlib.sha256((previous / TXT_ARRAY).read_bytes()).hexdigest()
    assert f"previous outputs at {previous} verified (text, image, knn: 12 files)" in [
        r.getMessage() for r in caplog.records]
    # through a task's output (KFP carries numbers as floats): versions as strings
    carried = json.loads(json.dumps(verified.as_dict()))
    assert carried["files"][TXT_ARRAY]["version"] == str(entry["version"])
    assert VerifiedSet.from_dict(carried) == verified
    for nothing in (None, {}, {"root": "", "uri": "x", "files": {}}):
        assert VerifiedSet.from_dict(nothing) is None
    assert verified.names(str(previous) + "/") and not verified.names(str(previous) + "x")
    # a step handed the verified set only checks its files are still those versions
    caplog.clear()
    with open_previous(str(previous), "text", verified=verified) as group:
        assert group.verified is verified
    assert not caplog.records  # nothing hashed again
    np.save(previous / TXT_ARRAY, np.load(previous / TXT_ARRAY))  # rewritten: a new version
    (previous / TXT_ITEMS).write_bytes((previous / TXT_ITEMS).read_bytes())
    with pytest.raises(PreviousSetError) as exc:
        with open_previous(str(previous), "text", verified=verified):
            pass
    assert str(exc.value) == (f"previous output set {previous}: txt.npy, txt_items.parquet "
                              "changed since this run verified it (the text step's files): "
                              "nothing is reused")
    # another location, or a group it did not verify: verified here
    with open_previous(str(previous), "image", verified=VerifiedSet(
            "elsewhere", "/elsewhere", verified.files)) as group:
        assert group.verified.root == str(previous)


def test_a_set_without_graphs_is_verified_for_what_it_holds(previous):
    (previous / KNN_TEXT).unlink()
    with pytest.raises(PreviousSetError) as exc:
        verify_previous_set(str(previous))
    assert str(exc.value) == (f"previous output set {previous} lacks the knn step's "
                              "knn_text.npy: incomplete (a killed run?); nothing is reused")
    for name in [*GRAPHS[1:], KNN_META]:
        (previous / name).unlink()
    assert _verified_names(verify_previous_set(str(previous))) == sorted(TEXT + IMAGE)
    for name in IMAGE:  # the text and image steps' files are required, whatever the metas say
        (previous / name).unlink()
    with pytest.raises(PreviousSetError, match="lacks img.npy, img_items.parquet, "
                                               "img_failures.parquet, img_meta.json: not a "
                                               "complete output set"):
        verify_previous_set(str(previous))


def test_graphs_that_do_not_match_their_vectors_are_refused(previous):
    scores = np.load(previous / KNN_TEXT_SCORES)
    scores[:, 0] -= 0.5
    np.save(previous / KNN_TEXT_SCORES, scores)
    meta = json.loads((previous / KNN_META).read_text())
    from item_embeddings.storage import file_record
    meta["files"][KNN_TEXT_SCORES] = file_record(previous / KNN_TEXT_SCORES)
    (previous / KNN_META).write_text(json.dumps(meta))
    with pytest.raises(PreviousSetError) as exc:
        verify_previous_set(str(previous))
    message = str(exc.value)
    assert message.startswith(f"previous output set {previous}: knn_text.npy does not match "
                              "txt.npy (40 of 120 sampled scores: row ")
    assert message.endswith("; rows were moved or files replaced after they were written "
                            "(with their records rewritten): nothing is reused")


# ----------------------------------------------------------------------------- fingerprints

def test_inputs_fingerprint_follows_the_records_and_pins_a_published_set(previous, tmp_path):
    plain = inputs_fingerprint("items-1", "")
    assert len(plain) == 64 and pinned_previous(plain) == ""
    assert plain != inputs_fingerprint("items-2", "")
    local = inputs_fingerprint("items-1", str(previous))
    assert len(local) == 64 and pinned_previous(local) == "" and local != plain
    assert local == inputs_fingerprint("items-1", str(previous))
    assert previous_fingerprint("") == ""
    before = previous_fingerprint(str(previous))
    assert len(before) == 64 and before == previous_fingerprint(str(previous))
    meta = json.loads((previous / KNN_META).read_text())
    meta["note"] = "x"  # any meta file's record changes it, kNN's too
    (previous / KNN_META).write_text(json.dumps(meta))
    assert previous_fingerprint(str(previous)) != before
    assert inputs_fingerprint("items-1", str(previous)) != local
    prefix = tmp_path / "pub"
    manifest = publish_outputs([previous], str(prefix), run_id="r1")
    pinned = inputs_fingerprint("items-1", str(prefix))
    assert pinned[64] == ":" and pinned_previous(pinned) == str(Path(prefix, manifest["set"]))
    assert pinned_previous(pinned[:64] + "x/y") == ""
    published = previous_fingerprint(str(prefix))
    # the same manifest written with its keys in another order: the same records
    pointer = json.loads((prefix / MANIFEST).read_text())
    (prefix / MANIFEST).write_text(json.dumps(dict(reversed(pointer.items()))))
    assert previous_fingerprint(str(prefix)) == published
    # the manifest counts: the same meta files under another manifest differ
    pointer = json.loads((prefix / MANIFEST).read_text())
    pointer["published_at"] = "2000-01-01T00:00:00+00:00"
    (prefix / MANIFEST).write_text(json.dumps(pointer))
    assert previous_fingerprint(str(prefix)) != published


def test_a_set_on_cloud_storage_is_read_from_the_verified_versions(previous, gcs):
    bucket = gcs.create_bucket(f"previous-{uuid.uuid4().hex[:8]}")
    prefix = f"gs://{bucket.name}/embeddings"
    manifest = publish_outputs([previous], prefix, run_id="r1")
    root = f"{prefix}/{manifest['set'].rstrip('/')}"
    with pytest.raises(PreviousSetError) as exc:
        check_previous_set(f"{root}/{TXT_ARRAY}")
    assert str(exc.value) == (f"previous output set {root}/{TXT_ARRAY} is an object, a file "
                              "(previous_uri must be an earlier run's output folder or publish "
                              "prefix)")
    with pytest.raises(PreviousSetError, match="is an object, a file"):
        check_previous_set(f"{root}/{TXT_ARRAY}/")  # a trailing slash does not hide it
    bucket.blob("X").upload_from_string(b"x")  # (any object name)
    with pytest.raises(PreviousSetError, match="is an object, a file"):
        check_previous_set(f"gs://{bucket.name}/X")
    check_previous_set(prefix + "/")
    verified = verify_previous_set(prefix)
    assert verified.root == root and verified.names(prefix + "/")
    with open_previous(prefix, "image", verified=verified) as group:
        local = group.dir
        assert local.is_dir() and group.dir == local  # copied once
        assert sorted(p.name for p in local.iterdir()) == sorted(IMAGE)
        for name in IMAGE:
            assert (local / name).read_bytes() == (previous / name).read_bytes()
        np.testing.assert_array_equal(group.array(IMG_ARRAY), np.load(previous / IMG_ARRAY))
        # rows and columns read by ranges of the verified generation
        np.testing.assert_array_equal(group.rows(IMG_ARRAY, np.array([3, 0])),
                                      np.load(previous / IMG_ARRAY)[[3, 0]])
        assert group.shape(IMG_ARRAY) == (21, 512)
        assert group.table(IMG_ITEMS, ["url"]).equals(
            pq.read_table(previous / IMG_ITEMS, columns=["url"]))
    assert not local.exists()  # the copy goes with the group
    with pytest.raises(PreviousSetError) as exc:
        check_previous_set(f"gs://{bucket.name}/nothing")
    assert str(exc.value) == (f"previous output set gs://{bucket.name}/nothing is empty or not "
                              "found (previous_uri must be an earlier run's output folder or "
                              "publish prefix)")
