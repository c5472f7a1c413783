"""Fast text backends: the quality gate against float32 sentence-transformers, the cached and
deterministic build of the ONNX models, and the step's metadata."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from helpers import catalogue, write_items
from item_embeddings.config import PipelineParams
from item_embeddings.outputs import TXT_ARRAY, TXT_META
from item_embeddings.storage import sha256_file
from item_embeddings.text import embed_items_text, load_text_encoder, resolve_text_model
from item_embeddings.text.encoders import resolve_backend
from item_embeddings.text.onnx import (
    MANIFEST_FILE,
    MODEL_FILE,
    ONNX_BACKENDS,
    OnnxTextEncoder,
    build_fast_model,
)
from item_embeddings.text.quality import quality_gate

CATEGORIES = {
    "headphones": (["over-ear headphones", "wireless earbuds", "studio monitor headphones"],
                   ["active noise cancellation", "40 mm drivers", "30-hour battery",
                    "foldable headband", "built-in microphone", "aptX codec"]),
    "storage": (["portable SSD", "microSD card", "external hard drive", "NVMe enclosure"],
                ["USB 3.2 Gen 2", "read speeds up to 1050 MB/s", "shock resistant",
                 "hardware encryption", "exFAT formatted", "UHS-I U3 V30"]),
    "cables": (["USB-C to USB-C cable", "HDMI 2.1 cable", "Lightning cable", "DisplayPort cable"],
               ["braided nylon jacket", "100 W power delivery", "8K at 60 Hz",
                "gold-plated connectors", "MFi certified", "2 m length"]),
    "cameras": (["action camera", "dash cam", "security camera", "mirrorless camera body"],
                ["4K 60 fps video", "night vision", "image stabilisation", "waterproof to 10 m",
                 "wide dynamic range", "loop recording"]),
    "computing": (["mechanical keyboard", "wireless mouse", "27-inch monitor", "laptop stand"],
                  ["hot-swappable switches", "RGB backlight", "1440p IPS panel",
                   "ergonomic design", "16000 DPI sensor", "adjustable height"]),
    "power": (["power bank", "wall charger", "wireless charging pad", "surge protector"],
              ["20000 mAh capacity", "GaN technology", "Qi certified", "six AC outlets",
               "pass-through charging", "overheat protection"]),
    "audio": (["bluetooth speaker", "soundbar", "turntable", "USB microphone"],
              ["360-degree sound", "Dolby Atmos", "belt drive", "cardioid pattern",
               "IPX7 waterproof", "stereo pairing"]),
    "networking": (["Wi-Fi 6 router", "mesh system", "network switch", "powerline adapter"],
                   ["dual band", "gigabit ports", "WPA3 security", "parental controls",
                    "beamforming", "easy app setup"]),
}
BRANDS = ["Acme", "Volt", "Nimbus", "Orion", "Kestrel", "Lumen", "Zenith", "Pico", "Strata"]
FILLER = ["Designed for everyday use at home, in the office or on the road.",
          "The package includes a user manual and a quick start guide.",
          "Our support team answers questions within 24 hours.",
          "Compatible with Windows, macOS, Linux, Android and iOS devices.",
          "Made from recycled materials and shipped in plastic-free packaging.",
          "Please check the dimensions before ordering to make sure it fits your setup.",
          "Firmware updates add features and improve stability over time.",
          "Tested for durability with more than 10,000 cycles in our lab."]


def product_texts(n: int, seed: int = 0) -> list[str]:
    """Realistic product texts: short titles only, medium listings, long ones past 256 tokens."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        kinds, features = CATEGORIES[rng.choice(sorted(CATEGORIES))]
        model = f"{rng.choice('XSGT')}{rng.randint(1, 999)}"
        title = f"{rng.choice(BRANDS)} {rng.choice(kinds)} {model}"
        shape = i % 5
        if shape == 0:
            sentences = []  # title only
        elif shape == 4:  # long: many sentences, well past the 256-token cap
            sentences = [f"Features {', '.join(rng.sample(features, 3))}." for _ in range(6)]
            sentences += rng.choices(FILLER, k=25)
        else:
            sentences = [f"Offers {f}." for f in rng.sample(features, rng.randint(1, 4))]
            sentences += rng.sample(FILLER, rng.randint(0, 4))
        texts.append(" ".join([title] + sentences))
    return texts


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("text-cache")


