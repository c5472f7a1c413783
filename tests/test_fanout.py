"""Fan-out: planning (deterministic, the global image cap, empty shards, bounds) and the merges
(the single-run files; missing, duplicated or unplanned shards refused)."""

import json
import logging
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import catalogue, write_items
from item_embeddings.config import ConfigError, PipelineParams
from item_embeddings.fanout import (
    WHOLE_TABLE,
    MergeError,
    Shard,
    ShardPlan,
    merge_image_shards,
    merge_text_shards,
    plan_shards,
    worker_shards,
)
from item_embeddings.image.selection import Selection, iter_selected
from item_embeddings.items import ItemColumns
from item_embeddings.outputs import (
    IMG_ARRAY,
    IMG_FAILURES,
    IMG_ITEMS,
    IMG_META,
    TXT_ARRAY,
    TXT_ITEMS,
    TXT_META,
)
from item_embeddings.text import embed_items_text


def _items(tmp_path, n=23):
    cat = catalogue(n)
    return write_items(tmp_path / "items.parquet", cat), cat


def test_plan_is_deterministic_contiguous_and_balanced(tmp_path):
    items, _ = _items(tmp_path)
    params = PipelineParams(shards=5, max_parallel_shards=2, max_items=0)
    plan = plan_shards(str(items), params)
    assert plan == plan_shards(str(items), params)
    assert [(s.start, s.stop) for s in plan.shards] == [(0, 4), (4, 9), (9, 13), (13, 18),
                                                         (18, 23)]
    assert plan.rows == 23 and all(s.image_quota is None for s in plan.shards)
    assert [s.image_rows for s in plan.shards] == [s.url_rows for s in plan.shards] == \
        [2, 4, 2, 4, 3]  # no cap: every URL row (every third row has none)
    # two workers: 0 runs shards 0, 2, 4 and 1 runs 1, 3
    assert [[s.index for s in worker_shards(w)] for w in plan.workers] == [[0, 2, 4], [1, 3]]
    assert ShardPlan.from_workers(plan.workers).shards == plan.shards


def test_the_image_cap_selects_the_items_one_run_selects(tmp_path):
    items, _ = _items(tmp_path, 40)
    columns = ItemColumns()
    whole = [i for i, _ in iter_selected(str(items), columns, 9, Selection())]
    plan = plan_shards(str(items), PipelineParams(shards=4, max_items=9))
    sharded = []
    for shard in plan.shards:
        sharded += [i for i, _ in iter_selected(str(items), columns, shard.image_quota,
                                                Selection(), shard.rows)]
    assert sharded == whole and len(whole) == 9
    assert [s.image_quota for s in plan.shards][-1] == 0  # the cap is used up before the end


def test_image_workers_start_only_where_the_capped_images_are(tmp_path):
    """The cap puts every selected image in the first shards: only that many image workers
    (one T4 each) start, dealt by their image rows; every shard still has one image worker
    (an empty one writes empty outputs, so the merge finds every shard), and the text
    workers are one per shard with rows."""
    items, cat = _items(tmp_path, 40)
    plan = plan_shards(str(items), PipelineParams(shards=8, max_parallel_shards=6, max_items=9))
    quotas = [s.image_quota for s in plan.shards]
    # each shard's URL rows, counted by the plan: a worker reads nothing of a shard without
    # images to select (its quota used up), yet records its counts
    assert [s.url_rows for s in plan.shards] == [
        sum(u is not None for u in cat["image_url"][s.start:s.stop]) for s in plan.shards]
    assert [s.image_rows for s in plan.shards] == quotas
    with_images = [s.index for s in plan.shards if s.image_quota]
    assert 1 <= len(with_images) < 6 and quotas[-1] == 0
    assert len(plan.image_workers) == len(with_images)
    dealt = [[s.index for s in worker_shards(w)] for w in plan.image_workers]
    assert sorted(i for shards in dealt for i in shards) == list(range(8))
    # each image worker has exactly one shard with images, the largest first
    assert sorted(sum(1 for i in shards if quotas[i]) for shards in dealt) == \
        [1] * len(with_images)
    assert len(plan.workers) == 6  # text: min(shards with rows, max_parallel_shards)
    assert ShardPlan.from_workers(plan.image_workers).shards == plan.shards


