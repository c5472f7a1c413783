import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import catalogue, write_items
from item_embeddings.items import (
    ItemColumns,
    ItemsError,
    clean_text,
    item_text,
    iter_batches,
    validate_items,
)

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
    with pytest.raises(ItemsError,
                       match=r"1 duplicated id\(s\), e.g. \['B0000001'\] at rows \[1, 5\]"):
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


# ----------------------------------------------------------------------------- folders: every file

def _folder(tmp_path, *parts: dict, schemas=None) -> str:
    """A folder of parquet files, one per part, in path order."""
    for i, part in enumerate(parts):
        schema = schemas[i] if schemas else None
        write_items(tmp_path / "items" / f"part-{i}.parquet", part, schema=schema)
    return str(tmp_path / "items")


def _split(cat: dict, at: int) -> tuple[dict, dict]:
    return {k: v[:at] for k, v in cat.items()}, {k: v[at:] for k, v in cat.items()}


def test_folder_with_string_and_integer_ids_names_file_and_column(tmp_path):
    first, second = _split(catalogue(6), 3)
    second["asin"] = [4, 5, 6]
    uri = _folder(tmp_path, first, second)
    with pytest.raises(ItemsError, match=r"column 'asin' is int64 in file part-1.parquet but "
                                         r"string in file part-0.parquet"):
        validate_items(uri, COLS)


def test_folder_with_a_file_missing_a_needed_column(tmp_path):
    first, second = _split(catalogue(6), 3)
    del second["image_url"]
    uri = _folder(tmp_path, first, second)
    with pytest.raises(ItemsError, match=r"file part-1.parquet has no column 'image_url'"):
        validate_items(uri, COLS, need_image_url=True)
    assert validate_items(uri, COLS).num_rows == 6  # the text step does not need it


def test_folder_with_list_and_string_descriptions(tmp_path):
    first, second = _split(catalogue(6), 3)
    second["description"] = ["plain text", None, "more"]
    uri = _folder(tmp_path, first, second)
    with pytest.raises(ItemsError, match=r"column 'description' is string in file part-1.parquet "
                                         r"but list<element: string> in file part-0.parquet"):
        validate_items(uri, COLS)
    assert validate_items(uri, COLS, need_text=False).num_rows == 6  # not needed: not checked


def test_folder_types_that_read_unchanged_are_accepted(tmp_path):
    """string vs large_string and an all-null column read unchanged with the first file's types;
    an all-null first file does not (its type is null), and is refused."""
    cat = catalogue(9)
    parts = [{k: v[lo:lo + 3] for k, v in cat.items()} for lo in (0, 3, 6)]
    parts[2]["title"] = [None, None, None]  # written with type null
    large = pa.schema([("asin", pa.large_string()), ("title", pa.large_string()),
                       ("description", pa.large_list(pa.large_string())),
                       ("image_url", pa.large_string())])
    uri = _folder(tmp_path, *parts, schemas=[None, large, None])
    assert validate_items(uri, COLS, need_image_url=True).num_rows == 9
    titles = [t for b in iter_batches(uri, ["title"]) for t in b.column(0).to_pylist()]
    assert titles == cat["title"][:6] + [None] * 3

    null_first = _folder(tmp_path / "b", parts[2], parts[0])
    with pytest.raises(ItemsError, match=r"column 'title' is string in file part-1.parquet but "
                                         r"null in file part-0.parquet"):
        validate_items(null_first, COLS)


def test_folder_with_a_corrupt_later_file_names_it(tmp_path):
    uri = _folder(tmp_path, catalogue(4))
    (tmp_path / "items" / "part-1.parquet").write_bytes(b"not parquet")
    with pytest.raises(ItemsError, match=r"cannot read items table .*part-1.parquet"):
        validate_items(uri, COLS)


def test_one_row_is_refused_up_front(tmp_path):
    path = write_items(tmp_path / "i.parquet", catalogue(1))
    with pytest.raises(ItemsError, match=r"has 1 row; at least 2 are needed \(the fusion step"):
        validate_items(str(path), COLS, need_text=False)
    assert validate_items(str(write_items(tmp_path / "j.parquet", catalogue(2))),
                          COLS).num_rows == 2


def _with_invalid_utf8(values: list, row: int, nested: bool = False) -> pa.Array:
    """``values`` as strings, with bytes that are not UTF-8 at ``row`` (written unchecked)."""
    raw = [None if v is None else [s.encode() for s in v] if nested else v.encode()
           for v in values]
    bad = b"caf\xe9 \xff"
    raw[row] = [b"fine", bad] if nested else bad
    if nested:
        return pa.array(raw, pa.list_(pa.binary())).view(pa.list_(pa.string()))
    return pa.array(raw, pa.binary()).view(pa.string())


@pytest.mark.parametrize("column, nested", [("title", False), ("description", True),
                                            ("asin", False), ("image_url", False)])
def test_invalid_utf8_names_column_and_row(tmp_path, column, nested):
    cat = catalogue(8)
    cat["description"] = [d or [] for d in cat["description"]]
    cat["image_url"] = [u or "" for u in cat["image_url"]]
    first, second = _split(cat, 5)
    uri = _folder(tmp_path, first)
    pq.write_table(pa.table(second).set_column(
        list(cat).index(column), column, _with_invalid_utf8(second[column], 1, nested)),
        tmp_path / "items" / "part-1.parquet")
    with pytest.raises(ItemsError, match=rf"column '{column}' has invalid UTF-8 \(not text\) "
                                         r"at rows \[6\]"):
        validate_items(uri, COLS, need_image_url=True)
