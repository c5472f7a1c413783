"""Parts of a file without the rest (ranged.py): rows of an .npy array and columns of a parquet
file read from a gs:// object (the GCS emulator) by byte ranges, pinned to one generation."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from item_embeddings import ranged
from item_embeddings.outputs import TXT_ARRAY, TXT_ITEMS
from item_embeddings.ranged import file_version, npy_layout, npy_rows, parquet_table

ROWS, DIM = 20_000, 64  # 5 MB of float32: far more than the rows a shard asks for


@pytest.fixture
def stored(gcs, monkeypatch):
    """An array and a table uploaded to a fresh bucket; every byte range read is recorded."""
    bucket = gcs.create_bucket(f"ranged-{uuid.uuid4().hex[:8]}")
    array = np.random.default_rng(0).standard_normal((ROWS, DIM)).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, array)
    bucket.blob(f"set/{TXT_ARRAY}").upload_from_string(buf.getvalue())
    noise = np.random.default_rng(1).integers(0, 1 << 62, size=(ROWS, 8))
    table = pa.table({"key": [f"{i:032x}" for i in range(ROWS)],  # incompressible titles:
                      "title": ["".join(f"{v:x}" for v in row) for row in noise]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    bucket.blob(f"set/{TXT_ITEMS}").upload_from_string(buf.getvalue())
    reads: list[tuple[int, int]] = []
    real = ranged._PinnedObject.read_range

    def recorded(self, start, stop):
        reads.append((start, stop))
        return real(self, start, stop)

    monkeypatch.setattr(ranged._PinnedObject, "read_range", recorded)
    return f"gs://{bucket.name}/set", array, table, reads, bucket


def test_rows_of_a_gcs_array_are_read_by_ranges_not_whole(stored):
    root, array, _, reads, _ = stored
    uri = f"{root}/{TXT_ARRAY}"
    version = file_version(uri)
    assert version.size == array.nbytes + npy_layout(uri, version).offset
    wanted = np.array([17, 5, 19_990, 6, 5], dtype=np.int64)  # any order, repeats
    reads.clear()
    got = npy_rows(uri, wanted, version)
    np.testing.assert_array_equal(got, array[wanted])
    read_bytes = sum(stop - start for start, stop in reads)
    # the header, then two runs of rows (5..17 coalesced, 19,990 on its own): a few KB of 5 MB
    assert read_bytes < 64 * 1024 + 14 * DIM * 4 + DIM * 4
    assert read_bytes < version.size / 50


def test_a_column_of_a_gcs_parquet_file_is_read_without_the_others(stored):
    root, _, table, reads, _ = stored
    uri = f"{root}/{TXT_ITEMS}"
    version = file_version(uri)
    reads.clear()
    keys = parquet_table(uri, ["key"], version)
    assert keys.column_names == ["key"] and keys.column("key").equals(table.column("key"))
    # the key column's chunks and the footer, not the titles
    assert sum(stop - start for start, stop in reads) < version.size / 2


def test_a_file_replaced_after_the_first_task_verified_it_is_refused(stored, tmp_path):
    """Workers read the versions the run's first task verified: an object replaced since (a
    new generation) is refused when a worker opens the set, before a row is read."""
    from helpers import make_output_set
    from item_embeddings.incremental import PreviousSetError, open_previous, verify_previous_set
    from item_embeddings.publish import publish_outputs

    _, _, _, reads, _ = stored
    prefix = stored[0].rsplit("/", 1)[0] + "/published"
    root = make_output_set(tmp_path / "set")
    for fusion_file in [*root.glob("fused*"), *root.glob("fusion*")]:
        fusion_file.unlink()  # the helper's fusion weights are not a model: text and image
    published = publish_outputs([root], prefix, run_id="A")
    verified = verify_previous_set(prefix)
    with open_previous(prefix, "text", verified=verified) as previous:
        assert previous.shape(TXT_ARRAY)[0] == 40
    bucket = stored[4]
    blob = bucket.blob(f"published/{published['set']}{TXT_ARRAY}")
    blob.upload_from_string(blob.download_as_bytes())  # same bytes, a new generation
    reads.clear()
    with pytest.raises(PreviousSetError, match="txt.npy.* changed since this run verified it"):
        with open_previous(prefix, "text", verified=verified):
            pass
    assert reads == []


def test_local_rows_and_missing_files(tmp_path):
    array = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.save(tmp_path / TXT_ARRAY, array)
    version = file_version(str(tmp_path / TXT_ARRAY))
    np.testing.assert_array_equal(npy_rows(str(tmp_path / TXT_ARRAY), np.array([9, 0]),
                                           version), array[[9, 0]])
    assert file_version(str(tmp_path / "missing" / TXT_ARRAY)) is None