@pytest.fixture(scope="module")
def texts():
    return product_texts(240)


@pytest.fixture(scope="module")
def reference(texts):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_text_model("all-MiniLM-L6-v2").location, device="cpu")
    return model.encode(texts, batch_size=128, normalize_embeddings=True)


@pytest.fixture(scope="module")
def encoders(cache):
    return {b: OnnxTextEncoder("all-MiniLM-L6-v2", backend=b, batch_size=64, cache_dir=cache)
            for b in ONNX_BACKENDS}


def test_generated_texts_include_long_ones(texts, encoders):
    lengths = [len(ids) for ids in encoders["onnx"].tokenizer(texts)["input_ids"]]
    assert min(lengths) < 20 and sum(n > 256 for n in lengths) >= len(texts) // 6


@pytest.mark.parametrize("backend", ONNX_BACKENDS)
def test_backend_passes_the_quality_gate(backend, texts, reference, encoders):
    encoder = encoders[backend]
    got = encoder.encode(texts)
    assert got.shape == (len(texts), 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    gate = quality_gate(reference, got)
    assert gate["passed"], gate
    if backend == "onnx":  # the float32 graph is the same function, up to rounding
        assert gate["cosine_min"] > 0.9999 and gate["top10_overlap"] > 0.99


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")
def test_torch_fp16_on_cuda_passes_the_quality_gate(texts, reference):
    encoder = load_text_encoder("all-MiniLM-L6-v2", backend="torch-fp16")
    assert encoder.dtype == "float16" and encoder.device == "cuda"
    assert quality_gate(reference, encoder.encode(texts))["passed"]


def test_duplicates_order_and_edge_cases(texts, reference, encoders):
    encoder = encoders["onnx"]
    assert encoder.encode([]).shape == (0, 384)
    picked = [texts[7], texts[3], texts[7], "  " + texts[3] + "\n", "", texts[4]]
    got = encoder.encode(picked)
    np.testing.assert_array_equal(got[0], got[2])  # a duplicate is encoded once and copied
    np.testing.assert_array_equal(got[1], got[3])  # stripped like sentence-transformers does
    for row, index in ((0, 7), (1, 3), (5, 4)):
        assert float(got[row] @ reference[index]) > 0.9999
    assert np.isfinite(got[4]).all() and abs(np.linalg.norm(got[4]) - 1) < 1e-5  # empty text


def test_batches_cover_every_text_once_within_the_token_budget(encoders):
    encoder = encoders["onnx"]
    lengths = np.array(random.Random(1).choices(range(3, 257), k=500))
    groups = encoder._batches(lengths)
    assert sorted(np.concatenate(groups).tolist()) == list(range(500))
    for group in groups:
        assert len(group) <= encoder.batch_size
        assert len(group) == 1 or len(group) * lengths[group].max() <= encoder.tokens_per_batch


def test_build_is_cached_and_deterministic(cache, tmp_path, encoders):
    resolved = resolve_text_model("all-MiniLM-L6-v2")
    first = build_fast_model(resolved.location, "onnx-int8", resolved.weights_sha256, cache)
    assert first == encoders["onnx-int8"].model_dir  # reused, not rebuilt
    manifest = json.loads((first / MANIFEST_FILE).read_text())
    assert manifest["model_sha256"] == sha256_file(first / MODEL_FILE)
    assert manifest["weights_sha256"] == resolved.weights_sha256
    again = build_fast_model(resolved.location, "onnx-int8", resolved.weights_sha256, tmp_path)
    assert sha256_file(again / MODEL_FILE) == manifest["model_sha256"]  # same bytes from scratch
    assert [p.name for p in (tmp_path / "text_fast").iterdir()] == [again.name]  # no leftovers


def test_step_records_backend_and_fast_model_hash(tmp_path, cache, monkeypatch, encoders):
    monkeypatch.setenv("ITEM_EMBEDDINGS_CACHE", str(cache))
    items = write_items(tmp_path / "items.parquet", catalogue(30))
    meta = embed_items_text(str(items), tmp_path / "out",
                            PipelineParams(text_backend="onnx-int8", text_batch_size=16),
                            run_id="r1")
    on_disk = json.loads((tmp_path / "out" / TXT_META).read_text())
    assert on_disk == meta
    assert meta["text_backend"] == "onnx-int8" and meta["dtype"] == "int8"
    assert meta["fast_model_sha256"] == encoders["onnx-int8"].model_sha256
    assert np.load(tmp_path / "out" / TXT_ARRAY).shape == (30, 384)
    # an approximation: recorded as such, with the gate it passed on this catalogue's texts
    assert meta["exact"] is False
    gate = meta["quality_gate"]
    assert gate["passed"] and gate["sample"] == 30 and gate["cosine_mean"] > 0.99
    assert "top10_overlap" in gate


def test_default_backend_is_exact(tmp_path, cache, monkeypatch, encoders):
    """What a user gets without choosing: the model's own vectors, not an approximation."""
    from sentence_transformers import SentenceTransformer

    from item_embeddings.items import item_text

    monkeypatch.setenv("ITEM_EMBEDDINGS_CACHE", str(cache))
    cat = catalogue(30)
    items = write_items(tmp_path / "items.parquet", cat)
    meta = embed_items_text(str(items), tmp_path / "out", run_id="r1")  # text_backend=auto
    assert meta["text_backend"] == "onnx" and meta["exact"] is True
    assert meta["quality_gate"] is None and meta["dtype"] == "float32"
    texts = [item_text(t, d) for t, d in zip(cat["title"], cat["description"])]
    plain = SentenceTransformer(resolve_text_model("all-MiniLM-L6-v2").location, device="cpu")
    want = plain.encode(texts, normalize_embeddings=True)
    got = np.load(tmp_path / "out" / TXT_ARRAY)
    assert (got * want).sum(axis=1).min() >= 0.9999


def test_an_approximation_that_fails_the_gate_is_refused_before_encoding(
        tmp_path, cache, monkeypatch, encoders):
    from item_embeddings.text import quality

    monkeypatch.setenv("ITEM_EMBEDDINGS_CACHE", str(cache))
    monkeypatch.setattr(quality, "GATE_MEAN_COSINE", 0.99999)  # int8 cannot get this close
    items = write_items(tmp_path / "items.parquet", catalogue(30))
    with pytest.raises(quality.QualityGateError, match="'onnx-int8' fails the quality gate "
                                                       "on 30 texts"):
        embed_items_text(str(items), tmp_path / "out", PipelineParams(text_backend="onnx-int8"))
    assert not (tmp_path / "out" / TXT_ARRAY).exists()


def test_backend_names_are_checked():
    assert resolve_backend("auto", "cpu") == "onnx"  # exact by default
    assert resolve_backend("auto", "cuda") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="unknown text_backend 'onnx-fp8'"):
        load_text_encoder(backend="onnx-fp8")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_backend("torch-fp16", "cpu")
    with pytest.raises(ValueError, match="runs on cpu"):
        load_text_encoder(backend="onnx", device="cuda")


def test_quality_gate_rejects_lossy_vectors(reference):
    rng = np.random.default_rng(0)
    assert quality_gate(reference, reference.copy())["passed"]
    noisy = reference + rng.normal(0, 0.03, reference.shape).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    gate = quality_gate(reference, noisy)
    assert not gate["passed"] and gate["top10_overlap"] < 0.9, gate
    with pytest.raises(ValueError, match="same shape"):
        quality_gate(reference, reference[:5])
