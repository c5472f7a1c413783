"""One error root: every exception class the project defines derives from
``errors.ItemEmbeddingsError`` and the command line exits with the status the error carries."""

import ast
import importlib
from pathlib import Path

import pytest

from item_embeddings.errors import (
    EXIT_FAILED,
    EXIT_USAGE,
    ItemEmbeddingsError,
    MissingFileError,
    UsageError,
)
from item_embeddings.ops.cli import exit_code, main

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"item_embeddings": ROOT / "src" / "item_embeddings",
           "item_embeddings.components": ROOT / "components",
           "item_embeddings.pipeline": ROOT / "pipeline"}


def _exception_classes() -> list[type]:
    """Every class defined in the project's sources that is an exception."""
    found = []
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            names = [n.name for n in ast.parse(path.read_text()).body
                     if isinstance(n, ast.ClassDef)]
            if not names:
                continue
            rel = path.relative_to(folder).with_suffix("")
            module = importlib.import_module(
                ".".join([package, *(p for p in rel.parts if p != "__init__")]))
            found += [c for c in (getattr(module, n) for n in names)
                      if isinstance(c, type) and issubclass(c, BaseException)]
    return found


def test_every_project_error_derives_from_the_root():
    classes = _exception_classes()
    assert len(classes) >= 15  # the discovery works (one per concern, at least as many as today)
    assert [c.__qualname__ for c in classes if not issubclass(c, ItemEmbeddingsError)] == []


@pytest.mark.parametrize("cls", _exception_classes(), ids=lambda c: c.__qualname__)
def test_the_cli_maps_each_error_by_its_status(cls):
    assert cls.exit_status in (EXIT_FAILED, EXIT_USAGE)
    try:
        exc = cls("what went wrong")
    except TypeError:  # ImageDecodeError(reason, detail)
        exc = cls("reason", "what went wrong")
    assert exit_code(exc) == cls.exit_status


def test_usage_errors_stay_value_errors():
    """Code that catches bad values (``except ValueError``) keeps catching them."""
    from item_embeddings.config import ConfigError
    from item_embeddings.incremental import PreviousSetError
    from item_embeddings.items import ItemsError

    for cls in (UsageError, ConfigError, ItemsError, PreviousSetError):
        assert issubclass(cls, ValueError) and cls.exit_status == EXIT_USAGE
    assert issubclass(MissingFileError, FileNotFoundError)


def test_a_bug_is_not_mapped():
    assert exit_code(ValueError("a bug")) is None
    assert exit_code(KeyError("x")) is None


def test_unknown_open_clip_model_is_a_usage_error(capsys, monkeypatch, tmp_path):
    """A user mistake that reaches the command line ends with exit status 2 and one line."""
    from item_embeddings.image.encoder import resolve_image_model

    with pytest.raises(UsageError, match="unknown open_clip model 'ViT-Nope'"):
        resolve_image_model("ViT-Nope", "none")
    with pytest.raises(MissingFileError, match="image_model config file not found"):
        resolve_image_model(str(tmp_path / "missing.json"), "none")

    import item_embeddings.ops.local_commands as local_commands

    def estimate_with_a_bad_model(args):
        resolve_image_model("ViT-Nope", "none")

    monkeypatch.setattr(local_commands, "_cmd_estimate", estimate_with_a_bad_model)
    code = main(["estimate", "--items", "10"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("item-embeddings estimate: error: unknown open_clip model 'ViT-Nope'")
    assert "Traceback" not in err
