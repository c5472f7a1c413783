"""The fusion step on a small catalogue (240 items, 24 + 16 dimensions, a 32-unit MLP): each run
takes a fraction of a second, so these tests are what `tools/mutation.sh fusion-*` runs against
every mutant. They read what a user of the step reads: ``fusion_config.json`` (settings, the loss
history and the kept epoch), the fused vectors (their values, neighbourhoods and bytes across
reruns), the saved model, the log lines and the errors.

The pinned numbers were measured with the code of issue #20 (its objective and schedule); a
change to them is a change of the fusion algorithm, which those measurements depend on.
"""

import json
import logging
import shutil
from importlib import metadata

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import with_content_keys
from item_embeddings.config import PipelineParams
from item_embeddings.fusion import (
    FusionInputError,
    FusionMLP,
    fuse_item_embeddings,
    load_fusion_model,
)
from item_embeddings.fusion.synthetic import write_synthetic_catalogue
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
    TXT_ARRAY,
    TXT_ITEMS,
    TXT_META,
)
from item_embeddings.storage import sha256_file
from item_embeddings.tracking import LocalTracker

N, TEXT_DIM, IMG_DIM = 240, 24, 16
# exactly fusion_epochs (fusion_min_steps 0): the pinned numbers below are of 3 epochs
SMALL = {"fusion_epochs": 3, "fusion_min_steps": 0, "fusion_batch_size": 64,
         "fusion_hidden_dim": 32, "fusion_output_dim": 8}


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def catalogue(tmp_path):
    cat = write_synthetic_catalogue(tmp_path / "text", tmp_path / "image", n=N,
                                    image_fraction=0.5, text_clusters=4, image_clusters=4,
                                    text_dim=TEXT_DIM, img_dim=IMG_DIM, seed=5)
    return tmp_path / "text", tmp_path / "image", cat


def _fuse(catalogue, out, **params):
    text_dir, image_dir, _ = catalogue
    return fuse_item_embeddings(text_dir, image_dir, out,
                                PipelineParams(**{"seed": 0, **SMALL, **params}),
                                run_id="r-small")