def _three_items_in_five_shards(tmp_path):
    """Worker output of 3 items in 5 shards (two empty), the plan, and the merged meta."""
    items, cat = _items(tmp_path, 3)
    plan = plan_shards(str(items), PipelineParams(shards=5, max_parallel_shards=5))
    assert [s.stop - s.start for s in plan.shards] == [0, 1, 0, 1, 1]
    from item_embeddings.text import load_text_encoder

    encoder = load_text_encoder(batch_size=8)
    part = tmp_path / "worker"
    for shard in plan.shards:
        embed_items_text(str(items), part / shard.dirname, rows=shard.rows, encoder=encoder)
    from item_embeddings.tracking import LocalTracker

    tracker = LocalTracker(tmp_path / "runs", "fanout")
    meta = merge_text_shards([part], plan, tmp_path / "merged", PipelineParams(), run_id="t1",
                             tracker=tracker)
    assert meta["count"] == 3 and meta["fanout_shards"] == 5
    record = json.loads((tmp_path / "runs" / "fanout" / "embed-text-t1.json").read_text())
    assert record["params"]["items_uri"] == str(items) and record["params"]["shards"] == 5
    assert set(meta["versions"]) == {"item-embeddings", "numpy", "pyarrow"}  # no encoder
    assert pq.read_table(tmp_path / "merged" / TXT_ITEMS).column("id").to_pylist() == \
        cat["asin"]
    whole = embed_items_text(str(items), tmp_path / "whole", encoder=encoder)
    np.testing.assert_allclose(np.load(tmp_path / "merged" / TXT_ARRAY),
                               np.load(tmp_path / "whole" / TXT_ARRAY), atol=1e-6)
    return part, plan, meta, whole


def test_more_shards_than_items_gives_empty_shards_that_merge(tmp_path):
    part, plan, meta, whole = _three_items_in_five_shards(tmp_path)
    for key in ("count", "empty_text_count", "null_title_count", "encoder_fingerprint"):
        assert meta[key] == whole[key], key
    assert meta["rows"] == [0, 3] and meta["batch_size"] == PipelineParams().text_batch_size
    assert meta["throughput_items_per_sec"] == pytest.approx(3 / meta["encode_time_sec"])
    # an incremental run: the rate counts the rows encoded, not those reused
    metas = {s.dirname: json.loads((part / s.dirname / TXT_META).read_text())
             for s in plan.shards}
    for name, reused in (("shard-00001", 1), ("shard-00003", 0), ("shard-00004", 1)):
        metas[name].update(encoded_count=1 - reused, reused_count=reused)
        (part / name / TXT_META).write_text(json.dumps(metas[name]))
    again = merge_text_shards([part], plan, tmp_path / "again", PipelineParams())
    assert (again["encoded_count"], again["reused_count"]) == (1, 2)
    assert again["throughput_items_per_sec"] == pytest.approx(1 / again["encode_time_sec"])
    for name, shard_meta in metas.items():  # every row reused: nothing encoded, no time
        shard_meta.update(encoded_count=0, reused_count=shard_meta["count"], encode_time_sec=0.0)
        (part / name / TXT_META).write_text(json.dumps(shard_meta))
    reused = merge_text_shards([part], plan, tmp_path / "reused", PipelineParams())
    assert (reused["throughput_items_per_sec"], reused["reused_count"]) == (0.0, 3)


