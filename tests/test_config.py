import pytest

from item_embeddings.config import PARAM_FIELDS, ConfigError, PipelineParams
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