def _purity(vectors, labels, rows, k=10):
    x = vectors[rows] / np.linalg.norm(vectors[rows], axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    neighbours = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return float((labels[rows][neighbours] == labels[rows][:, None]).mean())


# The run of issue #20's code on this catalogue: the objective after each epoch (training mean,
# its two parts, the evaluation sample's), the start's, and the first two fused rows.
HISTORY = [(2.6740262, 2.6738317, 0.019443745, 2.3323371),
           (2.4256142, 2.4254264, 0.018784315, 2.2334007),
           (2.5282329, 2.5280472, 0.018560279, 2.2132640)]
INITIAL = 2.5062970
# the training objective per epoch of 130 items in batches of 64, 64 and 2
LAST_BATCH_OF_TWO = [2.4319158, 2.2551215, 2.1355203]
FIRST_ROWS = [[-0.50248265, -0.29178226, -0.44347894, -0.6195791, 0.21993247, 0.04634042,
               -0.05608528, 0.16780716],
              [-0.6405529, 0.06167622, -0.21731311, 0.01723245, -0.39117053, -0.22367443,
               0.570679, -0.09821918]]


def test_a_small_run_records_its_training_and_writes_the_same_codes(tmp_path, catalogue,
                                                                    caplog):
    text_dir, image_dir, cat = catalogue
    caplog.set_level(logging.INFO, logger="item_embeddings")
    meta = _fuse(catalogue, tmp_path / "out")
    out = tmp_path / "out"
    config = json.loads((out / FUSION_CONFIG).read_text())
    assert config == json.loads(json.dumps(meta))
    assert {k: config[k] for k in (
        "fusion_mode", "objective", "text_uri", "image_uri", "previous_uri", "epochs", "lr",
        "batch_size", "seed", "init", "objective_params", "text_dim", "img_dim", "hidden_dim",
        "output_dim", "count", "items_with_images", "items_without_images",
        "image_vectors_excluded", "image_failures", "text_run_id", "image_run_id",
        "reused_count", "computed_count", "weights_file", "normalized", "torch_threads",
        "run_id")} == {
        "fusion_mode": "train", "objective": "modality-balanced-kl+norm",
        "text_uri": str(text_dir), "image_uri": str(image_dir), "previous_uri": "",
        "epochs": 3, "lr": 1e-3, "batch_size": 64, "seed": 0, "init": "pca",
        "objective_params": {"tau": 0.05, "norm_weight": 0.01, "warmup_share": 0.1,
                             "schedule": "warmup-cosine"},
        "text_dim": TEXT_DIM, "img_dim": IMG_DIM, "hidden_dim": 32, "output_dim": 8,
        "count": N, "items_with_images": 128, "items_without_images": 112,
        "image_vectors_excluded": 0, "image_failures": 0, "text_run_id": "synthetic",
        "image_run_id": "synthetic", "reused_count": 0, "computed_count": N,
        "weights_file": FUSION_WEIGHTS, "normalized": True, "torch_threads": 1,
        "run_id": "r-small"}
    assert config["imputation"] == {"ridge_alpha": 0.3, "items": 128, "rank": 16, "kept": 1.0,
                                    "cv_r2": pytest.approx(0.0029292, abs=1e-5)}
    assert config["initial_eval_loss"] == pytest.approx(INITIAL, rel=1e-5)
    parts = ("loss", "sim_loss", "norm_loss", "eval_loss")
    assert [sorted(h) for h in meta["loss_history"]] == [sorted(parts)] * 3
    assert [tuple(h[k] for k in parts) for h in config["loss_history"]] == [
        pytest.approx(h, rel=1e-4) for h in HISTORY]
    assert config["best_epoch"] == 3 and config["final_loss"] == config["loss_history"][2][
        "eval_loss"]
    for key in ("load_time_sec", "train_time_sec", "write_time_sec", "wall_time_sec"):
        assert 0 < config[key] < 60, key
    assert config["weights_sha256"] == sha256_file(out / FUSION_WEIGHTS)

    fused = np.load(out / FUSED_ARRAY)
    assert fused.shape == (N, 8) and fused.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(fused, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(fused[:2], FIRST_ROWS, atol=1e-4)
    items = pq.read_table(out / FUSED_ITEMS)
    assert items.column_names == ["id", "has_image", "text_key", "image_key"]
    assert items.column("id").to_pylist() == cat.ids
    assert items.column("has_image").to_pylist() == cat.has_image.tolist()
    assert items.column("text_key").null_count == items.column("image_key").null_count == N
    exclusions = pq.read_table(out / FUSION_EXCLUSIONS)
    assert exclusions.num_rows == 0 and exclusions.schema.field("id").type == pa.string()

    # the modality mix, as the meta and the warning report it
    mix = config["modality_mix"]
    assert (mix["items"], mix["k"], mix["items_with_photo"], mix["items_without_photo"]) == (
        N, 10, 128, 112)
    assert mix["photo_share"]["fused"]["without_photo"] == pytest.approx(0.017857, abs=1e-4)
    assert mix["departure"] == pytest.approx(0.475893, abs=1e-4)
    messages = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    epochs = [m for name, _, m in messages if name == "item_embeddings.fusion.training"]
    assert epochs == [
        "fusion epoch 1/3: loss 2.67403, objective on the evaluation sample 2.33234",
        "fusion epoch 2/3: loss 2.42561, objective on the evaluation sample 2.23340",
        "fusion epoch 3/3: loss 2.52823, objective on the evaluation sample 2.21326"]
    assert [m for name, _, m in messages if name == "item_embeddings"
            and m.startswith("fuse-train")][-1].startswith(
        "fuse-train: 720/720 items (100.0%), ")  # 3 epochs of 240 items
    step_lines = [(level, m) for name, level, m in messages
                  if name == "item_embeddings.fusion.step"]
    assert step_lines[0][0] == logging.WARNING and step_lines[0][1].startswith(
        "fusion: the fused space sorts items by whether they have a photo")
    assert step_lines[-1][0] == logging.INFO
    assert step_lines[-1][1].startswith("fused 240 items (128 with images, 0 codes reused) in ")
    assert step_lines[-1][1].endswith(f"(training {config['train_time_sec']:.1f}s) -> {out}")

    # the saved model fuses the items as the step did, and says what it was trained on
    model = load_fusion_model(out)
    assert model.metadata == {
        "text_dim": TEXT_DIM, "img_dim": IMG_DIM, "hidden_dim": 32, "output_dim": 8,
        "activation": "relu", "objective": "modality-balanced-kl+norm",
        "input": "concat(l2norm(text), l2norm(image) or stand-in(text), has_image)",
        "run_id": "r-small", "seed": 0, "text_encoder_fingerprint": None,
        "image_encoder_fingerprint": None}
    assert not model.training
    text = np.load(text_dir / TXT_ARRAY)
    image = np.zeros((N, IMG_DIM), dtype=np.float32)
    img_items = pq.read_table(image_dir / IMG_ITEMS).to_pydict()
    position = {item: i for i, item in enumerate(cat.ids)}
    img = np.load(image_dir / IMG_ARRAY)
    for item, row in zip(img_items["id"], img_items["row"]):
        image[position[item]] = img[row]
    np.testing.assert_allclose(model.fuse(text, image, cat.has_image, batch_size=50), fused,
                               atol=1e-6)
    # the input rows are L2-normalised on the way in: a longer vector gives the same code
    np.testing.assert_allclose(model.fuse(3 * text, 2 * image, cat.has_image), fused, atol=1e-6)
    # the photo clusters show among the items with a photo, the text's among those without
    photo, no_photo = np.flatnonzero(cat.has_image), np.flatnonzero(~cat.has_image)
    assert _purity(fused, cat.image_label, photo) >= 0.45
    assert _purity(fused, cat.text_label, no_photo) >= 0.9

    # byte for byte again, a different seed differs
    _fuse(catalogue, tmp_path / "again")
    for name in (FUSED_ARRAY, FUSION_WEIGHTS, FUSED_ITEMS, FUSION_EXCLUSIONS):
        assert sha256_file(tmp_path / "again" / name) == sha256_file(out / name), name
    _fuse(catalogue, tmp_path / "seed1", seed=1)
    assert sha256_file(tmp_path / "seed1" / FUSED_ARRAY) != sha256_file(out / FUSED_ARRAY)


def test_a_run_that_gets_worse_keeps_the_start_and_says_so(tmp_path, catalogue, caplog):
    """A learning rate far too high: every epoch ends above the start, the start is kept, and
    the warning names the kept epoch and the three objectives."""
    caplog.set_level(logging.INFO, logger="item_embeddings")
    meta = _fuse(catalogue, tmp_path / "out", fusion_lr=5.0)
    assert meta["best_epoch"] == 0 and meta["final_loss"] == meta["initial_eval_loss"]
    assert meta["initial_eval_loss"] == pytest.approx(INITIAL, rel=1e-5)
    assert all(h["eval_loss"] > INITIAL for h in meta["loss_history"])
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "item_embeddings.fusion.training" and r.levelno == logging.WARNING]
    history = meta["loss_history"]
    assert warnings == [f"fusion: epoch 0 had the lowest objective ({INITIAL:.5f}, start "
                        f"{INITIAL:.5f}, last {history[-1]['eval_loss']:.5f}); keeping its "
                        "weights"]
    # the codes are those of the start: the model before any step
    start = _fuse(catalogue, tmp_path / "start", fusion_lr=1e-30)
    assert start["best_epoch"] in (0, 1, 2, 3)
    np.testing.assert_allclose(np.load(tmp_path / "out" / FUSED_ARRAY),
                               np.load(tmp_path / "start" / FUSED_ARRAY), atol=1e-5)


def test_a_random_start_and_more_epochs_record_what_they_did(tmp_path, catalogue):
    """init 'random': the model starts from torch's seeded initialisation, not the PCA
    projection (another start objective), and still learns the text clusters."""
    text_dir, image_dir, cat = catalogue
    meta = fuse_item_embeddings(text_dir, image_dir, tmp_path / "out",
                                PipelineParams(seed=0, **{**SMALL, "fusion_epochs": 8}),
                                init="random")
    assert meta["init"] == "random" and len(meta["loss_history"]) == 8
    assert meta["initial_eval_loss"] > INITIAL + 0.1
    assert meta["final_loss"] < meta["initial_eval_loss"] - 0.1
    assert meta["final_loss"] == min(h["eval_loss"] for h in meta["loss_history"])
    fused = np.load(tmp_path / "out" / FUSED_ARRAY)
    assert _purity(fused, cat.text_label, np.flatnonzero(~cat.has_image)) >= 0.8


def test_a_catalogue_too_small_for_fusion_min_steps_trains_more_epochs(tmp_path, catalogue,
                                                                       caplog):
    """240 items at batch 64 are 4 steps an epoch: fusion_min_steps 100 turns the 3 epochs asked
    for into 25 (100 steps), recorded, said once, and logged every second epoch (at most about
    LOGGED_EPOCHS lines)."""
    caplog.set_level(logging.INFO, logger="item_embeddings")
    meta = _fuse(catalogue, tmp_path / "out", fusion_min_steps=100)
    assert (meta["epochs"], meta["min_steps"], meta["epochs_trained"]) == (3, 100, 25)
    assert len(meta["loss_history"]) == 25 and meta["best_epoch"] == 25
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("item_embeddings")]
    assert "fusion: 240 items make 4 steps an epoch; training 25 epochs instead of 3 for " \
           "fusion_min_steps=100" in messages
    logged = [int(m.split()[2].split("/")[0]) for m in messages if m.startswith("fusion epoch ")]
    assert logged == [*range(2, 25, 2), 25]
    # a catalogue with enough steps in its epochs trains exactly fusion_epochs
    assert _fuse(catalogue, tmp_path / "enough", fusion_min_steps=12)["epochs_trained"] == 3
    assert _fuse(catalogue, tmp_path / "one more", fusion_min_steps=13)["epochs_trained"] == 4
    caplog.clear()
    assert _fuse(catalogue, tmp_path / "one batch", fusion_batch_size=512,
                 fusion_min_steps=4)["epochs_trained"] == 4
    assert "fusion: 240 items make 1 step an epoch; training 4 epochs instead of 3 for " \
           "fusion_min_steps=4" in [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("m", [1, 2, 5])
def test_mixed_pairs_are_ordered_by_the_photo_the_other_text_predicts(m):
    """For an item with a photo, the text-only items get its text softmax's values in the order
    of t·t' + v·v̂' (v̂' the photo the other item's text predicts), and the other way round:
    also with a single photo in the batch."""
    from item_embeddings.fusion.targets import Imputation, target_distribution

    gen = torch.Generator().manual_seed(m)
    b = 9
    text = torch.nn.functional.normalize(torch.randn(b, 6, generator=gen), dim=1)
    image = torch.nn.functional.normalize(torch.randn(m, 5, generator=gen), dim=1)
    imputation = Imputation.from_weight(torch.randn(6, 5, generator=gen),
                                        0.3 * torch.randn(5, generator=gen))
    target, _ = target_distribution(text, image, imputation)
    softmax = torch.softmax((text @ text.T / 0.05).fill_diagonal_(-torch.inf), dim=1)
    mixed = text[:m] @ text[m:].T + image @ imputation.predict(text[m:]).T   # [m, b - m]
    for rows, cols, evidence in ((slice(0, m), slice(m, b), mixed),
                                 (slice(m, b), slice(0, m), mixed.T)):
        got, text_values = target[rows, cols], softmax[rows, cols]
        # the same values, each row's largest on the column with the most evidence, and so on
        torch.testing.assert_close(got.sort(dim=1).values, text_values.sort(dim=1).values)
        assert torch.equal(got.argsort(dim=1, descending=True),
                           evidence.argsort(dim=1, descending=True))


def test_training_called_as_the_package_exports_it_starts_from_pca(catalogue):
    """train_fusion_model(inputs, params), without init: the PCA start (the step's objective
    before training, pinned above), the epochs asked for."""
    from item_embeddings.fusion import load_fusion_inputs, train_fusion_model

    text_dir, image_dir, _ = catalogue
    trained = train_fusion_model(load_fusion_inputs(text_dir, image_dir),
                                 PipelineParams(seed=0, **SMALL))
    assert trained.initial_eval_loss == pytest.approx(INITIAL, abs=1e-4)
    assert len(trained.history) == 3 and trained.best_epoch == 3


def test_the_steps_an_epoch_are_the_batches_training_draws():
    """PipelineParams.fusion_batches_per_epoch (what fusion_min_steps and the estimate count) is
    the number of batches an epoch of training draws, for every size and remainder."""
    from item_embeddings.fusion.training import _batch_bounds

    for batch_size in (2, 3, 64, 512):
        params = PipelineParams(fusion_batch_size=batch_size)
        for count in (*range(2, 140), 511, 512, 513, 514, 1024, 1025, 1026, 2000):
            assert params.fusion_batches_per_epoch(count) == \
                len(_batch_bounds(count, batch_size)) - 1, (batch_size, count)


def test_the_tracker_records_the_settings_and_the_metrics(tmp_path, catalogue):
    text_dir, image_dir, _ = catalogue
    tracker = LocalTracker(tmp_path / "runs", "exp")
    meta = fuse_item_embeddings(text_dir, image_dir, tmp_path / "out",
                                PipelineParams(seed=0, **SMALL), run_id="r-small",
                                tracker=tracker, input_uris=("gs://b/text", "gs://b/image"),
                                artifact_uri="gs://b/run/fused")
    record = json.loads((tmp_path / "runs" / "exp" / "fuse-modal-r-small.json").read_text())
    assert record["status"] == "COMPLETE"
    assert record["artifacts"] == {"fused_embeddings": "gs://b/run/fused"}
    assert set(meta["versions"]) == {"item-embeddings", "torch", "numpy", "safetensors"}
    assert meta["versions"]["safetensors"] == metadata.version("safetensors")
    mix = meta["modality_mix"]
    assert set(record["metrics"]) == {
        "count", "items_with_images", "image_vectors_excluded", "reused_count",
        "computed_count", "final_loss", "best_epoch", "epochs_trained", "train_time_sec",
        "wall_time_sec", "photo_share_base", "photo_share_departure", "photo_share_text_with_photo",
        "photo_share_text_without_photo", "photo_share_fused_with_photo",
        "photo_share_fused_without_photo"}
    assert record["metrics"]["photo_share_fused_without_photo"] == pytest.approx(
        mix["photo_share"]["fused"]["without_photo"])
    assert record["metrics"]["photo_share_departure"] == pytest.approx(mix["departure"])
    assert record["params"] == {
        "fusion_mode": "train", "output_dim": 8, "hidden_dim": 32, "epochs": 3, "min_steps": 0,
        "lr": 1e-3, "batch_size": 64, "seed": 0, "objective": "modality-balanced-kl+norm",
        "init": "pca",
        "text_uri": "gs://b/text", "image_uri": "gs://b/image", "previous_uri": ""}
    for key in ("count", "items_with_images", "image_vectors_excluded", "reused_count",
                "computed_count", "final_loss", "best_epoch", "epochs_trained",
                "train_time_sec", "wall_time_sec"):
        assert record["metrics"][key] == pytest.approx(meta[key]), key
    assert (meta["text_uri"], meta["image_uri"]) == ("gs://b/text", "gs://b/image")



def test_apply_reuses_unchanged_codes_and_fuses_the_rest_with_the_same_model(tmp_path,
                                                                             catalogue, caplog):
    text_dir, image_dir, cat = catalogue
    gain = np.flatnonzero(cat.has_image)[::10]
    with_content_keys(text_dir, image_dir, {cat.ids[i] for i in gain})
    first = _fuse(catalogue, tmp_path / "a")
    assert first["reused_count"] == 0
    keyed = pq.read_table(tmp_path / "a" / FUSED_ITEMS).to_pydict()
    assert keyed["text_key"] == [f"t-{i}" for i in cat.ids]
    shutil.copytree(tmp_path / "image", tmp_path / "image-b")
    shutil.rmtree(image_dir)
    write_synthetic_catalogue(tmp_path / "text-b", image_dir, n=N, image_fraction=0.5,
                              text_clusters=4, image_clusters=4, text_dim=TEXT_DIM,
                              img_dim=IMG_DIM, seed=5)
    with_content_keys(tmp_path / "text-b", image_dir)  # every photo, the text as before
    caplog.set_level(logging.INFO, logger="item_embeddings")
    meta = fuse_item_embeddings(text_dir, image_dir, tmp_path / "b", PipelineParams(
        fusion_mode="apply", previous_uri=str(tmp_path / "a"), **SMALL), run_id="r-b")
    unchanged = np.setdiff1d(np.arange(N), gain)
    assert (meta["reused_count"], meta["computed_count"]) == (len(unchanged), len(gain))
    assert meta["applied_from"] == str(tmp_path / "a")
    assert meta["trained_by_run"] == "r-small"
    assert "loss_history" not in meta and "epochs" not in meta
    before, after = np.load(tmp_path / "a" / FUSED_ARRAY), np.load(tmp_path / "b" / FUSED_ARRAY)
    assert after[unchanged].tobytes() == before[unchanged].tobytes()
    assert not np.allclose(after[gain], before[gain], atol=1e-3)
    model = load_fusion_model(tmp_path / "a")
    text = np.load(text_dir / TXT_ARRAY)
    img_items = pq.read_table(image_dir / IMG_ITEMS).to_pydict()
    img = np.load(image_dir / IMG_ARRAY)
    row_of = dict(zip(img_items["id"], img_items["row"]))
    photos = img[[row_of[cat.ids[i]] for i in gain]]
    np.testing.assert_allclose(after[gain], model.fuse(text[gain], photos), atol=1e-6)
    assert (sha256_file(tmp_path / "b" / FUSION_WEIGHTS)
            == sha256_file(tmp_path / "a" / FUSION_WEIGHTS))
    assert [r.getMessage() for r in caplog.records
            if r.name == "item_embeddings.fusion.step"][-1].startswith(
        f"fused 240 items (128 with images, {len(unchanged)} codes reused) in ")
    assert " (applying " in caplog.records[-1].getMessage()


def test_apply_refuses_a_model_of_other_dimensions_or_encoders(tmp_path, catalogue):
    text_dir, image_dir, _ = catalogue
    _fuse(catalogue, tmp_path / "a")
    write_synthetic_catalogue(tmp_path / "t2", tmp_path / "i2", n=40, text_dim=TEXT_DIM,
                              img_dim=IMG_DIM + 1, seed=1)
    apply = PipelineParams(fusion_mode="apply", previous_uri=str(tmp_path / "a"))
    with pytest.raises(FusionInputError) as error:
        fuse_item_embeddings(tmp_path / "t2", tmp_path / "i2", tmp_path / "b", apply)
    assert str(error.value) == (
        f"fusion_mode 'apply': the fusion model at {tmp_path / 'a'} takes text/image vectors "
        f"of {TEXT_DIM}/{IMG_DIM} dimensions, these inputs have {TEXT_DIM}/{IMG_DIM + 1}")
    for side, meta_file in (("text", TXT_META), ("image", IMG_META)):
        folder = text_dir if side == "text" else image_dir
        meta = json.loads((folder / meta_file).read_text())
        (folder / meta_file).write_text(json.dumps({**meta, "encoder_fingerprint": "other"}))
        with pytest.raises(FusionInputError) as error:
            fuse_item_embeddings(text_dir, image_dir, tmp_path / f"c-{side}", apply)
        assert str(error.value) == (
            f"fusion_mode 'apply': the fusion model at {tmp_path / 'a'} was trained on {side} "
            f"vectors of another {side} encoder (fingerprint None, these are other); retrain "
            "with fusion_mode 'train'")
        (folder / meta_file).write_text(json.dumps(meta))
        assert not list((tmp_path / f"c-{side}").rglob("*"))  # nothing written


def test_the_model_refuses_bad_shapes_and_rows_with_their_numbers(tmp_path):
    for name, dims in (("text_dim", (0, 4, 5, 6)), ("img_dim", (3, 0, 5, 6)),
                       ("hidden_dim", (3, 4, 0, 6)), ("output_dim", (3, 4, 5, 0))):
        with pytest.raises(ValueError, match=rf"^{name} must be >= 1, got 0$"):
            FusionMLP(*dims)
    model = FusionMLP(3, 4, 1, 1)  # 1 is a size
    assert (model.text_dim, model.img_dim, model.hidden_dim, model.output_dim) == (3, 4, 1, 1)
    model = FusionMLP(3, 4, 5, 6)
    text, image = np.ones((2, 3), np.float32), np.ones((2, 4), np.float32)
    cases = [((np.ones((2, 2)),), r"text vectors must be [n, 3], got [2, 2]"),
             ((np.ones(3),), r"text vectors must be [n, 3], got [3]"),
             ((text, np.ones((2, 5))), r"image vectors must be [2, 4], got [2, 5]"),
             ((text, np.ones(4)), r"image vectors must be [2, 4], got [4]"),
             ((text, np.ones((3, 4))), r"image vectors must be [2, 4], got [3, 4]"),
             ((text, image, np.ones(3, bool)), r"has_image must be [2], got [3]"),
             ((text, image, np.ones((2, 1), bool)), r"has_image must be [2], got [2, 1]")]
    for args, message in cases:
        with pytest.raises(ValueError) as error:
            model.fuse(*args)
        assert str(error.value) == message
    bad = np.ones((8, 3), np.float32)
    bad[[1, 2, 3, 4, 5, 7]] = 0
    with pytest.raises(ValueError) as error:
        model.fuse(bad)
    assert str(error.value) == "6 text vector(s) are non-finite or zero, at rows [1, 2, 3, 4, 5]"
    photos = np.ones((8, 4), np.float32)
    photos[[2, 6]] = np.inf
    with pytest.raises(ValueError) as error:
        model.fuse(np.ones((8, 3)), photos)
    assert str(error.value) == "2 image vector(s) are non-finite or zero, at rows [2, 6]"
    # a row without a photo may hold anything in the image array: it is not read
    has = np.ones(8, bool)
    has[[2, 6]] = False
    codes = model.fuse(np.ones((8, 3)), photos, has)
    np.testing.assert_allclose(codes[2], model.fuse(np.ones((1, 3)))[0], atol=1e-7)
    assert codes.dtype == np.float32 and codes.shape == (8, 6)


def test_a_weights_file_is_loaded_from_its_folder_or_itself_or_refused(tmp_path, catalogue):
    from safetensors import safe_open
    from safetensors.torch import save_file

    _fuse(catalogue, tmp_path / "out")
    weights = tmp_path / "out" / FUSION_WEIGHTS
    by_file, by_dir = load_fusion_model(weights), load_fusion_model(tmp_path / "out")
    with safe_open(str(weights), framework="pt") as fh:  # what a safetensors reader lists
        recorded = fh.metadata()
    assert list(recorded) == ["fusion_model"]
    assert list(json.loads(recorded["fusion_model"])) == sorted(by_dir.metadata)
    for name, tensor in by_dir.state_dict().items():
        assert torch.equal(tensor, by_file.state_dict()[name]), name
    with pytest.raises(FileNotFoundError, match=f"^no fusion weights at {tmp_path / 'x.st'}$"):
        load_fusion_model(tmp_path / "x.st")
    with pytest.raises(FileNotFoundError, match="^no fusion weights at "
                       f"{tmp_path / FUSION_WEIGHTS}$"):
        load_fusion_model(tmp_path)
    state = by_dir.state_dict()
    save_file(dict(state), str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError) as error:
        load_fusion_model(tmp_path / "bare.safetensors")
    assert str(error.value) == (f"{tmp_path / 'bare.safetensors'} is not a fusion model: "
                                "metadata lacks ['text_dim', 'img_dim', 'hidden_dim', "
                                "'output_dim']")
    architecture = json.dumps({"text_dim": TEXT_DIM, "img_dim": IMG_DIM, "hidden_dim": 32})
    save_file(dict(state), str(tmp_path / "partial.safetensors"),
              metadata={"fusion_model": architecture})
    with pytest.raises(ValueError, match=r"metadata lacks \['output_dim'\]$"):
        load_fusion_model(tmp_path / "partial.safetensors")
    # a model saved before the stand-in existed: its missing image half was zero
    old = {k: v for k, v in state.items() if not k.startswith("standin_in.")}
    architecture = json.dumps({"text_dim": TEXT_DIM, "img_dim": IMG_DIM, "hidden_dim": 32,
                               "output_dim": 8})
    save_file(old, str(tmp_path / "old.safetensors"), metadata={"fusion_model": architecture})
    loaded = load_fusion_model(tmp_path / "old.safetensors")
    assert not loaded.standin_in.weight.any() and not loaded.standin_in.bias.any()
    assert torch.equal(loaded.text_in.weight, state["text_in.weight"])


def test_two_threads_build_targets_aside_and_give_the_same_codes_each_time(tmp_path, catalogue):
    """num_threads=2: the targets are built on a second thread and the text block's gradient
    products may be computed there; the codes are byte-identical from run to run, equal to the
    one-thread run's up to rounding, and the caller's thread count is restored."""
    one = _fuse(catalogue, tmp_path / "one", fusion_epochs=1)
    text_dir, image_dir, _ = catalogue
    for name in ("a", "b"):
        meta = fuse_item_embeddings(text_dir, image_dir, tmp_path / name,
                                    PipelineParams(seed=0, **{**SMALL, "fusion_epochs": 1}),
                                    run_id="r-small", num_threads=2)
        assert meta["torch_threads"] == 2
        assert torch.get_num_threads() == 1
        assert [h["eval_loss"] for h in meta["loss_history"]] == pytest.approx(
            [h["eval_loss"] for h in one["loss_history"]], rel=1e-5)
    for file in (FUSED_ARRAY, FUSION_WEIGHTS):
        assert sha256_file(tmp_path / "a" / file) == sha256_file(tmp_path / "b" / file)
    np.testing.assert_allclose(np.load(tmp_path / "a" / FUSED_ARRAY),
                               np.load(tmp_path / "one" / FUSED_ARRAY), atol=1e-5)


def test_the_imputation_fusion_config_records(tmp_path):
    """What ``fusion_config.json`` says of the photo each text predicts: too few photos to fit
    (under 10) impute the mean photo; photos that show the text's cluster are predicted well
    (a weak ridge, most of their variance explained)."""
    params = PipelineParams(seed=0, **SMALL)
    few = write_synthetic_catalogue(tmp_path / "t1", tmp_path / "i1", n=N, image_fraction=0.03,
                                    text_clusters=4, image_clusters=4, text_dim=TEXT_DIM,
                                    img_dim=IMG_DIM, seed=5)
    meta = fuse_item_embeddings(tmp_path / "t1", tmp_path / "i1", tmp_path / "o1", params)
    assert int(few.has_image.sum()) == 9
    assert meta["imputation"] == {"ridge_alpha": None, "cv_r2": None, "items": 9, "rank": 1,
                                  "kept": 1.0}
    assert meta["initial_eval_loss"] == pytest.approx(1.4127120, rel=1e-5)
    assert meta["final_loss"] == pytest.approx(1.3404339, rel=1e-4)
    write_synthetic_catalogue(tmp_path / "t2", tmp_path / "i2", n=N, image_fraction=0.5,
                              text_clusters=4, image_clusters=4, text_dim=TEXT_DIM,
                              img_dim=IMG_DIM, seed=5, noise=0.5, image_noise=0.5,
                              photos_show_text_cluster=True)
    meta = fuse_item_embeddings(tmp_path / "t2", tmp_path / "i2", tmp_path / "o2", params)
    assert meta["imputation"] == {"ridge_alpha": 0.01, "items": 128, "rank": 16, "kept": 1.0,
                                  "cv_r2": pytest.approx(0.7011599, abs=1e-5)}
    assert meta["initial_eval_loss"] == pytest.approx(0.4391187, rel=1e-5)
    assert meta["final_loss"] == pytest.approx(0.4260147, rel=1e-4)


def test_an_imputation_keeps_rank_64_and_says_how_much_it_kept():
    from item_embeddings.fusion.targets import fit_imputation

    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(300, 80), dim=1)
    image = torch.nn.functional.normalize(text[:, :70] + 0.5 * torch.randn(300, 70), dim=1)
    imputation = fit_imputation(text, image)
    assert imputation.summary() == {"ridge_alpha": 0.1, "items": 300, "rank": 64,
                                    "cv_r2": pytest.approx(0.0053979, abs=1e-5),
                                    "kept": pytest.approx(0.9987109, abs=1e-6)}
    singular = torch.linalg.svdvals(imputation.weight.double())
    assert int((singular > 1e-6 * singular[0]).sum()) == 64


