"""The run estimator: its arithmetic, the fan-out's effect, the rates file and the CLI."""

from __future__ import annotations

import copy
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from item_embeddings.config import ConfigError
from item_embeddings.estimate import (BASES, Choices, Rates, count_items, duration, estimate,
                                      parse_count)
from item_embeddings.items import ItemsError
from item_embeddings.ops.cli import main


def q(value, unit="", basis="assumed"):
    return {"value": value, "unit": unit, "basis": basis, "source": "test", "date": "2026-12-04"}


def machine(vcpus, on_demand, spot, cpu_kind="avx2", memory_gb=16):
    return {"vcpus": q(vcpus), "memory_gb": q(memory_gb), "cpu_kind": q(cpu_kind),
            "on_demand_usd_per_hour": q(on_demand), "spot_usd_per_hour": q(spot)}


# Round numbers, so that every result below can be worked out by hand.
TOY = {
    "cpu": {"measured_vcpus": q(2)},
    "task": {"vm_start_s": q(100), "small_task_machine_type": q("e2-standard-4")},
    "storage": {"copy_bytes_per_s": q(1e6)},
    "merge": {"bytes_per_s": q(1e6)},
    "imports_s": {"text": q(10), "image": q(20), "fusion": q(5)},
    "rows": {"range_read_s": q(5), "id_file_bytes_per_item": q(0)},
    "text": {"load_s": {"torch": q(1), "onnx": q(3), "onnx-int8": q(5), "torch-fp16": q(2)},
             "cpu_items_per_s": {"avx2": {"torch": q(5), "onnx": q(8), "onnx-int8": q(10)}},
             "tokenize_items_per_s": q(50), "gflop_per_item": q(1)},
    "image": {"load_s": q(15), "decode_cpu_s_per_image": q(0.1),
              "download_images_per_s": q(1000), "gflop_per_image": q(1)},
    "fusion": {"item_epochs_per_s": q(1000)},
    "accelerators": {"NVIDIA_TESLA_T4": {
        "machine_families": q(["n1"]), "on_demand_usd_per_hour": q(3.0),
        "spot_usd_per_hour": q(1.5), "fp16_peak_tflops": q(1), "sustained_share_of_peak": q(1)}},
    "machines": {"e2-standard-4": machine(4, 1.0, 0.5), "n1-standard-4": machine(4, 2.0, 1.0)},
    "prices": {"pipeline_run_usd": q(0.03), "storage_usd_per_gb_month": q(0.02)},
}


def toy() -> Rates:
    return Rates(copy.deepcopy(TOY), "toy")


def small(**kw) -> Choices:
    base = dict(items=1000, image_items=400, max_items=0, shards=2, fusion_epochs=2,
                image_strategy="STANDARD", publish=False)
    return Choices(**{**base, **kw})


def rows(result):
    return {s.step: s for s in result.steps}


def test_hand_checked_case():
    r = rows(est := estimate(small(), toy()))
    # text task: VM 100 + imports 10 + onnx-int8 load 5 + row range 5 = 120 s fixed; 500 items at
    # 10 items/s per 2 vCPUs x 4 vCPUs = 20/s: 25 s; output 500 x 384 x 4 B at 1 MB/s: 0.768 s.
    assert r["text"].items_per_task == 500
    assert r["text"].task_s == pytest.approx(145.768)
    assert r["text"].wall_s == pytest.approx(145.768)  # two shards, both at once
    assert r["text"].cost_usd == pytest.approx(2 * 145.768 / 3600 * 1.0)
    # text merge: VM 100 + imports 5, reads and writes 1000 x 1536 B at 1 MB/s.
    assert r["text merge"].task_s == pytest.approx(105 + 3.072)
    # image task: 140 s fixed; 200 images at min(GPU 1000/s, decode 4 vCPUs / 0.1 s = 40/s,
    # downloads 1000/s) = 40/s: 5 s; output 200 x 2048 B: 0.4096 s. n1 $2 + T4 $3 per hour.
    assert r["image"].task_s == pytest.approx(145.4096)
    assert r["image"].cost_usd == pytest.approx(2 * 145.4096 / 3600 * 5.0)
    assert r["image merge"].task_s == pytest.approx(105 + 1.6384)
    # fusion: 105 s fixed; inputs (1000 x 1536 + 400 x 2048 B) and output 1000 x 512 B copied at
    # 1 MB/s: 2.8672 s; 1000 items x 2 epochs at 1000 item-epochs/s: 2 s.
    assert r["fusion"].task_s == pytest.approx(109.8672)
    assert "publish" not in r
    assert r["pipeline run fee"].cost_usd == 0.03
    assert r["fingerprint inputs"].task_s == 105  # a small task's fixed part only
    # Critical path: the fingerprint, the slower of text (145.768 + 108.072) and image
    # (145.4096 + 106.6384), then fusion.
    assert est.wall_s == pytest.approx(105 + 145.768 + 108.072 + 109.8672)
    assert est.cost_usd == pytest.approx(sum(s.cost_usd for s in est.steps))
    assert est.cost_usd == pytest.approx(
        (105 + 2 * 145.768 + 108.072 + 106.6384 + 109.8672) / 3600 + 2 * 145.4096 / 3600 * 5
        + 0.03)


