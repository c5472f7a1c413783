"""Fusion quality on the real sample and on a demo run: modality mix, category purity and kept
neighbourhoods of the fused space against the text space, PCA-128 and the fusion of another git
revision (``--compare-rev``, run on the same inputs in the same run).

Text side: all-MiniLM-L6-v2 on title + description of the 2,000 real Amazon Electronics items.
Image side, three scenarios on the same items:

* ``proxy``: a documented PROXY, not images (no CLIP weights and no reachable image URL here):
  for the 500 items that have an ``image_url``, MiniLM on the item's own *features* bullets and
  category path (a second, differently worded view of the same product), placed in 512-d by a
  fixed random isometry (cosines unchanged). It carries the category about as well as the text.
* ``random``: the same 500 items with random unit vectors: photos whose vectors carry nothing.
* ``proxy-all``: the proxy view for every item that has features or a category path (1,893 of
  2,000): what full photo coverage would give (an upper bound for ``proxy``).

``--demo-dir`` adds the output folder of ``item-embeddings demo`` (synthetic photos that show
the category; its ``fused.npy`` as the run wrote it, and the ``--compare-rev`` fusion retrained
on its inputs).

Metrics (top-10 cosine neighbours among all items, self excluded):
* ``photo share``: for items with / without an image, the share of their neighbours with one
  (the modality mix, docs/fusion.md); the fused space should stay within 0.10 of the text's.
* ``purity``: share of neighbours with the same ``main_category``, all items and per group.
* ``kept``: within each group (neighbours among the group only), the share of the reference
  neighbours kept: items with an image against the masked concatenation [text, image], items
  without against the text space.
* Purity difference of the fused space minus the text space, with a paired 95% bootstrap
  interval over items: whether a gap is more than item-sampling noise.

Usage::

    flock /tmp/bench.lock python bench/bench_fusion_quality.py \\
        --items ../shared/data/amazon_electronics_2000.parquet --cache-dir /tmp/fusion_quality \\
        --compare-rev f52d438 --demo-dir demo_out
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from bench_fusion import export_src

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


TARGET_MIX = 0.10


def _proxy_views(items: pa.Table, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(proxy view [N, 512] for every item with features or categories, which items)."""
    if (cache / "proxy_all.npz").is_file():
        data = np.load(cache / "proxy_all.npz")
        return data["image"], data["has"]
    from item_embeddings.text import load_text_encoder

    rows = items.to_pylist()
    has = np.array([bool(r["features"] or r["categories"]) for r in rows])
    views = [clean_text(" > ".join(r["categories"] or []) + ". " + " ".join(r["features"] or []))
             for r, h in zip(rows, has) if h]
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((512, 384)))
    image = np.zeros((len(rows), 512), dtype=np.float32)
    image[has] = load_text_encoder().encode(views) @ q.T.astype(np.float32)
    np.savez(cache / "proxy_all.npz", image=image, has=has)
    return image, has


def _scenarios(items: pa.Table, cache: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    text, image, has_image = _encode(items, cache)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(image.shape).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    random = np.where(has_image[:, None], noise, 0).astype(np.float32)
    return {"proxy": (image, has_image), "random": (random, has_image),
            "proxy-all": _proxy_views(items, cache)}


def _fuse(text_dir: Path, image_dir: Path, out: Path, epochs: int, seed: int,
          src: str | None, min_steps: int | None = None) -> dict:
    """The fusion step of this tree, or of ``src`` (another revision's package) in a child;
    ``min_steps``: this tree's ``fusion_min_steps`` (None: its default)."""
    steps = "" if min_steps is None or src else f", fusion_min_steps={min_steps}"
    code = ("import json, sys, logging; logging.disable(logging.WARNING); "
            "from item_embeddings.config import PipelineParams; "
            "from item_embeddings.fusion import fuse_item_embeddings; "
            f"m = fuse_item_embeddings({str(text_dir)!r}, {str(image_dir)!r}, {str(out)!r}, "
            f"PipelineParams(fusion_epochs={epochs}, seed={seed}{steps}), num_threads=1); "
            "print(json.dumps({'best_epoch': m.get('best_epoch'), "
            "'epochs_trained': m.get('epochs_trained', len(m.get('loss_history', []))), "
            "'train_time_sec': m['train_time_sec']}))")
    env = dict(os.environ, PYTHONPATH=src) if src else None
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _photo_share(nb: np.ndarray, has_image: np.ndarray) -> tuple[float, float]:
    share = has_image[nb].mean(axis=1)
    return float(share[has_image].mean()), float(share[~has_image].mean())


def measure(spaces: dict[str, np.ndarray], text: np.ndarray, image: np.ndarray,
            has_image: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, float]]:
    """Per space: photo share and purity by group, and neighbours kept within each group."""
    ti, ii = np.flatnonzero(~has_image), np.flatnonzero(has_image)
    concat = np.concatenate([text, image], axis=1)
    ref_t, ref_c = _neighbours(text[ti]), _neighbours(concat[ii])
    out = {}
    for name, x in spaces.items():
        nb = _neighbours(x)
        purity = _item_purity(nb, labels)
        with_photo, without_photo = _photo_share(nb, has_image)
        out[name] = {"share_with": with_photo, "share_without": without_photo,
                     "purity": float(purity.mean()), "purity_with": float(purity[ii].mean()),
                     "purity_without": float(purity[ti].mean()),
                     "kept_with": _overlap(_neighbours(x[ii]), ref_c),
                     "kept_without": _overlap(_neighbours(x[ti]), ref_t)}
    return out


