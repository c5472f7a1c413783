"""Fusion quality on the real sample: fused MLP vs PCA-128 of the same concatenation.

Text side: all-MiniLM-L6-v2 on title + description of the 2,000 real Amazon Electronics items.
Image side: a documented PROXY, not images (no CLIP weights and no reachable image URL here):
for the 500 items that have an ``image_url``, MiniLM on the item's own *features* bullets and
category path (a second, differently worded view of the same product, written independently of
the title/description), placed in 512-d by a fixed random isometry (cosines unchanged). See
docs/fusion.md for what this does and does not show.

Metrics (top-10 cosine neighbours, self excluded):
* ``overlap_text``: items without images, neighbours among themselves, fused vs text space.
* ``overlap_concat``: items with images, neighbours among themselves, fused vs [text, image].
* ``purity_*``: share of those neighbours with the same ``main_category``.
* Purity difference of the default MLP (first seed) minus each PCA-128, with a paired 95%
  bootstrap interval over items: whether a gap is more than item-sampling noise.

Usage::

    flock /tmp/bench.lock python bench/bench_fusion_quality.py \\
        --items ../shared/data/amazon_electronics_2000.parquet --cache-dir /tmp/fusion_quality
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from item_embeddings.config import PipelineParams
from item_embeddings.fusion import fuse_item_embeddings
from item_embeddings.items import clean_text, item_text
from item_embeddings.storage import write_json_atomic, write_parquet_atomic

K = 10


def _encode(items: pa.Table, cache: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(text [N,384], proxy image [N,512] (zero rows without image_url), has_image [N])."""
    if (cache / "vectors.npz").is_file():
        data = np.load(cache / "vectors.npz")
        return data["text"], data["image"], data["has_image"]
    from item_embeddings.text import load_text_encoder

    encoder = load_text_encoder()
    rows = items.to_pylist()
    t0 = time.perf_counter()
    text = encoder.encode([item_text(r["title"], r["description"]) for r in rows])
    has_image = np.array([bool(r["image_url"]) for r in rows])
    views = [clean_text(" > ".join(r["categories"] or []) + ". " + " ".join(r["features"] or []))
             for r, h in zip(rows, has_image) if h]
    proxy = encoder.encode(views)
    # A fixed random isometry R^384 -> R^512: 512-d like CLIP, other basis, same cosines.
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((512, 384)))
    image = np.zeros((len(rows), 512), dtype=np.float32)
    image[has_image] = proxy @ q.T.astype(np.float32)
    print(f"encoded {len(rows)} texts + {len(views)} proxy views in "
          f"{time.perf_counter() - t0:.0f}s", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(cache / "vectors.npz", text=text, image=image, has_image=has_image)
    return text, image, has_image


def _write_step_inputs(root: Path, ids: list[str], text: np.ndarray, image: np.ndarray,
                       has_image: np.ndarray) -> tuple[Path, Path]:
    text_dir, image_dir = root / "text", root / "image"
    text_dir.mkdir(parents=True)
    image_dir.mkdir(parents=True)
    np.save(text_dir / "txt.npy", text)
    write_parquet_atomic(text_dir / "txt_items.parquet", pa.table({"id": ids}))
    write_json_atomic(text_dir / "txt_meta.json", {"embed_dim": 384, "count": len(ids)})
    with_image = np.flatnonzero(has_image)
    np.save(image_dir / "img.npy", image[with_image])
    write_parquet_atomic(image_dir / "img_items.parquet", pa.table({
        "id": [ids[i] for i in with_image], "url": [""] * len(with_image),
        "row": pa.array(np.arange(len(with_image)), pa.int64())}))
    write_json_atomic(image_dir / "img_meta.json", {"embed_dim": 512, "count": len(with_image)})
    return text_dir, image_dir


def _neighbours(x: np.ndarray) -> np.ndarray:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :K]


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / K for x, y in zip(a, b)]))