def test_a_temperature_below_the_fixed_shifts_floor_is_refused():
    from item_embeddings.fusion.model import loss_and_gradients
    from item_embeddings.fusion.targets import no_imputation, target_distribution, training_batch

    text = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    image = torch.nn.functional.normalize(torch.randn(2, 3), dim=1)
    for call in (lambda tau: target_distribution(text, image, no_imputation(4, 3), tau),
                 lambda tau: loss_and_gradients(FusionMLP(4, 3, 5, 2), training_batch(
                     text, image, no_imputation(4, 3)), tau)):
        with pytest.raises(ValueError) as error:
            call(0.0249)
        assert str(error.value) == ("tau must be >= 0.025 (the softmax uses a fixed shift), "
                                    "got 0.0249")
        call(0.025)


def test_the_step_runs_one_torch_thread_below_20000_items_unless_told():
    from item_embeddings.fusion.training import torch_threads

    torch.set_num_threads(2)
    for asked, count, used in ((None, 19_999, 1), (None, 20_000, 2), (3, 10, 3), (1, 10**6, 1)):
        with torch_threads(asked, count) as threads:
            assert threads == used == torch.get_num_threads(), (asked, count)
        assert torch.get_num_threads() == 2


def test_a_last_batch_of_one_item_joins_the_one_before(tmp_path):
    """129 items in batches of 64: the last item alone would have no pair to compare with (a
    NaN objective); it trains with the batch before it."""
    write_synthetic_catalogue(tmp_path / "text", tmp_path / "image", n=129, text_clusters=4,
                              image_clusters=4, text_dim=TEXT_DIM, img_dim=IMG_DIM, seed=5)
    meta = fuse_item_embeddings(tmp_path / "text", tmp_path / "image", tmp_path / "out",
                                PipelineParams(seed=0, **SMALL))
    assert all(np.isfinite(list(h.values())).all() for h in meta["loss_history"])
    assert np.isfinite(meta["initial_eval_loss"]) and meta["best_epoch"] == 3
    assert np.isfinite(np.load(tmp_path / "out" / FUSED_ARRAY)).all()
    # a last batch of two items trains as a batch of its own (the objective, pinned)
    write_synthetic_catalogue(tmp_path / "text2", tmp_path / "image2", n=130, text_clusters=4,
                              image_clusters=4, text_dim=TEXT_DIM, img_dim=IMG_DIM, seed=5)
    meta = fuse_item_embeddings(tmp_path / "text2", tmp_path / "image2", tmp_path / "out2",
                                PipelineParams(seed=0, **SMALL))
    assert [h["loss"] for h in meta["loss_history"]] == pytest.approx(LAST_BATCH_OF_TWO,
                                                                       rel=1e-4)