def test_publish_copies_every_output():
    with_pub = estimate(small(publish=True), toy())
    # VM 100 + imports 5; txt 1000 x 1536 + img 400 x 2048 + fused 1000 x 512 B at 1 MB/s.
    assert rows(with_pub)["publish"].task_s == pytest.approx(105 + 2.8672)
    without = estimate(small(publish=False), toy())
    assert with_pub.wall_s - without.wall_s == pytest.approx(105 + 2.8672)  # last, alone


def test_max_items_caps_the_image_loop_only():
    r = rows(estimate(small(max_items=100), toy()))
    assert r["image"].items_per_task == 50
    assert r["text"].items_per_task == 500


def test_shards_cut_wall_time_at_the_same_cost_plus_fixed_overhead():
    rates = toy()
    one = rows(estimate(small(items=8000, image_items=8000, shards=1), rates))
    eight = rows(estimate(small(items=8000, image_items=8000, shards=8), rates))
    for step, fixed_s, usd_per_hour in (("text", 120, 1.0), ("image", 140, 5.0)):
        # Each task keeps the fixed part and does an eighth of the work, all eight at once.
        assert eight[step].wall_s == pytest.approx(fixed_s + (one[step].wall_s - fixed_s) / 8)
        # The same items are encoded either way; the 7 extra tasks pay only the fixed part.
        extra = eight[step].cost_usd - one[step].cost_usd
        assert extra == pytest.approx(7 * fixed_s / 3600 * usd_per_hour)


def test_max_parallel_shards_runs_tasks_in_waves():
    rates = toy()
    task_s = rows(estimate(small(shards=8), rates))["text"].task_s
    for limit, waves in ((0, 1), (8, 1), (20, 1), (3, 3), (4, 2), (1, 8)):
        text = rows(estimate(small(shards=8, max_parallel_shards=limit), rates))["text"]
        assert text.task_s == pytest.approx(task_s)
        assert text.wall_s == pytest.approx(waves * task_s)
        assert text.cost_usd == pytest.approx(8 * task_s / 3600)  # waves cost nothing extra


def test_spot_and_machine_size():
    spot = rows(estimate(small(image_strategy="SPOT"), toy()))["image"]
    standard = rows(estimate(small(image_strategy="STANDARD"), toy()))["image"]
    assert spot.cost_usd == pytest.approx(standard.cost_usd * (1.0 + 1.5) / (2.0 + 3.0))
    assert "Spot" in spot.machine and "standard" in standard.machine
    # Twice the vCPUs: the CPU-bound encode part of a text task halves.
    rates = toy()
    rates.data["machines"]["e2-standard-8"] = machine(8, 2.0, 1.0)
    big = rows(estimate(small(text_machine_type="e2-standard-8"), rates))["text"]
    assert big.task_s == pytest.approx(120 + 500 / 40 + 0.768)


@pytest.mark.parametrize("decode_s, download, expected_rate", [
    (0.1, 1000, 40),      # decoding on 4 vCPUs: 4 / 0.1 s
    (0.001, 500, 500),    # downloads
    (0.001, 5000, 1000),  # the GPU: 1 TFLOP/s x share 1 / 1 GFLOP per image
])
def test_image_rate_is_the_slowest_of_downloads_decoding_and_gpu(decode_s, download,
                                                                 expected_rate):
    rates = toy()
    rates.data["image"]["decode_cpu_s_per_image"] = q(decode_s)
    rates.data["image"]["download_images_per_s"] = q(download)
    image = rows(estimate(small(), rates))["image"]
    assert image.task_s == pytest.approx(140 + 200 / expected_rate + 0.4096)


