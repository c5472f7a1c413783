"""Plain helpers shared by the tests (the role of img2dataset's tests/fixtures.py).

Test modules import shared functions and constants from here (or from the fake services
``image_server``, ``vertex_fake`` and the ``network_guard``), never from another test module or
from ``conftest`` (which keeps the shared fixtures): ``test_helpers_rule.py`` checks it.
File names come from ``item_embeddings.outputs``, not string literals.
"""

from __future__ import annotations

# Only light imports at the top: conftest imports this module in every test session; the
# package's heavier modules are imported by the helpers that use them.
import atexit
import json
import random
import re
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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
    KNN_META,
    META_FILES,
    QA_REPORT,
    REPORT_META,
    TXT_ARRAY,
    TXT_ITEMS,
    TXT_META,
)

# Generated item catalogues (tests never read ../shared).

BRANDS = ["Acme", "Volt", "Nimbus", "Orion", "Kestrel", "Lumen"]
KINDS = ["USB-C cable", "wireless earbuds", "mechanical keyboard", "HDMI adapter",
         "portable SSD", "webcam", "phone charger", "bluetooth speaker"]


def catalogue(n: int, *, seed: int = 0) -> dict[str, list]:
    """A small realistic catalogue: list descriptions, HTML, some null/empty fields."""
    rng = random.Random(seed)
    ids, titles, descriptions, urls = [], [], [], []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        ids.append(f"B{i:07d}")
        titles.append(None if i % 17 == 5 else f"{rng.choice(BRANDS)} {kind} {rng.randint(1, 99)}")
        body = [f"<p>A {kind} with {rng.choice(['fast', 'reliable', 'compact'])} design.</p>",
                f"Works with laptops &amp; phones; {rng.randint(1, 5)} year warranty."]
        descriptions.append(None if i % 13 == 7 else ([] if i % 11 == 3 else body))
        urls.append(f"http://127.0.0.1:9/img/{i}.jpg" if i % 3 else None)
    return {"asin": ids, "title": titles, "description": descriptions, "image_url": urls}


def write_items(path: Path, columns: dict[str, list], schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



# Output sets in the documented layout (docs/outputs.md).

def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


_OUTPUT_SETS: dict[tuple, Path] = {}  # made once per test process, then copied


def make_output_set(root: Path, n: int = 40, with_images: bool = True, seed: int = 0,
                    run_id: str = "run-1", with_report: bool = True) -> Path:
    """A consistent output set in the documented layout (docs/outputs.md), each group written
    through the step skeleton (``step_run``), so its meta file records run id and file hashes;
    with images, also its QA report (``write_report``; 20 s, hence ``with_report``). Returns
    ``root``."""
    key = (n, with_images, seed, run_id, with_report)
    if key not in _OUTPUT_SETS:
        folder = tempfile.mkdtemp(prefix="item-embeddings-test-set-")
        atexit.register(shutil.rmtree, folder, True)
        _OUTPUT_SETS[key] = _make_output_set(Path(folder) / "set", *key)
    # (bytes copied here: tests replace shutil's copy functions to inject failures)
    shutil.copytree(_OUTPUT_SETS[key], root, dirs_exist_ok=True,
                    copy_function=lambda src, dst: Path(dst).write_bytes(Path(src).read_bytes()))
    return root


def _make_output_set(root: Path, n: int, with_images: bool, seed: int, run_id: str,
                     with_report: bool) -> Path:
    from item_embeddings.step import step_run

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"B{i:05d}" for i in range(n)]
    with step_run("embed-text", root, params={}, artifact="text", run_id=run_id) as run:
        np.save(root / TXT_ARRAY, _unit(rng, n, 384))
        pq.write_table(pa.table({"id": ids}), root / TXT_ITEMS)
        run.finish(TXT_META, {"count": n, "embed_dim": 384,
                                     "encoder_name": "all-MiniLM-L6-v2"}, metrics={})
    if not with_images:
        return root
    # Every 3rd item has no URL, every 5th download failed, the rest have an image.
    no_url = [i for i in ids if int(i[1:]) % 3 == 0]
    failed = [i for i in ids if i not in no_url and int(i[1:]) % 5 == 0]
    good = [i for i in ids if i not in no_url and i not in failed]
    with step_run("embed-image", root, params={}, artifact="image", run_id=run_id) as run:
        order = rng.permutation(len(good))  # img.npy rows need not follow id order
        np.save(root / IMG_ARRAY, _unit(rng, len(good), 512))
        pq.write_table(pa.table({"id": good, "url": [f"http://img/{i}.jpg" for i in good],
                                 "row": order.astype(np.int64)}), root / IMG_ITEMS)
        pq.write_table(pa.table({
            "id": failed, "url": [f"http://img/{i}.jpg" for i in failed],
            "reason": ["http_status"] * (len(failed) - 1) + ["timeout"],
            "detail": ["HTTP 404"] * (len(failed) - 1) + ["no response in 5 s"],
            "http_status": pa.array([404] * (len(failed) - 1) + [None], pa.int32()),
            "attempts": [1] * (len(failed) - 1) + [3]}), root / IMG_FAILURES)
        run.finish(IMG_META, {
            "count": len(good), "failed_count": len(failed), "embed_dim": 512,
            "attempted_count": len(good) + len(failed), "no_url_count": len(no_url),
            "failures_by_reason": {"http_status": len(failed) - 1, "timeout": 1}}, metrics={})
    with step_run("fuse-modal", root, params={}, artifact="fused", run_id=run_id) as run:
        np.save(root / FUSED_ARRAY, _unit(rng, n, 128))
        # The fusion step may exclude an unusable image vector: that item is fused without image.
        excluded = good[:1]
        pq.write_table(pa.table({"id": ids, "has_image": [i in good and i not in excluded
                                                          for i in ids]}),
                       root / FUSED_ITEMS)
        pq.write_table(pa.table({"id": excluded, "reason": ["non-finite or zero image vector"]}),
                       root / FUSION_EXCLUSIONS)
        (root / FUSION_WEIGHTS).write_bytes(b"\x08" * 64)
        run.finish(FUSION_CONFIG, {
            "count": n, "items_with_images": len(good) - 1, "output_dim": 128, "hidden_dim": 256,
            "text_run_id": run_id, "image_run_id": run_id}, metrics={})
    return write_report(root, run_id=run_id) if with_report else root