def test_catalogues_over_one_scan_chunk_are_checked_and_fused_row_by_row(tmp_path):
    """8,300 items (more than the 8,192 rows read or fused at a time): a bad text row in the
    second chunk is named; an unusable photo there is excluded; 'apply' copies the unchanged
    codes and fuses the changed items of both chunks into their own rows."""
    n, dims = 8300, {"text_dim": 8, "img_dim": 6, "text_clusters": 4, "image_clusters": 4}
    cat = write_synthetic_catalogue(tmp_path / "text", tmp_path / "image", n=n, seed=2, **dims)
    params = PipelineParams(seed=0, fusion_epochs=1, fusion_batch_size=256,
                            fusion_hidden_dim=8, fusion_output_dim=4)
    photos = np.flatnonzero(cat.has_image)
    gain = np.concatenate([photos[:3], photos[-3:]])
    assert gain[-1] > 8192
    with_content_keys(tmp_path / "text", tmp_path / "image", {cat.ids[i] for i in gain})
    fuse_item_embeddings(tmp_path / "text", tmp_path / "image", tmp_path / "a", params)

    write_synthetic_catalogue(tmp_path / "text-b", tmp_path / "image-b", n=n, seed=2, **dims)
    with_content_keys(tmp_path / "text-b", tmp_path / "image-b")
    items = pq.read_table(tmp_path / "image-b" / IMG_ITEMS).to_pydict()
    row_of = dict(zip(items["id"], items["row"]))
    img = np.load(tmp_path / "image-b" / IMG_ARRAY)
    broken = photos[-10]  # a photo in the second chunk of the text order that cannot be used
    img[row_of[cat.ids[broken]]] = np.nan
    np.save(tmp_path / "image-b" / IMG_ARRAY, img)
    meta = fuse_item_embeddings(tmp_path / "text-b", tmp_path / "image-b", tmp_path / "b",
                                PipelineParams(fusion_mode="apply",
                                               previous_uri=str(tmp_path / "a")))
    assert meta["image_vectors_excluded"] == 1
    assert meta["modality_mix"]["items"] == 4096  # the mix's sample, at most 4,096 items
    assert pq.read_table(tmp_path / "b" / FUSION_EXCLUSIONS).column("id").to_pylist() == [
        cat.ids[broken]]
    changed = np.append(gain, broken)
    unchanged = np.setdiff1d(np.arange(n), changed)
    assert (meta["reused_count"], meta["computed_count"]) == (len(unchanged), len(changed))
    before, after = np.load(tmp_path / "a" / FUSED_ARRAY), np.load(tmp_path / "b" / FUSED_ARRAY)
    assert after[unchanged].tobytes() == before[unchanged].tobytes()
    model = load_fusion_model(tmp_path / "a")
    text = np.load(tmp_path / "text-b" / TXT_ARRAY)
    np.testing.assert_allclose(after[gain], model.fuse(
        text[gain], img[[row_of[cat.ids[i]] for i in gain]]), atol=1e-6)
    np.testing.assert_allclose(after[broken], model.fuse(text[[broken]])[0], atol=1e-6)

    text[8195, 1] = np.inf
    np.save(tmp_path / "text-b" / TXT_ARRAY, text)
    with pytest.raises(FusionInputError, match=r"^1 text vector\(s\) in .* are non-finite or "
                       r"zero, e.g. ids \['item-0008195'\]$"):
        fuse_item_embeddings(tmp_path / "text-b", tmp_path / "image-b", tmp_path / "c")