def evidence_bounds(text: np.ndarray, image: np.ndarray, has_image: np.ndarray,
                    labels: np.ndarray, weights: tuple[float, ...] = (0.5, 1.0, 2.0)
                    ) -> dict[str, float]:
    """Purity@10 that the evidence itself reaches, without any model (what a fusion of it can
    hope for): per image-evidence weight w, (1) the targets' own top-10 (the text's number of
    photo items at every item, each group ordered by t·t' + w · (photo or imputed photo)
    cosines, text-only pairs by the text) and (2) all pairs ranked by t·t' + w · v·v', v the
    photo or, without one, the photo the text predicts (no constraint on the mix)."""
    import torch

    from item_embeddings.fusion.targets import fit_imputation

    t = text / np.linalg.norm(text, axis=1, keepdims=True)
    v = np.zeros_like(image)
    v[has_image] = image[has_image] / np.linalg.norm(image[has_image], axis=1, keepdims=True)
    imputation = fit_imputation(torch.from_numpy(t[has_image]), torch.from_numpy(v[has_image]))
    v = np.where(has_image[:, None], v, imputation.predict(torch.from_numpy(t)).numpy())
    text_sim, image_sim = t @ t.T, v @ v.T
    np.fill_diagonal(text_sim, -np.inf)
    photos = has_image[np.argsort(-text_sim, axis=1)[:, :K]].sum(axis=1)
    out = {}
    for w in weights:
        evidence = text_sim + w * image_sim
        out[f"evidence, w={w}"] = _purity(np.argsort(-evidence, axis=1)[:, :K], labels)
        evidence[np.ix_(~has_image, ~has_image)] = text_sim[np.ix_(~has_image, ~has_image)]
        rows = []
        for i in range(len(t)):
            order = np.argsort(-evidence[i], kind="stable")
            with_photo, without = order[has_image[order]], order[~has_image[order]]
            rows.append(np.concatenate([with_photo[:photos[i]], without[:K - photos[i]]]))
        out[f"targets' top-10, w={w}"] = _purity(np.array(rows), labels)
    return out


def _table(title: str, results: dict[str, dict[str, float]], runs: dict[str, dict]) -> None:
    print(f"\n#### {title}\n")
    print("| space | photo share: with / without a photo | purity@10 all | with | without "
          "| kept@10 with (vs concat) | without (vs text) | best / trained epochs |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['share_with']:.3f} / {r['share_without']:.3f} | {r['purity']:.3f} "
              f"| {r['purity_with']:.3f} | {r['purity_without']:.3f} | {r['kept_with']:.3f} "
              f"| {r['kept_without']:.3f} | {_epochs(runs.get(name))} |")


def _epochs(run: dict | None) -> str:
    """'best / trained' epochs of a fused run ('epochs' asks for fewer where fusion_min_steps
    adds some: a small catalogue)."""
    return f"{run['best_epoch']} / {run['epochs_trained']}" if run else "–"


def _verdicts(results: dict[str, dict[str, float]], fused: str, purity_margin: float) -> str:
    """The issue's targets for one fused space against the text space and the PCA-128s."""
    text, r = results["text"], results[fused]
    gap = max(abs(r["share_with"] - text["share_with"]),
              abs(r["share_without"] - text["share_without"]))
    pcas = [v for k, v in results.items() if k.startswith("PCA-128")]
    kept = all(r[key] >= max(p[key] for p in pcas) for key in ("kept_with", "kept_without"))
    checks = [(f"photo-share gap {gap:.3f} <= {TARGET_MIX}", gap <= TARGET_MIX),
              (f"purity {r['purity']:.3f} >= text {text['purity']:.3f} {purity_margin:+.2f}",
               r["purity"] >= text["purity"] + purity_margin),
              ("kept >= PCA-128 in both groups", kept)]
    return "; ".join(f"{what}: {'PASS' if ok else 'FAIL'}" for what, ok in checks)


