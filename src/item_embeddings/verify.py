"""Check a finished (local or published) output set: shapes, counts, alignment, norms, hashes.

``item-embeddings verify DIR_OR_URI`` prints what the set holds and every violated invariant;
the exit status is non-zero when there is one. The files and the rules are described in
docs/outputs.md; a ``gs://`` prefix is downloaded to a temporary directory first (only the files
of the manifest when there is one).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .items import id_problems
from .outputs import (FUSED_ARRAY, FUSED_ITEMS, FUSION_CONFIG, FUSION_EXCLUSIONS, FUSION_WEIGHTS,
                      GROUPS, IMG_ARRAY, IMG_FAILURES, IMG_ITEMS, IMG_META, TXT_ARRAY, TXT_ITEMS,
                      TXT_META)
from .publish import MANIFEST
from .storage import gcs_client, is_gcs_uri, sha256_file, split_gcs_uri

NORM_TOLERANCE = 1e-3
_CHUNK_ROWS = 65536  # rows per pass over a memory-mapped array (bounded memory on 500k x 512)

_REQUIRED_EXTRA = {IMG_FAILURES}  # the fusion extras are optional


@dataclass
class Report:
    """What ``verify_outputs`` found: printable facts, missing groups/files, and violations."""

    source: str
    facts: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def fail(self, message: str) -> None:
        self.violations.append(message)

    def format(self) -> str:
        lines = [f"output set: {self.source}", *(f"  {f}" for f in self.facts)]
        if self.missing:
            lines.append("not present: " + ", ".join(self.missing))
        if self.violations:
            lines.append(f"{len(self.violations)} violation(s):")
            lines += [f"  VIOLATION: {v}" for v in self.violations]
        else:
            lines.append("all checks passed")
        return "\n".join(lines)


def verify_outputs(dir_or_uri: str) -> Report:
    """Read the output set at a local directory or ``gs://`` prefix and check its invariants."""
    if is_gcs_uri(dir_or_uri):
        with tempfile.TemporaryDirectory(prefix="verify-") as tmp:
            report = Report(source=dir_or_uri)
            if _download_set(dir_or_uri, Path(tmp), report):
                _verify_dir(Path(tmp), report)
            return report
    report = Report(source=dir_or_uri)
    if not Path(dir_or_uri).is_dir():
        report.fail(f"directory not found: {dir_or_uri}")
        return report
    _verify_dir(Path(dir_or_uri), report)
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


def _load_table(path: Path, columns: list[str], report: Report):
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
    return table


def _load_array(path: Path, report: Report) -> np.ndarray | None:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # truncated header, wrong format: say so instead of crashing
        report.fail(f"{path.name}: unreadable .npy: {exc}")
        return None
    report.facts.append(f"{path.name}: shape {list(arr.shape)}, dtype {arr.dtype}")
    if arr.ndim != 2:
        report.fail(f"{path.name}: expected a 2-D array, got shape {list(arr.shape)}")
        return None
    if arr.dtype != np.float32:
        report.fail(f"{path.name}: expected float32, got {arr.dtype}")
    return arr


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


def _ids(table, name: str, report: Report) -> list | None:
    for problem in id_problems(table.column("id")):
        report.fail(f"{name}: {problem}")
    return table.column("id").to_pylist()


def _check_meta(meta_name: str, meta: dict, expected: dict[str, Any], report: Report) -> None:
    for key, value in expected.items():
        if key not in meta:
            report.fail(f"{meta_name}: field {key!r} missing")
        elif meta[key] != value:
            report.fail(f"{meta_name}: {key} = {meta[key]!r} but the data says {value!r}")


def _meta_fact(name: str, meta: dict) -> str:
    shown = {k: v for k, v in meta.items() if not isinstance(v, (dict, list))}
    return f"{name}: " + ", ".join(f"{k}={v}" for k, v in sorted(shown.items()))