def test_apply_without_content_keys_fuses_every_item_and_train_ignores_the_previous_set(
        tmp_path, catalogue):
    """Sets written before content keys existed: 'apply' cannot tell unchanged items, so it
    fuses every item with the previous model. 'train' with a previous_uri trains afresh."""
    text_dir, image_dir, cat = catalogue
    _fuse(catalogue, tmp_path / "a")
    meta = fuse_item_embeddings(text_dir, image_dir, tmp_path / "b", PipelineParams(
        fusion_mode="apply", previous_uri=str(tmp_path / "a")))
    assert (meta["reused_count"], meta["computed_count"]) == (0, N)
    np.testing.assert_allclose(np.load(tmp_path / "b" / FUSED_ARRAY),
                               np.load(tmp_path / "a" / FUSED_ARRAY), atol=1e-6)
    again = _fuse(catalogue, tmp_path / "c", previous_uri=str(tmp_path / "a"))
    assert again["previous_uri"] == str(tmp_path / "a") and again["reused_count"] == 0
    assert "applied_from" not in again and again["best_epoch"] == 3
    assert sha256_file(tmp_path / "c" / FUSED_ARRAY) == sha256_file(tmp_path / "a" / FUSED_ARRAY)


def _write_npy(path, array):
    np.save(path, array)


