"""image_decode: JPEGs decoded near the encoder's input size ('fast', the default) or in full
('exact'), the quality gate between the two, and where the image step's time goes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, JpegImagePlugin

from image_server import ImageServer, gradient, make_images, product_photo
from item_embeddings import image as im
from item_embeddings.config import ConfigError, PipelineParams
from item_embeddings.image.reuse import encoder_fingerprint
from item_embeddings.outputs import IMG_ARRAY, IMG_ITEMS, IMG_META

# (width, height) of the generated catalogue photos: landscape, portrait, square, wide, large,
# and sides that a 1/2 or 1/4 scale does not divide (the reduced image ends in a partial pixel).
PHOTO_SIZES = [(1000, 750), (750, 1000), (1000, 1000), (1000, 600), (1600, 1200), (1000, 625),
               (1000, 453), (871, 1000), (523, 1000), (997, 997)]


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """Product photos at about 1000 px, as catalogue hosts serve them (JPEG quality 85)."""
    return [save(product_photo(size, seed), "JPEG", quality=85)
            for seed, size in enumerate(PHOTO_SIZES)]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    config, checkpoint, _ = tiny_model
    return im.load_image_encoder(str(config), str(checkpoint))


@pytest.fixture(scope="module")
def vit_b32():
    """The default model's architecture with random weights (no weights exist offline)."""
    return im.load_image_encoder("ViT-B-32", "none", device="cpu")