def write_report(root: Path, run_id: str = "run-1") -> Path:
    """The QA report of the set in ``root`` (``write_qa_report``, with the set's kNN graphs when
    it has them), over a generated items table of the set's ids."""
    from item_embeddings.config import PipelineParams
    from item_embeddings.report import write_qa_report

    ids = pq.read_table(root / TXT_ITEMS).column("id").to_pylist()
    with tempfile.TemporaryDirectory() as tmp:
        items = write_items(Path(tmp) / "items.parquet",
                            {"asin": ids, "title": [f"Item {i}" for i in ids]})
        knn = root if (root / KNN_META).is_file() else None
        write_qa_report(str(items), root, root, root, knn, root / QA_REPORT,
                        PipelineParams(seed=0), run_id=run_id)
    return root


# A page that loads nothing from outside itself, for sets whose checks do not read the page.
PLAIN_PAGE = "<!doctype html><html><body><h1>QA report</h1></body></html>"


def write_page_record(root: Path, page: str = PLAIN_PAGE) -> Path:
    """``qa_report.html`` and its ``report_meta.json`` as ``write_qa_report`` records them (the
    page's size and sha256, the run ids of the groups present), with ``page`` for the report:
    a whole set for ``verify`` in milliseconds instead of the real report's 20 s."""
    from item_embeddings.storage import file_record

    (root / QA_REPORT).write_text(page, encoding="utf-8")
    run_ids = {}
    for key, meta_name in (("text_run_id", TXT_META), ("image_run_id", IMG_META),
                           ("fusion_run_id", FUSION_CONFIG), ("knn_run_id", KNN_META)):
        path = root / meta_name
        run_ids[key] = json.loads(path.read_text()).get("run_id") if path.is_file() else None
    meta = json.loads((root / TXT_META).read_text())
    (root / REPORT_META).write_text(json.dumps({
        "run_id": meta.get("run_id"), "count": meta.get("count"), **run_ids,
        "files": {QA_REPORT: file_record(root / QA_REPORT)}}))
    return root


