"""Check a finished (local or published) output set: completeness, alignment, shapes, norms, hashes.

``item-embeddings verify DIR_OR_URI`` prints what the set holds and every violated invariant;
the exit status is non-zero when there is one. The files and the rules are described in
docs/outputs.md ("What `verify` guarantees" lists the damage it refuses); a ``gs://`` prefix is
downloaded to a temporary directory first (only the files of the manifest when there is one).

Alignment is proven, not assumed: every meta file lists the size and sha256 of each file its step
wrote (``step.StepRun.finish``), so a moved array row or id is a hash mismatch; the fusion meta
names the text and image runs it was made from; kNN scores must be the cosine of the rows they
link. Damaged files of any kind (wrong dtypes, truncated, not JSON) are reported, never raised.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from .items import id_problems
from .outputs import (FUSED_ARRAY, FUSED_ITEMS, FUSION_CONFIG, FUSION_EXCLUSIONS, GROUPS,
                      IMG_ARRAY, IMG_FAILURES, IMG_ITEMS, IMG_META, KNN_FUSED, KNN_FUSED_SCORES,
                      KNN_META, KNN_TEXT, KNN_TEXT_SCORES, TXT_ARRAY, TXT_ITEMS, TXT_META)
from .published import MANIFEST, PublishedSetError, resolve
from .storage import gcs_client, is_gcs_uri, sha256_file, split_gcs_uri

NORM_TOLERANCE = 1e-3
SCORE_TOLERANCE = 1e-3  # a kNN score vs the cosine of its two rows, and the [-1, 1] bounds
_ORDER_SLACK = 1e-6     # float rounding allowed between neighbouring kNN scores
_CHUNK_ROWS = 65536     # rows per pass over a memory-mapped array (bounded memory on 500k x 512)
_GATHER_VALUES = 1 << 24  # neighbour vector values gathered at once by the kNN score check (64 MB)
_EXAMPLES = 5

_REQUIRED_EXTRA = {IMG_FAILURES}  # the fusion extras are required when its meta lists them
KNN_FILES = (KNN_TEXT, KNN_TEXT_SCORES, KNN_FUSED, KNN_FUSED_SCORES, KNN_META)
# group -> the files it must have, and its meta file
_GROUP_FILES = {**{group: [arr, ids, meta, *(e for e in extra if e in _REQUIRED_EXTRA)]
                   for group, (arr, ids, meta, extra) in GROUPS.items()}, "knn": list(KNN_FILES)}
_GROUP_META = {**{group: meta for group, (_, _, meta, _) in GROUPS.items()}, "knn": KNN_META}
# kNN space in knn_meta.json -> (neighbour indices, scores, the array whose rows they link)
KNN_SPACES = {"text": (KNN_TEXT, KNN_TEXT_SCORES, TXT_ARRAY),
              "fused": (KNN_FUSED, KNN_FUSED_SCORES, FUSED_ARRAY)}

# Column kinds of the parquet files: a test of the arrow type and how a message names it.
_KINDS: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
    "id": (lambda t: pa.types.is_integer(t) or pa.types.is_string(t)
           or pa.types.is_large_string(t), "string or integer ids"),
    "int": (pa.types.is_integer, "an integer type"),
    "str": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "a string type"),
    "bool": (pa.types.is_boolean, "bool"),
}


@dataclass
class Report:
    """What ``verify_outputs`` found: printable facts and violations."""

    source: str
    facts: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def fail(self, message: str) -> None:
        self.violations.append(message)

    def format(self) -> str:
        lines = [f"output set: {self.source}", *(f"  {f}" for f in self.facts)]
        if self.violations:
            lines.append(f"{len(self.violations)} violation(s):")
            lines += [f"  VIOLATION: {v}" for v in self.violations]
        else:
            lines.append("all checks passed")
        return "\n".join(lines)


def verify_outputs(dir_or_uri: str) -> Report:
    """Read the output set at a local directory or ``gs://`` prefix and check its invariants;
    a publish prefix is checked as readers see it: the set its pointer names."""
    report = Report(source=dir_or_uri)
    if not is_gcs_uri(dir_or_uri) and not Path(dir_or_uri).is_dir():
        report.fail(f"directory not found: {dir_or_uri}")
        return report
    try:
        found = resolve(dir_or_uri)
    except PublishedSetError as exc:
        report.fail(str(exc))
        return report
    if found.pointed:
        report.facts.append(f"publish prefix: its pointer names the set {found.root}")
    if is_gcs_uri(dir_or_uri):
        with tempfile.TemporaryDirectory(prefix="verify-") as tmp:
            if _download_set(found.root, Path(tmp), report):
                _SetCheck(Path(tmp), report).run()
            return report
    _SetCheck(Path(found.root), report).run()
    return report


def _download_set(uri: str, dest: Path, report: Report) -> bool:
    bucket_name, prefix = split_gcs_uri(uri)
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    bucket = gcs_client().bucket(bucket_name)
    manifest_blob = bucket.blob(prefix + MANIFEST)
    if manifest_blob.exists():
        manifest_blob.download_to_filename(str(dest / MANIFEST))
        names = list(json.loads((dest / MANIFEST).read_text()).get("files", {}))
    else:
        # No manifest: a plain copy of a run's outputs (or a publish in progress).
        names = [b.name[len(prefix):] for b in bucket.list_blobs(prefix=prefix, delimiter="/")]
    if not names:
        report.fail(f"nothing found under {uri}")
        return False
    for name in names:
        if not name or name != Path(name).name or name in (".", ".."):
            report.fail(f"{MANIFEST}: file name {name!r} is not a plain name in the set")
            continue
        blob = bucket.blob(prefix + name)
        if blob.exists():
            blob.download_to_filename(str(dest / name))
    return True


def _load_json(path: Path, report: Report) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        report.fail(f"{path.name}: unreadable JSON: {exc}")
        return None
    if not isinstance(data, dict):
        report.fail(f"{path.name}: expected a JSON object")
        return None
    return data


def _load_table(path: Path, columns: dict[str, str], report: Report) -> pa.Table | None:
    """The table with ``columns`` (name -> kind in ``_KINDS``), or None after a violation."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # any pyarrow error: the file is unusable
        report.fail(f"{path.name}: unreadable parquet: {exc}")
        return None
    absent = [c for c in columns if c not in table.column_names]
    if absent:
        report.fail(f"{path.name}: missing column(s) {absent} (has {table.column_names})")
        return None
    usable = True
    for column, kind in columns.items():
        accepts, expected = _KINDS[kind]
        dtype = table.schema.field(column).type
        if not accepts(dtype):
            report.fail(f"{path.name}: column {column!r} has type {dtype}, expected {expected}")
            usable = False
    return table if usable else None