@pytest.fixture
def decoded_sizes(monkeypatch) -> list[tuple[int, int]]:
    """The size each JPEG is decoded at (after ``draft``), in call order."""
    sizes: list[tuple[int, int]] = []
    original = JpegImagePlugin.JpegImageFile.load

    def load(self):
        if not getattr(self, "_size_recorded", False):  # load() runs again on a loaded image
            self._size_recorded = True
            sizes.append(self.size)
        return original(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", load)
    return sizes


# ----------------------------------------------------------------------------- the decoder

def test_encoders_know_their_input_size(tiny, vit_b32):
    assert tiny.input_size == (32, 32) and vit_b32.input_size == (224, 224)
    decoder = vit_b32.decoder()
    assert (decoder.mode, decoder.input_size) == ("fast", (224, 224))
    assert decoder.pil_transform is vit_b32.pil_transform
    assert decoder.reduction.draft_size == (224, 224) and decoder.reduction.size == (224,)
    assert decoder.reduction.resample == Image.BICUBIC  # open_clip's Resize filter
    assert decoder.reduction.resized_size(1000, 625) == (358, 224)  # as torchvision computes
    assert vit_b32.decoder("exact").reduction is None


def test_fast_decodes_in_full_for_a_transform_it_cannot_follow(vit_b32, decoded_sizes):
    """A first step other than torchvision's Resize (e.g. open_clip's resize_mode='longest'):
    no reduction whose geometry could differ; fast decodes every pixel."""
    import open_clip

    longest = open_clip.image_transform(224, is_train=False, resize_mode="longest")
    pil_part = im.encoder.split_preprocess(longest)[0]
    decoder = im.ImageDecoder(pil_part, (224, 224), "fast")
    assert decoder.reduction is None
    body = save(gradient((1000, 625), seed=4), "JPEG", quality=90)
    assert np.array_equal(decoder(body), im.ImageDecoder(pil_part, (224, 224), "exact")(body))
    assert decoded_sizes == [(1000, 625), (1000, 625)]


@pytest.mark.parametrize("size, decoded", [
    ((1000, 1000), (250, 250)),   # 1/4: 250 >= 224, 1/8 would be 125
    ((1000, 600), (500, 300)),    # the short side decides: 600 // 224 = 2
    ((600, 1000), (300, 500)),
    ((2000, 1500), (500, 375)),   # 1/4: at 1/8 the short side would be 188
    ((2000, 1800), (250, 225)),   # 1/8
    ((448, 448), (224, 224)),     # exactly the input size at 1/2
    ((447, 447), (447, 447)),     # 1/2 would be below 224: decoded in full
    ((300, 200), (300, 200)),     # smaller than the input: in full, as exact does
])
def test_fast_decodes_at_the_smallest_scale_not_below_the_input(vit_b32, decoded_sizes, size,
                                                               decoded):
    body = save(gradient(size, seed=1), "JPEG", quality=90)
    fast = vit_b32.decoder("fast")(body)
    assert decoded_sizes == [decoded]
    exact = vit_b32.decoder("exact")(body)
    assert decoded_sizes == [decoded, size]  # exact always decodes every pixel
    assert fast.shape == exact.shape == (224, 224, 3) and fast.dtype == np.uint8
    if decoded == size:
        assert np.array_equal(fast, exact)


@pytest.mark.parametrize("fmt, kw", [("PNG", {}), ("WEBP", {"quality": 90}), ("GIF", {}),
                                     ("BMP", {}), ("TIFF", {})])
def test_formats_without_a_reduced_decode_are_decoded_in_full(vit_b32, fmt, kw):
    img = product_photo((1000, 750), seed=2)
    body = save(img if fmt != "GIF" else img.convert("P"), fmt, **kw)
    assert np.array_equal(vit_b32.decoder("fast")(body), vit_b32.decoder("exact")(body))


def test_fast_keeps_jpeg_modes_and_failures(vit_b32):
    photo = product_photo((1000, 750), seed=3)
    for mode in ("L", "CMYK"):
        body = save(photo.convert(mode), "JPEG", quality=90)
        fast, exact = vit_b32.decoder("fast")(body), vit_b32.decoder("exact")(body)
        assert fast.shape == (224, 224, 3)
        assert np.abs(fast.astype(int) - exact).mean() < 2.0, mode
        if mode == "L":  # grey stays grey
            assert np.array_equal(fast[..., 0], fast[..., 1])
    bodies = make_images()
    whole = save(photo, "JPEG", quality=90)
    for body, reason in ((whole[: len(whole) // 2], im.DECODE_ERROR),
                         (bodies["bomb.png"][0], im.DECOMPRESSION_BOMB),
                         (bodies["notimage.jpg"][0], "not_an_image")):
        with pytest.raises(im.ImageDecodeError) as info:
            vit_b32.decoder("fast")(body)
        assert info.value.reason == reason


def test_a_jpeg_bomb_is_refused_from_its_header_in_both_modes(vit_b32, decoded_sizes):
    body = save(Image.new("L", (1000, 1000)), "JPEG")
    for mode in im.DECODE_MODES:
        decoder = im.ImageDecoder(vit_b32.pil_transform, (224, 224), mode, max_pixels=999_999)
        with pytest.raises(im.ImageDecodeError) as info:
            decoder(body)
        assert info.value.reason == im.DECOMPRESSION_BOMB
    assert decoded_sizes == []  # refused before any pixel was decoded


def test_timed_gives_the_threads_cpu_seconds_and_the_failure(vit_b32, photos):
    decoder = vit_b32.decoder("exact")
    pixels, error, cpu_s = decoder.timed(photos[0])
    assert error is None and pixels.shape == (224, 224, 3) and 0 < cpu_s < 5
    pixels, error, cpu_s = decoder.timed(b"<html>")
    assert pixels is None and error.reason == "not_an_image" and cpu_s >= 0


def test_unknown_modes_are_refused():
    with pytest.raises(ValueError, match="image_decode must be one of fast, exact"):
        im.ImageDecoder(lambda img: img, (224, 224), "approximate")
    with pytest.raises(ConfigError, match="'image_decode' must be one of fast, exact, got 'x'"):
        PipelineParams(image_decode="x")
    assert PipelineParams().image_decode == "fast"


# ----------------------------------------------------------------------------- the quality gate

@pytest.mark.parametrize("model", ["vit_b32", "tiny"])
def test_fast_vectors_match_exact_ones(model, photos, request):
    """The gate: cosine >= 0.999 between the vectors of both modes, photo by photo (ViT-B-32
    with random weights, and the tiny model's checkpoint at 32 px, where every photo is
    decoded at 1/8)."""
    encoder = request.getfixturevalue(model)
    fast = np.stack([encoder.decoder("fast")(b) for b in photos])
    exact = np.stack([encoder.decoder("exact")(b) for b in photos])
    assert not np.array_equal(fast, exact)  # the reduced decode did happen
    assert np.abs(fast.astype(int) - exact).mean() < 2.0  # of 255
    cosines = np.sum(encoder.encode(fast) * encoder.encode(exact), axis=1)
    assert cosines.min() >= 0.999, cosines


# ----------------------------------------------------------------------------- the user's path

def _items(path: Path, urls: list[str]) -> Path:
    pq.write_table(pa.table({"asin": [f"P{i}" for i in range(len(urls))],
                             "image_url": pa.array(urls, pa.string())}), path)
    return path


def test_image_decode_from_the_component_to_the_vectors(tiny_model, tiny, photos, tmp_path):
    """The pipeline parameter reaches the decoder through the component: each mode's vectors
    are the encoder's vectors of its decoding; the meta file, the experiment run and the
    merge record where the time went."""
    from kfp.dsl import Dataset, Metrics

    from item_embeddings.components.embed_images import embed_images
    from item_embeddings.fanout import WHOLE_TABLE, ShardPlan, merge_image_shards
    from item_embeddings.image.step import IMAGE_STEP
    from item_embeddings.tracking import write_metrics_artifact

    config, checkpoint, _ = tiny_model
    names = [f"p{i}.jpg" for i in range(len(photos))]
    vectors = {}
    with ImageServer({n: (b, "image/jpeg") for n, b in zip(names, photos)}) as host:
        items = _items(tmp_path / "items.parquet", [host.url(f"img/{n}") for n in names])
        for mode, chosen in (("exact", {"image_decode": "exact"}), ("fast", {})):  # default
            task = tmp_path / f"run-{mode}" / "embed-images"
            embed_images(items=Dataset(name="items", uri=str(items)),
                         image_shards=Dataset(name="image_shards", uri=str(task / "ds")),
                         image_model=str(config), image_pretrained=str(checkpoint),
                         download_retries=0, allow_private_hosts=True, tracking_backend="local",
                         tracking_dir=str(tmp_path / "runs"), log_shard_runs=True, **chosen)
            shard = task / "ds" / "shard-00000"
            meta = json.loads((shard / IMG_META).read_text())
            assert meta["image_decode"] == mode and meta["count"] == len(photos)
            vectors[mode] = np.load(shard / IMG_ARRAY)
            expected = tiny.encode(np.stack([tiny.decoder(mode)(b) for b in photos]))
            np.testing.assert_allclose(vectors[mode], expected, atol=1e-6)
            assert meta["download_wall_s"] > 0 and meta["encode_wall_s"] > 0
            assert meta["decode_cpu_s"] > 0
            assert meta["download_wall_s"] <= meta["wall_time_sec"]
            record = json.loads((tmp_path / "runs" / "recsys-dev" /
                                 f"embed-image-run-{mode}-shard-00000.json").read_text())
            assert record["params"]["image_decode"] == mode
            for key in ("download_wall_s", "decode_cpu_s", "encode_wall_s"):
                assert record["metrics"][key] == meta[key]

            merged = Dataset(name="image_embeddings", uri=str(task.parent / "merge" / "ds"))
            metrics = Metrics(name="metrics", uri=str(task.parent / "merge" / "metrics"))
            merge_image_shards([str(task / "ds")], ShardPlan.from_workers([WHOLE_TABLE]),
                               merged.path, PipelineParams())
            merged_meta = json.loads((Path(merged.path) / IMG_META).read_text())
            write_metrics_artifact(metrics, "image", IMAGE_STEP.metrics(merged_meta))
            for key in ("download_wall_s", "decode_cpu_s", "encode_wall_s"):
                assert merged_meta[key] == meta[key]
                assert metrics.metadata[f"image_{key}"] == meta[key]
            assert merged_meta["image_decode"] == mode
            assert pq.read_table(Path(merged.path) / IMG_ITEMS).num_rows == len(photos)
    assert not np.array_equal(vectors["fast"], vectors["exact"])
    assert np.sum(vectors["fast"] * vectors["exact"], axis=1).min() >= 0.999


def test_the_mode_is_part_of_the_image_fingerprint(tiny):
    from item_embeddings.image.decoding import ALLOWED_FORMATS, MAX_PIXELS
    from item_embeddings.incremental import fingerprint

    exact, fast = encoder_fingerprint(tiny, "exact"), encoder_fingerprint(tiny, "fast")
    assert exact != fast and encoder_fingerprint(tiny, "fast") == fast
    # Sets written before image_decode existed were decoded exactly: "exact" keeps their key.
    resolved = tiny.resolved
    assert exact == fingerprint({
        "kind": "image", "model": resolved.model_name, "weights": resolved.weights_sha256,
        "quick_gelu": resolved.quick_gelu, "preprocess": repr(tiny.pil_transform),
        "dtype": tiny.dtype, "max_pixels": MAX_PIXELS, "formats": ALLOWED_FORMATS})