def _verify_dir(root: Path, report: Report) -> None:
    present = {p.name for p in root.iterdir() if p.is_file()}
    listed = _check_manifest(root, present, report)
    if listed is not None:
        present &= listed  # like a reader: a published set is what its manifest lists
    groups: dict[str, bool] = {}
    for group, (arr_name, ids_name, meta_name, extra) in GROUPS.items():
        names = [arr_name, ids_name, meta_name, *(e for e in extra if e in _REQUIRED_EXTRA)]
        have = [n for n in names if n in present]
        groups[group] = len(have) == len(names)
        if not have:
            report.missing.append(f"{group} outputs ({', '.join(names)})")
        elif not groups[group]:
            report.fail(f"{group} outputs incomplete: missing {sorted(set(names) - set(have))}")
    if not any(n in present for n in GROUPS["text"][:3]):
        report.fail("no text outputs (txt.npy, txt_items.parquet, txt_meta.json): "
                    "not an item-embeddings output set")
    txt_ids = _verify_text(root, report) if groups["text"] else None
    img_ids = _verify_image(root, report, txt_ids) if groups["image"] else None
    if groups["fusion"]:
        _verify_fusion(root, report, txt_ids, img_ids)


def _verify_text(root: Path, report: Report) -> list | None:
    arr = _load_array(root / TXT_ARRAY, report)
    table = _load_table(root / TXT_ITEMS, ["id"], report)
    meta = _load_json(root / TXT_META, report)
    if meta is not None:
        report.facts.append(_meta_fact(TXT_META, meta))
    if arr is None or table is None:
        return None
    ids = _ids(table, TXT_ITEMS, report)
    report.facts.append(f"text items: {len(ids):,d}")
    if table.num_rows != arr.shape[0]:
        report.fail(f"txt.npy has {arr.shape[0]} rows but txt_items.parquet has "
                    f"{table.num_rows} ids")
    if meta is not None:
        _check_meta(TXT_META, meta, {"count": arr.shape[0], "embed_dim": arr.shape[1]},
                    report)
    _check_values(TXT_ARRAY, arr, report)
    return ids


def _verify_image(root: Path, report: Report, txt_ids: list | None) -> set | None:
    arr = _load_array(root / IMG_ARRAY, report)
    table = _load_table(root / IMG_ITEMS, ["id", "url", "row"], report)
    failures = _load_table(root / IMG_FAILURES,
                           ["id", "url", "reason", "http_status", "attempts"], report)
    meta = _load_json(root / IMG_META, report)
    if meta is not None:
        report.facts.append(_meta_fact(IMG_META, meta))
    if arr is None or table is None:
        return None
    ids = _ids(table, IMG_ITEMS, report)
    report.facts.append(f"items with images: {len(ids):,d}")
    rows = table.column("row").to_pylist()
    bad_rows = [r for r in rows if r is None or not 0 <= r < arr.shape[0]]
    if bad_rows:
        report.fail(f"img_items.parquet: {len(bad_rows)} row index(es) outside img.npy "
                    f"[0, {arr.shape[0]}), e.g. {bad_rows[:3]}")
    if len(set(rows)) != len(rows):
        report.fail("img_items.parquet: several ids point at the same img.npy row")
    if table.num_rows != arr.shape[0]:
        report.fail(f"img.npy has {arr.shape[0]} rows but img_items.parquet has "
                    f"{table.num_rows} ids")
    if txt_ids is not None:
        unknown = set(ids) - set(txt_ids)
        if unknown:
            report.fail(f"img_items.parquet: {len(unknown)} id(s) not in txt_items.parquet, "
                        f"e.g. {sorted(map(str, unknown))[:3]}")
    expected = {"count": arr.shape[0], "embed_dim": arr.shape[1]}
    if failures is not None:
        failed_ids = failures.column("id").to_pylist()
        reasons = Counter(failures.column("reason").to_pylist())
        report.facts.append(f"failed downloads: {len(failed_ids):,d}"
                            + (f" ({', '.join(f'{r}: {n}' for r, n in reasons.most_common())})"
                               if reasons else ""))
        both = set(ids) & set(failed_ids)
        if both:
            report.fail(f"{len(both)} id(s) are both in img_items.parquet and "
                        f"img_failures.parquet, e.g. {sorted(map(str, both))[:3]}")
        expected["failed_count"] = len(failed_ids)
        if meta is not None and "failures_by_reason" in meta:
            expected["failures_by_reason"] = dict(sorted(reasons.items()))
        if meta is not None and "attempted_count" in meta:
            # Every attempted item ends either embedded or recorded as a failure.
            expected["attempted_count"] = arr.shape[0] + len(failed_ids)
    if meta is not None:
        _check_meta(IMG_META, meta, expected, report)
    _check_values(IMG_ARRAY, arr, report)
    return set(ids)