def _item_purity(nb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[n] share of each item's neighbours with the item's own label."""
    return (labels[nb] == labels[:, None]).mean(axis=1)


def _purity(nb: np.ndarray, labels: np.ndarray) -> float:
    return float(_item_purity(nb, labels).mean())


def purity_difference(a: np.ndarray, b: np.ndarray, rows: np.ndarray, labels: np.ndarray,
                      resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Purity of space ``a`` minus space ``b`` on ``rows``, with a paired 95% bootstrap interval.

    Paired by item: both spaces' purity is taken per item, and the items are resampled, so the
    interval reflects how much the difference depends on which items were drawn.
    """
    d = _item_purity(_neighbours(a[rows]), labels[rows]) - \
        _item_purity(_neighbours(b[rows]), labels[rows])
    draws = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    means = d[draws].mean(axis=1)
    return float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _pca(x: np.ndarray, k: int, centre: bool) -> np.ndarray:
    mean = x.mean(axis=0) if centre else np.zeros(x.shape[1])
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return (x - mean) @ vt[:k].T


def evaluate(spaces: dict[str, np.ndarray], text: np.ndarray, concat: np.ndarray,
             has_image: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, float]]:
    ti, ii = np.flatnonzero(~has_image), np.flatnonzero(has_image)
    ref_t, ref_c = _neighbours(text[ti]), _neighbours(concat[ii])
    out = {"reference (text / concat)": {"overlap_text": 1.0, "overlap_concat": 1.0,
                                         "purity_text_only": _purity(ref_t, labels[ti]),
                                         "purity_with_image": _purity(ref_c, labels[ii])}}
    for name, x in spaces.items():
        nt, nc = _neighbours(x[ti]), _neighbours(x[ii])
        out[name] = {"overlap_text": _overlap(nt, ref_t), "overlap_concat": _overlap(nc, ref_c),
                     "purity_text_only": _purity(nt, labels[ti]),
                     "purity_with_image": _purity(nc, labels[ii])}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", default="../shared/data/amazon_electronics_2000.parquet")
    parser.add_argument("--cache-dir", default="/tmp/fusion_quality")
    parser.add_argument("--epochs", type=int, nargs="+", default=[5, 20, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)

    items = pq.read_table(args.items)
    ids = [str(x) for x in items.column("asin").to_pylist()]
    labels = np.array(items.column("main_category").to_pylist(), dtype=object)
    text, image, has_image = _encode(items, Path(args.cache_dir))
    concat = np.concatenate([text, image], axis=1)  # zero image block without an image
    proxy_vs_text = _overlap(_neighbours(image[has_image]), _neighbours(text[has_image]))

    spaces = {"PCA-128 centred": _pca(concat, 128, True),
              "PCA-128 uncentred": _pca(concat, 128, False)}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        text_dir, image_dir = _write_step_inputs(Path(tmp), ids, text, image, has_image)
        for init in ("pca", "random"):
            for epochs in args.epochs:
                for seed in args.seeds:
                    name = f"MLP init={init} epochs={epochs} seed={seed}"
                    meta = fuse_item_embeddings(
                        text_dir, image_dir, Path(tmp) / name,
                        PipelineParams(fusion_epochs=epochs, seed=seed), init=init,
                        num_threads=1)
                    spaces[name] = np.load(Path(tmp) / name / "fused.npy")
                    runs[name] = {"final_loss": meta["final_loss"],
                                  "train_time_sec": meta["train_time_sec"]}
    results = evaluate(spaces, text, concat, has_image, labels)
    print(f"items {len(ids)}: {int((~has_image).sum())} without image, {int(has_image.sum())} "
          f"with proxy image; top-{K} overlap proxy-image vs text space (items with image): "
          f"{proxy_vs_text:.3f}\n")
    print(f"| space | overlap@10 text (no image) | overlap@10 concat (image) "
          f"| purity@10 no image | purity@10 image |  (MLP rows: mean [min, max] over seeds "
          f"{args.seeds})")
    print("|---|---|---|---|---|")
    keys = ("overlap_text", "overlap_concat", "purity_text_only", "purity_with_image")
    groups: dict[str, list[dict[str, float]]] = {}
    for name, r in results.items():
        groups.setdefault(name.split(" seed=")[0], []).append(r)
    for name, rs in groups.items():
        cells = []
        for key in keys:
            values = [r[key] for r in rs]
            cells.append(f"{np.mean(values):.3f}" if len(values) == 1 else
                         f"{np.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]")
        print(f"| {name} | " + " | ".join(cells) + " |")
    mlp = f"MLP init=pca epochs={args.epochs[0]} seed={args.seeds[0]}"
    print(f"\nPurity difference, {mlp} minus PCA-128 (mean over items, paired 95% bootstrap "
          f"interval over items):\n")
    print("| against | no image | image |")
    print("|---|---|---|")
    for pca in ("PCA-128 uncentred", "PCA-128 centred"):
        cells = [purity_difference(spaces[mlp], spaces[pca], np.flatnonzero(side), labels)
                 for side in (~has_image, has_image)]
        print(f"| {pca} | " + " | ".join(f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]"
                                          for m, lo, hi in cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "runs": runs,
                                               "proxy_vs_text_overlap": proxy_vs_text}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