@pytest.mark.parametrize("damage, message", [
    (lambda t, i: (t / TXT_META).write_text("{not json"),
     r"^{t}/txt_meta.json is not valid JSON: Expecting property name enclosed in double quotes: "
     r"line 1 column 2 \(char 1\)$"),
    (lambda t, i: (t / TXT_ARRAY).unlink(), r"^missing {t}/txt.npy$"),
    (lambda t, i: (i / IMG_ITEMS).unlink(), r"^missing {i}/img_items.parquet$"),
    (lambda t, i: (t / TXT_ARRAY).write_bytes(b"\x93NUMPY garbage"),
     r"^{t}/txt.npy is not a readable .npy file: "),
    (lambda t, i: _write_npy(t / TXT_ARRAY, np.ones((N, 24))),
     r"^{t}/txt.npy must be a 2-D float32 array, got shape \[240, 24\] dtype float64$"),
    (lambda t, i: _write_npy(i / IMG_ARRAY, np.ones(5, np.float32)),
     r"^{i}/img.npy must be a 2-D float32 array, got shape \[5\] dtype float32$"),
    (lambda t, i: pq.write_table(pq.read_table(i / IMG_ITEMS).drop(["row"]),
                                 i / IMG_ITEMS),
     r"^{i}/img_items.parquet has no column\(s\) \['row'\]; columns present: \['id', 'url'\]$"),
    (lambda t, i: (t / TXT_META).write_text(json.dumps({"embed_dim": 24, "count": 7})),
     r"^count mismatch: {t}/txt.npy has 240 rows, txt_items.parquet 240, txt_meta.json "
     r"count 7$"),
    (lambda t, i: (i / IMG_META).write_text(json.dumps({"embed_dim": 16, "count": 7})),
     r"^count mismatch: {i}/img.npy has 128 rows, img_items.parquet 128, img_meta.json "
     r"count 7$"),
    (lambda t, i: pq.write_table(pq.read_table(i / IMG_ITEMS).set_column(
        2, "row", pa.array([k + 0.5 for k in range(128)])), i / IMG_ITEMS),
     r"^img_items.parquet column 'row' must be non-null integers, got double with 0 null\(s\)$"),
    (lambda t, i: pq.write_table(pq.read_table(i / IMG_ITEMS).set_column(
        2, "row", pa.array([None] + list(range(1, 128)), pa.int64())), i / IMG_ITEMS),
     r"^img_items.parquet column 'row' must be non-null integers, got int64 with 1 null\(s\)$"),
    (lambda t, i: pq.write_table(pq.read_table(i / IMG_ITEMS).set_column(
        2, "row", pa.array([-1] + list(range(1, 128)), pa.int64())), i / IMG_ITEMS),
     r"^img_items.parquet: 1 row index\(es\) outside img.npy \[0, 128\), e.g. ids "
     r"\['item-\d+'\]$"),
    (lambda t, i: pq.write_table(pq.read_table(i / IMG_ITEMS).set_column(
        2, "row", pa.array([128] + list(range(1, 128)), pa.int64())), i / IMG_ITEMS),
     r"^img_items.parquet: 1 row index\(es\) outside img.npy \[0, 128\)"),
])
def test_damaged_inputs_are_refused_word_for_word(tmp_path, catalogue, damage, message):
    text_dir, image_dir, _ = catalogue
    damage(text_dir, image_dir)
    with pytest.raises(FusionInputError, match=message.format(t=text_dir, i=image_dir)):
        fuse_item_embeddings(text_dir, image_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_one_item_is_refused_and_two_are_fused(tmp_path):
    for n in (1, 2):
        write_synthetic_catalogue(tmp_path / f"t{n}", tmp_path / f"i{n}", n=n, text_dim=4,
                                  img_dim=3, image_fraction=1.0, seed=1)
    with pytest.raises(FusionInputError) as error:
        fuse_item_embeddings(tmp_path / "t1", tmp_path / "i1", tmp_path / "o1")
    assert str(error.value) == (f"{tmp_path / 't1' / TXT_ARRAY} has 1 item(s); fusion needs "
                                "at least 2")
    meta = fuse_item_embeddings(tmp_path / "t2", tmp_path / "i2", tmp_path / "o2",
                                PipelineParams(fusion_output_dim=2, fusion_hidden_dim=4))
    assert meta["count"] == 2 and np.load(tmp_path / "o2" / FUSED_ARRAY).shape == (2, 2)


def test_what_the_inputs_record_failures_exclusions_and_keys(tmp_path, catalogue, caplog):
    from item_embeddings.fusion import load_fusion_inputs
    from item_embeddings.fusion.inputs import fused_row_keys

    text_dir, image_dir, cat = catalogue
    assert load_fusion_inputs(text_dir, image_dir).image_failures == 0
    pq.write_table(pa.table({"id": ["x", "y"], "url": ["u", "v"]}),
                   image_dir / IMG_FAILURES)
    assert load_fusion_inputs(text_dir, image_dir).image_failures == 2
    (image_dir / IMG_FAILURES).unlink()
    assert load_fusion_inputs(text_dir, image_dir).image_failures is None
    # keys: only when both steps wrote them; an item without a usable photo has none
    ids = pq.read_table(text_dir / TXT_ITEMS).column("id").to_pylist()
    pq.write_table(pa.table({"id": ids, "key": [f"t-{i}" for i in ids]}), text_dir / TXT_ITEMS)
    inputs = load_fusion_inputs(text_dir, image_dir)
    assert inputs.text_keys is None and inputs.image_keys is None and inputs.row_keys() is None
    items = pq.read_table(image_dir / IMG_ITEMS)
    listed = items.column("id").to_pylist()
    pq.write_table(items.append_column("key", pa.array([f"i-{i}" for i in listed])),
                   image_dir / IMG_ITEMS)
    img = np.load(image_dir / IMG_ARRAY)
    img[items.column("row").to_pylist()[:6]] = 0  # six photos that cannot be used
    np.save(image_dir / IMG_ARRAY, img)
    caplog.set_level(logging.WARNING, logger="item_embeddings")
    inputs = load_fusion_inputs(text_dir, image_dir)
    assert [r.getMessage() for r in caplog.records] == [
        "6 image vector(s) are non-finite or zero; fused as items without an image (listed in "
        f"fusion_exclusions.parquet), e.g. {listed[:5]}"]
    assert inputs.excluded_ids == listed[:6] and inputs.items_with_images == 122
    keys = inputs.row_keys().to_pylist()
    has = {item: k < 0 for item, k in zip(ids, inputs.image_row)}
    assert keys == [f"t-{i}|-" if has[i] else f"t-{i}|i-{i}" for i in ids]
    assert fused_row_keys(pa.array(["a", "b"]), pa.array([None, "c"])).to_pylist() == [
        "a|-", "b|c"]
    assert fused_row_keys(pa.array(["a"]), None) is None


def test_meta_files_without_a_count_are_read_by_their_arrays(tmp_path, catalogue):
    """``count`` in txt_meta.json / img_meta.json is checked when it is there; a meta file
    without one (only ``embed_dim``) is not refused."""
    text_dir, image_dir, _ = catalogue
    for meta_file in (text_dir / TXT_META, image_dir / IMG_META):
        meta = json.loads(meta_file.read_text())
        meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "count"}))
    meta = _fuse(catalogue, tmp_path / "out")
    assert (meta["count"], meta["items_with_images"]) == (N, 128)