def _verify_fusion(root: Path, report: Report, txt_ids: list | None,
                   img_ids: set | None) -> None:
    arr = _load_array(root / FUSED_ARRAY, report)
    table = _load_table(root / FUSED_ITEMS, ["id", "has_image"], report)
    meta = _load_json(root / FUSION_CONFIG, report)
    if meta is not None:
        report.facts.append(_meta_fact(FUSION_CONFIG, meta))
    if (root / FUSION_WEIGHTS).is_file():
        size = (root / FUSION_WEIGHTS).stat().st_size
        report.facts.append(f"fusion_model.safetensors: {size:,d} bytes")
    if arr is None or table is None:
        return
    ids = table.column("id").to_pylist()
    has_image = table.column("has_image").to_pylist()
    if table.num_rows != arr.shape[0]:
        report.fail(f"fused.npy has {arr.shape[0]} rows but fused_items.parquet has "
                    f"{table.num_rows} ids")
    if txt_ids is not None and ids != txt_ids:
        if set(ids) != set(txt_ids) or len(ids) != len(txt_ids):
            missing = len(set(txt_ids) - set(ids))
            report.fail(f"fused_items.parquet does not cover the text items: {missing} text "
                        f"id(s) missing, {len(set(ids) - set(txt_ids))} extra, "
                        f"{len(ids)} rows vs {len(txt_ids)}")
        else:
            first = next(i for i, (a, b) in enumerate(zip(ids, txt_ids)) if a != b)
            report.fail(f"fused_items.parquet ids are not in txt_items.parquet order "
                        f"(first difference at row {first})")
    excluded: set = set()
    if (root / FUSION_EXCLUSIONS).is_file():
        table_ex = _load_table(root / FUSION_EXCLUSIONS, ["id", "reason"], report)
        excluded = set(table_ex.column("id").to_pylist()) if table_ex is not None else set()
        report.facts.append(f"image vectors excluded from fusion: {len(excluded):,d}")
    if img_ids is not None:
        # An item has an image in the fused set iff its image vector exists and was usable.
        wrong = [i for i, h in zip(ids, has_image)
                 if bool(h) != (i in img_ids and i not in excluded)]
        if wrong:
            report.fail(f"fused_items.parquet: has_image disagrees with img_items.parquet / "
                        f"fusion_exclusions.parquet for {len(wrong)} id(s), e.g. "
                        f"{[str(w) for w in wrong[:3]]}")
        if excluded - img_ids:
            report.fail(f"fusion_exclusions.parquet: {len(excluded - img_ids)} id(s) not in "
                        f"{IMG_ITEMS}")
    report.facts.append(f"fused items: {len(ids):,d}, with images: {sum(map(bool, has_image)):,d}")
    if meta is not None:
        _check_meta(FUSION_CONFIG, meta,
                    {"count": arr.shape[0], "items_with_images": sum(map(bool, has_image)),
                     "output_dim": arr.shape[1]}, report)
    _check_values(FUSED_ARRAY, arr, report)


def _check_manifest(root: Path, present: set[str], report: Report) -> set[str] | None:
    """Check sizes and hashes of the listed files; return their names (None: no manifest)."""
    if MANIFEST not in present:
        report.facts.append("manifest.json: none (not a published set)")
        return None
    manifest = _load_json(root / MANIFEST, report)
    if manifest is None:
        return None
    files = manifest.get("files", {})
    report.facts.append(f"manifest.json: run_id={manifest.get('run_id', '')!r}, "
                        f"published_at={manifest.get('published_at', '')}, {len(files)} files")
    for name, entry in sorted(files.items()):
        path = root / name
        if name not in present:
            report.fail(f"manifest lists {name} but it is missing")
        elif path.stat().st_size != entry.get("size"):
            report.fail(f"{name}: size {path.stat().st_size} != manifest {entry.get('size')}")
        elif sha256_file(path) != entry.get("sha256"):
            report.fail(f"{name}: sha256 does not match the manifest")
    unlisted = sorted(present - set(files) - {MANIFEST})
    if unlisted:
        report.facts.append(f"files not in the manifest (ignored by readers): {unlisted}")
    return set(files)