def test_merge_refuses_missing_duplicated_and_unplanned_shards(tmp_path):
    import shutil

    part, plan, _, _ = _three_items_in_five_shards(tmp_path)
    (part / "shard-00003" / TXT_META).unlink()  # a worker that died before placing it
    with pytest.raises(MergeError, match=r"shard\(s\) \[3\] of 5 have no complete txt_meta"):
        merge_text_shards([part], plan, tmp_path / "m1", PipelineParams())
    other = tmp_path / "other"
    shutil.copytree(part / "shard-00001", other / "shard-00001")
    with pytest.raises(MergeError, match="shard 1 is in two worker outputs"):
        merge_text_shards([part, other], plan, tmp_path / "m2", PipelineParams())
    shutil.copytree(part / "shard-00001", part / "shard-00007")
    (part / "shard-00003" / TXT_META).write_text(json.dumps({}))
    with pytest.raises(MergeError, match=r"^shard folder\(s\) \[7\] are not in the plan$"):
        merge_text_shards([part], plan, tmp_path / "m3", PipelineParams())
    assert not (tmp_path / "m1" / TXT_META).exists()


@pytest.mark.parametrize("values, message", [
    ({"shards": 0}, "'shards' must be >= 1 and <= 10000, got 0"),
    ({"shards": 10_001}, "'shards' must be >= 1 and <= 10000"),
    ({"max_parallel_shards": 101}, "'max_parallel_shards' must be >= 1 and <= 100, got 101"),
    ({"shards": 2, "image_pretrained": "none"}, "random weights in every worker"),
])
def test_bad_fanout_settings_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        PipelineParams(**values)


def test_a_worker_without_a_plan_runs_the_whole_table():
    (shard,) = worker_shards(WHOLE_TABLE)
    assert shard == Shard(0, 0, None, None) and shard.rows is None
    # loop items come back from KFP with float numbers
    assert Shard.from_dict({"index": 2.0, "start": 10.0, "stop": 20.0, "image_quota": -1}) == \
        Shard(2, 10, 20, None)
    assert shard.image_rows is None  # not counted: the step reads the table
    counted = Shard(2, 10, 20, None, 7)  # no cap: every URL row is selected
    assert Shard.from_dict(json.loads(json.dumps(counted.as_dict()))) == counted
    assert (counted.image_rows, Shard(2, 10, 20, 0, 7).image_rows) == (7, 0)


@pytest.mark.parametrize("rows", [(20, 24), (5, 4), (-1, 3)])
def test_a_shard_outside_the_table_is_refused_by_both_steps(tmp_path, rows, monkeypatch):
    """A plan of another table (23 rows here) fails before any model loads, in either step."""
    from item_embeddings.image import embed_items_images
    from item_embeddings.image import step as image_step
    from item_embeddings.items import ItemsError
    from item_embeddings.text import step as text_step

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(text_step, "load_text_encoder", no_model)
    monkeypatch.setattr(image_step, "load_image_encoder", no_model)
    items, _ = _items(tmp_path)
    message = rf"rows \[{rows[0]}, {rows[1]}\) are not within the table's 23 rows"
    with pytest.raises(ItemsError, match=message):
        embed_items_text(str(items), tmp_path / "txt", rows=rows)
    with pytest.raises(ItemsError, match=message):
        embed_items_images(str(items), tmp_path / "img", rows=rows, quota=None)
    assert not (tmp_path / "txt").exists() and not (tmp_path / "img").exists()


