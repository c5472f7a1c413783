import subprocess
import sys

import pytest

from item_embeddings.ops.cli import build_parser, main


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_console_script_help():
    done = subprocess.run(["item-embeddings", "--help"], capture_output=True, text=True, check=True)
    assert "run-local" in done.stdout and "compile" in done.stdout


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


def test_submit_py_forwards_to_cli():
    done = subprocess.run([sys.executable, "submit.py", "--help"], capture_output=True, text=True)
    # submit arrives with the operations work; until then argparse names the valid commands.
    assert "usage: item-embeddings" in (done.stdout + done.stderr)


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