def test_the_synthetic_catalogue_is_written_like_the_steps_outputs(tmp_path):
    """bench/bench_fusion.py writes it into folders that may not exist yet or hold an earlier
    catalogue; its img_failures.parquet has the image step's columns and types."""
    from item_embeddings.image.shards import shard_schema

    text_dir, image_dir = tmp_path / "a" / "text", tmp_path / "b" / "c" / "image"
    for seed in (1, 2):
        cat = write_synthetic_catalogue(text_dir, image_dir, n=20, text_dim=4, img_dim=3,
                                        seed=seed)
    assert pq.read_table(text_dir / TXT_ITEMS).column("id").to_pylist() == cat.ids
    failures = pq.read_table(image_dir / IMG_FAILURES)
    assert failures.num_rows == 0
    step = shard_schema(pa.string(), 3)
    assert [(f.name, f.type) for f in failures.schema] == [
        (name, step.field(name).type) for name in ("id", "url", "reason", "http_status",
                                                   "attempts")]
    assert pq.read_table(image_dir / IMG_ITEMS).schema.field("row").type == pa.int64()
    m = int(cat.has_image.sum())
    assert json.loads((image_dir / IMG_META).read_text()) == {"embed_dim": 3, "count": m,
                                                              "run_id": "synthetic"}
    assert json.loads((text_dir / TXT_META).read_text()) == {
        "embed_dim": 4, "count": 20, "run_id": "synthetic", "normalized": True}
    # the default seed is 0
    write_synthetic_catalogue(tmp_path / "d" / "text", tmp_path / "d" / "image", n=20,
                              text_dim=4, img_dim=3)
    write_synthetic_catalogue(tmp_path / "z" / "text", tmp_path / "z" / "image", n=20,
                              text_dim=4, img_dim=3, seed=0)
    for name in ("text/" + TXT_ARRAY, "image/" + IMG_ARRAY):
        assert sha256_file(tmp_path / "d" / name) == sha256_file(tmp_path / "z" / name)