def test_a_retried_worker_runs_only_the_shards_not_placed_whole(tmp_path, caplog):
    """A shard is left out only when an earlier attempt placed it whole for the same rows (the
    log says so): a folder without its meta file (killed while copying) or with other rows
    (another plan) is run again."""
    from types import SimpleNamespace

    from item_embeddings.components.shared import pending_shards

    output = SimpleNamespace(path=str(tmp_path))
    shards = [Shard(i, 10 * i, 10 * i + 10, None) for i in range(4)]
    for shard, rows in ((shards[0], [0, 10]), (shards[2], [0, 5])):  # 2: another plan's rows
        (tmp_path / shard.dirname).mkdir()
        (tmp_path / shard.dirname / TXT_META).write_text(json.dumps({"rows": rows}))
    (tmp_path / shards[3].dirname).mkdir()  # 3: no meta file, the copy did not finish
    with caplog.at_level(logging.INFO, logger="item_embeddings.components.shared"):
        assert [s.index for s in pending_shards(output, shards, TXT_META)] == [1, 2, 3]
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("item_embeddings.components.shared",
         f"{shards[0].dirname} was placed by an earlier attempt: skipped")]
    whole = Shard(0, 0, None, None)  # a worker without a plan: the whole table, rows None
    alone = tmp_path / "alone"
    (alone / whole.dirname).mkdir(parents=True)
    (alone / whole.dirname / TXT_META).write_text(json.dumps({"rows": None}))
    assert list(pending_shards(SimpleNamespace(path=str(alone)), [whole], TXT_META)) == []


def _image_shards(tmp_path, tiny_model):
    """Nine items (one without a URL, a 404 and an HTML page among them) in three shards with
    a cap of six images, each shard run by the real image step against a loopback host; and
    the same items run whole."""
    import pyarrow as pa

    from image_server import ImageServer, make_images
    from item_embeddings.image import embed_items_images, load_image_encoder
    from item_embeddings.image.download import DownloadConfig

    config, checkpoint, _ = tiny_model
    params = PipelineParams(image_model=str(config), image_pretrained=str(checkpoint), shards=3,
                            max_parallel_shards=3, max_items=6, image_batch_size=2)
    encoder = load_image_encoder(str(config), str(checkpoint))
    download = DownloadConfig(timeout_s=2.0, retries=0, allow_private_hosts=True)
    paths = ["img/rgb.jpg", "status/404", None, "img/grey.jpg", "img/photo.webp", "html",
             "img/palette.png", "img/rgba.png", "img/cmyk.jpg"]
    with ImageServer(make_images()) as server:
        urls = [server.url(p) if p else None for p in paths]
        items = tmp_path / "items.parquet"
        pq.write_table(pa.table({"asin": [f"item-{i}" for i in range(9)],
                                 "title": ["a title"] * 9, "description": [["words"]] * 9,
                                 "image_url": pa.array(urls, pa.string())}), items)
        plan = plan_shards(str(items), params)
        part = tmp_path / "worker"
        for shard in plan.shards:
            embed_items_images(str(items), part / shard.dirname, params, rows=shard.rows,
                               quota=shard.image_quota, encoder=encoder,
                               download_config=download)
        whole = embed_items_images(str(items), tmp_path / "whole", params, encoder=encoder,
                                   download_config=download)
    return part, plan, params, whole