def test_warns_when_fusion_inputs_outgrow_its_memory():
    rates = toy()
    # 1000 x 1536 + 400 x 2048 B = 2.35 MB of fusion inputs.
    assert estimate(small(), rates).warnings == []
    rates.data["machines"]["e2-standard-4"]["memory_gb"] = q(0.002)
    est = estimate(small(), rates)
    assert len(est.warnings) == 1 and "fusion's inputs (0.0 GB) exceed" in est.warnings[0]
    assert "warnings:" in est.format()


def test_text_on_a_gpu():
    r = rows(estimate(small(text_machine_type="n1-standard-4",
                            text_accelerator="NVIDIA_TESLA_T4"), toy()))
    # torch-fp16 load 2 s; tokenizing (50 x 4 / 2 = 100/s) and the GPU (1e12 / 1e9 = 1000/s)
    # take turns: 1 / (1/100 + 1/1000) = 90.9 items/s.
    assert r["text"].task_s == pytest.approx(100 + 10 + 2 + 5 + 500 * (1 / 100 + 1 / 1000)
                                             + 0.768)
    assert r["text"].cost_usd == pytest.approx(2 * r["text"].task_s / 3600 * (1.0 + 1.5))


def test_rates_used_are_those_of_each_estimate():
    rates = toy()
    on_gpu = estimate(small(text_machine_type="n1-standard-4",
                            text_accelerator="NVIDIA_TESLA_T4"), rates)
    assert "text.tokenize_items_per_s" in {q.path for q in on_gpu.rates_used}
    on_cpu = estimate(small(), rates)
    assert "text.tokenize_items_per_s" not in {q.path for q in on_cpu.rates_used}


