import html
import importlib.util
from pathlib import Path

import pytest

from item_embeddings import config
from item_embeddings.config import PARAM_FIELDS, ConfigError, PipelineParams, check_machines
from item_embeddings.errors import UsageError
from item_embeddings.param_sources import load_config_file, parse_overrides, resolve_params


def test_defaults_match_the_design():
    p = PipelineParams()
    assert (p.id_column, p.title_column, p.description_column, p.image_url_column) == (
        "asin", "title", "description", "image_url")
    assert p.text_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert p.text_batch_size == 128 and p.experiment == "recsys-dev"
    assert p.max_items == 150000 and p.download_concurrency == 128 and p.image_batch_size == 32
    assert (p.fusion_hidden_dim, p.fusion_output_dim, p.fusion_epochs) == (256, 128, 5)
    assert all(f.metadata.get("help") for f in PARAM_FIELDS.values())


def test_overrides_are_typed():
    got = parse_overrides(["text_batch_size=64", "allow_private_hosts=true", "fusion_lr=0.01",
                           "items_uri=gs://b/items/"])
    assert got == {"text_batch_size": 64, "allow_private_hosts": True, "fusion_lr": 0.01,
                   "items_uri": "gs://b/items/"}


@pytest.mark.parametrize("pair, message", [
    ("text_batchsize=3", "unknown parameter 'text_batchsize' (did you mean text_batch_size"),
    ("text_batch_size=abc", "expects int"),
    ("allow_private_hosts=maybe", "expects true/false"),
    ("novalue", "expects name=value"),
])
def test_bad_overrides_are_named(pair, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_overrides([pair])


@pytest.mark.parametrize("text, value", [(t, True) for t in ("1", "true", "Yes", "ON")]
                         + [(t, False) for t in ("0", "False", "no", "Off")])
def test_set_spells_true_and_false_as_people_do(text, value):
    assert parse_overrides([f"respect_opt_out={text}"]) == {"respect_opt_out": value}


def test_set_values_are_what_follows_the_first_equals_sign():
    assert parse_overrides(["image_user_agent=bot (see a=b)", "shard_size=1_000"]) == {
        "image_user_agent": "bot (see a=b)", "shard_size": 1000}


def test_an_unknown_name_gets_the_three_closest_or_the_list_only():
    with pytest.raises(ConfigError) as err:
        parse_overrides(["download_rate=3"])
    assert str(err.value) == (
        "unknown parameter 'download_rate' (did you mean download_retries, "
        "download_rate_per_host, download_timeout_s?); run 'item-embeddings params' for the list")
    with pytest.raises(ConfigError) as err:
        parse_overrides(["zzzzqq=3"])
    assert str(err.value) == ("unknown parameter 'zzzzqq'; run 'item-embeddings params' for "
                              "the list")


@pytest.mark.parametrize("line, message", [
    ("previous_uri:", "parameter 'previous_uri' expects a string, got None (null); quote it in "
                      "YAML, or write '' for empty"),
    ("previous_uri: 123", "parameter 'previous_uri' expects a string, got 123 (int); quote it "
                          "in YAML, or write '' for empty"),
    ("seed: 2.5", "parameter 'seed' expects int, got 2.5"),
    ("seed: true", "parameter 'seed' expects int, got True"),
])
def test_a_config_file_value_of_the_wrong_type_is_named(tmp_path, line, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(line + "\n")
    with pytest.raises(ConfigError) as err:
        load_config_file(cfg)
    assert str(err.value) == message


def test_a_config_file_takes_whole_floats_for_ints_and_names_bad_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 3.0\n")
    assert load_config_file(cfg) == {"seed": 3}
    cfg.write_text("seed: [\n")
    with pytest.raises(ConfigError, match=f"config file {cfg} is not valid YAML: while parsing"):
        load_config_file(cfg)


def test_config_file_then_set_then_explicit(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("parameters:\n  text_batch_size: 16\n  experiment: exp-a\n"
                   "  items_uri: a.parquet\n")
    p = resolve_params(str(cfg), ["experiment=exp-b"], items_uri="b.parquet")
    assert (p.text_batch_size, p.experiment, p.items_uri) == (16, "exp-b", "b.parquet")
    flat = tmp_path / "flat.yaml"
    flat.write_text("seed: 3\n")
    assert load_config_file(flat) == {"seed": 3}


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("nope_param: 1\n")
    with pytest.raises(ConfigError, match="unknown parameter 'nope_param'"):
        load_config_file(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config_file(notmap)


# --- what a user meets of each parameter: its help, its refusals, the machines it pairs with ---

PARAMETER_DOC = Path(__file__).resolve().parents[1] / "docs" / "parameters.md"


def _documented_parameters() -> list[str]:
    """The rows of docs/parameters.md, spelled as `item-embeddings params` prints them."""
    lines = []
    for row in PARAMETER_DOC.read_text().splitlines():
        if row.startswith("| `"):
            name, kind, default, description = (c.strip() for c in row.strip("|").split(" | "))
            lines.append(f"  {name.strip('`')} ({kind}, default {default.strip('`')}): "
                         f"{html.unescape(description)}")
    return lines


def _config_imported_afresh():
    """item_embeddings.config executed again, as a new process imports it: the parameters'
    fields (their defaults, help and allowed values) are built when the module runs."""
    spec = importlib.util.spec_from_file_location("item_embeddings.config", config.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_params_prints_the_parameter_reference_of_the_docs(capsys):
    """`item-embeddings params` (and so `--help` and the Vertex AI UI, which show the same
    descriptions) prints docs/parameters.md row for row: every name, type, default, help and
    the values allowed in words."""
    from item_embeddings.ops.cli import main

    assert main(["params"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "pipeline parameters (--set NAME=VALUE or keys of --config FILE.yaml):"
    assert printed[1:] == _documented_parameters()
    fresh = _config_imported_afresh()
    assert [f"  {name} ({kind}, default {default!r}): {text}"
            for name, kind, default, text in fresh.param_help()] == _documented_parameters()


def test_a_fresh_import_refuses_values_at_the_bounds_it_prints():
    fresh = _config_imported_afresh()
    for kw, message in [
        (dict(fusion_batch_size=1),
         "parameter 'fusion_batch_size' must be >= 2 and <= 8192, got 1"),
        (dict(fusion_batch_size=8193), "parameter 'fusion_batch_size' must be >= 2 and <= 8192, "
                                       "got 8193"),
        (dict(fusion_lr=0.0), "parameter 'fusion_lr' must be > 0 and <= 10, got 0.0"),
        (dict(text_strategy="spot"), "parameter 'text_strategy' must be one of SPOT, STANDARD, "
                                     "got 'spot'"),
        (dict(knn_machine_type="e2"), "parameter 'knn_machine_type' must be a Vertex AI machine "
                                      "type such as e2-standard-4 (family-series-size), got 'e2'"),
        (dict(image_model=" "), "parameter 'image_model' must be not empty, got ' '"),
    ]:
        with pytest.raises(UsageError) as err:
            fresh.PipelineParams(**kw)
        assert str(err.value) == message
    assert fresh.PipelineParams(fusion_batch_size=2, fusion_lr=10.0).fusion_batch_size == 2


@pytest.mark.parametrize("kw, message", [
    (dict(id_column="  "), "parameter 'id_column' must be not empty, got '  '"),
    (dict(id_column=3), "parameter 'id_column' expects str, got 3"),
    (dict(text_batch_size=True), "parameter 'text_batch_size' expects int, got True"),
    (dict(text_batch_size=2.0), "parameter 'text_batch_size' expects int, got 2.0"),
    (dict(fusion_lr=True), "parameter 'fusion_lr' expects float, got True"),
    (dict(fusion_lr="0.1"), "parameter 'fusion_lr' expects float, got '0.1'"),
    (dict(allow_private_hosts=1), "parameter 'allow_private_hosts' expects bool, got 1"),
    (dict(download_timeout_s=float("nan")),
     "parameter 'download_timeout_s' must be > 0 and <= 600, got nan"),
    (dict(download_timeout_s=0), "parameter 'download_timeout_s' must be > 0 and <= 600, got 0"),
    (dict(download_timeout_s=600.5),
     "parameter 'download_timeout_s' must be > 0 and <= 600, got 600.5"),
    (dict(download_rate_per_host=float("inf")),
     "parameter 'download_rate_per_host' must be >= 0 and <= 10000, got inf"),
    (dict(download_rate_per_host=-0.5),
     "parameter 'download_rate_per_host' must be >= 0 and <= 10000, got -0.5"),
    (dict(max_items=-1), "parameter 'max_items' must be >= 0, got -1"),
    (dict(text_batch_size=65537),
     "parameter 'text_batch_size' must be >= 1 and <= 65536, got 65537"),
    (dict(experiment="Recsys"), "parameter 'experiment' must be lower-case letters, digits and "
                                "'-', starting with a letter or digit, at most 64, got 'Recsys'"),
    (dict(experiment="e" * 65), "parameter 'experiment' must be lower-case letters, digits and "
                                "'-', starting with a letter or digit, at most 64, got "
                                f"'{'e' * 65}'"),
    (dict(persistent_resource_id="a-"),
     "parameter 'persistent_resource_id' must be empty or a persistent resource ID: lower-case "
     "letters, digits and '-', a letter first, at most 63, got 'a-'"),
    (dict(text_accelerator="nvidia_tesla_t4"),
     "parameter 'text_accelerator' must be one of '' (empty), NVIDIA_TESLA_T4, NVIDIA_TESLA_P4, "
     "NVIDIA_TESLA_P100, NVIDIA_TESLA_V100, NVIDIA_L4, NVIDIA_TESLA_A100, NVIDIA_A100_80GB, "
     "NVIDIA_H100_80GB, got 'nvidia_tesla_t4'"),
    # several problems: one message, in the order of the parameters
    (dict(fusion_epochs=0, text_batch_size=0),
     "parameter 'text_batch_size' must be >= 1 and <= 65536, got 0; parameter 'fusion_epochs' "
     "must be >= 1 and <= 10000, got 0"),
    (dict(shards=2, image_pretrained=" None "),
     "image_pretrained 'none' draws random weights in every worker: their vectors could not be "
     "merged; with shards > 1 give a pretrained tag or a checkpoint"),
    (dict(shards=2, image_pretrained=""),
     "image_pretrained 'none' draws random weights in every worker: their vectors could not be "
     "merged; with shards > 1 give a pretrained tag or a checkpoint"),
    (dict(image_user_agent="bot\n"),
     "parameter 'image_user_agent' must be printable ASCII on one line, got 'bot\\n'"),
    (dict(image_user_agent="bötchen"),
     "parameter 'image_user_agent' must be printable ASCII on one line, got 'bötchen'"),
    (dict(fusion_mode="apply"),
     "fusion_mode 'apply' needs previous_uri (the set whose fusion model is applied)"),
    (dict(fusion_mode="apply", shards=3, image_pretrained="none", text_batch_size=0),
     "parameter 'text_batch_size' must be >= 1 and <= 65536, got 0; image_pretrained 'none' "
     "draws random weights in every worker: their vectors could not be merged; with shards > 1 "
     "give a pretrained tag or a checkpoint; fusion_mode 'apply' needs previous_uri (the set "
     "whose fusion model is applied)"),
])
def test_a_value_not_allowed_is_refused_in_one_message_naming_it(kw, message):
    with pytest.raises(ConfigError) as err:
        PipelineParams(**kw)
    assert str(err.value) == message


@pytest.mark.parametrize("kw", [
    dict(fusion_lr=1), dict(download_timeout_s=600), dict(download_rate_per_host=0),
    dict(max_items=0), dict(text_batch_size=65536), dict(experiment="e" * 64),
    dict(experiment="1st-run"), dict(persistent_resource_id=""),
    dict(persistent_resource_id="a" * 63), dict(text_accelerator=""),
    dict(shards=2, image_pretrained="openai"), dict(shards=1, image_pretrained="none"),
    dict(image_user_agent="bot/1 (+https://example.org/bot; ops@example.org)"),
    dict(fusion_mode="apply", previous_uri="gs://b/sets/p"),
])
def test_values_at_the_edges_of_what_is_allowed_are_taken(kw):
    params = PipelineParams(**kw)
    assert {k: getattr(params, k) for k in kw} == kw


MACHINES_OK = [
    dict(text_accelerator="NVIDIA_TESLA_T4", text_machine_type="n1-highcpu-16"),
    dict(text_accelerator="NVIDIA_TESLA_V100", text_machine_type="n1-highmem-8"),
    dict(text_accelerator="NVIDIA_L4", text_machine_type="g2-standard-32"),
    dict(text_accelerator="NVIDIA_TESLA_A100", text_machine_type="a2-highgpu-1g"),
    dict(text_accelerator="NVIDIA_H100_80GB", text_machine_type="a3-highgpu-1g"),
    dict(image_machine_type="n1-highmem-16", fusion_machine_type="e2-highmem-8",
         knn_machine_type="n2-highmem-32", text_machine_type="c3-standard-8-lssd"),
]


@pytest.mark.parametrize("kw", MACHINES_OK)
def test_machines_vertex_pairs_are_taken(kw):
    check_machines(PipelineParams(**kw))


@pytest.mark.parametrize("kw, message", [
    (dict(text_accelerator="NVIDIA_L4", text_machine_type="g2-standard-48"),
     "parameter 'text_accelerator' NVIDIA_L4 attaches to g2-standard machine types of 4 to 32 "
     "vCPUs only, but text_machine_type is 'g2-standard-48' (e.g. text_machine_type="
     "g2-standard-8)"),
    (dict(text_accelerator="NVIDIA_A100_80GB", text_machine_type="a2-highgpu-1g"),
     "parameter 'text_accelerator' NVIDIA_A100_80GB attaches to a2-ultragpu-1g only, but "
     "text_machine_type is 'a2-highgpu-1g' (e.g. text_machine_type=a2-ultragpu-1g)"),
    (dict(text_machine_type="a2-highgpu-1g"),
     "parameter 'text_machine_type' 'a2-highgpu-1g' is a GPU machine type, which does not run "
     "without its GPUs; this step takes a CPU machine type (e.g. e2-standard-4)"),
    (dict(fusion_machine_type="g2-standard-8", text_machine_type="a3-highgpu-1g"),
     "parameter 'text_machine_type' 'a3-highgpu-1g' is a GPU machine type, which does not run "
     "without its GPUs; this step takes a CPU machine type (e.g. e2-standard-4); parameter "
     "'fusion_machine_type' 'g2-standard-8' is a GPU machine type, which does not run without "
     "its GPUs; this step takes a CPU machine type (e.g. e2-standard-4)"),
    (dict(image_machine_type="n1-ultramem-40"),
     "parameter 'image_machine_type' 'n1-ultramem-40' cannot take the image workers' "
     "NVIDIA_TESLA_T4: it attaches to n1 machine types only (e.g. n1-standard-4)"),
    # every problem in one message: the text GPU, the image machine, then the CPU steps
    (dict(text_accelerator="NVIDIA_TESLA_P4", text_machine_type="g4-standard-48",
          image_machine_type="a4x-highgpu-4g", fusion_machine_type="g2-standard-8",
          knn_machine_type="a3-highgpu-1g"),
     "parameter 'text_accelerator' NVIDIA_TESLA_P4 attaches to n1 machine types only, but "
     "text_machine_type is 'g4-standard-48' (e.g. text_machine_type=n1-standard-4); "
     "parameter 'image_machine_type' 'a4x-highgpu-4g' cannot take the image workers' "
     "NVIDIA_TESLA_T4: it attaches to n1 machine types only (e.g. n1-standard-4); "
     "parameter 'fusion_machine_type' 'g2-standard-8' is a GPU machine type, which does not "
     "run without its GPUs; this step takes a CPU machine type (e.g. e2-standard-4); "
     "parameter 'knn_machine_type' 'a3-highgpu-1g' is a GPU machine type, which does not run "
     "without its GPUs; this step takes a CPU machine type (e.g. e2-standard-4)"),
])
def test_machines_vertex_would_not_pair_are_refused_by_name(kw, message):
    with pytest.raises(ConfigError) as err:
        check_machines(PipelineParams(**kw))
    assert str(err.value) == message


def test_the_cli_refuses_a_machine_pairing_in_one_line_before_anything_runs(tmp_path, capsys,
                                                                           monkeypatch):
    from kfp import local

    from item_embeddings.ops.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("kfp.local.init was called: the pipeline started")

    monkeypatch.setattr(local, "init", refuse)
    out = tmp_path / "out"
    assert main(["demo", "--output-dir", str(out), "--set", "knn_machine_type=a4-highgpu-8g",
                 "--set", "text_machine_type=g2-standard-4"]) == 2
    assert capsys.readouterr().err == (
        "item-embeddings demo: error: parameter 'text_machine_type' 'g2-standard-4' is a GPU "
        "machine type, which does not run without its GPUs; this step takes a CPU machine type "
        "(e.g. e2-standard-4); parameter 'knn_machine_type' 'a4-highgpu-8g' is a GPU machine "
        "type, which does not run without its GPUs; this step takes a CPU machine type (e.g. "
        "e2-standard-4)\n")
    assert not out.exists()