def exact_knn(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force neighbours by cosine, most similar first, the row itself left out."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k].astype(np.int32)
    return idx, np.take_along_axis(sims, idx, axis=1).astype(np.float32)


def write_knn(root: Path, k: int = 5, run_id: str = "run-1") -> Path:
    """The kNN graph files of the set in ``root`` (exact search), through the step skeleton."""
    from item_embeddings.knn.graph import RECALL_PREFIXES
    from item_embeddings.step import step_run
    from item_embeddings.verify import KNN_SPACES

    spaces = {}
    with step_run("knn", root, params={}, artifact="knn", run_id=run_id) as run:
        for space, (idx_name, score_name, source) in KNN_SPACES.items():
            vectors = np.load(root / source)
            idx, scores = exact_knn(vectors, k)
            np.save(root / idx_name, idx)
            np.save(root / score_name, scores)
            spaces[space] = {"dim": vectors.shape[1], "method": "exact", "index_params": {},
                             "build_time_sec": 0.0, "query_time_sec": 0.0, "recall_at_k": 1.0,
                             "recall_at": {str(j): 1.0 for j in RECALL_PREFIXES if j < k},
                             "recall_queries": len(idx)}
        run.finish(KNN_META, {"k": k, "count": len(idx), "spaces": spaces}, metrics={})
    return root


def reseal(root: Path) -> None:
    """Record the current hashes in every meta file, as if the step itself had written the
    damaged files: what is left to catch the damage is the content checks."""
    from item_embeddings.storage import file_record

    for meta_path in root.glob("*.json"):
        meta = json.loads(meta_path.read_text())
        if isinstance(meta.get("files"), dict):
            meta["files"] = {name: file_record(root / name) for name in meta["files"]}
            meta_path.write_text(json.dumps(meta))



def verify_cli(root: Path, capsys) -> tuple[int, str]:
    """``item-embeddings verify root``: its exit status and what it printed."""
    from item_embeddings.ops.cli import main

    rc = main(["verify", str(root)])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def refused(root: Path, capsys, *fragments: str) -> str:
    """Run the CLI on ``root``: exit status 1 and every fragment among the violations."""
    rc, out = verify_cli(root, capsys)
    assert rc == 1, out
    violations = "\n".join(line for line in out.splitlines() if "VIOLATION" in line)
    for fragment in fragments:
        assert fragment in violations, (fragment, out)
    return violations


# The console of a local run (ops/console.py).

MAX_CONSOLE_LINES = 100  # two screenfuls; kfp.local's own output alone is over a thousand


def check_console_of_a_run(console: str, out_dir) -> None:
    """What the console of a successful run-local or demo shows: a screenful, each step with
    its wall time, counts that agree with every meta file placed, where the files, the report
    and the log are; and that the log holds what the console leaves out."""
    from item_embeddings.ops.console import meta_counts

    lines = console.splitlines()
    assert len(lines) <= MAX_CONSOLE_LINES, console
    log = out_dir / "run.log"
    assert lines[0] == f"full log of this run: {log}" and lines[-1] == f"full log: {log}"
    for task in ["fingerprint-inputs", "embed-text", "embed-images", "fuse-embeddings"]:
        assert re.search(rf"^\d\d:\d\d:\d\d {task}: done in", console, re.M), task
        assert re.search(rf"^  {task}\s+done( \d+)?\s+\d+\.\d s$", console, re.M), task
    flat = " ".join(console.split())  # the summary wraps long lines between counts
    metas = [p for p in out_dir.iterdir() if p.name in META_FILES]
    assert {p.name for p in metas} >= {TXT_META, IMG_META, FUSION_CONFIG}
    for path in metas:
        counts = meta_counts(json.loads(path.read_text()))
        assert f"{path.name} {', '.join(counts)}" in flat, path.name
    report = out_dir / QA_REPORT
    assert (f"QA report: {report}" in lines) == report.exists()
    assert f"outputs in {out_dir}" in console
    text = log.read_text()
    assert text.count("Got executor_input:") >= 4 and "executor_input" not in console
    assert "Wrote executor output file" in text and "Wrote executor output" not in console


def with_content_keys(text_dir: Path, image_dir: Path, hide=()) -> None:
    """Give a synthetic set content keys, as the text and image steps write them (``t-<id>``,
    ``i-<id>``), and drop the photos of the ``hide`` items (their image rows too)."""
    ids = pq.read_table(text_dir / TXT_ITEMS).column("id").to_pylist()
    pq.write_table(pa.table({"id": ids, "key": [f"t-{i}" for i in ids]}), text_dir / TXT_ITEMS)
    items = pq.read_table(image_dir / IMG_ITEMS).to_pydict()
    keep = [k for k, item in enumerate(items["id"]) if item not in hide]
    img = np.load(image_dir / IMG_ARRAY)
    np.save(image_dir / IMG_ARRAY, img[[items["row"][k] for k in keep]])
    pq.write_table(pa.table({"id": [items["id"][k] for k in keep],
                             "url": [items["url"][k] for k in keep],
                             "row": pa.array(range(len(keep)), pa.int64()),
                             "key": [f"i-{items['id'][k]}" for k in keep]}),
                   image_dir / IMG_ITEMS)
    meta = json.loads((image_dir / IMG_META).read_text())
    (image_dir / IMG_META).write_text(json.dumps({**meta, "count": len(keep)}))