@pytest.mark.parametrize("kw, words", [
    (dict(items=0), "items must be >= 1"),
    (dict(image_items=1001), "image items must be between 0 and items"),
    (dict(shards=0), "shards must be >= 1"),
    (dict(shards=1001), "must not exceed items"),
    (dict(max_parallel_shards=-1), "max_parallel_shards"),
    (dict(fusion_epochs=0), "fusion_epochs"),
    (dict(image_strategy="CHEAP"), "image_strategy must be one of SPOT, STANDARD"),
    (dict(text_backend="fast"), "text_backend must be one of"),
    (dict(text_machine_type="x9-huge-4"), "text_machine_type 'x9-huge-4' has no price"),
    (dict(text_accelerator="NVIDIA_TESLA_T4"), "attaches to n1 machine types only"),
    (dict(text_accelerator="NVIDIA_B200", text_machine_type="n1-standard-4"),
     "accelerator 'NVIDIA_B200' has no price"),
    (dict(text_backend="torch-fp16"), "needs a GPU"),
    (dict(text_backend="onnx", text_accelerator="NVIDIA_TESLA_T4",
          text_machine_type="n1-standard-4"), "has no rate on NVIDIA_TESLA_T4"),
])
def test_bad_choices_are_refused_by_name(kw, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        estimate(small(**kw), toy())


def test_missing_rate_names_the_entry():
    rates = toy()
    del rates.data["text"]["cpu_items_per_s"]["avx2"]["onnx-int8"]
    with pytest.raises(ConfigError, match=r"no entry 'text\.cpu_items_per_s\.avx2\.onnx-int8'"):
        estimate(small(), rates)


def test_output_lists_assumptions_and_every_rate_used():
    est = estimate(small(), toy())
    text = est.format()
    assert "No kNN-graph step" in text
    for quantity in est.rates_used:
        assert quantity.path in text
    assert {q.path for q in est.rates_used} >= {"task.vm_start_s", "image.decode_cpu_s_per_image",
                                                 "fusion.item_epochs_per_s"}
    assert re.search(r"total \(critical path\).*\$", text)


def test_parse_count():
    assert parse_count("500000") == 500_000
    assert parse_count("500_000") == 500_000
    assert parse_count("500k") == 500_000
    assert parse_count("10M") == 10_000_000
    assert parse_count("1.5k") == 1500
    for bad in ("", "ten", "1.5", "5G", "-3"):
        with pytest.raises(ConfigError):
            parse_count(bad)


def test_duration():
    assert duration(42) == "42 s"
    assert duration(600) == "10.0 min"
    assert duration(3 * 3600 + 5 * 60) == "3 h 05 min"


URLS = ["http://cdn.example/a.jpg", "https://cdn.example/b.jpg", "  https://c.example/x  ", None,
        "", "ftp://files.example/a.jpg", "not a url"]


def test_count_items_file_and_folder(tmp_path):
    table = pa.table({"asin": [f"A{i}" for i in range(len(URLS))], "image_url": URLS})
    pq.write_table(table, tmp_path / "one.parquet")
    assert count_items(str(tmp_path / "one.parquet")) == (7, 3)
    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(table, folder / "part-0.parquet")
    pq.write_table(table, folder / "part-1.parquet")
    assert count_items(str(folder)) == (14, 6)
    with pytest.raises(ItemsError, match="no column 'img'"):
        count_items(str(tmp_path / "one.parquet"), "img")


def test_packaged_rates_file_has_a_source_and_date_for_every_number():
    rates = Rates.load()
    quantities = []

    def walk(node, path):
        if isinstance(node, dict) and "value" in node:
            quantities.append((path, node))
        elif isinstance(node, dict):
            for key, child in node.items():
                if key != "about":
                    walk(child, f"{path}.{key}" if path else key)
    walk(rates.data, "")
    assert len(quantities) > 50
    for path, entry in quantities:
        assert entry.get("source", "").strip(), path
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", entry.get("date", "")), path
        assert entry.get("basis") in BASES, path
        assert "unit" in entry, path
    # Every machine is complete, and its CPU kind has a measured rate for each CPU backend.
    for name, spec in rates.data["machines"].items():
        for key in ("vcpus", "memory_gb", "cpu_kind", "on_demand_usd_per_hour",
                    "spot_usd_per_hour"):
            assert "value" in spec[key], (name, key)
        kind = spec["cpu_kind"]["value"]
        for backend in ("torch", "onnx", "onnx-int8"):
            assert rates.get(f"text.cpu_items_per_s.{kind}.{backend}").basis == "measured"
    # Nothing that is not a measurement here is presented as one.
    assert rates.get("task.vm_start_s").basis == "assumed"
    assert rates.get("merge.bytes_per_s").basis == "assumed"
    assert rates.get("accelerators.NVIDIA_TESLA_T4.sustained_share_of_peak").basis == "assumed"


def test_packaged_rates_give_a_500k_estimate():
    est = estimate(Choices(items=500_000, image_items=500_000, shards=4))
    assert 0 < est.wall_s < 24 * 3600 and 0 < est.cost_usd < 100
    assert est.rates_origin == "estimate_rates.json"


def test_cli_table_and_json(capsys):
    assert main(["estimate", "--items", "200k", "--image-fraction", "0.5", "--shards", "4"]) == 0
    out = capsys.readouterr().out
    assert "200,000 items, 100,000 with an image URL" in out
    assert re.search(r"^text\s+e2-standard-4 \(standard\)\s+4\s+50,000", out, re.M)
    assert "assumptions:" in out and "measured rates and published prices used" in out

    assert main(["estimate", "--items", "200k", "--image-fraction", "0.5", "--shards", "4",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    direct = estimate(Choices(items=200_000, image_items=100_000, shards=4))
    assert data["total"]["cost_usd"] == pytest.approx(direct.cost_usd)
    assert data["total"]["wall_s"] == pytest.approx(direct.wall_s)
    assert [s["step"] for s in data["steps"]][:3] == ["fingerprint inputs", "text",
                                                      "text merge"]
    assert all(q["source"] and q["date"] for q in data["rates_used"])


def test_cli_items_file(tmp_path, capsys):
    path = tmp_path / "items.parquet"
    pq.write_table(pa.table({"asin": [f"A{i}" for i in range(len(URLS))], "image_url": URLS}),
                   path)
    assert main(["estimate", "--items-file", str(path), "--json"]) == 0
    choices = json.loads(capsys.readouterr().out)["choices"]
    assert (choices["items"], choices["image_items"]) == (7, 3)


@pytest.mark.parametrize("argv", [
    ["--items", "lots"],
    ["--items", "100", "--shards", "0"],
    ["--items", "100", "--image-fraction", "1.5"],
    ["--items", "100", "--text-machine-type", "x9-huge-4"],
    ["--items-file", "/nonexistent/items.parquet"],
])
def test_cli_bad_values_exit_2(argv, capsys):
    assert main(["estimate", *argv]) == 2
    assert "item-embeddings estimate: error:" in capsys.readouterr().err


def test_cli_bad_usage_exits_2(tmp_path):
    path = tmp_path / "items.parquet"
    pq.write_table(pa.table({"asin": ["A"], "image_url": ["http://x.example/a.jpg"]}), path)
    usage_errors = (["--items", "10", "--items-file", str(path)], [],
                    ["--items", "10", "--shards", "two"])
    for argv in usage_errors:
        with pytest.raises(SystemExit) as exc:
            main(["estimate", *argv])
        assert exc.value.code == 2
    assert main(["estimate", "--items-file", str(path), "--image-fraction", "0.5"]) == 2