def test_merged_image_shards_are_the_files_one_run_writes(tmp_path, tiny_model):
    """The image merge (the fusion task's first step) gives the whole run's vectors, items
    (rows renumbered across shards), failures and counts; the rates are the workers'."""
    part, plan, params, whole = _image_shards(tmp_path, tiny_model)
    assert [s.image_quota for s in plan.shards] == [2, 3, 1]
    from item_embeddings.tracking import LocalTracker

    merged_dir = tmp_path / "merged"
    tracker = LocalTracker(tmp_path / "runs", "fanout")
    meta = merge_image_shards([part], ShardPlan.from_workers(plan.image_workers), merged_dir,
                              params, tracker=tracker)  # no run id: a fresh one
    out, ref = merged_dir, tmp_path / "whole"
    np.testing.assert_allclose(np.load(out / IMG_ARRAY), np.load(ref / IMG_ARRAY), atol=1e-6)
    assert pq.read_table(out / IMG_ITEMS).to_pylist() == pq.read_table(ref / IMG_ITEMS).to_pylist()
    assert pq.read_table(out / IMG_ITEMS).column("row").to_pylist() == [0, 1, 2, 3]
    failures = pq.read_table(out / IMG_FAILURES).to_pylist()
    assert [(r["id"], r["reason"]) for r in failures] == \
        [(r["id"], r["reason"]) for r in pq.read_table(ref / IMG_FAILURES).to_pylist()]
    for key in ("count", "failed_count", "attempted_count", "no_url_count", "capped_count",
                "total_rows", "failures_by_reason", "unavailable_hosts", "max_items",
                "embed_dim", "encoder_fingerprint", "encoder_name"):
        assert meta[key] == whole[key], key
    assert (meta["count"], meta["failed_count"], meta["capped_count"]) == (4, 2, 2)
    assert meta["fanout_shards"] == 3 and meta["rows"] == [0, 9]
    assert re.fullmatch(r"[0-9a-f]{12}", meta["run_id"])
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "fanout").iterdir()]
    assert record["run_name"] == f"embed-image-{meta['run_id']}"
    assert record["artifacts"] == {"image_embeddings": str(merged_dir)}  # where it was written
    assert record["metrics"]["count"] == 4 and record["metrics"]["fanout_shards"] == 3
    assert record["params"]["shards"] == 3 and record["status"] == "COMPLETE"
    # as the fusion task calls it: its run id and the artifact's durable URI
    merge_image_shards([part], plan, tmp_path / "again", params, tracker=tracker, run_id="r2",
                       artifact_uri="gs://bucket/run/image_embeddings")
    record = json.loads((tmp_path / "runs" / "fanout" / "embed-image-r2.json").read_text())
    assert record["artifacts"] == {"image_embeddings": "gs://bucket/run/image_embeddings"}
    assert json.loads((out / IMG_META).read_text()) == json.loads(json.dumps(meta))
    shard_metas = [json.loads((part / s.dirname / IMG_META).read_text()) for s in plan.shards]
    # a worker's rate (their images over their time) lies between the fastest and the slowest
    rates = [m["throughput_items_per_sec"] for m in shard_metas if m["encoded_this_attempt"]]
    assert min(rates) * 0.999 <= meta["throughput_items_per_sec"] <= max(rates) * 1.001
    assert meta["encode_only_items_per_sec"] == pytest.approx(
        4 / sum(m["encode_time_sec"] for m in shard_metas))
    assert meta["encode_time_sec"] == pytest.approx(sum(m["encode_time_sec"]
                                                        for m in shard_metas))
    assert meta["shard_wall_time_max_sec"] == max(m["wall_time_sec"] for m in shard_metas)
    assert set(meta["versions"]) == {"item-embeddings", "numpy", "pyarrow"}  # no model
    # hosts the workers gave up on: summed, the most failures first, then by name
    for shard, hosts in ((plan.shards[0], {"b.example": 3, "a.example": 1}),
                         (plan.shards[2], {"c.example": 5, "a.example": 2})):
        meta_file = part / shard.dirname / IMG_META
        meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()),
                                         "unavailable_hosts": hosts}))
    hosts = merge_image_shards([part], plan, tmp_path / "hosts", params)["unavailable_hosts"]
    assert list(hosts.items()) == [("c.example", 5), ("a.example", 3), ("b.example", 3)]
    # a shard whose meta file counts other rows than its arrays hold is refused
    meta_file = part / plan.shards[1].dirname / IMG_META
    meta_file.write_text(json.dumps({**shard_metas[1], "count": 5}))
    with pytest.raises(MergeError, match=r"the shards hold 4 image rows, their meta files 7$"):
        merge_image_shards([part], plan, tmp_path / "m2", params)
    # one made with another encoder is refused, naming the setting
    meta_file.write_text(json.dumps({**shard_metas[1], "encoder_fingerprint": "other"}))
    with pytest.raises(MergeError, match=r"the shards disagree on 'encoder_fingerprint'"):
        merge_image_shards([part], plan, tmp_path / "m3", params)
    assert not (tmp_path / "m2" / IMG_META).exists() and not (tmp_path / "m3").exists()
