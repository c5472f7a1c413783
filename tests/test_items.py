import pyarrow as pa
import pytest

from conftest import catalogue, write_items
from item_embeddings.items import (ItemColumns, ItemsError, clean_text, item_text, iter_batches,
                                   validate_items)

COLS = ItemColumns()


def test_text_joins_lists_and_strips_html():
    assert item_text("USB <b>cable</b>", ["<p>Fast &amp; safe</p>", "2 m"]) == \
        "USB cable Fast & safe 2 m"
    assert item_text(None, None) == ""
    assert item_text("  Title\n\twith   space ", "desc &lt;br&gt;line") == \
        "Title with space desc line"
    assert clean_text("caf&eacute;&nbsp;&#233;") == "café é"


def test_valid_catalogue_summary(items_path):
    summary = validate_items(str(items_path), COLS, need_image_url=True)
    assert summary.num_rows == 40


def test_folder_of_parquet_files_keeps_path_order(tmp_path):
    cat = catalogue(30)
    for part, (lo, hi) in enumerate([(0, 10), (10, 20), (20, 30)]):
        write_items(tmp_path / "items" / f"part-{part:03d}.parquet",
                    {k: v[lo:hi] for k, v in cat.items()})
    assert validate_items(str(tmp_path / "items"), COLS).num_rows == 30
    ids = [i for b in iter_batches(str(tmp_path / "items"), ["asin"], 7)
           for i in b.column(0).to_pylist()]
    assert ids == cat["asin"]


def test_missing_column_names_it(tmp_path):
    cat = catalogue(5)
    del cat["description"]
    path = write_items(tmp_path / "i.parquet", cat)
    with pytest.raises(ItemsError, match=r"no column\(s\) 'description'.*columns present: asin"):
        validate_items(str(path), COLS)


def test_image_step_needs_no_text_columns(tmp_path):
    cat = catalogue(5)
    del cat["title"], cat["description"]
    path = write_items(tmp_path / "i.parquet", cat)
    assert validate_items(str(path), COLS, need_text=False, need_image_url=True).num_rows == 5
    with pytest.raises(ItemsError, match="'title', 'description'"):
        validate_items(str(path), COLS)


def test_missing_image_column_only_when_needed(tmp_path):
    cat = catalogue(5)
    del cat["image_url"]
    path = write_items(tmp_path / "i.parquet", cat)
    validate_items(str(path), COLS)
    with pytest.raises(ItemsError, match="'image_url'"):
        validate_items(str(path), COLS, need_image_url=True)


def test_null_ids_name_rows(tmp_path):
    cat = catalogue(8)
    cat["asin"][2] = None
    cat["asin"][6] = None
    path = write_items(tmp_path / "i.parquet", cat)
    with pytest.raises(ItemsError, match=r"'asin' has 2 null id\(s\), at rows \[2, 6\]"):
        validate_items(str(path), COLS)


def test_duplicate_ids_name_values_and_rows(tmp_path):
    cat = catalogue(8)
    cat["asin"][5] = cat["asin"][1]
    path = write_items(tmp_path / "i.parquet", cat)
    with pytest.raises(ItemsError, match=r"1 duplicated id\(s\), e.g. \['B0000001'\] at rows \[1, 5\]"):
        validate_items(str(path), COLS)


def test_empty_table(tmp_path):
    cat = catalogue(3)
    schema = pa.table(cat).schema
    path = write_items(tmp_path / "i.parquet", {k: [] for k in cat}, schema=schema)
    with pytest.raises(ItemsError, match="is empty"):
        validate_items(str(path), COLS)


@pytest.mark.parametrize("column, values, expected", [
    ("title", [1, 2, 3], "'title' must be string"),
    ("description", [1.5, 2.5, 3.5], "'description' must be string or list of strings"),
    ("asin", [1.0, 2.0, 3.0], "'asin' must be string or integer"),
])
def test_wrong_type_names_column(tmp_path, column, values, expected):
    cat = catalogue(3)
    cat[column] = values
    path = write_items(tmp_path / "i.parquet", cat)
    with pytest.raises(ItemsError, match=expected):
        validate_items(str(path), COLS)


def test_missing_table_and_empty_uri(tmp_path):
    with pytest.raises(ItemsError, match="not found"):
        validate_items(str(tmp_path / "nope.parquet"), COLS)
    with pytest.raises(ItemsError, match="items_uri is empty"):
        validate_items("", COLS)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ItemsError, match="no .parquet files"):
        validate_items(str(tmp_path / "empty_dir"), COLS)


def test_corrupt_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ItemsError, match="cannot read items table"):
        validate_items(str(bad), COLS)


def test_gcs_folder_of_parquet_files(tmp_path, gcs):
    import uuid

    cat = catalogue(12)
    bucket = gcs.create_bucket(f"items-{uuid.uuid4().hex[:8]}")
    for part, (lo, hi) in enumerate([(0, 5), (5, 12)]):
        local = write_items(tmp_path / f"p{part}.parquet", {k: v[lo:hi] for k, v in cat.items()})
        bucket.blob(f"catalogue/part-{part}.parquet").upload_from_filename(str(local))
    uri = f"gs://{bucket.name}/catalogue"
    assert validate_items(uri, COLS).num_rows == 12
    ids = [i for b in iter_batches(uri, ["asin"], 4) for i in b.column(0).to_pylist()]
    assert ids == cat["asin"]
    with pytest.raises(ItemsError, match="not found"):
        validate_items(f"gs://{bucket.name}/nothing-here.parquet", COLS)