def _load_array(path: Path, report: Report, dtype: type = np.float32) -> np.ndarray | None:
    """The 2-D array at ``path`` (memory-mapped), or None when it cannot be checked further.

    A wrong dtype of the right kind (float64 for float32) is a violation but still checked.
    """
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # truncated header, wrong format: say so instead of crashing
        report.fail(f"{path.name}: unreadable .npy: {exc}")
        return None
    report.facts.append(f"{path.name}: shape {list(arr.shape)}, dtype {arr.dtype}")
    if arr.ndim != 2:
        report.fail(f"{path.name}: expected a 2-D array, got shape {list(arr.shape)}")
        return None
    if arr.dtype != dtype:
        report.fail(f"{path.name}: expected {np.dtype(dtype)}, got {arr.dtype}")
        if arr.dtype.kind != np.dtype(dtype).kind:
            return None
    return arr


def _rows_text(rows: list[int]) -> str:
    return f"{len(rows)} row(s) (rows {rows[:_EXAMPLES]})"


def _check_values(name: str, arr: np.ndarray, report: Report) -> None:
    """No NaN/Inf and unit L2 norm on every row, in chunks (the array is memory-mapped)."""
    bad_finite, bad_norm = [], []
    for start in range(0, arr.shape[0], _CHUNK_ROWS):
        block = np.asarray(arr[start:start + _CHUNK_ROWS], dtype=np.float64)
        finite = np.isfinite(block).all(axis=1)
        bad_finite += (np.flatnonzero(~finite) + start).tolist()
        norms = np.linalg.norm(np.where(np.isfinite(block), block, 0.0), axis=1)
        bad_norm += (np.flatnonzero(finite & (np.abs(norms - 1.0) > NORM_TOLERANCE))
                     + start).tolist()
    if bad_finite:
        report.fail(f"{name}: {len(bad_finite)} row(s) with NaN/Inf (rows {bad_finite[:5]})")
    if bad_norm:
        report.fail(f"{name}: {len(bad_norm)} row(s) not unit-norm (tolerance {NORM_TOLERANCE}; "
                    f"rows {bad_norm[:5]})")