def test_without_a_regression_the_missing_photo_is_the_mean_photo_or_zero():
    from item_embeddings.fusion.targets import no_imputation

    plain = no_imputation(4, 3)
    assert plain.summary() == {"ridge_alpha": None, "cv_r2": None, "items": 0, "rank": 1,
                               "kept": 1.0}
    text = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    assert torch.equal(plain.predict(text), torch.zeros(5, 3))
    mean = torch.tensor([0.5, -0.25, 1.0], dtype=torch.float64)
    with_mean = no_imputation(4, 3, mean, items=7)
    assert with_mean.summary()["items"] == 7 and with_mean.offset.dtype == torch.float32
    np.testing.assert_array_equal(with_mean.predict(text).numpy(),
                                  np.tile(mean.float().numpy(), (5, 1)))


@pytest.mark.parametrize("preserve", [0.0, 0.5])
def test_the_preservation_weight_a_batch_is_built_with_is_the_one_its_loss_uses(preserve):
    """training_batch(..., preserve=w): the objective is KL(P || Q) plus w times the KL within
    the anchor's own group, row means (docs/fusion.md); w = 0 leaves the plain KL."""
    from item_embeddings.fusion.model import loss_and_gradients
    from item_embeddings.fusion.targets import Imputation, target_distribution, training_batch

    torch.manual_seed(3)
    b, m = 10, 4
    text = torch.nn.functional.normalize(torch.randn(b, 6, dtype=torch.float64), dim=1)
    image = torch.nn.functional.normalize(torch.randn(m, 5, dtype=torch.float64), dim=1)
    imputation = Imputation.from_weight(0.3 * torch.randn(6, 5, dtype=torch.float64),
                                        0.2 * torch.randn(5, dtype=torch.float64))
    batch = training_batch(text, image, imputation, preserve=preserve)
    assert batch.preserve == preserve
    model = FusionMLP(6, 5, hidden_dim=7, output_dim=4).double()
    parts = loss_and_gradients(model, batch)

    target, _ = target_distribution(text, image, imputation)
    with torch.no_grad():
        z, _ = model(text, image, torch.arange(m))
    logits = (z @ z.T / 0.05).fill_diagonal_(-torch.inf)
    own = (torch.arange(b) < m).unsqueeze(1) == (torch.arange(b) < m)
    own_target = torch.where(own, target, 0.0)
    own_target = own_target / own_target.sum(dim=1, keepdim=True)
    kl = (torch.special.xlogy(target, target)
          - target * torch.log_softmax(logits, dim=1).nan_to_num(neginf=0.0)).sum(dim=1).mean()
    own_logits = logits.masked_fill(~own, -torch.inf)
    own_kl = (torch.special.xlogy(own_target, own_target) - own_target * torch.log_softmax(
        own_logits, dim=1).nan_to_num(neginf=0.0)).sum(dim=1).mean()
    assert parts["sim_loss"] == pytest.approx(float(kl + preserve * own_kl), abs=1e-9)


def test_the_model_records_both_encoders_and_apply_trusts_only_what_was_verified(
        tmp_path, catalogue):
    """The weights name the text and image encoders they were trained on (an 'apply' with the
    same encoders fuses). Handed what the run's first task verified, 'apply' checks that the
    files are still those versions instead of hashing them: a weights file rewritten since
    (the same bytes, a new version) is refused."""
    import os

    from item_embeddings.incremental import PreviousSetError, VerifiedSet
    from item_embeddings.ranged import file_version

    text_dir, image_dir, _ = catalogue
    for folder, meta_file, fingerprint in ((text_dir, TXT_META, "txt-fp"),
                                           (image_dir, IMG_META, "img-fp")):
        meta = json.loads((folder / meta_file).read_text())
        (folder / meta_file).write_text(json.dumps({**meta, "encoder_fingerprint": fingerprint}))
    _fuse(catalogue, tmp_path / "a")
    metadata = load_fusion_model(tmp_path / "a").metadata
    assert (metadata["text_encoder_fingerprint"], metadata["image_encoder_fingerprint"]) == (
        "txt-fp", "img-fp")
    root = tmp_path / "a"
    names = [FUSED_ARRAY, FUSED_ITEMS, FUSION_EXCLUSIONS, FUSION_WEIGHTS, FUSION_CONFIG]
    files = {}
    for name in names:
        version = file_version(str(root / name))
        files[name] = {"size": version.size, "sha256": sha256_file(root / name),
                       "version": version.version}
    verified = VerifiedSet(str(root), str(root), files)
    apply = PipelineParams(fusion_mode="apply", previous_uri=str(root))
    meta = fuse_item_embeddings(text_dir, image_dir, tmp_path / "b", apply, verified=verified)
    assert meta["computed_count"] == N
    stat = (root / FUSION_WEIGHTS).stat()
    os.utime(root / FUSION_WEIGHTS, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(PreviousSetError, match=f"^previous output set {root}: "
                       f"{FUSION_WEIGHTS} changed since this run verified it"):
        fuse_item_embeddings(text_dir, image_dir, tmp_path / "c", apply, verified=verified)
