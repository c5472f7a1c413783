import subprocess
import sys

import pytest

from item_embeddings.ops.cli import build_parser, main
from item_embeddings.outputs import TXT_ARRAY, TXT_ITEMS, TXT_META


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_console_script_help():
    done = subprocess.run(["item-embeddings", "--help"], capture_output=True, text=True, check=True)
    assert "run-local" in done.stdout and "compile" in done.stdout


def test_top_level_help_compile_example_runs(tmp_path, capsys):
    """The compile example of `item-embeddings --help` works as shown (it once lacked the
    images every Vertex template needs)."""
    with pytest.raises(SystemExit):
        main(["--help"])
    examples = capsys.readouterr().out.split("examples:\n", 1)[1].splitlines()
    (compile_example,) = [e.split() for e in examples if e.split()[1:2] == ["compile"]]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert main(compile_example[1:]) == 0
    assert (tmp_path / "item_embeddings.yaml").is_file()


@pytest.mark.parametrize("command", _subcommands())
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: item-embeddings" in capsys.readouterr().out


def test_run_local_help_lists_parameters(capsys):
    with pytest.raises(SystemExit):
        main(["run-local", "--help"])
    out = capsys.readouterr().out
    assert "text_batch_size (int, default 128)" in out and "--set NAME=VALUE" in out


@pytest.mark.parametrize("command", ["run-local", "demo"])
def test_local_run_help_says_what_the_cache_looks_at(command, capsys):
    # The fingerprint task hashes the items' contents, so the cache never serves stale vectors
    # for a file changed in place; and a rerun into the same folder resumes a failed run.
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "the contents of the items table and of the previous set" in out
    assert "not look at" not in out
    if command == "run-local":
        assert "A failed run resumes when rerun into the same --output-dir" in out


def test_bad_flag_and_unknown_parameter(tmp_path, capsys, items_path):
    with pytest.raises(SystemExit) as exc:
        main(["run-local", "--output-dir", str(tmp_path), "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    rc = main(["run-local", "--items", str(items_path), "--output-dir", str(tmp_path),
               "--set", "txt_model=x"])
    assert rc == 2
    assert "unknown parameter 'txt_model'" in capsys.readouterr().err
    rc = main(["run-local", "--items", str(items_path), "--output-dir", str(tmp_path),
               "--config", str(tmp_path / "missing.yaml")])
    assert rc == 2
    assert "config file not found" in capsys.readouterr().err


def test_runs_on_empty_dir(tmp_path, capsys):
    assert main(["runs", "--output-dir", str(tmp_path)]) == 0
    assert "no local runs" in capsys.readouterr().out


