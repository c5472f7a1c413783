"""One pass over an output set: completeness, provenance, alignment, shapes, norms, hashes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..items import id_problems
from ..outputs import (
    FUSED_ARRAY,
    FUSED_ITEMS,
    FUSION_CONFIG,
    FUSION_EXCLUSIONS,
    GROUPS,
    IMG_ARRAY,
    IMG_FAILURES,
    IMG_ITEMS,
    IMG_META,
    KNN_META,
    MANIFEST,
    QA_REPORT,
    REPORT_META,
    TXT_ARRAY,
    TXT_ITEMS,
    TXT_META,
)
from ..published import PublishedSetError, resolve
from ..storage import (
    is_file_records,
    is_gcs_uri,
    list_files,
    local_folder,
    read_bytes,
    record_problems,
    sha256_file,
)
from .graphs import KNN_FILES, KNN_SPACES, check_graph
from .nearest import check_nearest, recorded_recall
from .page import check_page
from .report import (
    EXAMPLES,
    Report,
    check_meta,
    check_values,
    load_array,
    load_json,
    load_table,
    meta_fact,
)

_REQUIRED_EXTRA = {IMG_FAILURES}  # the fusion extras are required when its meta lists them
# group -> the files it must have, and its meta file
_GROUP_FILES = {**{group: [arr, ids, meta, *(e for e in extra if e in _REQUIRED_EXTRA)]
                   for group, (arr, ids, meta, extra) in GROUPS.items()}, "knn": list(KNN_FILES)}
_GROUP_META = {**{group: meta for group, (_, _, meta, _) in GROUPS.items()}, "knn": KNN_META}
# meta file -> its keys that name the run of another group, and that group's meta file
_RUN_LINKS = {
    FUSION_CONFIG: (("text_run_id", TXT_META), ("image_run_id", IMG_META)),
    REPORT_META: (("text_run_id", TXT_META), ("image_run_id", IMG_META),
                  ("fusion_run_id", FUSION_CONFIG), ("knn_run_id", KNN_META)),
}


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
    names = None  # a local folder is read in place
    if is_gcs_uri(found.root):
        names = _published_names(found.root, report)
        if names is None:
            return report
    with local_folder(found.root, names) as root:
        _SetCheck(root, report).run()
    return report


def _published_names(uri: str, report: Report) -> list[str] | None:
    """The files of a remote set to fetch: those its manifest lists (and the manifest), or
    every file under the prefix when there is no manifest (a plain copy of a run's outputs, or
    a publish in progress). None when there is nothing."""
    import json

    manifest = read_bytes(f"{uri.rstrip('/')}/{MANIFEST}")
    if manifest is None:
        names = list_files(uri)
    else:
        try:
            names = list(json.loads(manifest).get("files", {}))
        except (ValueError, AttributeError):  # fetched alone: the check reports it unreadable
            names = [MANIFEST]
    if not names:
        report.fail(f"nothing found under {uri}")
        return None
    plain = [name for name in names if name and name == Path(name).name
             and name not in (".", "..")]
    for name in names:
        if name not in plain:
            report.fail(f"{MANIFEST}: file name {name!r} is not a plain name in the set")
    return plain if manifest is None else [MANIFEST, *plain]


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
                self._read_meta(meta_name, _GROUP_FILES[group])
        self._read_report_record(listed)
        self._check_run_links()
        if complete["text"]:
            self._verify_text()
        img_ids = self._verify_image() if complete["image"] else None
        if complete["fusion"]:
            self._verify_fusion(img_ids)
        if complete["knn"]:
            self._verify_knn()
        if QA_REPORT in self.present:
            check_page(self.root / QA_REPORT, self.report)

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

    def _read_meta(self, meta_name: str, group_files: list[str]) -> None:
        meta = load_json(self.root / meta_name, self.report)
        if meta is None:
            return
        self.metas[meta_name] = meta
        self.report.facts.append(meta_fact(meta_name, meta))
        if not isinstance(meta.get("run_id"), str) or not meta["run_id"]:
            self.fail(f"{meta_name}: no run_id: which run wrote these files is unknown")
        records = meta.get("files")
        if records is None:
            self.fail(f"{meta_name}: no 'files' record (size and sha256 of each file of the "
                      f"step): the alignment of its files cannot be proven")
            return
        if self._check_records(meta_name, records):
            data_files = [n for n in group_files if n != meta_name]
            unrecorded = [n for n in data_files if n not in records]
            if unrecorded:
                self.fail(f"{meta_name}: 'files' records no hash of {unrecorded}")

    def _check_records(self, owner: str, records: Any) -> bool:
        """Check the files against ``{name: {"size", "sha256"}}`` recorded in ``owner``;
        False when ``records`` is not such a record."""
        for problem in record_problems({name: self.root / name for name in self.present},
                                       records, owner, sha256=self._hash):
            self.fail(problem)
        return is_file_records(records)

    def _hash(self, path: Path) -> str:
        if path.name not in self._sha256:
            self._sha256[path.name] = sha256_file(path)
        return self._sha256[path.name]

    def _read_report_record(self, listed: set[str] | None) -> None:
        """The QA report belongs to the set: it is there, and ``report_meta.json`` records its
        size and sha256 (the manifest's record is accepted for a set published before the
        report recorded itself)."""
        if QA_REPORT not in self.present:
            self.fail(f"report outputs missing ({QA_REPORT}): the QA report belongs to the set "
                      f"(the report step writes it, and {REPORT_META}, with the other outputs)")
        if REPORT_META in self.present:
            self._read_meta(REPORT_META, [QA_REPORT, REPORT_META])
        elif QA_REPORT in self.present and listed is not None and QA_REPORT in listed:
            self.report.facts.append(f"{QA_REPORT}: recorded by {MANIFEST} only (no "
                                     f"{REPORT_META}: published before the report recorded "
                                     f"itself), so the runs it was made from are not checked")
        elif QA_REPORT in self.present:
            self.fail(f"{QA_REPORT}: no {REPORT_META} records its size and sha256 (a set written "
                      f"before the report recorded itself, or the record was removed): it "
                      f"cannot be shown to be this set's report; run the QA report step again")

    def _check_run_links(self) -> None:
        """The fusion step, and the QA report, must have been made from the outputs of the
        groups of this set."""
        for owner, links in _RUN_LINKS.items():
            meta = self.metas.get(owner)
            for key, meta_name in links if meta is not None else ():
                upstream = self.metas.get(meta_name)
                if upstream is not None and meta.get(key) != upstream.get("run_id"):
                    self.fail(f"{owner}: {key} = {meta.get(key)!r} but {meta_name} has "
                              f"run_id {upstream.get('run_id')!r}: groups of different runs")

    def _check_manifest(self) -> set[str] | None:
        """Check sizes and hashes of the listed files; return their names (None: no manifest)."""
        if MANIFEST not in self.present:
            self.report.facts.append("manifest.json: none (not a published set)")
            return None
        manifest = load_json(self.root / MANIFEST, self.report)
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
        table = load_table(self.root / name, columns, self.report)
        if table is None or "id" not in columns:
            return table
        if self.id_type is not None and table.schema.field("id").type != self.id_type:
            self.fail(f"{name}: ids are {table.schema.field('id').type} but {TXT_ITEMS} ids are "
                      f"{self.id_type}: they cannot join")
        for problem in id_problems(table.column("id")):
            self.fail(f"{name}: {problem}")
        return table

    def _array(self, name: str, dtype: type = np.float32) -> np.ndarray | None:
        arr = load_array(self.root / name, self.report, dtype)
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
            check_meta(TXT_META, meta, {"count": arr.shape[0], "embed_dim": arr.shape[1]},
                        self.report)
        check_values(TXT_ARRAY, arr, self.report)

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
                      f"(rows {shared[:EXAMPLES]})")
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
            check_meta(IMG_META, meta, expected, self.report)
        check_values(IMG_ARRAY, arr, self.report)
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
            check_meta(FUSION_CONFIG, meta, {"count": arr.shape[0],
                                              "items_with_images": with_images,
                                              "output_dim": arr.shape[1]}, self.report)
        check_values(FUSED_ARRAY, arr, self.report)

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
                check_meta(KNN_META, meta, {"count": n}, self.report)
            if not isinstance(spaces, dict) or not all(
                    isinstance(spaces.get(s), dict) for s in KNN_SPACES):
                self.fail(f"{KNN_META}: 'spaces' must describe {sorted(KNN_SPACES)}")
                spaces = None
        for space, (idx_name, score_name, source) in KNN_SPACES.items():
            idx = self._array(idx_name, np.int32)
            scores = self._array(score_name, np.float32)
            vectors = self.arrays.get(source)
            recorded = None
            if spaces is not None:
                info = spaces[space]
                self.report.facts.append(meta_fact(f"{KNN_META} {space}", info))
                if vectors is not None and info.get("dim") != vectors.shape[1]:
                    self.fail(f"{KNN_META}: spaces.{space}.dim = {info.get('dim')!r} but "
                              f"{source} has {vectors.shape[1]} columns")
                recorded = recorded_recall(space, info, k, self.report)
            if idx is None or scores is None or n is None or k is None:
                continue
            shapes_ok = True
            for name, arr in ((idx_name, idx), (score_name, scores)):
                if arr.shape != (n, k):
                    self.fail(f"{name}: shape {list(arr.shape)}, expected [{n}, {k}] "
                              f"(text items x k of {KNN_META})")
                    shapes_ok = False
            if shapes_ok:
                check_graph(space, idx, scores, vectors, self.report)
                if recorded is not None and vectors is not None and len(vectors) == n:
                    check_nearest(space, idx, vectors, recorded, self.report)