def _demo(demo_dir: Path, compare_src: str | None, compare_rev: str, epochs: int,
          tmp: Path) -> None:
    """The demo run's own fused space (and the other revision's, retrained on its inputs)."""
    ids = pq.read_table(demo_dir / "txt_items.parquet").column("id").to_pylist()
    text = np.load(demo_dir / "txt.npy")
    img_items = pq.read_table(demo_dir / "img_items.parquet").to_pydict()
    img = np.load(demo_dir / "img.npy")
    index = {item: i for i, item in enumerate(ids)}
    image = np.zeros((len(ids), img.shape[1]), np.float32)
    has_image = np.zeros(len(ids), bool)
    for item, row in zip(img_items["id"], img_items["row"]):
        image[index[item]], has_image[index[item]] = img[row], True
    table = pq.read_table(demo_dir / "sample_items.parquet").to_pydict()
    category = dict(zip(table["asin"], table["main_category"]))
    labels = np.array([category[i] for i in ids], dtype=object)
    spaces = {"text": text, "fused (this run)": np.load(demo_dir / "fused.npy")}
    runs = {}
    if compare_src:
        out = tmp / "demo-compare"
        runs[f"fused at {compare_rev}"] = _fuse(demo_dir, demo_dir, out, epochs, 0, compare_src)
        spaces[f"fused at {compare_rev}"] = np.load(out / "fused.npy")
    concat = np.concatenate([text, image / np.maximum(np.linalg.norm(image, axis=1,
                                                                      keepdims=True), 1e-12)], 1)
    spaces["PCA-128 uncentred"] = _pca(concat, min(128, len(ids) - 1), False)
    results = measure(spaces, text, image, has_image, labels)
    _table(f"demo run {demo_dir} ({len(ids)} items, {int(has_image.sum())} with a photo)",
           results, runs)
    print(f"\n{'fused (this run)'}: {_verdicts(results, 'fused (this run)', 0.02)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", default="../shared/data/amazon_electronics_2000.parquet")
    parser.add_argument("--cache-dir", default="/tmp/fusion_quality")
    parser.add_argument("--scenarios", nargs="+", default=["proxy", "random", "proxy-all"])
    parser.add_argument("--epochs", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-steps", type=int,
                        help="fusion_min_steps of this tree's runs (default: the parameter's)")
    parser.add_argument("--compare-rev", help="git revision whose fusion runs on the same inputs")
    parser.add_argument("--demo-dir", help="output folder of `item-embeddings demo`")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)

    items = pq.read_table(args.items)
    ids = [str(x) for x in items.column("asin").to_pylist()]
    labels = np.array(items.column("main_category").to_pylist(), dtype=object)
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    text = _encode(items, cache)[0]
    scenarios = _scenarios(items, cache)
    everything = {}
    with tempfile.TemporaryDirectory() as tmp:
        compare_src = export_src(args.compare_rev, Path(tmp)) if args.compare_rev else None
        for scenario in args.scenarios:
            image, has_image = scenarios[scenario]
            root = Path(tmp) / scenario
            text_dir, image_dir = _write_step_inputs(root, ids, text, image, has_image)
            concat = np.concatenate([text, image], axis=1)  # zero image block without one
            spaces = {"text": text, "PCA-128 centred": _pca(concat, 128, True),
                      "PCA-128 uncentred": _pca(concat, 128, False)}
            runs = {}
            for epochs in args.epochs:
                for name, src in (("fused", None), (f"fused at {args.compare_rev}", compare_src)):
                    if name != "fused" and src is None:
                        continue
                    key = f"{name}, {epochs} epochs"
                    out = root / key.replace(" ", "_").replace(",", "")
                    runs[key] = _fuse(text_dir, image_dir, out, epochs, args.seed, src,
                                      args.min_steps)
                    spaces[key] = np.load(out / "fused.npy")
            results = measure(spaces, text, image, has_image, labels)
            everything[scenario] = {"results": results, "runs": runs}
            _table(f"{scenario}: {int(has_image.sum())} of {len(ids)} items with an image view",
                   results, runs)
            margin = -0.01 if scenario == "random" else 0.02
            print()
            for key in runs:
                print(f"* {key}: {_verdicts(results, key, margin)}")
            bounds = evidence_bounds(text, image, has_image, labels)
            print("* purity@10 of the evidence itself (no model; text "
                  f"{results['text']['purity']:.4f}): "
                  + "; ".join(f"{k} {v:.4f}" for k, v in bounds.items()))
            everything[scenario]["evidence_bounds"] = bounds
            fused = f"fused, {args.epochs[0]} epochs"
            for against in ("text",):
                m, lo, hi = purity_difference(spaces[fused], spaces[against],
                                              np.arange(len(ids)), labels)
                print(f"* purity {fused} minus {against}: {m:+.4f} [{lo:+.4f}, {hi:+.4f}] "
                      "(paired 95% bootstrap over items)")
        if args.demo_dir:
            _demo(Path(args.demo_dir), compare_src, args.compare_rev or "", args.epochs[0],
                  Path(tmp))
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