def test_submit_py_is_the_cli_submit():
    done = subprocess.run([sys.executable, "submit.py", "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: item-embeddings submit ")
    assert "--pipeline-root" in done.stdout  # submit's own options, not another command's


@pytest.mark.parametrize("flags, expected", [([], True), (["--no-caching"], False)])
def test_run_local_caching_flag(tmp_path, items_path, monkeypatch, flags, expected):
    import item_embeddings.ops.local_run as local_run

    seen = {}

    def fake_run_local(params, output_dir, enable_caching=True):
        seen.update(params=params, enable_caching=enable_caching)
        return {}

    monkeypatch.setattr(local_run, "run_local", fake_run_local)
    assert main(["run-local", "--items", str(items_path), "--output-dir", str(tmp_path),
                 "--set", "seed=7", *flags]) == 0
    assert seen["enable_caching"] is expected
    assert seen["params"].seed == 7 and seen["params"].items_uri == str(items_path)


@pytest.fixture
def no_pipeline(monkeypatch):
    """kfp.local must not start: a refused command line runs nothing."""
    from kfp import local

    def refuse(*args, **kwargs):
        raise AssertionError("kfp.local.init was called: the pipeline started")

    monkeypatch.setattr(local, "init", refuse)


BAD_VALUES = [  # (--set, what the message must say)
    ("text_batch_size=0", "'text_batch_size' must be >= 1 and <= 65536, got 0"),
    ("text_batch_size=-1", "'text_batch_size' must be >= 1 and <= 65536, got -1"),
    ("download_concurrency=0", "'download_concurrency' must be >= 1 and <= 1024, got 0"),
    ("download_timeout_s=-1", "'download_timeout_s' must be > 0 and <= 600, got -1.0"),
    ("fusion_epochs=0", "'fusion_epochs' must be >= 1 and <= 10000, got 0"),
    ("fusion_output_dim=0", "'fusion_output_dim' must be >= 1 and <= 65536, got 0"),
    ("text_backend=bogus", "'text_backend' must be one of auto, torch, torch-fp16, onnx, "
                           "onnx-int8, got 'bogus'"),
    ("image_strategy=spot", "'image_strategy' must be one of SPOT, STANDARD, got 'spot'"),
    # only Vertex GPU types a worker can take one of, or empty
    ("text_accelerator=T4", "'text_accelerator' must be one of '' (empty), NVIDIA_TESLA_T4, "
                            "NVIDIA_TESLA_P4, NVIDIA_TESLA_P100, NVIDIA_TESLA_V100, NVIDIA_L4, "
                            "NVIDIA_TESLA_A100, NVIDIA_A100_80GB, NVIDIA_H100_80GB, got 'T4'"),
    ("text_accelerator=TPU_V3", "'text_accelerator' must be one of '' (empty), NVIDIA_TESLA_T4, "
                                "NVIDIA_TESLA_P4, NVIDIA_TESLA_P100, NVIDIA_TESLA_V100, NVIDIA_L4,"
                                " NVIDIA_TESLA_A100, NVIDIA_A100_80GB, NVIDIA_H100_80GB, got "
                                "'TPU_V3'"),
    ("text_machine_type=n1_standard_4", "'text_machine_type' must be a Vertex AI machine type "
                                        "such as e2-standard-4 (family-series-size), got "
                                        "'n1_standard_4'"),
    # the pairings Vertex allows: a T4 needs n1, GPU machine families need their GPUs
    ("text_accelerator=NVIDIA_TESLA_T4", "'text_accelerator' NVIDIA_TESLA_T4 attaches to n1 "
                                         "machine types only, but text_machine_type is "
                                         "'e2-standard-4' (e.g. text_machine_type=n1-standard-4)"),
    ("image_machine_type=e2-standard-8", "'image_machine_type' 'e2-standard-8' cannot take the "
                                         "image workers' NVIDIA_TESLA_T4: it attaches to n1 "
                                         "machine types only (e.g. n1-standard-4)"),
    ("knn_machine_type=a2-highgpu-1g", "'knn_machine_type' 'a2-highgpu-1g' is a GPU machine "
                                       "type, which does not run without its GPUs; this step "
                                       "takes a CPU machine type (e.g. e2-standard-4)"),
]


@pytest.mark.parametrize("command", ["run-local", "demo"])
@pytest.mark.parametrize("value, message", BAD_VALUES, ids=[v for v, _ in BAD_VALUES])
def test_bad_parameter_value_exits_2_before_anything_runs(command, value, message, tmp_path,
                                                         items_path, capsys, no_pipeline):
    out = tmp_path / "out"
    items = ["--items", str(items_path)] if command == "run-local" else []
    assert main([command, *items, "--output-dir", str(out), "--set", value]) == 2
    err = capsys.readouterr().err
    assert err == f"item-embeddings {command}: error: parameter {message}\n"
    assert not out.exists()  # nothing written: no output directory, no demo catalogue


@pytest.mark.parametrize("command", ["run-local", "demo"])
def test_output_dir_that_is_a_file_exits_2(command, tmp_path, items_path, capsys, no_pipeline):
    out = tmp_path / "out"
    out.write_text("a file")
    items = ["--items", str(items_path)] if command == "run-local" else []
    assert main([command, *items, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"item-embeddings {command}: error: output directory {out} is an existing "
                   "file, not a directory\n")
    assert out.read_text() == "a file"
    assert main([command, *items, "--output-dir", str(out / "sub")]) == 2  # under a file
    assert "cannot be written: Not a directory" in capsys.readouterr().err


def test_read_only_output_dir_exits_2_with_one_line(tmp_path, items_path):
    """A directory without write permission; as root (who ignores permissions) the CLI runs
    without the capability that lets it (setpriv), so the permission bits apply."""
    import os
    import shutil

    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: permissions cannot be enforced")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    done = subprocess.run([*prefix, sys.executable, "-m", "item_embeddings.ops.cli", "run-local",
                           "--items", str(items_path), "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=300)
    out.chmod(0o755)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == (f"item-embeddings run-local: error: output directory {out} cannot "
                           "be written: Permission denied\n")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("command", ["run-local", "demo"])
@pytest.mark.parametrize("case", ["missing", "file", "empty", "partial"])
def test_unusable_previous_uri_exits_2_before_anything_runs(command, case, tmp_path, items_path,
                                                           capsys, no_pipeline):
    """previous_uri that does not exist, is a file, is empty or lacks a step's files: one line,
    exit 2, before any model loads or anything is written."""
    previous = tmp_path / "prev"
    if case == "file":
        previous.write_text("not a folder")
    elif case in ("empty", "partial"):
        previous.mkdir()
        if case == "partial":
            for name in (TXT_ARRAY, TXT_ITEMS, TXT_META):
                (previous / name).write_text("x")
    out = tmp_path / "out"
    items = ["--items", str(items_path)] if command == "run-local" else []
    assert main([command, *items, "--output-dir", str(out),
                 "--set", f"previous_uri={previous}"]) == 2
    err = capsys.readouterr().err
    words = {"missing": f"previous output set not found: {previous} (previous_uri must",
             "file": f"previous output set {previous} is a file (previous_uri must",
             "empty": f"previous output set {previous} is empty or not found (previous_uri",
             "partial": f"previous output set {previous} lacks img.npy, img_items.parquet, "
                        "img_failures.parquet, img_meta.json: not a complete output set "
                        "(previous_uri)"}[case]
    assert err.startswith(f"item-embeddings {command}: error: {words}"), err
    assert len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("line, message", [
    ("previous_uri: 123", "parameter 'previous_uri' expects a string, got 123 (int)"),
    ("publish_uri:", "parameter 'publish_uri' expects a string, got None (null)"),
    ("text_model: [a, b]", "parameter 'text_model' expects a string, got ['a', 'b'] (list)"),
    ("experiment: true", "parameter 'experiment' expects a string, got True (bool)"),
])
def test_yaml_values_of_the_wrong_type_for_strings_exit_2(line, message, tmp_path, items_path,
                                                         capsys, no_pipeline):
    """YAML reads `previous_uri: 123` as a number: refused, not turned into the path "123"."""
    config = tmp_path / "c.yaml"
    config.write_text(f"parameters:\n  {line}\n")
    out = tmp_path / "out"
    assert main(["run-local", "--items", str(items_path), "--output-dir", str(out),
                 "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == (f"item-embeddings run-local: error: {message}; quote it in YAML, or write "
                   "'' for empty\n")
    assert not out.exists()