def _check_meta(meta_name: str, meta: dict, expected: dict[str, Any], report: Report) -> None:
    for key, value in expected.items():
        if key not in meta:
            report.fail(f"{meta_name}: field {key!r} missing")
        elif meta[key] != value:
            report.fail(f"{meta_name}: {key} = {meta[key]!r} but the data says {value!r}")


def _meta_fact(name: str, meta: dict) -> str:
    shown = {k: v for k, v in meta.items() if not isinstance(v, (dict, list))}
    return f"{name}: " + ", ".join(f"{k}={v}" for k, v in sorted(shown.items()))


class _SetCheck:
    """One pass over an output set in ``root``; every finding goes to ``report``."""

    def __init__(self, root: Path, report: Report):
        self.root = root
        self.report = report
        self.present = {p.name for p in root.iterdir() if p.is_file()}
        self._sha256: dict[str, str] = {}  # each file is hashed once (manifest and meta share)
        self.metas: dict[str, dict] = {}
        self.txt_ids: list | None = None
        self.id_type: pa.DataType | None = None
        self.arrays: dict[str, np.ndarray] = {}

    def fail(self, message: str) -> None:
        self.report.fail(message)

    def run(self) -> None:
        listed = self._check_manifest()
        if listed is not None:
            self.present &= listed  # like a reader: a published set is what its manifest lists
        if not any(n in self.present for n in GROUPS["text"][:3]):
            self.fail("no text outputs (txt.npy, txt_items.parquet, txt_meta.json): "
                      "not an item-embeddings output set")
            return
        complete = {group: self._group_complete(group, names)
                    for group, names in _GROUP_FILES.items()}
        for group, meta_name in _GROUP_META.items():
            if complete[group]:
                self._read_meta(meta_name, group)
        self._check_run_links()
        if complete["text"]:
            self._verify_text()
        img_ids = self._verify_image() if complete["image"] else None
        if complete["fusion"]:
            self._verify_fusion(img_ids)
        if complete["knn"]:
            self._verify_knn()

    # -- completeness and provenance

    def _group_complete(self, group: str, names: list[str]) -> bool:
        have = [n for n in names if n in self.present]
        if len(have) == len(names):
            return True
        if have:
            self.fail(f"{group} outputs incomplete: missing {sorted(set(names) - set(have))}")
        elif group == "knn":  # optional: a set need not carry kNN graphs
            self.report.facts.append("kNN graphs: none")
        else:
            # No pipeline mode skips a step: a group missing is a run that stopped early.
            self.fail(f"{group} outputs missing ({', '.join(names)}): a complete set holds the "
                      f"text, image and fusion outputs of one run")
        return False

    def _read_meta(self, meta_name: str, group: str) -> None:
        meta = _load_json(self.root / meta_name, self.report)
        if meta is None:
            return
        self.metas[meta_name] = meta
        self.report.facts.append(_meta_fact(meta_name, meta))
        if not isinstance(meta.get("run_id"), str) or not meta["run_id"]:
            self.fail(f"{meta_name}: no run_id: which run wrote these files is unknown")
        records = meta.get("files")
        if records is None:
            self.fail(f"{meta_name}: no 'files' record (size and sha256 of each file of the "
                      f"step): the alignment of its files cannot be proven")
            return
        if self._check_records(meta_name, records):
            data_files = [n for n in _GROUP_FILES[group] if n != meta_name]
            unrecorded = [n for n in data_files if n not in records]
            if unrecorded:
                self.fail(f"{meta_name}: 'files' records no hash of {unrecorded}")

    def _check_records(self, owner: str, records: Any) -> bool:
        """Check files against ``{name: {"size", "sha256"}}`` recorded in ``owner``."""
        if not isinstance(records, dict) or not all(isinstance(e, dict)
                                                    for e in records.values()):
            self.fail(f"{owner}: 'files' is not a mapping of file name to size and sha256")
            return False
        for name, entry in sorted(records.items()):
            if name not in self.present:
                self.fail(f"{owner} lists {name} but it is missing")
                continue
            size = (self.root / name).stat().st_size
            if size != entry.get("size"):
                differs = f"size {size}, recorded {entry.get('size')!r}"
            elif self._hash(name) != entry.get("sha256"):
                differs = "same size, sha256 differs"
            else:
                continue
            self.fail(f"{name}: content does not match {owner} ({differs}): changed after it "
                      f"was written, or from another run")
        return True

    def _hash(self, name: str) -> str:
        if name not in self._sha256:
            self._sha256[name] = sha256_file(self.root / name)
        return self._sha256[name]

    def _check_run_links(self) -> None:
        """The fusion step must have been made from the text and image outputs of this set."""
        fusion = self.metas.get(FUSION_CONFIG)
        if fusion is None:
            return
        for key, meta_name in (("text_run_id", TXT_META), ("image_run_id", IMG_META)):
            upstream = self.metas.get(meta_name)
            if upstream is not None and fusion.get(key) != upstream.get("run_id"):
                self.fail(f"{FUSION_CONFIG}: {key} = {fusion.get(key)!r} but {meta_name} has "
                          f"run_id {upstream.get('run_id')!r}: groups of different runs")

    def _check_manifest(self) -> set[str] | None:
        """Check sizes and hashes of the listed files; return their names (None: no manifest)."""
        if MANIFEST not in self.present:
            self.report.facts.append("manifest.json: none (not a published set)")
            return None
        manifest = _load_json(self.root / MANIFEST, self.report)
        if manifest is None:
            return None
        files = manifest.get("files", {})
        if not self._check_records(MANIFEST, files):
            return None
        self.report.facts.append(f"manifest.json: run_id={manifest.get('run_id', '')!r}, "
                                 f"published_at={manifest.get('published_at', '')}, "
                                 f"{len(files)} files")
        unlisted = sorted(self.present - set(files) - {MANIFEST})
        if unlisted:
            self.report.facts.append(f"files not in the manifest (ignored by readers): {unlisted}")
        return set(files)

    # -- the groups' contents

    def _table(self, name: str, columns: dict[str, str]) -> pa.Table | None:
        table = _load_table(self.root / name, columns, self.report)
        if table is None or "id" not in columns:
            return table
        if self.id_type is not None and table.schema.field("id").type != self.id_type:
            self.fail(f"{name}: ids are {table.schema.field('id').type} but {TXT_ITEMS} ids are "
                      f"{self.id_type}: they cannot join")
        for problem in id_problems(table.column("id")):
            self.fail(f"{name}: {problem}")
        return table

    def _array(self, name: str, dtype: type = np.float32) -> np.ndarray | None:
        arr = _load_array(self.root / name, self.report, dtype)
        if arr is not None:
            self.arrays[name] = arr
        return arr

    def _verify_text(self) -> None:
        arr = self._array(TXT_ARRAY)
        table = self._table(TXT_ITEMS, {"id": "id"})
        meta = self.metas.get(TXT_META)
        if arr is None or table is None:
            return
        self.id_type = table.schema.field("id").type
        self.txt_ids = table.column("id").to_pylist()
        self.report.facts.append(f"text items: {len(self.txt_ids):,d}")
        if table.num_rows != arr.shape[0]:
            self.fail(f"txt.npy has {arr.shape[0]} rows but txt_items.parquet has "
                      f"{table.num_rows} ids")
        if meta is not None:
            _check_meta(TXT_META, meta, {"count": arr.shape[0], "embed_dim": arr.shape[1]},
                        self.report)
        _check_values(TXT_ARRAY, arr, self.report)

    def _verify_image(self) -> set | None:
        arr = self._array(IMG_ARRAY)
        table = self._table(IMG_ITEMS, {"id": "id", "url": "str", "row": "int"})
        failures = self._table(IMG_FAILURES, {"id": "id", "url": "str", "reason": "str",
                                              "http_status": "int", "attempts": "int"})
        meta = self.metas.get(IMG_META)
        if arr is None or table is None:
            return None
        ids = table.column("id").to_pylist()
        self.report.facts.append(f"items with images: {len(ids):,d}")
        rows = table.column("row").to_pylist()
        bad_rows = [r for r in rows if r is None or not 0 <= r < arr.shape[0]]
        if bad_rows:
            self.fail(f"img_items.parquet: {len(bad_rows)} row index(es) outside img.npy "
                      f"[0, {arr.shape[0]}), e.g. {bad_rows[:3]}")
        shared = sorted(r for r, n in Counter(rows).items() if n > 1 and r is not None)
        if shared:
            self.fail(f"img_items.parquet: several ids point at the same img.npy row "
                      f"(rows {shared[:_EXAMPLES]})")
        if table.num_rows != arr.shape[0]:
            self.fail(f"img.npy has {arr.shape[0]} rows but img_items.parquet has "
                      f"{table.num_rows} ids")
        if self.txt_ids is not None:
            unknown = set(ids) - set(self.txt_ids)
            if unknown:
                self.fail(f"img_items.parquet: {len(unknown)} id(s) not in txt_items.parquet, "
                          f"e.g. {sorted(map(str, unknown))[:3]}")
        expected = {"count": arr.shape[0], "embed_dim": arr.shape[1]}
        if failures is not None:
            self._check_failures(ids, failures, meta, expected)
            expected["failed_count"] = failures.num_rows
        if meta is not None:
            _check_meta(IMG_META, meta, expected, self.report)
        _check_values(IMG_ARRAY, arr, self.report)
        return set(ids)

    def _check_failures(self, ids: list, failures: pa.Table, meta: dict | None,
                        expected: dict[str, Any]) -> None:
        failed_ids = failures.column("id").to_pylist()
        reasons = Counter(failures.column("reason").to_pylist())
        self.report.facts.append(
            f"failed downloads: {len(failed_ids):,d}"
            + (f" ({', '.join(f'{r}: {n}' for r, n in reasons.most_common())})"
               if reasons else ""))
        both = set(ids) & set(failed_ids)
        if both:
            self.fail(f"{len(both)} id(s) are both in img_items.parquet and "
                      f"img_failures.parquet, e.g. {sorted(map(str, both))[:3]}")
        if meta is not None and "failures_by_reason" in meta:
            expected["failures_by_reason"] = dict(sorted(reasons.items()))
        if meta is not None and "attempted_count" in meta:
            # Every attempted item ends either embedded or recorded as a failure.
            expected["attempted_count"] = len(ids) + len(failed_ids)

    def _verify_fusion(self, img_ids: set | None) -> None:
        arr = self._array(FUSED_ARRAY)
        table = self._table(FUSED_ITEMS, {"id": "id", "has_image": "bool"})
        meta = self.metas.get(FUSION_CONFIG)
        if arr is None or table is None:
            return
        ids = table.column("id").to_pylist()
        has_image = table.column("has_image").to_pylist()
        if table.column("has_image").null_count:
            self.fail(f"fused_items.parquet: {table.column('has_image').null_count} null "
                      f"has_image value(s)")
        if table.num_rows != arr.shape[0]:
            self.fail(f"fused.npy has {arr.shape[0]} rows but fused_items.parquet has "
                      f"{table.num_rows} ids")
        txt_ids = self.txt_ids
        if txt_ids is not None and ids != txt_ids:
            if set(ids) != set(txt_ids) or len(ids) != len(txt_ids):
                missing = len(set(txt_ids) - set(ids))
                self.fail(f"fused_items.parquet does not cover the text items: {missing} text "
                          f"id(s) missing, {len(set(ids) - set(txt_ids))} extra, "
                          f"{len(ids)} rows vs {len(txt_ids)}")
            else:
                first = next(i for i, (a, b) in enumerate(zip(ids, txt_ids)) if a != b)
                self.fail(f"fused_items.parquet ids are not in txt_items.parquet order "
                          f"(first difference at row {first})")
        excluded: set = set()
        if FUSION_EXCLUSIONS in self.present:
            table_ex = self._table(FUSION_EXCLUSIONS, {"id": "id", "reason": "str"})
            excluded = set(table_ex.column("id").to_pylist()) if table_ex is not None else set()
            self.report.facts.append(f"image vectors excluded from fusion: {len(excluded):,d}")
        if img_ids is not None:
            # An item has an image in the fused set iff its image vector exists and was usable.
            wrong = [i for i, h in zip(ids, has_image)
                     if bool(h) != (i in img_ids and i not in excluded)]
            if wrong:
                self.fail(f"fused_items.parquet: has_image disagrees with img_items.parquet / "
                          f"fusion_exclusions.parquet for {len(wrong)} id(s), e.g. "
                          f"{[str(w) for w in wrong[:3]]}")
            if excluded - img_ids:
                self.fail(f"fusion_exclusions.parquet: {len(excluded - img_ids)} id(s) not in "
                          f"{IMG_ITEMS}")
        with_images = sum(map(bool, has_image))
        self.report.facts.append(f"fused items: {len(ids):,d}, with images: {with_images:,d}")
        if meta is not None:
            _check_meta(FUSION_CONFIG, meta, {"count": arr.shape[0],
                                              "items_with_images": with_images,
                                              "output_dim": arr.shape[1]}, self.report)
        _check_values(FUSED_ARRAY, arr, self.report)

    # -- kNN graphs

    def _verify_knn(self) -> None:
        meta = self.metas.get(KNN_META)
        n = len(self.txt_ids) if self.txt_ids is not None else None
        k = meta.get("k") if meta is not None else None
        spaces = meta.get("spaces") if meta is not None else None
        if meta is not None:
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                self.fail(f"{KNN_META}: k = {k!r} is not a positive integer")
                k = None
            if n is not None:
                _check_meta(KNN_META, meta, {"count": n}, self.report)
            if not isinstance(spaces, dict) or not all(
                    isinstance(spaces.get(s), dict) for s in KNN_SPACES):
                self.fail(f"{KNN_META}: 'spaces' must describe {sorted(KNN_SPACES)}")
                spaces = None
        for space, (idx_name, score_name, source) in KNN_SPACES.items():
            idx = self._array(idx_name, np.int32)
            scores = self._array(score_name, np.float32)
            vectors = self.arrays.get(source)
            if spaces is not None:
                info = spaces[space]
                self.report.facts.append(_meta_fact(f"{KNN_META} {space}", info))
                if vectors is not None and info.get("dim") != vectors.shape[1]:
                    self.fail(f"{KNN_META}: spaces.{space}.dim = {info.get('dim')!r} but "
                              f"{source} has {vectors.shape[1]} columns")
            if idx is None or scores is None or n is None or k is None:
                continue
            shapes_ok = True
            for name, arr in ((idx_name, idx), (score_name, scores)):
                if arr.shape != (n, k):
                    self.fail(f"{name}: shape {list(arr.shape)}, expected [{n}, {k}] "
                              f"(text items x k of {KNN_META})")
                    shapes_ok = False
            if shapes_ok:
                self._check_graph(space, idx, scores, vectors)

    def _check_graph(self, space: str, idx: np.ndarray, scores: np.ndarray,
                     vectors: np.ndarray | None) -> None:
        """Indices in range, not the row itself, no repeats; scores finite, within [-1, 1],
        most similar first, and equal to the cosine of the two rows of ``vectors``."""
        idx_name, score_name, source = KNN_SPACES[space]
        n, k = idx.shape
        bad: dict[str, list[int]] = {key: [] for key in (
            "range", "self", "repeat", "finite", "bounds", "order", "cosine")}
        dim = vectors.shape[1] if vectors is not None and vectors.shape[0] == n else 0
        if dim:
            norms = np.concatenate([np.linalg.norm(np.asarray(vectors[s:s + _CHUNK_ROWS]), axis=1)
                                    for s in range(0, n, _CHUNK_ROWS)])
        step = max(1, min(_CHUNK_ROWS, _GATHER_VALUES // max(1, k * dim)))
        for start in range(0, n, step):
            ix = np.asarray(idx[start:start + step], dtype=np.int64)
            sc = np.asarray(scores[start:start + step], dtype=np.float64)
            rows = np.arange(start, start + len(ix))
            in_range = (ix >= 0) & (ix < n)
            ordered = np.sort(ix, axis=1)
            finite = np.isfinite(sc)
            found = {
                "range": ~in_range.all(axis=1),
                "self": (ix == rows[:, None]).any(axis=1),
                "repeat": (ordered[:, 1:] == ordered[:, :-1]).any(axis=1),
                "finite": ~finite.all(axis=1),
                "bounds": (finite & (np.abs(sc) > 1 + SCORE_TOLERANCE)).any(axis=1),
                "order": (np.diff(sc, axis=1) > _ORDER_SLACK).any(axis=1),
            }
            if dim:
                # float32 products (error ~1e-6, far below the tolerance): 6x faster than float64
                linked = np.where(in_range, ix, 0)
                anchors = np.asarray(vectors[start:start + len(ix)])
                dots = np.matmul(vectors[linked], anchors[:, :, None])[..., 0]
                cosine = dots / np.maximum(norms[rows, None] * norms[linked], 1e-12)
                found["cosine"] = (in_range & finite
                                   & (np.abs(cosine - sc) > SCORE_TOLERANCE)).any(axis=1)
            for key, hit in found.items():
                bad[key] += rows[hit].tolist()
        messages = {
            "range": f"{idx_name}: {{}} with neighbour indices outside [0, {n})",
            "self": f"{idx_name}: {{}} listing the item itself as its neighbour",
            "repeat": f"{idx_name}: {{}} listing a neighbour twice",
            "finite": f"{score_name}: {{}} with NaN/Inf scores",
            "bounds": f"{score_name}: {{}} with scores outside [-1, 1] "
                      f"(tolerance {SCORE_TOLERANCE})",
            "order": f"{score_name}: {{}} not sorted most similar first",
            "cosine": f"{score_name}: {{}} whose scores are not the cosine of the {source} rows "
                      f"they link (tolerance {SCORE_TOLERANCE}): built from other vectors, or "
                      f"rows moved",
        }
        for key, rows in bad.items():
            if rows:
                self.fail(messages[key].format(_rows_text(rows)))
